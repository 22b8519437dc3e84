"""``fuseseg bench [--quick] [--only NAME,...] [--out FILE]``: the benchmarks (same as
``python -m benchmarks``; see benchmarks/__main__.py). Needs the source checkout (benchmarks/)."""
from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="run the benchmarks: one table + results/benchmarks/<date>.json",
        description="Run the speed/memory benchmarks (python -m benchmarks) and print one table.")
    try:
        from benchmarks.__main__ import add_arguments
    except ModuleNotFoundError:  # installed without the source tree
        p.set_defaults(func=_missing)
        return
    add_arguments(p)
    p.set_defaults(func=run)


def _missing(args) -> int:
    from fuseseg.errors import ConfigError

    raise ConfigError("fuseseg bench needs the source checkout (the benchmarks/ package); run it from "
                      "the repository root, or use `python -m benchmarks` there.")


def run(args) -> int:
    from benchmarks.__main__ import main_args

    return main_args(args, ["fuseseg", "bench"])
