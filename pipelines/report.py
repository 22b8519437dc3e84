"""Tables, statistics and the report of an experiment.

* the mIoU table: rows = input variants, columns = per-class IoU and mIoU (mean +- spread over
  segmentation seeds), best per column marked;
* a paired bootstrap over test images for each fused variant's mIoU gain over the better single
  modality;
* ``report.md`` and a self-contained ``report.html`` (inline SVG bar chart, the matplotlib
  figures of :mod:`pipelines.figures` and the scene grid embedded as PNG; works offline);
* merging the tables of several runs (``fuseseg compare``), refusing runs whose protocols differ.

Every table carries the protocol it was measured under, so two tables are never compared blind.
"""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from fuseseg.data.io import atomic_write_text
from fuseseg.errors import FusesegError
from pipelines.report_page import (  # noqa: F401  (the report's page, importable from here as before)
    build_report,
    figure_name,
    markdown_to_html_table,
    png_data_uri,
    report_plots,
    scene_rows,
    stage_table,
    svg_bar_chart,
    write_report,
)
from segmentation.metrics import miou as miou_from_confusion


# ---------------------------------------------------------------- statistics
def bootstrap_gain(per_image: dict[str, np.ndarray], fused: str, singles: tuple[str, str] = ("ir", "vi"),
                   n_boot: int = 2000, seed: int = 0, convention: str = "all",
                   level: float = 0.95) -> dict:
    """Paired bootstrap over test images of ``mIoU(fused) - mIoU(best single modality)``.

    ``per_image[v]`` is an (n_images, C, C) stack of per-image confusion matrices of variant v
    (summed over segmentation seeds), in the same image order for every variant. The better
    single modality is chosen on the whole test set; each bootstrap replicate resamples images
    with replacement (the same images for both variants: paired), sums their confusion matrices
    and recomputes both mIoUs. Returns the observed gain and the percentile interval."""
    base = max(singles, key=lambda v: miou_from_confusion(per_image[v].sum(0), convention))
    a, b = per_image[fused], per_image[base]
    n = a.shape[0]
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot)           # (B, n) resampling weights
    cms_a = np.einsum("bn,nij->bij", counts, a)                              # (B, C, C)
    cms_b = np.einsum("bn,nij->bij", counts, b)
    gains = np.array([miou_from_confusion(x, convention) - miou_from_confusion(y, convention)
                      for x, y in zip(cms_a, cms_b)])
    lo, hi = np.nanpercentile(gains, [100 * (1 - level) / 2, 100 * (1 + level) / 2])
    observed = miou_from_confusion(a.sum(0), convention) - miou_from_confusion(b.sum(0), convention)
    return {"variant": fused, "baseline": base, "gain": observed, "ci_low": float(lo), "ci_high": float(hi),
            "level": level, "n_boot": n_boot, "n_images": int(n),
            # the share of resamples whose gain is <= 0: a description of the bootstrap
            # distribution, not a p-value (no null hypothesis was resampled)
            "frac_resamples_gain_le_0": float(np.mean(gains <= 0))}


# ---------------------------------------------------------------- tables
def _fmt(mean: float | None, std: float | None = None, nd: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "absent"
    s = f"{mean:.{nd}f}"
    if std is not None and std > 0:
        s += f" ± {std:.{nd}f}"
    return s


def miou_rows(seg: dict[str, list[dict]], class_names: list[str]) -> list[dict]:
    """Aggregate per-seed evaluation dicts into one row per variant.

    ``seg[variant]`` = list over seeds of {'per_class_iou': [..C.. floats or None], 'miou': float,
    'pixel_accuracy': float}. Returns rows with mean and std (population, over seeds)."""
    rows = []
    for variant, runs in seg.items():
        per = np.array([[np.nan if v is None else v for v in r["per_class_iou"]] for r in runs], dtype=float)
        mious = np.array([r["miou"] for r in runs], dtype=float)
        acc = np.array([r["pixel_accuracy"] for r in runs], dtype=float)
        with np.errstate(invalid="ignore"):
            row = {"variant": variant, "seeds": len(runs),
                   "per_class": {c: (None if np.isnan(per[:, i]).all() else float(np.nanmean(per[:, i])),
                                     None if np.isnan(per[:, i]).all() else float(np.nanstd(per[:, i])))
                                 for i, c in enumerate(class_names)},
                   "miou": (float(mious.mean()), float(mious.std())),
                   "pixel_accuracy": (float(acc.mean()), float(acc.std()))}
        rows.append(row)
    return rows


def _best(rows: list[dict], getter, higher=True):
    """The best value of a column, or None when nothing is best: no values, every variant
    scores 0.000 as shown (a class no segmenter found), or all of them show the same value."""
    vals = [getter(r) for r in rows]
    vals = [v for v in vals if v is not None and not np.isnan(v)]
    if not vals or all(abs(v) < 5e-4 for v in vals) or (len(vals) > 1 and len({_fmt(v) for v in vals}) == 1):
        return None
    return max(vals) if higher else min(vals)


def _is_best(v: float | None, best: float | None) -> bool:
    """``v`` shows the column's best value at the table's 3 decimals (so equal-looking cells are
    marked alike)."""
    return v is not None and best is not None and not np.isnan(v) and _fmt(v) == _fmt(best)


def miou_markdown(rows: list[dict], class_names: list[str], protocol: str) -> str:
    """Markdown table, best value per column in bold."""
    cols = class_names + ["mIoU", "pixel acc."]
    getters = [(lambda r, c=c: r["per_class"][c][0]) for c in class_names] + \
              [lambda r: r["miou"][0], lambda r: r["pixel_accuracy"][0]]
    best = [_best(rows, g) for g in getters]
    lines = [f"Protocol: {protocol}", "", "| variant | " + " | ".join(cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = []
        for g, b, c in zip(getters, best, cols):
            v = g(r)
            std = (r["per_class"][c][1] if c in r["per_class"] else
                   r["miou"][1] if c == "mIoU" else r["pixel_accuracy"][1])
            s = _fmt(v, std)
            if _is_best(v, b):
                s = f"**{s}**"
            cells.append(s)
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _p(p: float) -> str:
    return "-" if p is None or np.isnan(p) else ("< 0.0001" if p < 1e-4 else f"{p:.3g}")


def _c(v) -> str:
    """A CSV cell: empty for nothing or NaN, else 6 significant digits."""
    return "" if v is None or (isinstance(v, float) and np.isnan(v)) else f"{v:.6g}"


def write_miou_tables(out_dir: Path, rows: list[dict], class_names: list[str], protocol: str,
                      protocol_dict: dict, gains: list[dict], analysis: dict | None = None) -> dict[str, Path]:
    """Write miou.md, miou.csv and miou.json into ``out_dir``. With ``analysis`` (see
    :mod:`pipelines.analysis`) the gain table and the CSV also carry each variant's test against
    the better single modality and its day and night mIoU."""
    from pipelines.analysis import find_pair

    base = (analysis or {}).get("baseline")
    tests = {r["variant"]: find_pair(analysis["pairs"], r["variant"], base)
             for r in rows if analysis and base and r["variant"] != base}
    dn = (analysis or {}).get("day_night", {}).get("rows", {})
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "miou.md", "csv": out_dir / "miou.csv", "json": out_dir / "miou.json"}
    md = miou_markdown(rows, class_names, protocol)
    if gains:
        g0 = gains[0]
        md += (f"\nmIoU gain over the better single modality: paired bootstrap over test images, "
               f"{int(g0['level'] * 100)}% interval from {g0['n_boot']} resamples of {g0['n_images']} images"
               + ("; p: paired permutation test against the better single modality (seeds pooled), Holm over "
                  "all pairs" if tests else "") + ":\n\n")
        extra = " p | p (Holm) | exceeds the noise |" if tests else ""
        md += ("| variant | baseline | gain | CI | resamples with gain <= 0 |" + extra + "\n|---|---|---:|---|---:|"
               + ("---:|---:|---|" if tests else "") + "\n")
        for g in gains:
            md += (f"| {g['variant']} | {g['baseline']} | {g['gain']:+.4f} | "
                   f"[{g['ci_low']:+.4f}, {g['ci_high']:+.4f}] | {g['frac_resamples_gain_le_0']:.3f} |")
            t = tests.get(g["variant"])
            if tests:
                md += (f" {_p(t['pvalue'])} | {_p(t['p_holm'])} | {'yes' if t['exceeds_noise'] else 'no'} |"
                       if t else " - | - | - |")
            md += "\n"
    atomic_write_text(paths["md"], md)
    buf = io.StringIO()
    w = csv.writer(buf)
    # one header row, then one row per variant: the protocol is a column (and in miou.json), so
    # csv readers and pandas.read_csv see a plain table
    w.writerow(["variant", "seeds"] + class_names + ["miou", "miou_std", "pixel_accuracy", "gain_baseline", "gain",
                                                     "gain_ci_low", "gain_ci_high", "gain_ci_level", "p_vs_baseline",
                                                     "p_holm_vs_baseline", "exceeds_noise", "day_miou", "day_miou_std",
                                                     "night_miou", "night_miou_std", "protocol"])
    by_gain = {g["variant"]: g for g in gains}
    for r in rows:
        g, t, d = by_gain.get(r["variant"], {}), tests.get(r["variant"]), dn.get(r["variant"], {})
        w.writerow([r["variant"], r["seeds"]] +
                   ["" if r["per_class"][c][0] is None else f"{r['per_class'][c][0]:.6f}" for c in class_names] +
                   [f"{r['miou'][0]:.6f}", f"{r['miou'][1]:.6f}", f"{r['pixel_accuracy'][0]:.6f}",
                    g.get("baseline", ""), _c(g.get("gain")), _c(g.get("ci_low")), _c(g.get("ci_high")),
                    _c(g.get("level")), _c(t and t["pvalue"]), _c(t and t["p_holm"]),
                    "" if t is None else t["exceeds_noise"], *(_c(x) for x in d.get("day", (None, None))),
                    *(_c(x) for x in d.get("night", (None, None))), protocol])
    atomic_write_text(paths["csv"], buf.getvalue())
    atomic_write_text(paths["json"], json.dumps({"protocol": protocol_dict, "protocol_text": protocol,
                                                 "classes": class_names, "rows": rows, "gains": gains,
                                                 "analysis": analysis},
                                                indent=2))
    return paths


def rich_miou_table(rows: list[dict], class_names: list[str], protocol: str, width: int | None = None):
    """The mIoU table for the terminal, best per column in bold green. When ``width`` (the
    console's) is too narrow for one column per class, it is shown transposed (one column per
    variant); the files always have one row per variant."""
    from rich.table import Table

    getters = [(lambda r, c=c: r["per_class"][c][0]) for c in class_names] + [lambda r: r["miou"][0]]
    labels = class_names + ["mIoU"]
    best = [_best(rows, g) for g in getters]

    def cell(r, i):
        v = getters[i](r)
        s = _fmt(v, r["miou"][1] if i == len(class_names) else None)
        if _is_best(v, best[i]):
            s = f"[bold green]{s}[/]"
        return s

    t = Table(title="Segmentation mIoU per input variant", caption=protocol, caption_justify="left")
    if width is not None and width < 14 + 10 * len(labels):
        t.add_column("class", style="bold")
        for r in rows:
            t.add_column(r["variant"], justify="right")
        for i, name in enumerate(labels):
            t.add_row(name, *(cell(r, i) for r in rows))
        return t
    t.add_column("variant", style="bold")
    for c in labels:
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(r["variant"], *(cell(r, i) for i in range(len(labels))))
    return t


def metrics_markdown(d: dict) -> str:
    """Markdown table of the data-set means in a scorer's metrics.json (best per metric bold)."""
    names, lower = d["metrics"], set(d.get("lower_is_better", []))
    methods = d["methods"]
    best = {}
    for k in names:
        vals = [m["mean"][k] for m in methods.values() if m["mean"].get(k) is not None]
        if vals:
            best[k] = min(vals) if k in lower else max(vals)
    lines = [f"Convention: {d['convention_text']}. Means over {d['n_images']} test images; "
             f"lower is better for {', '.join(sorted(lower))}, higher for the others.", "",
             "| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for name, m in methods.items():
        cells = []
        for k in names:
            v = m["mean"].get(k)
            s = "-" if v is None else f"{v:.4g}"
            if v is not None and k in best and abs(v - best[k]) <= 1e-12 * max(1.0, abs(v)):
                s = f"**{s}**"
            cells.append(s)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"



# ---------------------------------------------------------------- compare
def _pair(v) -> bool:
    return isinstance(v, list) and len(v) == 2 and all(x is None or (isinstance(x, (int, float))
                                                                      and not isinstance(x, bool)) for x in v)


def _miou_table_problem(t) -> str | None:
    if not isinstance(t, dict) or not isinstance(t.get("protocol"), dict) or not isinstance(t.get("rows"), list):
        return "it is not an object with a `protocol` mapping and a `rows` list"
    classes = None
    for i, r in enumerate(t["rows"]):
        if not isinstance(r, dict) or not isinstance(r.get("variant"), str):
            return f"row {i} has no `variant` name"
        if not isinstance(r.get("seeds"), int) or not all(_pair(r.get(k)) for k in ("miou", "pixel_accuracy")):
            return f"row {r['variant']!r} lacks `seeds` or a [mean, std] `miou`/`pixel_accuracy`"
        pc = r.get("per_class")
        if not isinstance(pc, dict) or not all(_pair(v) for v in pc.values()) or (classes is not None and list(pc) != classes):
            return f"row {r['variant']!r} has no `per_class` [mean, std] for the same classes as the others"
        classes = list(pc)
    return None


def _read_miou_table(p: Path) -> dict:
    """``p`` (a run's tables/miou.json) loaded and checked; a FusesegError naming it when damaged."""
    try:
        t = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        problem = f"it is not readable JSON ({str(exc)[:80]})"
    else:
        problem = _miou_table_problem(t)
    if problem is not None:
        raise FusesegError(f"{p} is damaged: {problem}. Rebuild it with `fuseseg run CONFIG --only report` "
                           "in that run folder's experiment, or leave this run out of the comparison.")
    return t


def compare_runs(run_dirs: list[Path], force: bool = False) -> tuple[list[dict], dict, list[str]]:
    """Merge the mIoU tables of several runs. Runs whose protocols differ are refused (with the
    differing keys) unless ``force``. Returns (rows with variant names prefixed by the run name
    when they clash, the shared protocol, warnings)."""
    tables, unique = [], []
    for d in run_dirs:   # a run folder given twice (or by two spellings of its path) is merged once
        if Path(d).resolve() not in {Path(u).resolve() for u in unique}:
            unique.append(d)
    for d in unique:
        p = Path(d) / "tables" / "miou.json"
        if not p.is_file():
            raise FusesegError(f"{d} has no tables/miou.json: it is not a finished fuseseg run folder "
                               "(run `fuseseg run` there first, or check the path).")
        tables.append((Path(d), _read_miou_table(p)))
    ref_dir, ref = tables[0]
    warnings = []
    for d, t in tables[1:]:
        diff = sorted(k for k in set(ref["protocol"]) | set(t["protocol"])
                      if ref["protocol"].get(k) != t["protocol"].get(k))
        if diff:
            msg = (f"protocols differ between {ref_dir} and {d} in: " +
                   ", ".join(f"{k} ({ref['protocol'].get(k)!r} vs {t['protocol'].get(k)!r})" for k in diff))
            if not force:
                raise FusesegError(msg + ". Their mIoUs are not comparable; pass --force to merge anyway "
                                   "(the table will say so).")
            warnings.append(msg)
    classes = {tuple(t["rows"][0]["per_class"]) for _, t in tables if t["rows"]}
    if len(classes) > 1:
        raise FusesegError("the runs' mIoU tables have different classes (" + "; ".join(", ".join(c) for c in classes)
                           + "); compare runs of the same data set only.")
    rows, seen = [], {}
    for d, t in tables:
        for r in t["rows"]:
            key = r["variant"]
            if key in seen and seen[key] != d:
                r = dict(r, variant=f"{d.name}:{key}")
            seen.setdefault(key, d)
            rows.append(dict(r, run=str(d)))
    return rows, ref["protocol"], warnings
