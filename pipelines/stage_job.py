"""The body of one training stage as the executors run it (:class:`StageJob`): a picklable callable
that checks its stage folder, runs the training inside it (under torchrun when it has several
processes) and returns the facts for the stage's record. ``pipelines.executor`` submits it."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

from fuseseg.errors import FusesegError
from fuseseg.threads import enter_job
from pipelines.jobs import run_and_record


def _peak_rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _epochs_logged(out: Path) -> int:
    """Rows of ``out/log.csv`` (one per finished epoch; both trainers write it)."""
    log = out / "log.csv"
    if not log.is_file():
        return 0
    return max(0, len(log.read_text().strip().splitlines()) - 1)


class StageJob:
    """The body of one training stage: a picklable callable (plain data, no open files).

    ``run()`` does the stage's work inside ``out`` and returns the facts for its record. Called
    as a job (``__call__``) it first checks that this node sees ``out`` (the run folder must be on
    a file system shared with the nodes), removes temporary files a killed attempt left in
    ``out``, and reports a fuseseg error as a value (the submitter then does not resubmit)."""

    out: Path
    threads: int | None = None     # torch threads in the job (set by the executor; OMP_NUM_THREADS wins)
    threads_adaptive: bool = False  # fewer while the load is high (fuseseg.threads)

    def run(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self) -> dict:
        return run_and_record(self._run_as_job)   # the outcome as JSON too: never unpickled by fuseseg

    def _run_as_job(self) -> dict:
        out = Path(self.out)
        if not out.is_dir():
            raise FusesegError(f"this node ({socket.gethostname()}) cannot see the stage folder {out}: the run "
                               "folder must be on a file system shared with the compute nodes (set results_dir).")
        for tmp in out.rglob(".*.tmp"):   # unfinished writes of a killed attempt (this folder is ours)
            tmp.unlink(missing_ok=True)
        enter_job(self.threads, self.threads_adaptive)
        t0, started = time.perf_counter(), time.time()
        resumed_from = _epochs_logged(out) if (out / "last.pt").is_file() else None
        try:
            # the job locks its own stage folder (two jobs of one stage never write together);
            # under torchrun the training command's rank 0 takes that lock itself
            from fuseseg.data.paths import confine_writes
            from pipelines.runstate import folder_lock

            with folder_lock(out if getattr(self, "nproc", 1) <= 1 else None, "the stage's job"), \
                    confine_writes(out, "the stage folder"):
                info = dict(self.run() or {})
        except FusesegError as exc:
            return {"error": str(exc), "error_type": type(exc).__name__}
        info.update(job_seconds=round(time.perf_counter() - t0, 3), peak_rss_mib=round(_peak_rss_mib(), 1),
                    host=socket.gethostname(), job_started=started, job_ended=time.time(),
                    cuda_visible_devices=os.environ.get("CUDA_VISIBLE_DEVICES"))
        if resumed_from is not None:
            info["resumed_from_epoch"] = resumed_from
        return info

    def launch(self, args: list[str]) -> None:
        """Run this stage's training command (``fuseseg ARGS``) under torchrun with ``self.nproc``
        processes (the stage's job calls it when ``nproc`` > 1)."""
        torchrun(getattr(self, "nproc", 1), args)

    def checkpoint(self, *args, **kwargs):
        """submitit calls this on pre-emption / time-out: requeue the same job; it resumes from last.pt."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self, *args, **kwargs)


def torchrun(nproc: int, args: list[str]) -> None:
    """Run one training command under ``torchrun --nproc_per_node=nproc`` (DDP; rank 0 writes)."""
    import sys

    from pipelines.console import console

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pipelines.cli", *args]
    console.print(f"[dim]  $ {' '.join(cmd)}[/]")
    rc = subprocess.call(cmd)
    if rc != 0:
        raise FusesegError(f"the distributed training command failed (exit code {rc}): {' '.join(cmd)}. "
                           "Its output is above; rerun `fuseseg run` with the same config to resume.")
