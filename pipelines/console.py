"""One shared rich console and progress-bar factory for every command."""
from __future__ import annotations

from rich.console import Console

from fuseseg.progress import make_progress as _make_progress

console = Console(stderr=False)
err_console = Console(stderr=True)   # error lines (the CLI's one top-level handler, pipelines/cli.py)


def make_progress(*extra_columns, transient: bool = False):
    """fuseseg's standard progress bar on the shared console (see :mod:`fuseseg.progress`)."""
    return _make_progress(*extra_columns, console=console, transient=transient)
