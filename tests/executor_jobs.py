"""A job body for the executor tests that imports nothing heavy: a trainer in miniature.

It counts to ``n`` in ``out/count``, one step per ``step_s``, each step written atomically, and
resumes from that file; ``out/starts`` gets one line per start, so a test sees that a requeued job
started again and carried on where it stopped. Importable by the jobs when ``tests/`` is on their
PYTHONPATH.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from pipelines.executor import StageJob


@dataclasses.dataclass
class CountingJob(StageJob):
    out: Path
    n: int = 60
    step_s: float = 0.1

    def run(self) -> dict:
        from fusion.data.io import atomic_write_text

        out = Path(self.out)
        with (out / "starts").open("a") as f:
            f.write(f"{time.time()}\n")
        count = int((out / "count").read_text()) if (out / "count").is_file() else 0
        first = count
        while count < self.n:
            time.sleep(self.step_s)
            count += 1
            atomic_write_text(out / "count", str(count))
        return {"count": count, "first": first, "starts": len((out / "starts").read_text().splitlines())}
