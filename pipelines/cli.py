"""The ``fuseseg`` command line: a thin layer over the stage functions.

Each sub-command lives in its own module under ``pipelines/commands/`` and exposes
``register(subparsers)``, which adds its parser and sets ``func`` (called with the parsed args,
returns an exit code). Add a module to ``COMMANDS`` to make it appear in ``fuseseg --help``.
"""
from __future__ import annotations

import argparse
import errno
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
    "pipelines.commands.info",
]


def version_text() -> str:
    """``fuseseg X.Y.Z`` (the installed distribution's version) and where it is imported from."""
    from importlib.metadata import PackageNotFoundError, version
    from pathlib import Path

    try:
        v = version("fuseseg")
    except PackageNotFoundError:
        v = "(not installed; running from a source tree)"
    return f"fuseseg {v} ({Path(__file__).resolve().parent.parent})"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fuseseg",
        description="Does this infrared-visible fusion method help segmentation? "
        "Train, fuse, segment and compare with one command.",
    )
    parser.add_argument("--version", action="version", version=version_text())
    parser.add_argument("--traceback", action="store_true",
                        help="show the Python traceback of an unexpected error (accepted anywhere on the line)")
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


def _os_error_line(exc: OSError) -> str:
    """One line for a failed file operation: the file, what happened, and the fix."""
    name = exc.filename if exc.filename is not None else "a file"
    if exc.filename2 is not None:
        name = f"{name} -> {exc.filename2}"
    fixes = {
        errno.EACCES: "make it writable (chmod/chown), or choose another folder (--out, results_dir=...)",
        errno.EPERM: "make it writable (chmod/chown), or choose another folder (--out, results_dir=...)",
        errno.EROFS: "it is on a read-only file system; choose a folder on a writable disk (--out, "
                     "results_dir=...)",
        errno.ENOSPC: "the disk is full; free some space or choose a folder on another disk (--out, "
                      "results_dir=...), then run the same command again (finished files are kept)",
        errno.EDQUOT: "the disk quota is exceeded; free some space or choose another folder (--out, "
                      "results_dir=...)",
        errno.EEXIST: "a file of that name is in the way of a folder; give another path or remove it",
        errno.ENOTDIR: "a file is in the way where a folder is needed; give a folder path",
        errno.EISDIR: "it is a folder where a file is needed; give a file path",
        errno.ENOENT: "it does not exist; check the path",
    }
    fix = fixes.get(exc.errno, "check the path and its permissions")
    return f"cannot use {name}: {exc.strerror or exc}; {fix}."


def _error_line(exc: BaseException) -> tuple[str, int]:
    """(message, exit code) for an exception that reached the top: 2 for usage/config mistakes,
    1 for everything else."""
    from fuseseg.errors import ConfigError, FusesegError

    if isinstance(exc, ConfigError):
        return str(exc), 2
    if isinstance(exc, FusesegError):
        return str(exc), 1
    if isinstance(exc, OSError):
        return _os_error_line(exc), 1
    if isinstance(exc, MemoryError) or (isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)):
        first = (str(exc).strip().splitlines() or ["MemoryError"])[0][:200]
        return (f"out of CPU memory ({first}); lower the batch sizes (fuse_batch_size, fusion_train.batch_size, "
                "segmentation.batch_size) or the image/crop size, or use a machine with more memory."), 1
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return (f"unexpected {type(exc).__name__}: {first} (a bug in fuseseg or in a plug-in). Rerun with "
            f"--traceback (e.g. fuseseg --traceback run ...) to see where it happened, and report it."), 1


def main(argv: list[str] | None = None) -> int:
    """The one top-level handler: every error ends as one line on stderr naming the file or key
    and the fix (exit 2 for usage and config mistakes, 1 for the others); ``--traceback``
    (anywhere on the line) shows the Python traceback of an unexpected error instead."""
    from rich.markup import escape

    from pipelines.console import err_console

    argv = list(sys.argv[1:] if argv is None else argv)
    show_traceback = "--traceback" in argv
    argv = [a for a in argv if a != "--traceback"]
    parser = build_parser()
    args = parse_args(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if not argv else 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        err_console.print("[yellow]interrupted.[/] Every file written so far is complete (checkpoints "
                          "included). To resume, run the same command again: finished stages are "
                          "skipped and training continues from its last checkpoint (for `train-fusion` "
                          "and `segment train` add --resume).", highlight=False)
        return 130
    except Exception as exc:
        from fuseseg.errors import FusesegError

        if show_traceback and not isinstance(exc, FusesegError):
            raise
        message, code = _error_line(exc)
        # escaped: messages name keys like fusion[name].checkpoint, which rich would eat as markup
        err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)
        return code


if __name__ == "__main__":
    sys.exit(main())
