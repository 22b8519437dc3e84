"""The one progress factory of fuseseg: a rich bar on a terminal, plain lines elsewhere.

On a terminal :func:`make_progress` gives a rich Progress (description, bar, count, elapsed,
remaining). When the console is not a terminal -- a cluster job's log file, ``| tee`` -- rich
draws nothing until the bar finishes, so a long training looks hung. There it gives a
:class:`PlainProgress` with the same calls (``add_task``, ``update``, ``advance``, ``start``,
``stop``, ``with``), which prints one timestamped line per task at most every ``heartbeat_s``
seconds (default 60, environment variable ``FUSESEG_HEARTBEAT_S``) and one line when the task
completes. Trainers add one line per epoch with :func:`epoch_line` (losses, lr, images/s, ETA);
on a terminal the bar already shows it and :func:`epoch_line` prints nothing.
"""
from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


def heartbeat_seconds() -> float:
    """Seconds between two plain progress lines of one task (``FUSESEG_HEARTBEAT_S``, default 60)."""
    try:
        return max(0.0, float(os.environ.get("FUSESEG_HEARTBEAT_S", "60")))
    except ValueError:
        return 60.0


def format_duration(seconds: float | None) -> str:
    """``75`` -> ``1m15s``; ``4000`` -> ``1h06m``; unknown -> ``?``."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_fields(fields: dict[str, Any]) -> str:
    """``{'loss': 0.51234, 'lr': 0.007}`` -> ``loss 0.5123 lr 0.007``; string values as they are."""
    parts = []
    for k, v in fields.items():
        if isinstance(v, float):
            parts.append(f"{k} {v:.4g}")
        elif isinstance(v, str):
            if v:
                parts.append(v if k == "info" else f"{k} {v}")
        else:
            parts.append(f"{k} {v}")
    return " ".join(parts)


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    fields: dict[str, Any]
    started: float
    start_completed: float
    last_line: float
    finished: bool = False
    extra: dict = field(default_factory=dict)


class PlainProgress:
    """Plain-line progress for consoles that are not terminals (see the module docstring)."""

    def __init__(self, console=None, heartbeat_s: float | None = None, disable: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        from rich.console import Console

        self.console = console if console is not None else Console()
        self.heartbeat_s = heartbeat_seconds() if heartbeat_s is None else heartbeat_s
        self.disable, self.clock = disable, clock
        self.tasks: dict[int, _Task] = {}

    # rich.Progress's calls -------------------------------------------------------------
    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def add_task(self, description: str, total: float | None = 100.0, completed: float = 0,
                 **fields: Any) -> int:
        now = self.clock()
        tid = len(self.tasks)
        self.tasks[tid] = _Task(description, total, completed, dict(fields), now, completed, now)
        return tid

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, **fields: Any) -> None:
        t = self.tasks[task_id]
        if description is not None:
            t.description = description
        if total is not None:
            t.total = total
        if completed is not None:
            t.completed = completed
        if advance:
            t.completed += advance
        t.fields.update(fields)
        now = self.clock()
        if t.total is not None and t.completed >= t.total and not t.finished:
            t.finished = True
            rate = (t.completed - t.start_completed) / max(now - t.started, 1e-9)
            self.line(f"{t.description}: {t.completed:g}/{t.total:g} done in "
                      f"{format_duration(now - t.started)} ({rate:.3g}/s) {format_fields(t.fields)}".rstrip())
        elif now - t.last_line >= self.heartbeat_s and (advance or completed is not None):
            t.last_line = now
            self.line(f"{t.description}: {self._status(t_id=task_id)}")

    # plain lines ------------------------------------------------------------------------
    def eta(self, task_id: int) -> float | None:
        """Seconds left for the task at its rate so far (None before the first step)."""
        t = self.tasks[task_id]
        done = t.completed - t.start_completed
        if t.total is None or done <= 0:
            return None
        return (t.total - t.completed) * (self.clock() - t.started) / done

    def _status(self, t_id: int) -> str:
        t = self.tasks[t_id]
        elapsed = self.clock() - t.started
        rate = (t.completed - t.start_completed) / max(elapsed, 1e-9)
        total = "?" if t.total is None else f"{t.total:g}"
        return (f"{t.completed:g}/{total} ({rate:.3g}/s, elapsed {format_duration(elapsed)}, "
                f"ETA {format_duration(self.eta(t_id))}) {format_fields(t.fields)}").rstrip()

    def line(self, text: str) -> None:
        """Print ``HH:MM:SS text`` as one unwrapped plain line."""
        if not self.disable:
            self.console.print(f"{time.strftime('%H:%M:%S')} {text}", markup=False, highlight=False,
                               soft_wrap=True)
            self.console.file.flush()


def make_progress(*extra_columns: ProgressColumn | str, console=None, transient: bool = False,
                  disable: bool = False) -> Progress | PlainProgress:
    """A rich Progress with fuseseg's standard columns followed by ``extra_columns`` on a
    terminal; a :class:`PlainProgress` (timestamped lines) when ``console`` is not one."""
    from rich.console import Console

    console = console if console is not None else Console()
    if not console.is_terminal:
        return PlainProgress(console, disable=disable)
    return Progress(TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), *extra_columns, console=console,
                    transient=transient, disable=disable)


def epoch_line(bar, task_id: int | None, text: str, eta_s: float | None = None) -> None:
    """One plain line per epoch (``text`` + ``ETA``) when ``bar`` is a :class:`PlainProgress`;
    nothing on a terminal, where the bar shows it. ``eta_s`` defaults to the task's ETA."""
    if isinstance(bar, PlainProgress):
        if eta_s is None and task_id is not None:
            eta_s = bar.eta(task_id)
        bar.line(f"{text} | ETA {format_duration(eta_s)}")
