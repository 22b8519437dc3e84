"""The ``fuseseg`` command line: a thin layer over the stage functions.

Each sub-command lives in its own module under ``pipelines/commands/`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed args,
returns an exit code). Add a module to ``COMMANDS`` to make it appear in ``fuseseg --help``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = [
    "pipelines.commands.data",
    "pipelines.commands.metrics",
    "pipelines.commands.synthetic",
    "pipelines.commands.fusion",
    "pipelines.commands.segment",
    "pipelines.commands.run",
    "pipelines.commands.status",
    "pipelines.commands.bench",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuseseg",
        description="Does this infrared-visible fusion method help segmentation? "
        "Train, fuse, segment and compare with one command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # pragma: no cover - only while a command is being written
            if exc.name != name:
                raise
            continue
        module.register(sub)
    return parser


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse ``argv``, accepting ``key=value`` overrides anywhere on the line (also after an
    option: ``fuseseg run CONFIG --only data name=x``) for the commands that take overrides."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        settings = [x for x in extra if "=" in x and not x.startswith("-")]
        if len(settings) < len(extra) or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*(args.overrides or []), *settings]
    return args


def main(argv: list[str] | None = None) -> int:
    from fusion.errors import FusesegError
    from pipelines.console import console

    parser = build_parser()
    args = parse_args(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if argv is None or not argv else 2
    try:
        return int(args.func(args) or 0)
    except FusesegError as exc:
        from rich.markup import escape

        # escaped: messages name keys like fusion[name].checkpoint, which rich would eat as markup
        console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
        return 2
    except KeyboardInterrupt:
        console.print("[yellow]interrupted.[/] Every file written so far is complete (checkpoints "
                      "included). To resume, run the same command again: finished stages are "
                      "skipped and training continues from its last checkpoint (for `train-fusion` "
                      "and `segment train` add --resume).", highlight=False)
        return 130


if __name__ == "__main__":
    sys.exit(main())
