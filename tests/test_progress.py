"""Plain progress lines where the console is not a terminal (cluster logs, ``| tee``)."""
from __future__ import annotations

import io

from rich.console import Console
from rich.progress import Progress

from fuseseg.progress import PlainProgress, epoch_line, format_duration, make_progress


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def test_factory_picks_plain_lines_off_a_terminal():
    buf = io.StringIO()
    assert isinstance(make_progress(console=Console(file=buf)), PlainProgress)
    assert isinstance(make_progress(console=Console(file=buf, force_terminal=True)), Progress)


def test_heartbeat_at_most_every_n_seconds_then_a_done_line():
    buf, clock = io.StringIO(), Clock()
    bar = PlainProgress(Console(file=buf, width=40), heartbeat_s=30, clock=clock)
    task = bar.add_task("seg frozen 1/3", total=100, loss=float("nan"))
    for _ in range(60):               # 60 steps, one per second: heartbeats at 30 s and 60 s only
        clock.t += 1
        bar.update(task, advance=1, loss=0.5, lr=1e-3)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert "seg frozen 1/3: 30/100 (1/s, elapsed 30s, ETA 1m10s) loss 0.5 lr 0.001" in lines[0]
    assert "60/100" in lines[1] and "ETA 40s" in lines[1]
    epoch_line(bar, task, "segment epoch 1/3 (frozen): loss 0.5")
    assert buf.getvalue().splitlines()[-1].endswith("segment epoch 1/3 (frozen): loss 0.5 | ETA 40s")
    clock.t += 40
    bar.update(task, advance=40)
    last = buf.getvalue().splitlines()[-1]
    assert "100/100 done in 1m40s (1/s)" in last
    assert all(len(ln) > 40 for ln in buf.getvalue().splitlines())  # never wrapped at the width


def test_epoch_line_prints_nothing_on_a_terminal():
    buf = io.StringIO()
    bar = make_progress(console=Console(file=buf, force_terminal=True))
    epoch_line(bar, None, "train epoch 1/1: loss 1")
    assert "train epoch" not in buf.getvalue()


def test_format_duration():
    assert [format_duration(x) for x in (None, 5.4, 75, 4000)] == ["?", "5s", "1m15s", "1h06m"]
