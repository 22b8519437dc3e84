"""``fuseseg check-data ROOT``: validate a data set and print a summary."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from fuseseg.data.pairs import MSRS_CLASSES, Layout, detect_splits, load_split
from fuseseg.data.validate import validate_pairset
from fuseseg.errors import ConfigError
from pipelines.console import console, make_progress


def register(sub) -> None:
    p = sub.add_parser("check-data", help="validate a data set (MSRS layout or ir/ + vi/ pairs) and summarise it",
                       description="Read every image of a data set once, report every problem with the "
                       "file names and the fix, and print pairs per split, sizes, day/night counts and "
                       "the per-class pixel share.")
    p.add_argument("root", type=Path, help="data set root: MSRS layout (train/, test/) or a folder with ir/ and vi/")
    p.add_argument("--num-classes", type=int, default=len(MSRS_CLASSES))
    p.add_argument("--ir16", choices=["minmax", "scale"], default="minmax",
                   help="mapping of 16-bit infrared to 8-bit (default: per-image min-max stretch)")
    p.set_defaults(func=run)


def check_data(root: Path, num_classes: int = 9, ir16: str = "minmax", layout: Layout = Layout()) -> dict:
    """Validate every split of ``root``; returns {split name: SplitSummary}. Raises DataError."""
    out = {}
    for split in detect_splits(root, layout):
        pairs = load_split(root, split, layout)
        with make_progress(transient=True) as prog:
            task = prog.add_task(f"checking {split or root.name}", total=len(pairs))
            out[split or "pairs"] = validate_pairset(pairs, num_classes, ir16,
                                                     progress=lambda t=task: prog.advance(t))
    return out


def run(args) -> int:
    if not 2 <= args.num_classes <= 255:
        raise ConfigError(f"--num-classes {args.num_classes}: give 2..255 classes (label files are 8-bit "
                          "and 255 means ignore); MSRS has 9.")
    summaries = check_data(args.root, args.num_classes, args.ir16)
    table = Table(title=f"data set {args.root}")
    for col in ("split", "pairs", "sizes (HxW)", "day", "night", "other", "grey visible", "labels"):
        table.add_column(col)
    for name, s in summaries.items():
        sizes = ", ".join(f"{h}x{w} ({n})" for (h, w), n in s.sizes.most_common(4))
        if len(s.sizes) > 4:
            sizes += f", ... {len(s.sizes)} sizes"
        table.add_row(name, str(s.pairs), sizes, str(s.day), str(s.night), str(s.other),
                      str(s.visible_grey), "yes" if s.labelled else "no")
    console.print(table)
    labelled = {k: s for k, s in summaries.items() if s.labelled}
    if labelled:
        names = list(MSRS_CLASSES[:args.num_classes]) if args.num_classes <= len(MSRS_CLASSES) else \
            [str(i) for i in range(args.num_classes)]
        ct = Table(title="per-class pixel share (%)")
        ct.add_column("class")
        for k in labelled:
            ct.add_column(k, justify="right")
        for i, cname in enumerate(names + ["ignore (255)"]):
            row = []
            for s in labelled.values():
                total = s.class_pixels.sum()
                row.append(f"{100 * s.class_pixels[i] / total:.2f}" if total else "-")
            ct.add_row(f"{i if i < len(names) else 255} {cname}", *row)
        console.print(ct)
    console.print(f"[green]OK[/]: {sum(s.pairs for s in summaries.values())} pairs, no problems found.")
    return 0
