"""Tables, statistics and the report of an experiment.

* the mIoU table: rows = input variants, columns = per-class IoU and mIoU (mean +- spread over
  segmentation seeds), best per column marked;
* a paired bootstrap over test images for each fused variant's mIoU gain over the better single
  modality;
* ``report.md`` and a self-contained ``report.html`` (inline SVG bar chart, embedded PNG figure
  grid);
* merging the tables of several runs (``fuseseg compare``), refusing runs whose protocols differ.

Every table carries the protocol it was measured under, so two tables are never compared blind.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
from pathlib import Path

import numpy as np

from fusion.data.io import atomic_write_text
from fusion.errors import FusesegError
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
    vals = [getter(r) for r in rows]
    vals = [v for v in vals if v is not None and not np.isnan(v)]
    if not vals:
        return None
    return max(vals) if higher else min(vals)


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
            if v is not None and b is not None and not np.isnan(v) and abs(v - b) < 1e-12:
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
    w.writerow(["# protocol: " + protocol])
    w.writerow(["variant", "seeds"] + class_names + ["miou", "miou_std", "pixel_accuracy"])
    for r in rows:
        w.writerow([r["variant"], r["seeds"]] +
                   ["" if r["per_class"][c][0] is None else f"{r['per_class'][c][0]:.6f}" for c in class_names] +
                   [f"{r['miou'][0]:.6f}", f"{r['miou'][1]:.6f}", f"{r['pixel_accuracy'][0]:.6f}"])
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
        if v is not None and best[i] is not None and not np.isnan(v) and abs(v - best[i]) < 1e-12:
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
    """A small self-contained SVG bar chart of (name, mean, std) with error bars."""
    w, bar, gap, h, top, left = 640, 36, 18, 260, 30, 50
    n = len(values)
    w = max(w, left + n * (bar + gap) + 20)
    vmax = max([m + s for _, m, s in values] + [1e-9])
    scale = (h - top - 40) / vmax
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
             f'<text x="{left}" y="18" font-weight="bold">{html.escape(title)}</text>',
             f'<line x1="{left}" y1="{h - 40}" x2="{w - 10}" y2="{h - 40}" stroke="#333"/>']
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
    from fusion.data.io import encode_image

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


def write_report(run_dir: Path, sections: list[tuple[str, str]], chart_svg: str,
                 figure_rows: list[tuple[str, list[tuple[str, np.ndarray]]]]) -> tuple[Path, Path]:
    """Write report.md and the self-contained report.html.

    ``sections``: (title, markdown body); ``figure_rows``: (scene name, [(column title, RGB or
    grey uint8 image)]) for the figure grid."""
    md = ["# fuseseg report", ""]
    for title, body in sections:
        md += [f"## {title}", "", body, ""]
    fig_dir = run_dir / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(fig_dir / "miou.svg", chart_svg)
    md += ["## Figures", "", "![mIoU per variant](figures/miou.svg)", ""]
    from fusion.data.io import write_image

    grid_html = []
    for scene, cols in figure_rows:
        md.append(f"Scene {scene}: " + ", ".join(f"![{t}](figures/{scene}_{t}.png)" for t, _ in cols))
        cells = []
        for t, img in cols:
            write_image(fig_dir / f"{scene}_{t}.png", img)
            cells.append(f'<figure><img src="{png_data_uri(img)}"><figcaption>{html.escape(t)}</figcaption></figure>')
        grid_html.append(f"<h3>{html.escape(scene)}</h3><div class='grid'>{''.join(cells)}</div>")
    md_text = "\n".join(md) + "\n"
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    atomic_write_text(md_path, md_text)
    body = "\n".join(f"<h2>{html.escape(t)}</h2>\n{markdown_to_html_table(b)}" for t, b in sections)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>fuseseg report</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1400px}} table{{border-collapse:collapse;margin:1em 0}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}} th{{background:#eee}}
.grid{{display:flex;flex-wrap:wrap;gap:6px}} figure{{margin:0}} img{{max-width:220px;image-rendering:pixelated}}
figcaption{{text-align:center;font-size:12px}}</style></head><body>
<h1>fuseseg report</h1>
{body}
<h2>mIoU per variant</h2>
{chart_svg}
<h2>Test scenes</h2>
{''.join(grid_html)}
</body></html>"""
    atomic_write_text(html_path, page)
    return md_path, html_path


# ---------------------------------------------------------------- compare
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
        tables.append((Path(d), json.loads(p.read_text())))
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
    rows, seen = [], {}
    for d, t in tables:
        for r in t["rows"]:
            key = r["variant"]
            if key in seen and seen[key] != d:
                r = dict(r, variant=f"{d.name}:{key}")
            seen.setdefault(key, d)
            rows.append(dict(r, run=str(d)))
    return rows, ref["protocol"], warnings
