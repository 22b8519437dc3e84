"""Where the trainings of ``fuseseg run`` run: in this process, as local subprocesses, or as SLURM jobs.

The stage graph (``pipelines/run.py``, stages in ``pipelines/stages/``) is the same for every
executor. A training stage (``train_fusion/<method>``, ``segment/<variant>/seed<k>``) hands its
body, a picklable :class:`StageJob`, to :meth:`Executor.run`, which returns what the body
returned. ``inprocess`` (the default) calls it here. ``local`` and ``slurm`` submit it through submitit as its own job
(``local``: a subprocess, at most ``jobs`` at once, ``CUDA_VISIBLE_DEVICES`` per job; ``slurm``:
an sbatch job) and wait for it; ``run_experiment`` runs the stage chains in threads
(:meth:`Executor.spawn`), so each job is submitted as soon as what it needs is done::

    train_fusion[m] -> fuse[m] -> segment[m, seed]   one chain per method, one thread per seed
    segment[ir|vi, seed]                             submitted at once
    metrics after every fuse, report after everything

Ownership and locks: the submitting process holds the run lock and alone writes the stage
records (``stages/*.json``) and every folder outside the jobs'. A job writes only inside its own
stage folder (checkpoints, ``eval.json``, and its submitit folder ``slurm/``: pickled job, its result
as JSON (never unpickled, see ``pipelines.jobs``), log) and holds that folder's lock (``STAGE/.lock``) while it runs; it never takes the run lock.
The submitter prepares (or clears) a stage folder only before submitting it, never while its job
may be alive.

Records: at submission a stage's record gets ``status: submitted`` with the executor, the job id,
the attempt and the log path; once its result is collected it gets ``status: done`` with the
same job id (``fuseseg status RUN_DIR`` reads them).

Crash safety: a pre-empted or timed-out job is signalled by SLURM (USR2, ``signal_delay_s``
before its time limit), stops (every file it wrote is complete: atomic writes) and is requeued
under the same job id by submitit (``StageJob.checkpoint``); the requeued job resumes from the
trainer's last checkpoint (``last.pt``, written after every epoch). A job that is killed
(``scancel``, node failure) or fails is reported with its log path and resubmitted once per
``fuseseg run``; it resumes from its last checkpoint as well. A job that fails with a fuseseg
error (a bad setting, a non-finite loss) is reported with that message and not resubmitted by
that run (it would fail again); ``fuseseg run`` again, the cause fixed, resubmits it once.
``fuseseg run`` again after the submitting process died picks the jobs up from the records:
running and queued jobs are waited for, finished ones collected, failed ones resubmitted once.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from fuseseg.errors import ConfigError, FusesegError
from fuseseg.threads import job_threads
from pipelines.jobs import JobRef, job_state, read_result, ref_of_record, slurm_query
from pipelines.stage_job import StageJob

KINDS = ("inprocess", "local", "slurm")


@dataclasses.dataclass
class ExecutorConfig:
    """Section ``executor:`` of the experiment config (``--executor``, ``--slurm KEY=VALUE``, ``--jobs``)."""

    kind: Literal["inprocess", "local", "slurm"] = "inprocess"   # where the trainings run: here, local subprocesses, SLURM jobs
    jobs: int | None = None            # local: most jobs at once (default: one per GPU group, 1 without GPUs)
    partition: str | None = None       # slurm --partition (None: the cluster's default)
    gpus_per_job: int | None = None    # None: local 1 when GPUs exist, else 0; slurm 0. >1: torchrun/DDP in the job
    cpus_per_job: int | None = None    # slurm --cpus-per-task (None: the cluster's default)
    mem_gb: float | None = None        # slurm --mem (None: the cluster's default)
    time_min: int = 1440               # wall-time limit per job; on reaching it the job is requeued and resumes
    setup: list[str] = dataclasses.field(default_factory=list)   # shell lines run first in each job (module load ...)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # more sbatch options: {account: lab, qos: high}
    poll_s: float = 10.0               # how often job states are checked
    signal_delay_s: int = 120          # slurm: USR2 this long before the time limit (checkpoint and requeue)

    def __post_init__(self):
        for name in ("jobs", "gpus_per_job", "cpus_per_job"):
            v = getattr(self, name)
            if v is not None and v < (0 if name == "gpus_per_job" else 1):
                raise ConfigError(f"executor.{name}: {v} is out of range; give a positive number.")
        if self.time_min < 1 or self.poll_s <= 0:
            raise ConfigError("executor.time_min and executor.poll_s must be positive.")
        if not 0 < self.signal_delay_s < self.time_min * 60:
            # USR2 at (limit - delay): a delay as long as the limit requeues every job at its start, forever
            raise ConfigError(f"executor.signal_delay_s={self.signal_delay_s} must be positive and below the "
                              f"time limit (executor.time_min={self.time_min}: {self.time_min * 60} s); "
                              "lower it or raise time_min.")


# ---------------------------------------------------------------- futures
class _Lazy:
    """A future that runs its function on the first ``result()`` (the in-process executor: the
    stage chains then run one after the other, in the order the results are asked for)."""

    def __init__(self, fn: Callable, args: tuple):
        self.fn, self.args, self.state = fn, args, None

    def result(self):
        if self.state is None:
            try:
                self.state = ("ok", self.fn(*self.args))
            except BaseException as exc:
                self.state = ("err", exc)
        if self.state[0] == "err":
            raise self.state[1]
        return self.state[1]


class _Stopped(Exception):
    """The submitting process is stopping (Ctrl-C): threads waiting for jobs return."""


class Executor:
    """In-process: every stage body runs here, one after the other (the default)."""

    kind = "inprocess"

    def __init__(self, cfg: ExecutorConfig | None = None):
        self.cfg = cfg or ExecutorConfig()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def spawn(self, fn: Callable, *args) -> Any:
        return _Lazy(fn, args)

    def gather(self, futures: dict) -> tuple[dict, list[str]]:
        """Results of ``futures`` ({key: future}) and the errors of those that failed. In process:
        the first error propagates at once (as a plain run always did)."""
        return {k: f.result() for k, f in futures.items()}, []

    def job_device(self, configured: str, resolved: str) -> str:
        """The device a training stage records and uses."""
        return resolved

    def nproc(self, launcher: str, gpus: int) -> int:
        """Processes (GPUs) per training: >1 runs it under torchrun."""
        return gpus if launcher == "torchrun" and gpus > 1 else 1

    def run(self, run_dir: Path, key: str, fp: str, out: Path, job: StageJob, prepare: Callable[[], Any]) -> dict:
        prepare()
        return job.run() or {}

    @contextlib.contextmanager
    def local_work(self):
        """Around heavy work the submitting process does itself (fusing a data set with a learned
        method): here and on SLURM nothing to share; the local executor counts it as a job."""
        yield


# ---------------------------------------------------------------- job executors
class JobExecutor(Executor):
    """Base of the submitit executors: submit, record, wait, resubmit once."""

    def __init__(self, cfg: ExecutorConfig):
        super().__init__(cfg)
        self.stop = threading.Event()
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=256, thread_name_prefix="fuseseg-stage")
        self._submit_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._states: dict[str, tuple[str, str, str]] = {}
        self._states_at = 0.0
        self._tracked: set[str] = set()
        self.gpus = self._gpus_per_job()

    def _gpus_per_job(self) -> int:
        return self.cfg.gpus_per_job or 0

    def __exit__(self, exc_type, exc, tb):
        self.stop.set()
        self.pool.shutdown(wait=True, cancel_futures=True)
        if exc_type is KeyboardInterrupt:
            self._say_on_interrupt()
        return False

    def _say_on_interrupt(self) -> None:
        pass

    def spawn(self, fn: Callable, *args):
        return self.pool.submit(fn, *args)

    def gather(self, futures: dict) -> tuple[dict, list[str]]:
        """Wait for every future; collect the errors (a failed chain never stops the others)."""
        done, errors = {}, []
        for k, f in futures.items():
            while True:
                try:
                    done[k] = f.result(timeout=0.5)   # a timeout, so Ctrl-C reaches the main thread
                    break
                except concurrent.futures.TimeoutError:
                    continue
                except FusesegError as exc:
                    errors.append(str(exc))
                    break
        return done, errors

    def job_device(self, configured: str, resolved: str) -> str:
        # decided here for the node: the submitting machine's own device says nothing about it
        if configured != "auto":
            return configured
        return "cuda" if self.gpus > 0 else "cpu"

    def nproc(self, launcher: str, gpus: int) -> int:
        return self.gpus if self.gpus > 1 else 1

    # -- the backend: one submitit executor per job, its folder inside the stage folder
    def _make_submitit(self, folder: Path, key: str, slot):  # pragma: no cover - abstract
        raise NotImplementedError

    def _acquire_slot(self) -> Any:
        return None

    def _threads(self) -> tuple[int | None, bool]:
        """(torch threads of each job, whether they adapt to the load: fuseseg.threads)."""
        return self.cfg.cpus_per_job, False

    def _release_slot(self, slot: Any) -> None:
        pass

    def _states_for(self, ref: JobRef) -> dict | None:
        return None

    def _cancel(self, ref: JobRef) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _submit(self, run_dir: Path, key: str, fp: str, out: Path, job: StageJob, attempt: int, slot) -> JobRef:
        from submitit.helpers import clean_env

        from pipelines.console import console
        from pipelines.runstate import mark_stage_submitted

        folder = out / "slurm"
        job.threads, job.threads_adaptive = self._threads()
        with self._submit_lock, clean_env():   # clean_env edits os.environ: one submission at a time
            ex = self._make_submitit(folder, key, slot)
            try:
                sj = ex.submit(job)
            except Exception as exc:   # sbatch refused (bad partition, option ...): its message
                msg = str(exc).strip().splitlines()
                raise FusesegError(f"{key}: submitting the job failed: {' '.join(msg[-3:])} "
                                   "(check the executor settings: --slurm KEY=VALUE / executor: in the config)") from None
        ref = JobRef(self.kind, str(sj.job_id), folder, time.time())
        self._tracked.add(ref.job_id)
        mark_stage_submitted(run_dir, key, fp, executor=self.kind, job_id=ref.job_id, job_folder=str(folder),
                             log=str(ref.log), attempt=attempt, submitted_at=ref.submitted)
        console.print(f"[cyan]  submitted[/] {key}: {self.kind} job {ref.job_id}"
                      + (f" (attempt {attempt})" if attempt > 1 else "") + f", log {ref.log}", highlight=False)
        return ref

    def _wait(self, ref: JobRef) -> tuple[str, Any]:
        """Block until ``ref`` ends: ("ok", info) / ("error", fuseseg message) / ("failed", detail)."""
        while True:
            st = job_state(ref, self._states_for(ref))
            if st.state == "finished":
                res = read_result(ref)
                return "ok", res[1] if isinstance(res[1], dict) else {}
            if st.state == "failed":
                res = read_result(ref)
                if res is not None and res[0] == "success" and isinstance(res[1], dict) and "error" in res[1]:
                    return "error", res[1]["error"]
                return "failed", st.detail
            if self.stop.wait(self.cfg.poll_s):
                raise _Stopped()

    def _live_job_in(self, folder: Path) -> JobRef | None:
        """A queued or running job whose submitit files are in ``folder`` (None if there is none)."""
        for pkl in sorted(folder.glob("*_submitted.pkl")) if folder.is_dir() else []:
            ref = JobRef(self.kind, pkl.name.split("_")[0], folder, pkl.stat().st_mtime)
            if job_state(ref, grace_s=0).state in ("queued", "running"):
                return ref
        return None

    def _failure_text(self, key: str, ref: JobRef, detail: str) -> str:
        if not ref.log.is_file():
            return (f"{key}: {self.kind} job {ref.job_id} failed ({detail}) without writing its log {ref.log}: "
                    "the compute node most likely cannot see the run folder. The run folder must be on a "
                    "file system shared with the nodes (set results_dir to such a folder).")
        return f"{key}: {self.kind} job {ref.job_id} failed ({detail}); log: {ref.log}"

    def run(self, run_dir: Path, key: str, fp: str, out: Path, job: StageJob, prepare: Callable[[], Any]) -> dict:
        from pipelines.console import console
        from pipelines.runstate import stage_record

        rec = stage_record(run_dir, key) or {}
        ref = ref_of_record(rec) if rec.get("status") == "submitted" else None
        attempt = int(rec.get("attempt", 0)) if ref is not None and rec.get("fingerprint") == fp else 0
        if ref is not None and rec.get("fingerprint") != fp:
            st = job_state(ref)
            if st.state in ("queued", "running"):   # a job of another configuration: obsolete
                console.print(f"[yellow]  {key}: cancelling {ref.kind} job {ref.job_id} of an older configuration[/]")
                self._cancel(ref)
                while job_state(ref).state in ("queued", "running"):
                    if self.stop.wait(1.0):
                        raise _Stopped()
            ref = None
        marker = out / ".fingerprint"
        if ref is None and marker.is_file() and marker.read_text().strip() == fp:
            ref = self._live_job_in(out / "slurm")   # submitted, but the submitter died before recording it
        slot = None
        # a job of an earlier `fuseseg run` that ended with a fuseseg error is resubmitted (once)
        # as well: that run told the user to fix the cause and run again
        earlier_failed = False
        try:
            slot = self._acquire_slot()   # a job picked up holds a slot too (local: --jobs at once)
            if ref is None:
                prepare()
                attempt += 1
                ref = self._submit(run_dir, key, fp, out, job, attempt, slot)
            else:
                self._tracked.add(ref.job_id)
                st = job_state(ref)
                earlier_failed = st.state == "failed"
                console.print(f"[cyan]  {key}:[/] picking up {ref.kind} job {ref.job_id} ({st.detail})", highlight=False)
            resubmitted = False
            while True:
                outcome, value = self._wait(ref)
                if outcome == "ok":
                    return {**value, "executor": self.kind, "job_id": ref.job_id, "attempt": attempt,
                            "job_folder": str(ref.folder), "log": str(ref.log)}
                if outcome == "error":
                    text = f"{key}: {value} (job {ref.job_id}; log: {ref.log})"
                    if resubmitted or not earlier_failed:   # this run's job: it would only fail again
                        raise FusesegError(text)
                else:
                    text = self._failure_text(key, ref, value)
                if resubmitted or not ref.log.is_file():
                    raise FusesegError(text + ". Fix the cause, then run `fuseseg run` again: the job is "
                                       "resubmitted and resumes from its last checkpoint.")
                console.print(f"[yellow]  {text}; resubmitting it once (it resumes from its last checkpoint)[/]",
                              highlight=False)
                self._release_slot(slot)
                slot = self._acquire_slot()
                attempt += 1
                ref = self._submit(run_dir, key, fp, out, job, attempt, slot)
                resubmitted = True
        finally:
            self._release_slot(slot)


class SlurmExecutor(JobExecutor):
    """Every training an sbatch job (submitit.SlurmExecutor)."""

    kind = "slurm"

    def __init__(self, cfg: ExecutorConfig):
        if shutil.which("sbatch") is None:
            raise ConfigError("--executor slurm: `sbatch` is not on PATH; run on a SLURM login node, or use "
                              "--executor local / inprocess.")
        super().__init__(cfg)

    def _make_submitit(self, folder: Path, key: str, slot):
        import submitit

        ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=1000)
        ex.update_parameters(**self.sbatch_params(key))
        return ex

    def sbatch_params(self, key: str) -> dict[str, Any]:
        """submitit.SlurmExecutor parameters (its sbatch options) of the job of stage ``key``."""
        c = self.cfg
        params: dict[str, Any] = {"job_name": f"fuseseg:{key}", "time": c.time_min, "nodes": 1,
                                  "ntasks_per_node": 1, "stderr_to_stdout": True,
                                  "signal_delay_s": c.signal_delay_s}
        if c.partition:
            params["partition"] = c.partition
        if c.cpus_per_job:
            params["cpus_per_task"] = c.cpus_per_job
        if self.gpus:
            params["gpus_per_node"] = self.gpus
        if c.mem_gb:
            params["mem"] = f"{int(round(c.mem_gb * 1024))}M"
        if c.setup:
            params["setup"] = list(c.setup)
        if c.extra:
            params["additional_parameters"] = {k.replace("_", "-"): v for k, v in c.extra.items()}
        return params

    def _states_for(self, ref: JobRef) -> dict:
        """One squeue call for every tracked job, at most every poll_s / 2."""
        with self._state_lock:
            if time.time() - self._states_at > self.cfg.poll_s / 2 or ref.job_id not in self._states:
                self._states = slurm_query(sorted(self._tracked | {ref.job_id}))
                self._states_at = time.time()
            return self._states

    def _cancel(self, ref: JobRef) -> None:
        subprocess.run(["scancel", ref.job_id], capture_output=True, timeout=60)

    def _say_on_interrupt(self) -> None:
        from pipelines.console import console

        console.print("[yellow]the submitted SLURM jobs keep running.[/] `fuseseg status RUN_DIR` shows them; "
                      "`fuseseg run` with the same config waits for them and carries on; `scancel` stops them.",
                      highlight=False)


class LocalExecutor(JobExecutor):
    """Every training a local subprocess (submitit.LocalExecutor), at most ``jobs`` at once; job
    slot ``i`` sees GPUs ``i*g .. i*g+g-1`` (modulo the GPU count) through CUDA_VISIBLE_DEVICES."""

    kind = "local"

    def __init__(self, cfg: ExecutorConfig):
        import torch

        self.n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        super().__init__(cfg)
        n = cfg.jobs or (max(1, self.n_gpus // self.gpus) if self.gpus else 1)
        self.slots: list[int] = list(range(n))
        self.slots_all = list(self.slots)
        self._slot_cv = threading.Condition()

    def _gpus_per_job(self) -> int:
        if self.cfg.gpus_per_job is not None:
            if self.cfg.gpus_per_job > self.n_gpus:
                raise ConfigError(f"executor.gpus_per_job={self.cfg.gpus_per_job} but this machine has "
                                  f"{self.n_gpus} GPU(s); lower it (0 = CPU jobs).")
            return self.cfg.gpus_per_job
        return 1 if self.n_gpus else 0

    def _acquire_slot(self) -> int:
        with self._slot_cv:
            while not self.slots:
                self._slot_cv.wait(0.5)
                if self.stop.is_set():
                    raise _Stopped()
            return self.slots.pop(0)

    def _threads(self) -> tuple[int, bool]:
        return job_threads(len(self.slots_all))

    @contextlib.contextmanager
    def local_work(self):
        """Fusing in this process takes a job slot and runs with a job's thread count, so at most
        ``jobs`` heavy things run at once, each with its share of the cores (measured on a 2-core
        CPU, table4: this process fusing RFN-Nest at 2 threads beside two 1-thread jobs ran at 0.33
        pairs/s instead of 0.69 alone; 4 threads on 2 cores)."""
        import torch

        slot = self._acquire_slot()
        try:
            threads, _ = self._threads()
            if threads and not os.environ.get("OMP_NUM_THREADS"):
                torch.set_num_threads(threads)   # this process does no heavy work of its own after
            yield
        finally:
            self._release_slot(slot)

    def _release_slot(self, slot) -> None:
        if slot is None:
            return
        with self._slot_cv:
            self.slots.append(slot)
            self.slots.sort()
            self._slot_cv.notify()

    def _make_submitit(self, folder: Path, key: str, slot):
        import submitit

        ex = submitit.LocalExecutor(folder=folder, max_num_timeout=1000)
        g = self.gpus
        visible = tuple((slot * g + k) % self.n_gpus for k in range(g)) if g else ()
        params: dict[str, Any] = {"timeout_min": self.cfg.time_min, "gpus_per_node": g,
                                  "visible_gpus": visible, "stderr_to_stdout": True,
                                  "signal_delay_s": self.cfg.signal_delay_s}
        if self.cfg.setup:
            params["setup"] = list(self.cfg.setup)
        ex.update_parameters(**params)
        return ex

    def _cancel(self, ref: JobRef) -> None:
        try:
            os.kill(int(ref.job_id), signal.SIGINT)   # the controller stops its task (SIGINT, then SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def make_executor(cfg: ExecutorConfig) -> Executor:
    return {"inprocess": Executor, "local": LocalExecutor, "slurm": SlurmExecutor}[cfg.kind](cfg)


