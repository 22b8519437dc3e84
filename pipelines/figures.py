"""The report's figures, drawn with matplotlib (PNG bytes; the report embeds them).

* training curves of every training, read from its ``log.csv``: the fusion trainers (one panel
  per logged loss component, one line per method, phases marked) and the segmenters (loss and,
  where validated, validation mIoU, one line per variant and seed);
* per-class IoU as a heatmap (variants x classes, values written in);
* each fusion quality metric against mIoU (scatter, rank correlations in the titles);
* the class colours of the label images (a legend for the scene grid);
* the confusion matrix of each variant (rows: true class, normalised to 1; summed over seeds);
* per-image distributions of every fusion quality metric per method (box plot + the images as
  points).

matplotlib is a required dependency: the report is written by every ``fuseseg run``, and a report
that silently lost its figures where an optional package is missing would be worse than one more
well-kept wheel. Only the object-oriented API with the Agg canvas is used (no pyplot, no GUI
backend, thread-safe), so it works on headless machines.
"""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np

# log.csv columns that are not loss components
_NOT_LOSSES = {"phase", "epoch", "global_step", "steps", "lr", "images_per_s", "seconds", "val_miou"}


def _figure(w: float, h: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _integer_ticks(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _num(text: str | None) -> float:
    try:
        return float(text) if text not in (None, "") else math.nan
    except ValueError:
        return math.nan


def read_log(path: Path) -> list[dict[str, str]]:
    with Path(path).open(newline="") as f:
        return list(csv.DictReader(f))


def focus_ylim(last_phase: np.ndarray, earlier: np.ndarray, margin: float = 0.1) -> tuple[float, float] | None:
    """y-limits (lo, hi) showing the last phase's values ``last_phase`` with ``margin`` of their span
    on both sides when some value of the earlier phases ``earlier`` lies outside that range
    (e.g. the structure phase's ``total`` is L_rec, a different quantity than the fusion phase's
    total, and would flatten its curve); None when every value fits or nothing is finite."""
    last = last_phase[np.isfinite(last_phase)]
    prev = earlier[np.isfinite(earlier)]
    if not last.size or not prev.size:
        return None
    lo, hi = float(last.min()), float(last.max())
    pad = margin * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-12)
    lo, hi = lo - pad, hi + pad
    if ((prev >= lo) & (prev <= hi)).all():
        return None
    return lo, hi


def fusion_curves(logs: dict[str, list[dict[str, str]]]) -> bytes | None:
    """Loss components per epoch of each fusion training (``{method: log rows}``)."""
    logs = {k: v for k, v in logs.items() if v}
    if not logs:
        return None
    comps: list[str] = []
    for rows in logs.values():
        for c in rows[0]:
            if c not in _NOT_LOSSES and c not in comps and any(math.isfinite(_num(r.get(c))) for r in rows):
                comps.append(c)
    cols = min(4, len(comps))
    nrows = math.ceil(len(comps) / cols)
    fig = _figure(3.2 * cols, 2.4 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
    for ax, comp in zip(axes, comps):
        last_vals, prev_pts = [], []   # (last phase's values; (x, y) of the earlier phases' points)
        for k, (method, rows) in enumerate(logs.items()):
            y = np.array([_num(r.get(comp)) for r in rows])
            x = np.arange(1, len(rows) + 1)
            starts = [i for i in range(1, len(rows)) if rows[i]["phase"] != rows[i - 1]["phase"]]
            cut = starts[-1] if starts else 0
            last_vals.append(y[cut:])
            prev_pts += [(xi, yi, k) for xi, yi in zip(x[:cut], y[:cut]) if np.isfinite(yi)]
            # one line per phase: a phase's losses are not the next phase's (no line across the border)
            for j, (a, b) in enumerate(zip([0, *starts], [*starts, len(rows)])):
                ok = np.isfinite(y[a:b])
                if ok.any():
                    ax.plot(x[a:b][ok], y[a:b][ok], marker="o", ms=3, color=f"C{k}",
                            label=method if j == 0 or not np.isfinite(y[:a]).any() else None)
            for s in starts:
                ax.axvline(s + 0.5, color="#999", lw=0.8, ls="--")
        lim = focus_ylim(np.concatenate(last_vals), np.array([p[1] for p in prev_pts]))
        if lim is not None:   # an earlier phase's points off this scale: at the edge, value written
            ax.set_ylim(*lim)
            for xi, yi, k in prev_pts:
                if not lim[0] <= yi <= lim[1]:
                    top = yi > lim[1]
                    ax.annotate(f"{yi:.3g}", (xi, lim[1] if top else lim[0]), xytext=(4, -9 if top else 3),
                                textcoords="offset points", fontsize=7, color=f"C{k}",
                                annotation_clip=False)
                    ax.plot([xi], [lim[1] if top else lim[0]], marker="^" if top else "v", ms=5,
                            color=f"C{k}", clip_on=False)
        ax.set_xlim(0.5, max(len(r) for r in logs.values()) + 0.5)   # one epoch axis for every panel
        ax.set_title(comp, fontsize=10)
        ax.set_xlabel("epoch (all phases)", fontsize=8)
        _integer_ticks(ax)
        ax.tick_params(labelsize=8)
    for ax in axes[len(comps):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7)
    fig.suptitle("Fusion training (log.csv; dashed: next phase)", fontsize=11)
    return _png(fig)


def segmentation_curves(logs: dict[str, list[dict[str, str]]]) -> bytes | None:
    """Training loss (and validation mIoU where logged) per epoch of each segmenter
    (``{'variant/seedK': log rows}``)."""
    logs = {k: v for k, v in logs.items() if v}
    if not logs:
        return None
    has_val = any(math.isfinite(_num(r.get("val_miou"))) for rows in logs.values() for r in rows)
    fig = _figure(12 if has_val else 8.5, 3.8)
    axes = fig.subplots(1, 2 if has_val else 1, squeeze=False)[0]
    variants = list(dict.fromkeys(name.split("/")[0] for name in logs))   # one colour per variant,
    dashes = ["-", "--", ":", "-."]                                       # one line style per seed
    seen: dict[str, int] = {}
    for name, rows in logs.items():
        variant = name.split("/")[0]
        k = seen[variant] = seen.get(variant, -1) + 1
        kw = {"marker": "o", "ms": 3, "color": f"C{variants.index(variant) % 10}", "ls": dashes[k % 4],
              "label": variant if k == 0 else None}
        x = [int(_num(r["epoch"])) for r in rows]
        axes[0].plot(x, [_num(r.get("loss")) for r in rows], **kw)
        if has_val:
            v = np.array([_num(r.get("val_miou")) for r in rows])
            ok = np.isfinite(v)
            axes[1].plot(np.array(x)[ok], v[ok], **kw)
    axes[0].set(title="segmentation training loss (Dice + CE)", xlabel="epoch", ylabel="loss")
    for ax in axes:
        _integer_ticks(ax)
    if has_val:
        axes[1].set(title="validation mIoU", xlabel="epoch", ylabel="mIoU")
    fig.legend(loc="outside right upper", fontsize=8, title="variant (line style: seed)", title_fontsize=8)
    return _png(fig)


def class_iou_heatmap(rows: list[dict], class_names: list[str]) -> bytes | None:
    """Per-class IoU as a heatmap: one row per variant, one column per class plus mIoU, each cell
    written with its mean over seeds (absent classes blank); sized to its table so the text stays
    at 9-10 pt whatever the number of variants and classes."""
    if not rows:
        return None
    cols = [*class_names, "mIoU"]
    data = np.array([[np.nan if r["per_class"][c][0] is None else r["per_class"][c][0] for c in class_names]
                     + [r["miou"][0]] for r in rows], dtype=float)
    fig = _figure(max(6.0, 0.85 * len(cols) + 2.2), max(2.6, 0.42 * len(rows) + 1.6))
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(data), vmin=0, vmax=1, cmap="viridis", aspect="auto")
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            if np.isfinite(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=9,
                        color="white" if data[i, j] < 0.6 else "black",
                        fontweight="bold" if j == len(class_names) else "normal")
    ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right", fontsize=10)
    ax.set_yticks(range(len(rows)), [r["variant"] for r in rows], fontsize=10)
    ax.axvline(len(class_names) - 0.5, color="white", lw=3)
    ax.set_title("Per-class IoU per input variant (mean over seeds; blank: class absent)", fontsize=11)
    fig.colorbar(im, ax=ax, shrink=0.9, label="IoU")
    return _png(fig)


def _corr_text(c: dict) -> str:
    if not np.isfinite(c["statistic"]):
        return "n/a"
    return f"{c['statistic']:+.2f} (p {c['pvalue']:.2g})"


def metric_scatter(correlation: dict, miou_sd: dict[str, float]) -> bytes | None:
    """One panel per fusion quality metric: its test-set mean (x) against the mean mIoU over seeds
    (y, error bar: sd over seeds) of each fused variant (one colour and marker per variant, one
    legend), the rank correlations in the title (``correlation``:
    :func:`pipelines.analysis.metric_correlations`)."""
    from matplotlib.ticker import MaxNLocator

    results = [r for r in correlation.get("results", []) if r["x"]]
    if not results:
        return None
    names = list(dict.fromkeys(v for r in results for v in r["x"]))
    style = {v: (f"C{i % 10}", "osD^vP*Xh<>"[i % 11]) for i, v in enumerate(names)}
    cols = min(3, len(results))
    nrows = math.ceil(len(results) / cols)
    fig = _figure(3.3 * cols + 1.6, 2.8 * nrows + 0.5)
    axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
    for ax, r in zip(axes, results):
        for v in r["x"]:
            colour, marker = style[v]
            ax.errorbar([r["x"][v]], [r["y"][v]], yerr=[miou_sd.get(v, 0.0)], fmt=marker, ms=6, capsize=3,
                        color=colour, label=v)
        ax.set_title(f"{r['metric']}{' (lower is better)' if r['lower_is_better'] else ''}, n {r['spearman']['n']}\n"
                     f"rho {_corr_text(r['spearman'])}, tau {_corr_text(r['kendall'])}", fontsize=9)
        ax.tick_params(labelsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(5))
        ax.set_ylabel("mIoU", fontsize=8)
        ax.margins(x=0.12, y=0.15)
    for ax in axes[len(results):]:
        ax.set_visible(False)
    handles = [axes[0].errorbar([], [], yerr=[], fmt=style[v][1], color=style[v][0], ms=6)[0] for v in names]
    fig.legend(handles, names, loc="outside right upper", fontsize=9, title="fused variant", title_fontsize=9)
    fig.suptitle("Fusion quality (x) against segmentation mIoU (y; bars: sd over seeds) per fused variant",
                 fontsize=11)
    return _png(fig)


def class_legend(class_names: list[str], colours: np.ndarray) -> bytes:
    """The colours of the label and prediction images, one swatch per class, in one or two rows."""
    from matplotlib.patches import Patch

    per_row = min(len(class_names), 9)
    fig = _figure(min(12.0, 1.1 * per_row + 0.3), 0.35 + 0.3 * math.ceil(len(class_names) / per_row))
    handles = [Patch(facecolor=np.asarray(c) / 255.0, edgecolor="#444", label=n) for n, c in zip(class_names, colours)]
    fig.legend(handles=handles, loc="center", ncols=per_row, fontsize=9, frameon=False, handlelength=1.4,
               columnspacing=1.0)
    return _png(fig)


def confusion_grid(confusions: dict[str, np.ndarray], class_names: list[str]) -> bytes | None:
    """One row-normalised confusion matrix per variant (rows: true class, columns: predicted)."""
    if not confusions:
        return None
    n = len(confusions)
    cols = min(3, n)
    nrows = math.ceil(n / cols)
    fig = _figure(4.2 * cols, 4.0 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
    im = None
    for ax, (variant, cm) in zip(axes, confusions.items()):
        cm = np.asarray(cm, dtype=float)
        totals = cm.sum(axis=1, keepdims=True)
        norm = np.divide(cm, totals, out=np.zeros_like(cm), where=totals > 0)
        im = ax.imshow(norm, vmin=0, vmax=1, cmap="viridis")
        ax.set_title(variant, fontsize=10)
        ticks = np.arange(len(class_names))
        ax.set_xticks(ticks, class_names, rotation=90, fontsize=7)
        ax.set_yticks(ticks, class_names, fontsize=7)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
    for ax in axes[n:]:
        ax.set_visible(False)
    if im is not None:
        fig.colorbar(im, ax=list(axes[:n]), shrink=0.8, label="share of the true class's pixels")
    return _png(fig)


def metric_distributions(metrics_json: dict) -> bytes | None:
    """Per metric, the distribution over test images of each method (box + points)."""
    methods = metrics_json.get("methods", {})
    names = metrics_json.get("metrics", [])
    if not methods or not names:
        return None
    lower = set(metrics_json.get("lower_is_better", []))
    cols = min(5, len(names))
    nrows = math.ceil(len(names) / cols)
    fig = _figure(2.9 * cols, 2.6 * nrows)
    axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
    labels = list(methods)
    rng = np.random.default_rng(0)   # fixed jitter: the same figure every time
    for ax, metric in zip(axes, names):
        data = []
        for m in labels:
            vals = np.array([np.nan if v.get(metric) is None else v[metric]
                             for v in methods[m]["per_image"].values()], dtype=float)
            data.append(vals[np.isfinite(vals)])
        ax.boxplot(data, showfliers=False, widths=0.6)
        for i, vals in enumerate(data, start=1):
            ax.plot(i + rng.uniform(-0.15, 0.15, len(vals)), vals, "o", ms=2.5, alpha=0.6, color="#d62728")
        ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right", fontsize=8)
        ax.set_title(f"{metric} ({'lower' if metric in lower else 'higher'} is better)", fontsize=9)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    fig.suptitle(f"Fusion quality metrics per test image ({metrics_json.get('n_images', '?')} images)",
                 fontsize=11)
    return _png(fig)
