"""``fuseseg metrics``: score fused images with the fusion quality metrics.

    fuseseg metrics --ir DIR --vi DIR --fused NAME=DIR [--fused NAME=DIR ...] [--out DIR]
                    [--preset reference|sspfusion|tang] [--mi-unit nats|bits]
                    [--ag-convention reference|matlab] [--metrics EN,MI,...] [--workers N]

Prints a table of the mean of every metric per method (best value marked, the convention
written under it) and, with ``--out``, writes metrics.csv and metrics.json there.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from fuseseg.data.paths import check_disjoint
from fuseseg.errors import ConfigError
from pipelines.runstate import folder_lock


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "metrics", help="score fused images with the fusion quality metrics (EN ... Nabf)",
        description="Score fused images against their infrared/visible sources with the 13 fusion "
        "quality metrics (reference conventions of the CDDFuse evaluator by default; the formula "
        "and convention of each metric: `python -m pydoc fusion.metrics`). Files are matched by name "
        "across all folders.")
    p.add_argument("--ir", required=True, type=Path, metavar="DIR", help="infrared images")
    p.add_argument("--vi", required=True, type=Path, metavar="DIR", help="visible images")
    p.add_argument("--fused", required=True, action="append", metavar="NAME=DIR",
                   help="a method's fused images (repeat for several methods)")
    p.add_argument("--out", type=Path, metavar="DIR", help="write metrics.csv and metrics.json here")
    p.add_argument("--preset", default="reference", choices=["reference", "sspfusion", "tang"],
                   help="convention preset (default: reference; sspfusion = reference with MI in bits)")
    p.add_argument("--mi-unit", choices=["nats", "bits"], help="override the MI unit")
    p.add_argument("--ag-convention", choices=["reference", "matlab"],
                   help="AG divisor: MN (reference) or (M-1)(N-1) (MATLAB)")
    p.add_argument("--metrics", metavar="LIST", help="comma-separated subset, e.g. EN,MI,Qabf")
    p.add_argument("--workers", type=int, metavar="N", help="threads (default: all cores)")
    p.set_defaults(func=run)


def parse_fused(items: list[str]) -> dict[str, Path]:
    """['name=dir', ...] -> {name: Path(dir)}; ConfigError on a malformed or repeated name."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        name, folder = name.strip(), folder.strip()
        if not sep or not name or not folder:
            raise ConfigError(f"--fused {item!r}: expected NAME=DIR, e.g. --fused sspfusion=out/fused")
        if name in out:
            raise ConfigError(f"--fused: method name {name!r} given twice; give each folder its own name")
        out[name] = Path(folder)
    return out


def run(args: argparse.Namespace) -> int:
    from fusion.metrics import Convention
    from fusion.scoring import results_table, score_folders
    from pipelines.commands.common import out_folder
    from pipelines.console import console, make_progress

    out_folder(args.out)
    fused = parse_fused(args.fused)
    check_disjoint(args.out, {"--ir": args.ir, "--vi": args.vi, **{f"--fused {k}": v for k, v in fused.items()}},
                   "--out")
    convention = Convention.preset(args.preset)
    changes = {}
    if args.mi_unit:
        changes["mi_unit"] = args.mi_unit
    if args.ag_convention:
        changes["ag"] = args.ag_convention
    convention = convention.with_options(**changes)
    metrics = None
    if args.metrics:
        metrics = [m for m in args.metrics.split(",") if m.strip()]
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"--workers {args.workers}: needs at least 1 thread")
    try:
        from fusion.metrics import resolve_metrics
        resolve_metrics(metrics)
    except ValueError as exc:
        raise ConfigError(f"--metrics: {exc}") from None

    with folder_lock(args.out, "fuseseg metrics --out"), make_progress(transient=True) as bar:
        task = bar.add_task("scoring", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        result = score_folders(args.ir, args.vi, fused, out_dir=args.out, workers=args.workers,
                               conventions=convention, metrics=metrics, progress=progress)
    console.print(results_table(result))
    for kind, path in result.files.items():
        console.print(f"wrote {kind.upper()}: {path}", highlight=False)
    return 0
