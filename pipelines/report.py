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

import base64
import csv
import html
import io
import json
import re
from pathlib import Path

import numpy as np

from fuseseg.data.io import atomic_write_text
from fuseseg.errors import FusesegError
from pipelines.runstate import read_record
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


def write_miou_tables(out_dir: Path, rows: list[dict], class_names: list[str], protocol: str,
                      protocol_dict: dict, gains: list[dict]) -> dict[str, Path]:
    """Write miou.md, miou.csv and miou.json into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"md": out_dir / "miou.md", "csv": out_dir / "miou.csv", "json": out_dir / "miou.json"}
    md = miou_markdown(rows, class_names, protocol)
    if gains:
        md += "\nmIoU gain over the better single modality (paired bootstrap over test images):\n\n"
        md += "| variant | baseline | gain | CI | resamples with gain <= 0 |\n|---|---|---:|---|---:|\n"
        for g in gains:
            md += (f"| {g['variant']} | {g['baseline']} | {g['gain']:+.4f} | "
                   f"[{g['ci_low']:+.4f}, {g['ci_high']:+.4f}] ({int(g['level'] * 100)}%, {g['n_boot']} resamples, "
                   f"{g['n_images']} images) | {g['frac_resamples_gain_le_0']:.3f} |\n")
    atomic_write_text(paths["md"], md)
    buf = io.StringIO()
    w = csv.writer(buf)
    # one header row, then one row per variant: the protocol is a column (and in miou.json), so
    # csv readers and pandas.read_csv see a plain table
    w.writerow(["variant", "seeds"] + class_names + ["miou", "miou_std", "pixel_accuracy", "protocol"])
    for r in rows:
        w.writerow([r["variant"], r["seeds"]] +
                   ["" if r["per_class"][c][0] is None else f"{r['per_class'][c][0]:.6f}" for c in class_names] +
                   [f"{r['miou'][0]:.6f}", f"{r['miou'][1]:.6f}", f"{r['pixel_accuracy'][0]:.6f}", protocol])
    atomic_write_text(paths["csv"], buf.getvalue())
    atomic_write_text(paths["json"], json.dumps({"protocol": protocol_dict, "protocol_text": protocol,
                                                 "classes": class_names, "rows": rows, "gains": gains},
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


# ---------------------------------------------------------------- report
def svg_bar_chart(values: list[tuple[str, float, float]], title: str = "mIoU per input variant") -> str:
    """A small self-contained SVG bar chart of (name, mean, std) with error bars, on a 0..1 axis
    when every value is in it (mIoU: bars of 0.000 must not fill the chart), with its ticks."""
    w, bar, gap, h, top, left = 640, 36, 18, 280, 48, 50
    n = len(values)
    w = max(w, left + n * (bar + gap) + 20)
    vmax = max([m + s for _, m, s in values] + [1e-9])
    vmax = 1.0 if vmax <= 1.0 else vmax
    scale = (h - top - 40) / vmax
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             f'<text x="{left}" y="18" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{h - 40}" x2="{w - 10}" y2="{h - 40}" stroke="#333"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{h - 40}" stroke="#333"/>']
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = h - 40 - tick * vmax * scale
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick * vmax:.2g}</text>')
        if tick:
            parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{w - 10}" y2="{y:.1f}" stroke="#ddd"/>')
    for i, (name, m, s) in enumerate(values):
        x = left + gap + i * (bar + gap)
        y = h - 40 - m * scale
        parts.append(f'<rect x="{x}" y="{y:.1f}" width="{bar}" height="{m * scale:.1f}" fill="#4c78a8"/>')
        if s > 0:
            parts.append(f'<line x1="{x + bar / 2}" y1="{y - s * scale:.1f}" x2="{x + bar / 2}" '
                         f'y2="{y + s * scale:.1f}" stroke="#000"/>')
        parts.append(f'<text x="{x + bar / 2}" y="{y - 4 - s * scale:.1f}" text-anchor="middle">{m:.3f}</text>')
        parts.append(f'<text x="{x + bar / 2}" y="{h - 24}" text-anchor="middle">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def png_data_uri(img: np.ndarray) -> str:
    from fuseseg.data.io import encode_image

    return "data:image/png;base64," + base64.b64encode(encode_image(img)).decode()


def markdown_to_html_table(md: str) -> str:
    """Convert the simple pipe tables written here to HTML (bold marks kept)."""
    out, rows = [], []

    def flush():
        if rows:
            head, body = rows[0], rows[2:]
            t = ["<table>", "<tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in head) + "</tr>"]
            for r in body:
                cells = []
                for c in r:
                    bold = c.startswith("**") and c.endswith("**")
                    c = html.escape(c.strip("*"))
                    cells.append(f"<td><b>{c}</b></td>" if bold else f"<td>{c}</td>")
                t.append("<tr>" + "".join(cells) + "</tr>")
            t.append("</table>")
            out.append("\n".join(t))
            rows.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in line.strip().strip("|").split("|")])
        else:
            flush()
            if line.startswith("#"):
                level = len(line) - len(line.lstrip("#"))
                out.append(f"<h{level}>{html.escape(line.lstrip('#').strip())}</h{level}>")
            elif line.strip():
                out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)


def stage_table(run_dir: Path) -> str:
    """Markdown table of the stage records: seconds and the stage's own peak memory."""
    lines = ["Peak RSS: the peak resident memory of the process that ran the stage, while it ran (a job's "
             "own process under a job executor; \"so far\": the fuseseg process's peak since it started, "
             "where the peak cannot be reset); child processes (torchrun, data loaders) in parentheses when "
             "one of them set a new peak during the stage.", "",
             "| stage | seconds | peak RSS (MiB) |", "|---|---:|---:|"]
    for rec_path in sorted((run_dir / "stages").glob("*.json")):
        rec = read_record(rec_path)
        if rec is None or rec.get("status") != "done":
            continue
        rss = rec.get("peak_rss_mib", "")
        if rss != "" and rec.get("peak_rss_scope") == "process so far":
            rss = f"{rss} so far"
        if rec.get("child_peak_rss_mib") is not None:
            rss = f"{rss} (children {rec['child_peak_rss_mib']})"
        lines.append(f"| {rec.get('key', rec_path.stem)} | {rec.get('seconds', 0.0):.1f} | {rss} |")
    return "\n".join(lines)


def build_report(run_dir: Path, rows: list[dict], seg: dict[str, list[dict]], class_names: list[str],
                 seeds: list[int], scenes: list[tuple[str, list[tuple[str, np.ndarray]]]]) -> tuple[Path, Path]:
    """Assemble and write report.md / report.html of a run folder from its tables (written
    before), metrics, stage records, the figures of :func:`report_plots` and the scene grid."""
    sections = [("Segmentation (mIoU)", (run_dir / "tables" / "miou.md").read_text())]
    mdp = run_dir / "metrics" / "metrics.md"
    if (run_dir / "metrics" / "metrics.json").is_file() and mdp.is_file():
        sections.append(("Fusion quality metrics (test split)", mdp.read_text()))
    sections.append(("Stage times (last run of each stage)", stage_table(run_dir)))
    chart = svg_bar_chart([(r["variant"], r["miou"][0], r["miou"][1]) for r in rows])
    return write_report(run_dir, sections, chart, scenes, report_plots(run_dir, rows, seg, class_names, seeds))


def scene_rows(run_dir: Path, test: dict[str, Path], fused_test: dict[str, Path | None], variants: list[str],
               seed: int, n_scenes: int, ir16: str = "minmax") -> list[tuple[str, list[tuple[str, np.ndarray]]]]:
    """The scene grid: for up to ``n_scenes`` test scenes (night and day alternating) the
    infrared, visible, every fused image (``fused_test``: method -> its test folder), the ground
    truth and each variant's prediction (segmentation ``seed``). ``test``: {ir, vi, labels} folders."""
    from fuseseg.data.io import read_infrared, read_label, read_visible
    from fuseseg.data.pairs import day_or_night, find_pairs, list_images
    from segmentation.palette import colorize

    pairs = find_pairs(test["ir"], test["vi"], test["labels"])
    stems = sorted(pairs.stems)
    night = [s for s in stems if day_or_night(s) == "night"]
    day = [s for s in stems if day_or_night(s) != "night"]
    chosen = [x for pair in zip(night, day) for x in pair][:n_scenes] or stems[:n_scenes]
    listed = {name: list_images(d) if d is not None and Path(d).is_dir() else {} for name, d in fused_test.items()}
    rows = []
    for stem in chosen:
        cols = [("infrared", read_infrared(pairs.ir[stem], ir16)), ("visible", read_visible(pairs.vi[stem]))]
        for name, imgs in listed.items():
            if stem in imgs:
                cols.append((name, read_visible(imgs[stem])))
        cols.append(("ground truth", colorize(read_label(pairs.labels[stem]))))
        for v in variants:
            pred = run_dir / "segment" / v / f"seed{seed}" / "predictions" / f"{stem}.png"
            if pred.is_file():
                cols.append((f"pred {v}", read_visible(pred)))
        rows.append((stem, cols))
    return rows


def report_plots(run_dir: Path, rows: list[dict], seg: dict[str, list[dict]], class_names: list[str],
                 seeds: list[int]) -> list[tuple[str, str, bytes]]:
    """The report's matplotlib figures as (title, file name, PNG bytes): training curves of every
    training found in the run folder, per-class IoU bars, confusion matrices (``seg``: variant ->
    its seeds' eval.json dicts), per-image fusion metric distributions (see
    :mod:`pipelines.figures`)."""
    from pipelines import figures

    fusion_logs = {p.parent.name: figures.read_log(p)
                   for p in sorted((run_dir / "train_fusion").glob("*/log.csv"))}
    seg_logs = {}
    for v in seg:
        for seed in seeds:
            p = run_dir / "segment" / v / f"seed{seed}" / "log.csv"
            if p.is_file():
                seg_logs[f"{v}/seed{seed}"] = figures.read_log(p)
    confusions = {v: np.sum([np.asarray(ev["confusion"]) for ev in evs], axis=0) for v, evs in seg.items()}
    mjson = run_dir / "metrics" / "metrics.json"
    drawn = [("Fusion training curves", "curves_fusion.png", figures.fusion_curves(fusion_logs)),
             ("Segmentation training curves", "curves_segmentation.png", figures.segmentation_curves(seg_logs)),
             ("Per-class IoU per variant", "class_iou.png", figures.class_iou_bars(rows, class_names)),
             ("Confusion matrices (rows normalised; summed over seeds)", "confusion.png",
              figures.confusion_grid(confusions, class_names)),
             ("Fusion quality metrics per test image", "metric_distributions.png",
              figures.metric_distributions(json.loads(mjson.read_text())) if mjson.is_file() else None)]
    return [(t, f, png) for t, f, png in drawn if png is not None]


def figure_name(scene: str, title: str) -> str:
    """``('00161D', 'ground truth')`` -> ``00161D_ground-truth.png``: no spaces or other characters
    that Markdown viewers fail on in an image link."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{scene}_{title}").strip("-") + ".png"


def write_report(run_dir: Path, sections: list[tuple[str, str]], chart_svg: str,
                 figure_rows: list[tuple[str, list[tuple[str, np.ndarray]]]],
                 plots: list[tuple[str, str, bytes]] = ()) -> tuple[Path, Path]:
    """Write report.md and the self-contained report.html (every image embedded; works offline).

    ``sections``: (title, markdown body); ``figure_rows``: (scene name, [(column title, RGB or
    grey uint8 image)]) for the figure grid; ``plots``: (title, file name, PNG bytes) from
    :func:`report_plots`, written to ``figures/`` and embedded in the HTML."""
    from fuseseg.data.io import atomic_write_bytes, write_image

    md = ["# fuseseg report", ""]
    for title, body in sections:
        md += [f"## {title}", "", body, ""]
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(fig_dir / "miou.svg", chart_svg)
    md += ["## Figures", "", "![mIoU per variant](figures/miou.svg)", ""]
    plots_html = []
    for title, name, png in plots:
        atomic_write_bytes(fig_dir / name, png)
        md += [f"### {title}", "", f"![{title}](figures/{name})", ""]
        uri = "data:image/png;base64," + base64.b64encode(png).decode()
        plots_html.append(f"<h3>{html.escape(title)}</h3><img class='plot' src='{uri}' alt='{html.escape(title)}'>")

    grid_html = []
    for scene, cols in figure_rows:
        md.append(f"Scene {scene}: " + ", ".join(f"![{t}](figures/{figure_name(scene, t)})" for t, _ in cols))
        cells = []
        for t, img in cols:
            write_image(fig_dir / figure_name(scene, t), img)
            cells.append(f'<figure><img src="{png_data_uri(img)}"><figcaption>{html.escape(t)}</figcaption></figure>')
        grid_html.append(f"<h3>{html.escape(scene)}</h3><div class='grid'>{''.join(cells)}</div>")
    md_text = "\n".join(md) + "\n"
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    atomic_write_text(md_path, md_text)
    body = "\n".join(f"<h2>{html.escape(t)}</h2>\n{markdown_to_html_table(b)}" for t, b in sections)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fuseseg report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} th{{background:#eee}}
td:first-child,th:first-child{{text-align:left}}
.grid{{display:flex;flex-wrap:wrap;gap:6px}} figure{{margin:0}} img{{max-width:220px;image-rendering:pixelated}}
figcaption{{text-align:center;font-size:12px}} img.plot{{max-width:100%;image-rendering:auto;display:block}}</style></head><body>
<h1>fuseseg report</h1>
{body}
<h2>mIoU per variant</h2>
{chart_svg}
<h2>Figures</h2>
{''.join(plots_html)}
<h2>Test scenes</h2>
{''.join(grid_html)}
</body></html>"""
    atomic_write_text(html_path, page)
    return md_path, html_path


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
