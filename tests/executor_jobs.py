"""Job bodies and hooks for the executor tests (importable by the jobs: ``tests/`` is on their PYTHONPATH).

:class:`CountingJob` imports nothing heavy: a trainer in miniature. It counts to ``n`` in
``out/count``, one step per ``step_s``, each step written atomically, and resumes from that file;
``out/starts`` gets one line per start (the count it started from), so a test sees that a requeued
job started again and carried on where it stopped. With ``hold_at`` it stops at that count and
waits while the file ``hold`` exists: a test signals or cancels it there, at a known point.

:func:`hold_segment_trainer` does the same to the real segmentation trainer of one stage folder
(installed in the jobs by ``tests/jobhooks/sitecustomize.py``).
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from pipelines.stage_job import StageJob


@dataclasses.dataclass
class CountingJob(StageJob):
    out: Path
    n: int = 60
    step_s: float = 0.1
    hold_at: int | None = None     # stop at this count while the file ``hold`` exists
    hold: Path | None = None

    def run(self) -> dict:
        from fuseseg.data.io import atomic_write_text

        out = Path(self.out)
        count = int((out / "count").read_text()) if (out / "count").is_file() else 0
        with (out / "starts").open("a") as f:
            f.write(f"{count}\n")
        while count < self.n:
            if count == self.hold_at:
                _wait_while(self.hold, out / "held")
            time.sleep(self.step_s)
            count += 1
            atomic_write_text(out / "count", str(count))
        starts = [int(x) for x in (out / "starts").read_text().split()]
        return {"count": count, "starts": starts}


def _wait_while(hold: Path | None, held: Path) -> None:
    """Say so in ``held`` (one line per time), then wait while ``hold`` exists."""
    with held.open("a") as f:
        f.write(f"{time.time()}\n")
    while hold is not None and Path(hold).exists():
        time.sleep(0.05)


def hold_segment_trainer(spec: str) -> None:
    """Make ``segmentation.train`` stop after writing ``last.pt`` of epoch ``epoch`` in the folder
    ``dir`` and wait there while the file ``hold`` exists, after appending a line to ``held``.
    ``spec``: JSON ``{"dir": ..., "epoch": k, "hold": ..., "held": ...}``."""
    import segmentation.train as seg_train

    want = json.loads(spec)
    save = seg_train.save_checkpoint

    def save_then_hold(path, payload):
        save(path, payload)
        path = Path(path)
        if (path.name == "last.pt" and path.parent == Path(want["dir"]) and payload.get("epoch") == want["epoch"]
                and not payload.get("step_in_epoch")):
            _wait_while(Path(want["hold"]), Path(want["held"]))

    seg_train.save_checkpoint = save_then_hold


@dataclasses.dataclass
class FailingJob(StageJob):
    """Appends a line to ``out/starts``, then dies (``crash``: the process exits without a result,
    as a killed job does) or stops with a fuseseg error (a bad setting)."""

    out: Path
    crash: bool = True

    def run(self) -> dict:
        import os

        from fuseseg.errors import ConfigError

        with (Path(self.out) / "starts").open("a") as f:
            f.write("start\n")
        if self.crash:
            os._exit(3)
        raise ConfigError("segmentation.lr: -1 is out of range; give a positive number.")
