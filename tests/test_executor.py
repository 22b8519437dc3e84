"""`fuseseg run` with every training as its own job (issue 17): local subprocesses and a real SLURM.

The tiny experiment of the reliability tests (6 + 4 scenes of 48x64, a tiny SSPFusion, segmenters
on ``ir`` and ``sspfusion``), with 4 one-step segmentation epochs. Every run is compared with one
in-process run of the same config (fused image bytes, checkpoints, eval.json, mIoU table, metrics):

* ``--executor local --jobs 2``: the same results; one job per training, two at once at most
  and at least once two together;
* ``--executor slurm``: the submitting process is SIGKILLed while jobs are queued and running,
  a running segmentation job is ``scancel``-ed while it waits after its checkpoint of epoch 2
  (held there by ``tests/jobhooks``, so that the cancel never races the job's end); ``fuseseg status`` shows queued, running and
  failed (with the log); ``fuseseg run`` again picks the jobs up, resubmits the cancelled one,
  which resumes from its checkpoint, and ends with the same results; one SLURM job per training,
  each known to SLURM under its stage's name;
* a pre-empted job (SIGUSR2 from ``scancel``) and a job reaching its one-minute time limit
  (SIGUSR2 from SLURM itself) are requeued under the same job id and resume where they stopped;
* a job whose node cannot see the run folder fails saying so;
* without a scheduler: a job that dies is resubmitted once, then its stage fails naming the log;
  local jobs get their own GPUs; ``gpus_per_job: 2`` asks SLURM for 2 GPUs per job and runs each
  training command under torchrun inside its job (the commands checked by running them here).

The SLURM tests need a SLURM that answers ``srun hostname``: ``scripts/slurm-local.sh`` (as
root) starts a single-node one, as ``.ci/run`` does; without it they are skipped with the reason.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import flat
from executor_jobs import CountingJob
from test_reliability import (  # noqa: F401 - the fixture ws (the tiny data set)
    assert_same_results,
    tiny_config,
    write_config,
    ws,
)

from fuseseg.errors import ConfigError, FusesegError
from fuseseg.runtime import load_checkpoint
from pipelines.cli import main
from pipelines.executor import (
    Executor,
    ExecutorConfig,
    JobExecutor,
    SlurmExecutor,
)
from pipelines.jobs import JobRef, job_state, status_rows
from pipelines.stage_job import StageJob

REPO = Path(__file__).resolve().parents[1]
TRAININGS = {"train_fusion/sspfusion", "segment/ir/seed0", "segment/sspfusion/seed0"}
pytestmark = pytest.mark.usefixtures("wide_console")


SEG_EPOCHS, HOLD_EPOCH = 4, 2


def exec_config(ws: Path, name: str) -> dict:
    return tiny_config(ws, name, segmentation={"epochs": SEG_EPOCHS})


def records(run_dir: Path) -> dict[str, dict]:
    return {json.loads(p.read_text())["key"]: json.loads(p.read_text()) for p in (run_dir / "stages").glob("*.json")}


@pytest.fixture(scope="module")
def reference(ws, one_torch_thread) -> Path:
    # one thread, as the jobs (job_env): float sums split over 1 or 2 threads round differently
    assert main(["run", str(write_config(ws, exec_config(ws, "ref"))), "--threads", "1"]) == 0
    return ws / "results" / "ref"


@pytest.fixture
def job_env(ws, monkeypatch, one_torch_thread):
    """What the jobs inherit: one thread (results comparable with the in-process run), this source tree."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("COLUMNS", "1000")
    monkeypatch.chdir(ws)
    return dict(os.environ)


@pytest.fixture(scope="module")
def slurm() -> int:
    """The CPUs of the SLURM node; skips (saying why) unless a SLURM answers `srun hostname` here."""
    start = "start one with scripts/slurm-local.sh (as root), as .ci/run does"
    if os.environ.get("FUSESEG_SLURM_ERROR"):
        pytest.skip(f"no SLURM: {os.environ['FUSESEG_SLURM_ERROR']}")
    if shutil.which("srun") is None:
        pytest.skip(f"no SLURM here (`srun` is not installed); {start}")
    try:
        r = subprocess.run(["srun", "-N1", "-t", "1", "hostname"], capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip(f"SLURM does not answer `srun hostname` within 60 s; {start}")
    if r.returncode != 0:
        pytest.skip(f"SLURM does not answer `srun hostname`: {r.stderr.strip()}; {start}")
    return int(subprocess.run(["sinfo", "-h", "-o", "%c"], capture_output=True, text=True).stdout.split()[0])


def wait_until(condition, what: str, timeout: float = 240.0, proc: subprocess.Popen | None = None,
               log: Path | None = None):
    t0 = time.monotonic()
    while True:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {what}:\n{log.read_text()}")
        if time.monotonic() - t0 > timeout:
            if proc is not None:
                proc.kill()
            pytest.fail(f"{what}: not reached in {timeout} s" + (f":\n{log.read_text()}" if log else ""))
        time.sleep(0.05)


# ---------------------------------------------------------------------- without a scheduler
def test_executor_settings_and_errors(tmp_path, capsys):
    from pipelines.commands.run import executor_overrides
    from pipelines.config import load_config
    from pipelines.experiment import ExperimentConfig

    ov = executor_overrides("slurm", ["partition=gpu", "gpus_per_job=2", "account=lab"], None)
    cfg = load_config(ExperimentConfig, None, ov).executor
    assert (cfg.kind, cfg.partition, cfg.gpus_per_job, cfg.extra) == ("slurm", "gpu", 2, {"account": "lab"})
    assert load_config(ExperimentConfig, None, executor_overrides("local", [], 3)).executor.jobs == 3
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        executor_overrides("slurm", ["partition"], None)
    with pytest.raises(ConfigError, match="executor.kind"):
        load_config(ExperimentConfig, None, ["executor.kind=cloud"])
    with pytest.raises(ConfigError, match="executor.gpus_per_job"):
        load_config(ExperimentConfig, None, ["executor.gpus_per_job=-1"])
    with pytest.raises(ConfigError, match="gpus_per_job"):
        load_config(ExperimentConfig, None, ["executor.kind=slurm", "launcher=torchrun", "gpus=2"])
    # USR2 comes signal_delay_s before the limit: not below it, every start would be requeued at once
    with pytest.raises(ConfigError, match="signal_delay_s=120 must be positive and below the time limit"):
        load_config(ExperimentConfig, None, executor_overrides("slurm", ["time_min=1"], None))
    assert load_config(ExperimentConfig, None, executor_overrides("slurm", ["time_min=1", "signal_delay_s=50"],
                                                                  None)).executor.signal_delay_s == 50
    assert main(["status", str(tmp_path)]) == 2
    assert "not a fuseseg run folder" in capsys.readouterr().err   # the CLI's error line (stderr)


def test_job_state_from_result_files(tmp_path):
    """A job's JSON result file decides first; a local job without one is failed once its process
    is gone. submitit's result pickle is never read (a crafted one could run code)."""
    import pickle

    ref = JobRef("local", str(2**22 + 7), tmp_path, time.time())
    assert job_state(ref).state == "failed"           # no such process, no result
    (tmp_path / f"{ref.job_id}_0_result.pkl").write_bytes(pickle.dumps(("success", {"miou": 0.5})))
    assert job_state(ref).state == "failed"           # a pickle alone is no result fuseseg reads
    ref.result_file.write_text(json.dumps({"status": "success", "value": {"miou": 0.5}}))
    assert job_state(ref).state == "finished"
    ref.result_file.write_text(json.dumps({"status": "success", "value": {"error": "bad setting"}}))
    assert job_state(ref).state == "failed"           # a fuseseg error reported by the job
    ref.result_file.write_text(json.dumps({"status": "error", "value": "Traceback ..."}))
    assert job_state(ref).state == "failed"


@pytest.mark.slow
def test_local_executor_jobs_2_gives_the_same_results(ws, reference, job_env):
    cfg = write_config(ws, exec_config(ws, "local"))
    assert main(["run", str(cfg), "executor.poll_s=0.2", "--executor", "local", "--jobs", "2"]) == 0
    run_dir = ws / "results" / "local"
    assert_same_results(reference, run_dir)
    recs = {k: r for k, r in records(run_dir).items() if k in TRAININGS}
    assert recs.keys() == TRAININGS
    assert all(r["executor"] == "local" for r in recs.values())
    assert len({r["job_id"] for r in recs.values()}) == 3          # one job (process) per training
    # CPU jobs (no GPU here): the job saw CUDA_VISIBLE_DEVICES set empty by the executor
    assert all(r["cuda_visible_devices"] == "" for r in recs.values())
    spans = [(r["job_started"], r["job_ended"]) for r in recs.values()]
    overlap = max(sum(a <= t < b for a, b in spans) for t, _ in spans)
    assert overlap == 2                                               # --jobs 2: never three at once


def test_local_jobs_get_their_own_gpus(tmp_path, monkeypatch):
    """``--executor local`` on a 4-GPU machine with 2 GPUs per job: two jobs at once, slot 0 sees
    GPUs 0,1 and slot 1 GPUs 2,3 (submitit sets CUDA_VISIBLE_DEVICES to them); 2 GPUs per job
    also means torchrun with 2 processes inside each job."""
    import torch

    from pipelines.executor import LocalExecutor

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    ex = LocalExecutor(ExecutorConfig(kind="local", gpus_per_job=2))
    assert ex.slots == [0, 1] and ex.nproc("none", 1) == 2 and ex.job_device("auto", "cpu") == "cuda"
    visible = [ex._make_submitit(tmp_path / str(k), "segment/x", k).parameters for k in ex.slots]
    assert [(p["visible_gpus"], p["gpus_per_node"]) for p in visible] == [((0, 1), 2), ((2, 3), 2)]
    one = LocalExecutor(ExecutorConfig(kind="local"))                 # default: one GPU per job
    assert one.slots == [0, 1, 2, 3] and one.nproc("none", 1) == 1
    assert one._make_submitit(tmp_path / "3", "segment/x", 3).parameters["visible_gpus"] == (3,)
    with pytest.raises(ConfigError, match="gpus_per_job=8 but this machine has 4"):
        LocalExecutor(ExecutorConfig(kind="local", gpus_per_job=8))
    for e in (ex, one):
        e.__exit__(None, None, None)


def test_a_failed_job_is_resubmitted_once_and_a_fuseseg_error_by_the_next_run(tmp_path, job_env):
    """A job that dies is reported with its log and resubmitted once; dying again, the stage fails
    naming the log and the fix. A job that stops with a fuseseg error (a bad setting) is not
    resubmitted: it would fail again. `fuseseg run` again (the fix made) resubmits either once."""
    from executor_jobs import FailingJob

    from pipelines.executor import LocalExecutor

    def run_once(run_dir: Path, out: Path, crash: bool) -> tuple[str, dict, int]:
        ex = LocalExecutor(ExecutorConfig(kind="local", poll_s=0.2))
        try:
            with pytest.raises(FusesegError) as err:
                ex.run(run_dir, "segment/x", "fp", out, FailingJob(out, crash=crash), lambda: None)
        finally:
            ex.__exit__(None, None, None)
        rec = json.loads((run_dir / "stages" / "segment__x.json").read_text())
        return str(err.value), rec, len((out / "starts").read_text().split())

    for crash in (True, False):
        run_dir = tmp_path / f"run-{crash}"
        out = run_dir / "segment" / "x"
        out.mkdir(parents=True)
        err, rec, starts = run_once(run_dir, out, crash)
        if crash:
            assert starts == 2 and rec["attempt"] == 2 and rec["status"] == "submitted"
            assert f"local job {rec['job_id']} failed (ENDED WITHOUT A RESULT); log: {rec['log']}" in err
            assert "Fix the cause, then run `fuseseg run` again" in err and Path(rec["log"]).is_file()
        else:
            assert starts == 1 and rec["attempt"] == 1
            assert err.startswith("segment/x: segmentation.lr: -1 is out of range") and rec["log"] in err
        again, rec2, starts2 = run_once(run_dir, out, crash)    # the next `fuseseg run`
        assert (starts2, rec2["attempt"]) == ((3, 3) if crash else (2, 2)) and rec2["job_id"] != rec["job_id"]
        assert rec2["log"] in again


class _SlurmSettingsHere(SlurmExecutor):
    """SLURM's settings for each job (GPUs, torchrun, sbatch options), its body run here, one
    stage after the other: what a multi-GPU SLURM job would do, checked on a CPU machine."""

    spawn, gather = Executor.spawn, Executor.gather

    def __init__(self, cfg: ExecutorConfig):
        JobExecutor.__init__(self, cfg)   # no sbatch needed
        self.jobs: dict[str, StageJob] = {}
        self.sbatch: dict[str, str] = {}

    def run(self, run_dir, key, fp, out, job, prepare):
        from submitit.slurm.slurm import _make_sbatch_string

        prepare()
        self.jobs[key] = job
        self.sbatch[key] = _make_sbatch_string(command="python -m submitit.core._submit",
                                               folder=str(out / "slurm"), **self.sbatch_params(key))
        info = job()
        assert "error" not in info, info
        return info


@pytest.mark.slow
def test_gpus_per_job_2_runs_every_training_under_torchrun_in_its_job(ws, monkeypatch, one_torch_thread):
    """``executor.gpus_per_job: 2``: each training's job asks SLURM for 2 GPUs and runs the training
    command under ``torchrun --nproc_per_node=2``; here the command runs in one process (no GPUs),
    which checks that it is a valid fuseseg command for that stage folder, resuming when it has a
    checkpoint."""
    import pipelines.run as run
    import pipelines.stage_job as stage_job

    calls: list[tuple[int, list[str]]] = []

    def torchrun_here(nproc: int, args: list[str]) -> None:
        calls.append((nproc, list(args)))
        assert main(args) == 0

    made: list[_SlurmSettingsHere] = []
    monkeypatch.setattr(stage_job, "torchrun", torchrun_here)
    monkeypatch.setattr(run, "make_executor", lambda c: made.append(_SlurmSettingsHere(c)) or made[-1])
    cfg = write_config(ws, tiny_config(ws, "gpus2"))
    assert main(["run", str(cfg), "--executor", "slurm", "--slurm", "gpus_per_job=2"]) == 0
    ex, run_dir = made[0], ws / "results" / "gpus2"
    assert set(ex.jobs) == TRAININGS and len(calls) == 3 and all(n == 2 for n, _ in calls)
    assert all("#SBATCH --gpus-per-node=2" in text.splitlines() for text in ex.sbatch.values())
    by_out = {args[args.index("--out") + 1]: args for _, args in calls}
    fusion_out = str(run_dir / "train_fusion" / "sspfusion")
    assert by_out[fusion_out] == ["train-fusion", f"{fusion_out}/requested.yaml", "--out", fusion_out]
    for v in ("ir", "sspfusion"):
        out = str(run_dir / "segment" / v / "seed0")
        job = ex.jobs[f"segment/{v}/seed0"]
        assert job.nproc == 2 and job.seg_cfg.device == "cpu"        # the configured device, not "auto"
        assert by_out[out] == ["segment", "train", "--images", str(job.images["train"]), "--labels",
                               str(job.labels["train"]), "--out", out, "--config", f"{out}/requested.yaml"]
    assert json.loads((run_dir / "tables" / "miou.json").read_text())
    # a requeued or resubmitted job finds the stage's checkpoint and resumes
    ex.jobs["segment/ir/seed0"]()
    assert calls[-1][1][-1] == "--resume" and calls[-1][1][:-1] == by_out[str(run_dir / "segment" / "ir" / "seed0")]


# ---------------------------------------------------------------------- a real SLURM
@pytest.mark.slow
@pytest.mark.slurm
def test_slurm_kill_scancel_status_and_pickup(ws, reference, slurm, job_env, capsys):
    cfg = write_config(ws, exec_config(ws, "slurm"))
    # a job takes the whole node: one runs, the others queue (deterministic states to observe)
    args = ["run", str(cfg), "executor.poll_s=0.2", "--executor", "slurm", "--slurm", f"cpus_per_job={slurm}"]
    run_dir, log = ws / "results" / "slurm", ws / "slurm-submitter.log"
    target = run_dir / "segment" / "ir" / "seed0"
    # segment/ir/seed0 stops after its checkpoint of epoch HOLD_EPOCH and waits there (jobhooks):
    # it is cancelled in the middle of its training, never racing its end
    hold, held = ws / "slurm-hold", ws / "slurm-held"
    hold.touch()
    held.unlink(missing_ok=True)
    spec = {"dir": str(target), "epoch": HOLD_EPOCH, "hold": str(hold), "held": str(held)}
    env = {**job_env, "FUSESEG_TEST_HOLD": json.dumps(spec),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "jobhooks"), job_env["PYTHONPATH"]])}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=ws, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    seen: set[str] = set()

    def rows() -> dict[str, dict]:
        if not (run_dir / "stages").is_dir():
            return {}
        found = {r["stage"]: r for r in status_rows(run_dir)}
        seen.update(r["state"] for r in found.values())
        return found

    # the segmentation job runs, held after its checkpoint of epoch HOLD_EPOCH; another job queues
    wait_until(lambda: held.is_file() and rows().get("segment/ir/seed0", {}).get("state") == "running"
               and "queued" in seen, "segment/ir/seed0 running, held after a checkpoint, another job queued",
               timeout=600, proc=proc, log=log)
    proc.send_signal(signal.SIGKILL)   # the submitting process dies ...
    proc.wait()
    job = records(run_dir)["segment/ir/seed0"]["job_id"]
    subprocess.run(["scancel", job], check=True)   # ... and the running segmentation job is cancelled
    failed = wait_until(lambda: rows().get("segment/ir/seed0", {}).get("state") == "failed"
                        and rows()["segment/ir/seed0"], "the cancelled job reported failed", timeout=120)
    assert {"queued", "running", "failed"} <= seen
    assert failed["job"] == job and Path(failed["log"]).is_file() and "CANCELLED" in failed["detail"]
    # the job queued behind it runs now and ends with no `fuseseg run` there to collect it
    others = [k for k, r in rows().items() if r["job"] and r["state"] != "done" and k != "segment/ir/seed0"]
    assert len(others) == 1, rows()
    wait_until(lambda: rows()[others[0]]["state"] == "finished", f"{others[0]} finished", timeout=600)
    finished_job = rows()[others[0]]["job"]
    capsys.readouterr()
    assert main(["status", str(run_dir)]) == 0
    table = flat(capsys.readouterr().out)
    assert "segment/ir/seed0" in table and "failed" in table and failed["log"] in table
    assert "finished; `fuseseg run` collects it" in table
    # stopped in the middle of its training: the checkpoint of epoch HOLD_EPOCH, no final one
    assert not (target / "final.pt").exists() and len(held.read_text().split()) == 1
    assert load_checkpoint(target / "last.pt")["epoch"] == HOLD_EPOCH
    first_rows = (target / "log.csv").read_text().splitlines()
    assert len(first_rows) == 1 + HOLD_EPOCH

    # `fuseseg run` again: waits for the others, resubmits the cancelled job, which resumes
    # (submitted from this process, whose environment has no hold hook)
    hold.unlink()
    assert main(args) == 0
    out = flat(capsys.readouterr().out)
    assert f"slurm job {job} failed (CANCELLED" in out and failed["log"] in out and "resubmitting it once" in out
    assert_same_results(reference, run_dir)
    recs = records(run_dir)
    assert {k for k in recs if k in TRAININGS} == TRAININGS
    trains = {k: recs[k] for k in TRAININGS}
    assert all(r["status"] == "done" and r["executor"] == "slurm" for r in trains.values())
    assert len({r["job_id"] for r in trains.values()}) == 3 and trains["segment/ir/seed0"]["job_id"] != job
    assert trains[others[0]]["job_id"] == finished_job and trains[others[0]]["attempt"] == 1   # collected, not rerun
    # the second attempt resumed from the checkpoint (not from scratch) and trained the rest only
    again = trains["segment/ir/seed0"]
    assert again["attempt"] == 2 and again["resumed_from_epoch"] == HOLD_EPOCH
    assert "resumed_from_epoch" not in trains["segment/sspfusion/seed0"]
    # its log holds the first attempt's rows of epochs 1..HOLD_EPOCH as they were (timings
    # included: a run from scratch would rewrite them) and the rest of the epochs once
    rows_now = (target / "log.csv").read_text().splitlines()
    assert rows_now[:len(first_rows)] == first_rows
    assert [int(r.split(",")[0]) for r in rows_now[1:]] == list(range(1, SEG_EPOCHS + 1))
    # every recorded job is a SLURM job of that name (no accounting database here for sacct:
    # squeue lists finished jobs for the controller's MinJobAge)
    listed = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%i %j"], capture_output=True, text=True).stdout
    names = dict(line.split(" ", 1) for line in listed.splitlines())
    assert all(names.get(r["job_id"]) == f"fuseseg:{k}" for k, r in trains.items())
    assert names.get(job) == "fuseseg:segment/ir/seed0"
    assert main(["status", str(run_dir), "--json"]) == 0
    final = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}
    assert {r["state"] for r in final.values()} == {"done"}
    ev = json.loads((target / "eval.json").read_text())
    assert final["segment/ir/seed0"]["miou"] == ev["miou"]


@dataclasses.dataclass
class _NoopJob(StageJob):
    out: Path

    def run(self) -> dict:
        return {}


@pytest.mark.slurm
def test_a_job_whose_node_cannot_see_the_run_folder_fails_saying_so(tmp_path, slurm, job_env):
    run_dir = tmp_path / "run"
    out = run_dir / "segment" / "x"
    out.mkdir(parents=True)
    ex = SlurmExecutor(ExecutorConfig(kind="slurm", poll_s=0.2, extra={"hold": True}))
    t, result = _in_thread(lambda: ex.run(run_dir, "segment/x", "fp", out, _NoopJob(out), lambda: None))
    rec = wait_until(lambda: (run_dir / "stages" / "segment__x.json").is_file()
                     and json.loads((run_dir / "stages" / "segment__x.json").read_text()), "the job submitted",
                     timeout=600)
    shutil.rmtree(out / "slurm")    # the node sees no such folder: what a node-local results_dir looks like
    subprocess.run(["scontrol", "release", rec["job_id"]], check=True)
    t.join(600)
    ex.__exit__(None, None, None)
    assert "cannot see the run folder" in result.get("error", "") and "shared with the nodes" in result["error"]


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    result: dict = {}

    def go():
        try:
            result["value"] = fn()
        except FusesegError as exc:
            result["error"] = str(exc)

    t = threading.Thread(target=go)
    t.start()
    return t, result


def _squeue_state(job: str) -> str:
    return subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()


def _requeued_job_resumes(tmp_path: Path, cfg: ExecutorConfig, signal_it: Callable[[str], None] | None) -> tuple:
    """Run a CountingJob that holds at count 5 as a SLURM job; ``signal_it(job id)`` (or SLURM
    itself, at its time limit) makes it checkpoint and requeue; once it is requeued, let it go on.
    Returns (the executor's result, the stage record, the job's log text)."""
    run_dir = tmp_path / "run"
    out = run_dir / "train_fusion" / "count"
    out.mkdir(parents=True)
    hold = tmp_path / "hold"
    hold.touch()
    ex = SlurmExecutor(cfg)
    job_body = CountingJob(out, n=10, step_s=0.05, hold_at=5, hold=hold)
    t, result = _in_thread(lambda: ex.run(run_dir, "train_fusion/count", "fp", out, job_body, lambda: None))
    rec_path = run_dir / "stages" / "train_fusion__count.json"
    # no timing assumptions: the job waits at count 5 however busy the node is
    wait_until(lambda: (out / "held").is_file(), "the job held at count 5", timeout=600)
    job = json.loads(rec_path.read_text())["job_id"]
    if signal_it is not None:
        signal_it(job)
    # requeued (checkpointed by submitit): it starts again, or SLURM holds it back for a while
    wait_until(lambda: _squeue_state(job) == "PENDING" or len((out / "starts").read_text().split()) > 1,
               "the job requeued", timeout=600)
    hold.unlink()
    # SLURM holds a requeued job back (cred_expire, 120 s) so that its new start cannot reuse the
    # old start's revoked credential, revoked at a 1 s resolution: a start in the same second
    # as the requeue fails ("Job credential revoked"). Let it start now, but 2 s after it was
    # seen pending (again, should it be signalled again).
    pending_since = None
    while t.is_alive():
        if _squeue_state(job) != "PENDING":
            pending_since = None
        elif pending_since is None:
            pending_since = time.monotonic()
        elif time.monotonic() - pending_since > 2.0:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        t.join(0.5)
    ex.__exit__(None, None, None)
    info = result.get("value") or pytest.fail(f"no result: {result}")
    return info, json.loads(rec_path.read_text()), (out / "slurm" / f"{job}_0_log.out").read_text()


@pytest.mark.slurm
def test_a_preempted_job_is_requeued_and_resumes(tmp_path, slurm, job_env):
    """Pre-emption: SLURM sends USR2 (``scancel --signal=USR2`` here); submitit checkpoints the job
    (StageJob.checkpoint) and requeues it under the same job id; it resumes where it stopped."""
    info, rec, log = _requeued_job_resumes(
        tmp_path, ExecutorConfig(kind="slurm", poll_s=0.2),
        lambda job: subprocess.run(["scancel", "--signal=USR2", job], check=True))
    assert info["job_id"] == rec["job_id"] and info["attempt"] == 1     # the same job, not a resubmission
    assert info["count"] == 10 and info["starts"] == [0, 5]              # resumed where it stopped
    assert rec["status"] == "submitted" and rec["attempt"] == 1
    assert "this job is preempted" in log and "Requeued job" in log       # submitit's own account


@pytest.mark.slurm
def test_a_job_reaching_its_time_limit_is_requeued_and_resumes(tmp_path, slurm, job_env):
    """Time-out: a one-minute job gets USR2 from SLURM itself ``signal_delay_s`` before its limit;
    submitit sees it has used its time, checkpoints and requeues it; it resumes where it stopped.

    SLURM checks time limits every 30 s and signals a job at the first check less than
    ``signal_delay_s`` + 30 s before its end (measured here: 60 s jobs with 5 and 15 s got USR2 42 s
    after their start, with 20 and 30 s 11 s after). With 20 s the signal comes 10 to 40 s after
    the start: long after submitit's handler is installed (well under 1 s) and the job holds."""
    info, rec, log = _requeued_job_resumes(
        tmp_path, ExecutorConfig(kind="slurm", poll_s=0.2, time_min=1, signal_delay_s=20), None)
    assert info["job_id"] == rec["job_id"] and info["attempt"] == 1
    assert info["count"] == 10 and info["starts"][:2] == [0, 5]
    assert "this job is timed-out" in log and "Requeued job" in log


def test_local_work_holds_a_job_slot_and_runs_with_a_jobs_thread_count(monkeypatch):
    """Fusing in the submitting process under ``--executor local`` counts as one of the ``jobs``
    (a third heavy thing waits for a slot) and uses a job's share of the cores; in process it is
    a no-op."""
    import torch

    import pipelines.executor as exm

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(exm, "job_threads", lambda jobs: (1, True))
    before = torch.get_num_threads()
    got: list = []
    try:
        torch.set_num_threads(2)
        with exm.LocalExecutor(ExecutorConfig(kind="local", jobs=2)) as ex:
            with ex.local_work():
                assert torch.get_num_threads() == 1 and len(ex.slots) == 1
                with ex.local_work():
                    assert ex.slots == []
                    waiter = threading.Thread(target=lambda: got.append(ex._acquire_slot()))
                    waiter.start()
                    waiter.join(0.3)
                    assert waiter.is_alive() and got == []      # no slot left: it waits
                waiter.join(5)
                assert got == [1]                                # the slot the inner block gave back
                ex._release_slot(got[0])
            assert ex.slots == [0, 1]
        torch.set_num_threads(2)
        with exm.Executor().local_work():
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
