"""The report's page: ``report.md`` and a self-contained ``report.html`` (every image embedded;
works offline) of a run folder, assembled from the tables, the analysis
(:mod:`pipelines.analysis`, worded by :mod:`pipelines.report_text`), the matplotlib figures of
:mod:`pipelines.figures`, an SVG chart of the mIoU with error bars and the scene grid.

Order: the headline, the protocol, the mIoU table, the pairwise tests, day and night, fusion
quality against mIoU, the fusion metrics, the exported tables, the stage times, the figures, the
test scenes (with the class colours).
"""
from __future__ import annotations

import base64
import html
import json
import re
from pathlib import Path

import numpy as np

from fuseseg.data.io import atomic_write_text
from pipelines.runstate import read_record

# a section: (title, Markdown body, figures shown after it: (title, file name, PNG bytes or SVG text))
Section = tuple[str, str, list[tuple[str, str, bytes | str]]]


def svg_bar_chart(values: list[tuple[str, float, float]], title: str = "mIoU per input variant",
                  note: str = "") -> str:
    """A self-contained SVG bar chart of (name, mean, sd) with error bars (± sd), on a 0..1 axis
    when every value is in it (mIoU: bars of 0.000 must not fill the chart), with its ticks, the
    names slanted under the bars and ``note`` (what the error bars are) under the title."""
    bar, gap, h, top, left, bottom = 40, 22, 340, 56, 50, 90
    n = len(values)
    w = max(640, left + n * (bar + gap) + 40)
    vmax = max([m + s for _, m, s in values] + [1e-9])
    vmax = 1.0 if vmax <= 1.0 else vmax
    base = h - bottom
    scale = (base - top) / vmax
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             f'<text x="{left}" y="18" font-weight="bold" font-size="14">{html.escape(title)}</text>',
             f'<text x="{left}" y="36" fill="#555">{html.escape(note)}</text>',
             f'<line x1="{left}" y1="{base}" x2="{w - 10}" y2="{base}" stroke="#333"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{base}" stroke="#333"/>']
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = base - tick * vmax * scale
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{tick * vmax:.2g}</text>')
        if tick:
            parts.append(f'<line x1="{left}" y1="{y:.1f}" x2="{w - 10}" y2="{y:.1f}" stroke="#ddd"/>')
    for i, (name, m, s) in enumerate(values):
        x = left + gap + i * (bar + gap)
        y = base - m * scale
        cx = x + bar / 2
        parts.append(f'<rect x="{x}" y="{y:.1f}" width="{bar}" height="{m * scale:.1f}" fill="#4c78a8"/>')
        if s > 0:
            y0, y1 = y - s * scale, min(base, y + s * scale)
            parts.append(f'<path d="M{cx - 6},{y0:.1f}H{cx + 6}M{cx},{y0:.1f}V{y1:.1f}M{cx - 6},{y1:.1f}H{cx + 6}" '
                         'stroke="#000" stroke-width="1.5" fill="none"/>')
        parts.append(f'<text x="{cx}" y="{y - 5 - s * scale:.1f}" text-anchor="middle">{m:.3f}</text>')
        parts.append(f'<text x="{cx + 4}" y="{base + 14}" text-anchor="end" '
                     f'transform="rotate(-35 {cx + 4} {base + 14})">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def png_data_uri(img: np.ndarray) -> str:
    from fuseseg.data.io import encode_image

    return "data:image/png;base64," + base64.b64encode(encode_image(img)).decode()


def _inline(text: str) -> str:
    """Escaped text with the Markdown used here: ``**bold**``, ```code```, ``\\*``."""
    s = html.escape(text.replace("\\*", "\x00"))
    s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
    s = re.sub(r"`([^`]+)`", r"<code>\1</code>", s)
    return s.replace("\x00", "*")


_NUMERIC = re.compile(r"[-+<]?\s*[\d.]+(e-?\d+)?( ± [\d.]+)?|-|")   # a number, "< 0.0001", "0.4 ± 0.1", "-", ""


def markdown_to_html_table(md: str) -> str:
    """Convert the simple Markdown written here to HTML: pipe tables (a cell in ``**`` bold),
    ``#`` headings, ``- `` bullet lists, paragraphs with ``**bold**`` and ```code```."""
    out, rows, items = [], [], []

    def flush():
        if rows:
            head, body = rows[0], rows[2:]
            t = ["<table>", "<tr>" + "".join(f"<th>{_inline(c)}</th>" for c in head) + "</tr>"]
            for r in body:
                t.append("<tr>" + "".join(f"<td>{_inline(c)}</td>" if _NUMERIC.fullmatch(c.strip("*\\ "))
                                          else f"<td class='t'>{_inline(c)}</td>" for c in r) + "</tr>")
            t.append("</table>")
            out.append("<div class='scroll'>" + "\n".join(t) + "</div>")
            rows.clear()
        if items:
            out.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line.strip().strip("|"))])
            continue
        if line.startswith("- "):
            items.append(line[2:])
            continue
        flush()
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line.lstrip('#').strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
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
        lines.append(f"| {rec['key']} | {rec['seconds']:.1f} | {rss} |")
    return "\n".join(lines)


def _without_protocol_line(md: str) -> str:
    """miou.md without its first ``Protocol: ...`` line (the report has its own protocol section)."""
    return "\n".join(ln for ln in md.splitlines() if not ln.startswith("Protocol: ")).strip() + "\n"


def build_report(run_dir: Path, rows: list[dict], seg: dict[str, list[dict]], class_names: list[str],
                 seeds: list[int], scenes: list[tuple[str, list[tuple[str, np.ndarray]]]],
                 analysis: dict | None = None, protocol_md: str = "") -> tuple[Path, Path]:
    """Assemble and write report.md / report.html of a run folder from its tables (written
    before: ``tables/miou.md`` and the files of :mod:`pipelines.report_tables`), the
    ``analysis`` (:func:`pipelines.analysis.analyse`), the protocol as Markdown, metrics, stage
    records, the figures of :func:`report_plots` and the scene grid."""
    from pipelines import figures
    from pipelines import report_text as rt

    a = analysis or {}
    k = a.get("max_seeds", max((r["seeds"] for r in rows), default=1))
    note = (f"error bars: ± sd over {k} seeds" if k > 1 else
            "one seed: no error bars (the spread over seeds is unmeasured)")
    chart = svg_bar_chart([(r["variant"], r["miou"][0], r["miou"][1]) for r in rows], note=note)
    # the per-class table of miou.md (its gain table is in the summary above it)
    miou_md = _without_protocol_line((run_dir / "tables" / "miou.md").read_text()).split("\nmIoU gain over")[0]
    warn = rt.seed_warning(a) if a else ""
    gains = (json.loads((run_dir / "tables" / "miou.json").read_text()).get("gains", [])
             if (run_dir / "tables" / "miou.json").is_file() else [])
    if a:
        miou_md = (rt.summary_markdown(rows, gains, a) + "\n\nPer class (IoU, mean ± sd over seeds; bold: the "
                   "best of a column):\n\n" + miou_md)
    sections: list[Section] = []
    if a:
        sections.append(("Headline", rt.headline_markdown(a), []))
    if protocol_md:
        sections.append(("Protocol", protocol_md, []))
    sections.append(("Segmentation (mIoU)", (warn + "\n\n" if warn else "") + miou_md,
                     [("mIoU per variant", "miou.svg", chart)]))
    if a:
        sections.append(("Which differences exceed the noise", rt.vs_baseline_markdown(a) + "\n\n"
                         + rt.pair_matrix_markdown(a), []))
        sections.append(("Day and night", rt.day_night_markdown(a["day_night"], a["variants"]), []))
        scatter = figures.metric_scatter(a["correlation"], {r["variant"]: r["miou"][1] for r in rows})
        sections.append(("Fusion quality against segmentation", rt.correlation_markdown(a["correlation"]),
                         [("Fusion quality metric against mIoU per fused variant", "metric_vs_miou.png", scatter)]
                         if scatter else []))
    mdp = run_dir / "metrics" / "metrics.md"
    if (run_dir / "metrics" / "metrics.json").is_file() and mdp.is_file():
        sections.append(("Fusion quality metrics (test split)", mdp.read_text(), []))
    exported = sorted(p.name for p in (run_dir / "tables").glob("*") if p.suffix in (".tex", ".csv", ".json"))
    sections.append(("Tables for a paper", "In `tables/` (LaTeX with booktabs; CSV with the gains, intervals "
                     "and tests): " + ", ".join(f"`{n}`" for n in exported) + ".", []))
    sections.append(("Stage times (last run of each stage)", stage_table(run_dir), []))
    legend = figures.class_legend(class_names, _palette(len(class_names)))
    return write_report(run_dir, sections, scenes, report_plots(run_dir, rows, seg, class_names, seeds), legend)


def _palette(n: int) -> np.ndarray:
    from segmentation.palette import palette

    return palette(n)


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
    training found in the run folder, the per-class IoU heatmap, confusion matrices (``seg``:
    variant -> its seeds' eval.json dicts), per-image fusion metric distributions (see
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
             ("Per-class IoU per variant", "class_iou.png", figures.class_iou_heatmap(rows, class_names)),
             ("Confusion matrices (rows normalised; summed over seeds)", "confusion.png",
              figures.confusion_grid(confusions, class_names)),
             ("Fusion quality metrics per test image", "metric_distributions.png",
              figures.metric_distributions(json.loads(mjson.read_text())) if mjson.is_file() else None)]
    return [(t, f, png) for t, f, png in drawn if png is not None]


def figure_name(scene: str, title: str) -> str:
    """``('00161D', 'ground truth')`` -> ``00161D_ground-truth.png``: no spaces or other characters
    that Markdown viewers fail on in an image link."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", f"{scene}_{title}").strip("-") + ".png"


def _figure_html(title: str, data: bytes | str) -> str:
    if isinstance(data, str):   # SVG text, inline
        return f"<figure class='chart'>{data}</figure>"
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    return f"<h3>{html.escape(title)}</h3><img class='plot' src='{uri}' alt='{html.escape(title)}'>"


STYLE = """body{font-family:sans-serif;margin:2em auto;max-width:1400px;padding:0 1.5em;line-height:1.45;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
.headline{font-size:1.12em;background:#f3f6fb;border-left:5px solid #4c78a8;padding:.7em 1em}
table{border-collapse:collapse;margin:.8em 0;font-size:14px} .scroll{overflow-x:auto;max-width:100%}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;white-space:nowrap} th{background:#eee;text-align:center}
td:first-child,th:first-child,td.t{text-align:left} code{background:#f2f2f2;padding:0 3px}
.grid{display:flex;flex-wrap:wrap;gap:6px} figure{margin:0} .grid img{width:200px;image-rendering:pixelated}
figcaption{text-align:center;font-size:12px} img.plot{max-width:100%;height:auto;display:block}
figure.chart{overflow-x:auto;max-width:100%} img.legend{max-width:100%;display:block;margin:.5em 0}"""


def write_report(run_dir: Path, sections: list[Section],
                 figure_rows: list[tuple[str, list[tuple[str, np.ndarray]]]],
                 plots: list[tuple[str, str, bytes]] = (), legend: bytes | None = None) -> tuple[Path, Path]:
    """Write report.md and the self-contained report.html (every image embedded; works offline).

    ``sections``: (title, Markdown body, figures after it: (title, file name, PNG bytes or SVG
    text)); the first, when titled ``Headline``, opens the page as a highlighted paragraph.
    ``figure_rows``: (scene name, [(column title, RGB or grey uint8 image)]) for the scene grid,
    with the class colours ``legend`` (PNG) above it; ``plots``: (title, file name, PNG bytes) from
    :func:`report_plots`. Every figure is also written to ``figures/``."""
    from fuseseg.data.io import atomic_write_bytes, write_image

    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)

    def save(name: str, data: bytes | str) -> None:
        (atomic_write_text if isinstance(data, str) else atomic_write_bytes)(fig_dir / name, data)

    md, body = ["# fuseseg report", ""], []
    for title, text, figs in sections:
        md += [f"## {title}", "", text, ""]
        inner = markdown_to_html_table(text)
        body.append(f"<div class='headline'>{inner}</div>" if title == "Headline"
                    else f"<h2>{html.escape(title)}</h2>\n{inner}")
        for ftitle, name, data in figs:
            save(name, data)
            md += [f"![{ftitle}](figures/{name})", ""]
            body.append(_figure_html(ftitle, data))
    md += ["## Figures", ""]
    body.append("<h2>Figures</h2>")
    for title, name, png in plots:
        save(name, png)
        md += [f"### {title}", "", f"![{title}](figures/{name})", ""]
        body.append(_figure_html(title, png))
    if figure_rows:
        md += ["## Test scenes", ""]
        body.append("<h2>Test scenes</h2>")
        if legend is not None:
            save("class_colours.png", legend)
            md += ["Class colours of the ground truth and the predictions:", "",
                   "![class colours](figures/class_colours.png)", ""]
            body.append("<p>Class colours of the ground truth and the predictions:</p><img class='legend' src='"
                        + "data:image/png;base64," + base64.b64encode(legend).decode() + "' alt='class colours'>")
    for scene, cols in figure_rows:
        md.append(f"Scene {scene}: " + ", ".join(f"![{t}](figures/{figure_name(scene, t)})" for t, _ in cols))
        cells = []
        for t, img in cols:
            write_image(fig_dir / figure_name(scene, t), img)
            cells.append(f'<figure><img src="{png_data_uri(img)}"><figcaption>{html.escape(t)}</figcaption></figure>')
        body.append(f"<h3>{html.escape(scene)}</h3><div class='grid'>{''.join(cells)}</div>")
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    atomic_write_text(md_path, "\n".join(md) + "\n")
    page = ("<!doctype html><html><head><meta charset=\"utf-8\"><meta name=\"viewport\" "
            "content=\"width=device-width, initial-scale=1\"><title>fuseseg report</title>"
            f"<style>{STYLE}</style></head><body>\n<h1>fuseseg report</h1>\n" + "\n".join(body) + "\n</body></html>")
    atomic_write_text(html_path, page)
    return md_path, html_path
