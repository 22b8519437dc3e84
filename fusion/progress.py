"""The one rich progress-bar layout of fuseseg (description, bar, count, elapsed, remaining)."""
from __future__ import annotations

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def make_progress(*extra_columns: ProgressColumn | str, console=None, transient: bool = False,
                  disable: bool = False) -> Progress:
    """A rich Progress with fuseseg's standard columns followed by ``extra_columns``."""
    return Progress(TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), *extra_columns, console=console,
                    transient=transient, disable=disable)
