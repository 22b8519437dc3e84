"""``fuseseg bench [--quick] [--only NAME,...] [--out FILE]``: the benchmarks (same as
``python -m benchmarks``; see benchmarks/__main__.py).

The benchmarks are part of the source checkout, not of the installed package (a wheel puts no
``benchmarks`` package into site-packages): ``fuseseg bench`` finds ``benchmarks/`` beside the
``pipelines`` package it runs from (a checkout, or an editable install of one) or in the current
folder, and imports it from there."""
from __future__ import annotations

import sys
from pathlib import Path


def benchmarks_root() -> Path | None:
    """The folder holding ``benchmarks/`` (the repository root), or None when there is none."""
    for root in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (root / "benchmarks" / "__main__.py").is_file():
            return root
    return None


def _import_benchmarks() -> bool:
    root = benchmarks_root()
    if root is None:
        return False
    if "benchmarks" not in sys.modules and str(root) not in sys.path:
        sys.path.append(str(root))
    return True


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="run the benchmarks: one table + results/benchmarks/<date>.json",
        description="Run the speed/memory benchmarks (python -m benchmarks) and print one table.")
    if not _import_benchmarks():   # installed without the source tree
        p.set_defaults(func=_missing)
        return
    from benchmarks.__main__ import add_arguments

    add_arguments(p)
    p.set_defaults(func=run)


def _missing(args) -> int:
    from fuseseg.errors import ConfigError

    raise ConfigError("fuseseg bench needs the source checkout (the benchmarks/ folder of the repository); "
                      "run it from the repository root, or use `python -m benchmarks` there.")


def run(args) -> int:
    from benchmarks.__main__ import main_args

    return main_args(args, ["fuseseg", "bench"])
