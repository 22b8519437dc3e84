"""Submitted jobs (``--executor local|slurm``): where a job's files are (:class:`JobRef`), what it
is doing now (:func:`job_state`: its result file first, then the scheduler), and ``fuseseg status
RUN_DIR`` (:func:`status_rows`: every stage record resolved against the scheduler).

A job's result is read from the plain JSON file its body writes when it ends
(:func:`write_job_result`, ``<job id>_0_result.json``), never from submitit's result pickle:
a run folder can come from someone else (a shared folder, an archive), and unpickling a file
it names could run any code. Reading a run folder's job states runs nothing of it.

Read by the executor (``pipelines.executor``) while it waits for its jobs, and by ``fuseseg run``
and ``fuseseg status`` from the stage records (``stages/*.json``) a run folder keeps.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pipelines.runstate import STAGES, read_record, stage_record


@dataclasses.dataclass
class JobRef:
    """One submitted job: where its submitit files are and how to ask about it."""

    kind: str            # local | slurm
    job_id: str
    folder: Path         # its submitit folder (inside the stage folder)
    submitted: float = 0.0

    @property
    def log(self) -> Path:
        return self.folder / f"{self.job_id}_0_log.out"

    @property
    def result_file(self) -> Path:
        """The job's result as JSON (written by the job's body, :func:`write_job_result`)."""
        return self.folder / f"{self.job_id}_0_result.json"


@dataclasses.dataclass
class JobState:
    state: Literal["queued", "running", "finished", "failed"]
    detail: str = ""                 # the scheduler's state/reason (PENDING (Resources), CANCELLED ...)
    elapsed: str = ""


_ACTIVE = {"PENDING": "queued", "REQUEUED": "queued", "REQUEUE_HOLD": "queued", "REQUEUE_FED": "queued",
           "CONFIGURING": "running", "RUNNING": "running", "COMPLETING": "running", "SUSPENDED": "running",
           "RESIZING": "running", "SIGNALING": "running", "STAGE_OUT": "running"}


def slurm_query(job_ids: list[str]) -> dict[str, tuple[str, str, str]]:
    """{job id: (STATE, elapsed, reason)} from ``squeue --states=all`` (no accounting database
    needed; finished jobs stay listed for the controller's MinJobAge, 5 min by default)."""
    if not job_ids:
        return {}
    try:
        res = subprocess.run(["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%i|%T|%M|%r"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    out = {}
    for line in res.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            out[parts[0]] = (parts[1], parts[2], parts[3])
    return out


def _local_alive(job_id: str) -> bool:
    """Is the submitit local controller with pid ``job_id`` still running (not a reused pid)?"""
    try:
        cmd = Path(f"/proc/{int(job_id)}/cmdline").read_bytes()
        stat = Path(f"/proc/{int(job_id)}/stat").read_text()
    except (OSError, ValueError):
        return False
    return b"submitit.local._local" in cmd and stat.rsplit(")", 1)[-1].split()[0] != "Z"


def _fmt_elapsed(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def read_result(ref: JobRef) -> tuple[str, Any] | None:
    """``("success", info)`` or ``("error", traceback text)`` from the job's JSON result file;
    None when it has none or it is unreadable. Plain JSON only: nothing in it can run."""
    try:
        res = json.loads(ref.result_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not (isinstance(res, dict) and res.get("status") in ("success", "error")):
        return None
    return res["status"], res.get("value")


def write_job_result(status: str, value: Any) -> None:
    """Inside a submitit job: write its outcome (``success`` + the body's info, or ``error`` +
    the traceback) as JSON beside submitit's files, where :func:`read_result` finds it. Outside
    a submitit job (a body called in process) this does nothing."""
    if not os.environ.get("SUBMITIT_FOLDER"):
        return
    import submitit

    from fuseseg.data.io import atomic_write_text

    env = submitit.JobEnvironment()
    path = env.paths.result_pickle.with_suffix(".json")
    try:
        atomic_write_text(path, json.dumps({"status": status, "value": value}, default=str))
    except OSError:   # the node cannot see the folder: the submitter reports the missing log
        pass


def run_and_record(body: Callable[[], dict]) -> dict:
    """Run a job's ``body`` and write its outcome with :func:`write_job_result` (the traceback of
    an exception, which propagates). SystemExit is not caught: submitit exits that way to requeue
    a pre-empted job, which is no outcome."""
    import traceback

    try:
        info = body()
    except Exception:
        write_job_result("error", traceback.format_exc())
        raise
    write_job_result("success", info)
    return info


def job_state(ref: JobRef, slurm: dict | None = None, grace_s: float = 20.0) -> JobState:
    """The state of one job: its result file first (written by the job when it ends), then the
    scheduler. ``slurm``: a prefetched :func:`slurm_query` answer."""
    if ref.result_file.is_file():
        res = read_result(ref)
        ok = res is not None and res[0] == "success" and not (isinstance(res[1], dict) and "error" in res[1])
        return JobState("finished" if ok else "failed", "COMPLETED" if ok else "FAILED")
    if ref.kind == "local":
        if _local_alive(ref.job_id):
            return JobState("running", "RUNNING", _fmt_elapsed(time.time() - ref.submitted) if ref.submitted else "")
        return JobState("failed", "ENDED WITHOUT A RESULT")
    info = (slurm if slurm is not None else slurm_query([ref.job_id])).get(ref.job_id)
    if info is None:
        # just submitted (not listed yet) or long gone (purged after MinJobAge)
        if time.time() - ref.submitted < grace_s:
            return JobState("queued", "SUBMITTED")
        return JobState("failed", "GONE (not known to SLURM any more, no result)")
    st, elapsed, reason = info
    if st in _ACTIVE:
        detail = st if reason in ("None", "") else f"{st} ({reason})"
        return JobState(_ACTIVE[st], detail, elapsed)
    if st == "COMPLETED":   # the result file may lag behind on a network file system
        stale = ref.log.is_file() and time.time() - ref.log.stat().st_mtime > 60
        if not stale:
            return JobState("running", "COMPLETED, result not visible yet", elapsed)
        return JobState("failed", "COMPLETED without a result (see its log)", elapsed)
    detail = st if reason in ("None", "") else f"{st} ({reason})"
    return JobState("failed", detail, elapsed)


def ref_of_record(rec: dict) -> JobRef | None:
    """The job of a stage record (None when it has none)."""
    if not rec or "job_id" not in rec or "job_folder" not in rec or rec.get("executor") not in ("local", "slurm"):
        return None
    return JobRef(rec["executor"], str(rec["job_id"]), Path(rec["job_folder"]), float(rec.get("submitted_at", 0)))


def status_rows(run_dir: Path) -> list[dict]:
    """One row per stage of the run folder: its record's state, resolved against the scheduler
    for submitted jobs, plus the configured segment runs that have no record yet (waiting)."""
    recs = {}
    for p in sorted((run_dir / "stages").glob("*.json")):
        rec = read_record(p)
        if rec is None:
            continue
        recs[rec.get("key", p.stem)] = rec
    expected = _expected_segment_keys(run_dir)
    refs = {k: ref_of_record(r) for k, r in recs.items() if r.get("status") == "submitted"}
    squeue = slurm_query([r.job_id for r in refs.values() if r and r.kind == "slurm"]) \
        if shutil.which("squeue") else {}
    keys = sorted(set(recs) | set(expected), key=lambda k: (STAGES.index(k.split("/")[0])
                                                            if k.split("/")[0] in STAGES else 99, k))
    rows = []
    for key in keys:
        rec = recs.get(key) or stage_record(run_dir, key)
        row = {"stage": key, "state": "waiting", "job": "", "elapsed": "", "miou": None, "log": "", "detail": ""}
        if rec and rec.get("status") == "done":
            row.update(state="done", job=str(rec.get("job_id", "")), elapsed=f"{rec.get('seconds', 0):.1f} s",
                       miou=rec.get("miou"))
        elif rec and rec.get("status") == "submitted" and refs.get(key):
            ref = refs[key]
            st = job_state(ref, squeue if ref.kind == "slurm" else None)
            row.update(state=st.state, job=ref.job_id, elapsed=st.elapsed, detail=st.detail)
            if st.state == "failed":
                row["log"] = str(ref.log)
            elif st.state == "finished":
                row["detail"] = "finished; `fuseseg run` collects it"
        rows.append(row)
    return rows


def _expected_segment_keys(run_dir: Path) -> list[str]:
    """segment/<variant>/seed<k> of the run's config.yaml (variants x seg_seeds)."""
    import yaml

    p = run_dir / "config.yaml"
    try:
        cfg = yaml.safe_load(p.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    names = [m.get("name") for m in cfg.get("fusion") or [] if isinstance(m, dict)]
    variants = cfg.get("variants") or ["ir", "vi", *names]
    return [f"segment/{v}/seed{s}" for v in variants for s in cfg.get("seg_seeds") or [0]]
