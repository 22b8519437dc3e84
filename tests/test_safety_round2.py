"""Nothing a user owns is damaged, round two (issue 24, items 1-4).

1. a run folder runs no code: ``fuseseg status`` and the executor's job-state check read a job's
   result from JSON, never a pickle a stage record points at;
2. no write leaves the run folder through a link at any level (``fused/mean/test`` -> elsewhere);
3. a run never adopts a folder it did not make (marker ``.fuseseg-run``; run folders of earlier
   versions are recognised by their own records);
4. no command overwrites one of its own input files (``--json`` = ``--checkpoint``, a run's or a
   training's config.yaml given as its CONFIG).
"""
from __future__ import annotations

import json
import os
import pickle
import time
from pathlib import Path

import pytest
import yaml
from conftest import flat
from test_safety import SEG_SETTINGS, seg_run  # noqa: F401 - the fixture: a one-step segmenter

from fuseseg.data.io import atomic_write_text
from fuseseg.data.paths import confine_writes
from fuseseg.errors import ConfigError
from pipelines.cli import main
from pipelines.executor import ExecutorConfig, LocalExecutor
from pipelines.jobs import JobRef, job_state, ref_of_record
from pipelines.runstate import RUN_MARKER

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("wide_console")


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def classical_config(ws: Path, name: str, **changes) -> Path:
    """A tiny experiment without learning: 2 + 2 synthetic scenes of 48x64 fused by ``mean``."""
    cfg = {"name": name, "results_dir": str(ws / "results"), "seed": 0, "device": "cpu",
           "data": {"synthetic": {"train": 2, "test": 2, "size": [48, 64], "seed": 1}},
           "fusion": [{"name": "mean"}], "variants": ["ir", "mean"], "seg_seeds": [0],
           "metrics": {"enabled": False}, **changes}
    path = ws / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------------- 1. no code from a run folder
class _Evil:
    """Unpickling it creates the file ``marker`` (what a crafted result pickle could do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _crafted_run(tmp_path: Path, kind: str) -> tuple[Path, Path, dict]:
    """A run folder whose stage record names a job folder (outside it) holding a crafted result pickle."""
    marker, jobs, run = tmp_path / "pwned", tmp_path / "elsewhere", tmp_path / "run"
    jobs.mkdir()
    job_id = str(2**22 + 11)          # no such process
    (jobs / f"{job_id}_0_result.pkl").write_bytes(pickle.dumps(("success", _Evil(marker))))
    assert not marker.exists()
    rec = {"key": "segment/ir/seed0", "fingerprint": "fp", "status": "submitted", "executor": kind,
           "job_id": job_id, "job_folder": str(jobs), "log": str(jobs / f"{job_id}_0_log.out"), "attempt": 1,
           "submitted_at": 0}
    (run / "stages").mkdir(parents=True)
    (run / "stages" / "segment__ir__seed0.json").write_text(json.dumps(rec))
    (run / "config.yaml").write_text(yaml.safe_dump({"variants": ["ir"], "seg_seeds": [0]}))
    return run, marker, rec


@pytest.mark.parametrize("kind", ["local", "slurm"])
def test_status_of_a_crafted_run_folder_runs_no_code(tmp_path, kind, capsys, monkeypatch):
    monkeypatch.setattr("shutil.which", lambda name: None)   # no squeue: the job is unknown to a scheduler
    run, marker, rec = _crafted_run(tmp_path, kind)
    assert main(["status", str(run)]) == 0
    out = flat(capsys.readouterr().out)
    assert not marker.exists()
    assert "segment/ir/seed0" in out and "failed" in out and rec["job_id"] in out and rec["log"] in out
    assert main(["status", str(run), "--json"]) == 0
    row = {r["stage"]: r for r in json.loads(capsys.readouterr().out)}["segment/ir/seed0"]
    assert row["state"] == "failed" and row["job"] == rec["job_id"] and not marker.exists()


def test_the_executors_job_check_on_a_crafted_record_runs_no_code(tmp_path):
    run, marker, rec = _crafted_run(tmp_path, "local")
    ref = ref_of_record(rec)
    ex = LocalExecutor(ExecutorConfig(kind="local", poll_s=0.05))
    try:
        outcome, detail = ex._wait(ref)                 # what `fuseseg run` does with a submitted job
    finally:
        ex.__exit__(None, None, None)
    assert (outcome, detail) == ("failed", "ENDED WITHOUT A RESULT") and not marker.exists()
    slurm_ref = JobRef("slurm", ref.job_id, ref.folder, 0.0)
    assert job_state(slurm_ref, slurm={}).state == "failed" and not marker.exists()


def test_a_local_job_reports_its_result_as_json(tmp_path, monkeypatch, one_torch_thread):
    """A real submitit job writes ``<job id>_0_result.json``; the executor collects the result from
    it, and a pickle put in its place later changes nothing and runs nothing."""
    from executor_jobs import CountingJob

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(REPO), str(REPO / "tests"),
                                                      os.environ.get("PYTHONPATH", "")]))
    run, out = tmp_path / "run", tmp_path / "run" / "segment" / "x"
    out.mkdir(parents=True)
    ex = LocalExecutor(ExecutorConfig(kind="local", poll_s=0.1))
    try:
        info = ex.run(run, "segment/x", "fp", out, CountingJob(out, n=3, step_s=0.0), lambda: None)
    finally:
        ex.__exit__(None, None, None)
    assert info["count"] == 3 and info["starts"] == [0] and info["executor"] == "local"
    ref = JobRef("local", info["job_id"], out / "slurm", time.time())
    saved = json.loads(ref.result_file.read_text())
    assert saved["status"] == "success" and saved["value"]["count"] == 3
    marker = tmp_path / "pwned"
    (ref.folder / f"{ref.job_id}_0_result.pkl").write_bytes(pickle.dumps(("success", _Evil(marker))))
    assert job_state(ref).state == "finished" and not marker.exists()


# ---------------------------------------------------------------------- 2. no write through a link
def test_confined_writes_refuse_a_link_at_any_level_naming_it(tmp_path):
    run, outside = tmp_path / "run", tmp_path / "elsewhere"
    (run / "fused" / "mean").mkdir(parents=True)
    outside.mkdir()
    (run / "fused" / "mean" / "test").symlink_to(outside, target_is_directory=True)
    (run / "fused" / "inner").symlink_to(run / "fused" / "mean", target_is_directory=True)   # stays inside
    with confine_writes(run):
        with pytest.raises(ConfigError) as err:
            atomic_write_text(run / "fused" / "mean" / "test" / "sub" / "a.png", "x")
        atomic_write_text(run / "fused" / "inner" / "b.txt", "y")
        atomic_write_text(tmp_path / "beside.txt", "z")           # not under the run: not its business
    msg = str(err.value)
    assert f"symbolic link {run / 'fused' / 'mean' / 'test'}" in msg and "outside the run folder" in msg
    assert "\n" not in msg and list(outside.iterdir()) == []
    assert (run / "fused" / "mean" / "b.txt").read_text() == "y"
    atomic_write_text(run / "fused" / "mean" / "test" / "c.txt", "w")   # unconfined again after the block
    assert [p.name for p in outside.iterdir()] == ["c.txt"]


def test_a_run_never_writes_through_a_nested_link_out_of_it(tmp_path, capsys, one_torch_thread):
    """fused/mean/test of a finished fuse replaced by a link, the stage's record deleted: fusing
    again (resuming in its own folder) is refused naming the link; the target stays empty."""
    cfg = classical_config(tmp_path, "nested")
    run = tmp_path / "results" / "nested"
    assert main(["run", str(cfg), "--only", "data,fuse"]) == 0
    test = run / "fused" / "mean" / "test"
    assert len(list(test.glob("*.png"))) == 2
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    for p in test.iterdir():
        p.unlink()
    test.rmdir()
    test.symlink_to(outside, target_is_directory=True)
    (run / "stages" / "fuse__mean.json").unlink()
    capsys.readouterr()
    rc = main(["run", str(cfg), "--only", "fuse"])
    err = flat(capsys.readouterr().err)
    assert rc != 0 and f"through the symbolic link {test}" in err and "outside the run folder" in err
    assert list(outside.iterdir()) == []


# ---------------------------------------------------------------------- 3. no folder adopted
def test_a_run_folder_fuseseg_did_not_make_is_refused_untouched(tmp_path, capsys):
    cfg = classical_config(tmp_path, "mine")
    for how in ("folder", "link"):
        user = tmp_path / f"user-{how}"
        user.mkdir()
        (user / "config.yaml").write_text("# my own notes\nkeep: me\n")
        (user / "report.md").write_text("my report\n")
        before = _tree(user)
        run = tmp_path / "results" / "mine"
        run.parent.mkdir(exist_ok=True)
        if how == "folder":
            user.rename(run)
            user = run
        else:
            run.symlink_to(user, target_is_directory=True)
        rc = main(["run", str(cfg), "--only", "data"])
        err = flat(capsys.readouterr().err)
        assert rc != 0 and f"{run} exists but is not a fuseseg run folder" in err
        assert f"touch {run / RUN_MARKER}" in err and "name=..." in err
        assert _tree(user) == before and sorted(p.name for p in user.iterdir()) == ["config.yaml", "report.md"]
        run.unlink() if how == "link" else os.rename(run, tmp_path / "kept")


def test_a_run_folder_gets_a_marker_and_earlier_versions_folders_are_still_resumed(tmp_path, capsys):
    cfg = classical_config(tmp_path, "mark")
    run = tmp_path / "results" / "mark"
    run.mkdir(parents=True)                          # an empty folder is taken
    assert main(["run", str(cfg), "--only", "data"]) == 0
    info = json.loads((run / RUN_MARKER).read_text())
    assert set(info) == {"fuseseg", "created"}
    record = (run / "stages" / "data.json").read_bytes()
    (run / RUN_MARKER).unlink()                      # a run folder of a version before the marker
    capsys.readouterr()
    assert main(["run", str(cfg), "--only", "data"]) == 0
    assert "data: skipped (up to date)" in flat(capsys.readouterr().out)
    assert (run / RUN_MARKER).is_file() and (run / "stages" / "data.json").read_bytes() == record
    (run / RUN_MARKER).unlink()                      # without its environment.json: not recognised
    (run / "environment.json").unlink()
    assert main(["run", str(cfg), "--only", "data"]) != 0
    assert "is not a fuseseg run folder" in flat(capsys.readouterr().err)


# ---------------------------------------------------------------------- 4. inputs are no outputs
@pytest.mark.parametrize("link", ["same path", "hard link"])
def test_segment_eval_json_never_replaces_its_checkpoint(seg_run, link, capsys):  # noqa: F811
    ck = seg_run / "model" / "final.pt"
    target = ck
    if link == "hard link":
        target = seg_run / "model" / "also-final.pt"
        target.unlink(missing_ok=True)
        os.link(ck, target)
    before = ck.read_bytes()
    rc = main(["segment", "eval", "--checkpoint", str(ck), "--images", str(seg_run / "images"), "--labels",
               str(seg_run / "labels"), "--json", str(target), "--device", "cpu", "--no-progress"])
    err = flat(capsys.readouterr().err)
    assert rc == 2 and f"--json {target} is the input --checkpoint {ck}" in err
    assert ck.read_bytes() == before


def test_a_run_never_rewrites_the_edited_config_it_reads(tmp_path, capsys):
    cfg = classical_config(tmp_path, "own")
    run = tmp_path / "results" / "own"
    assert main(["run", str(cfg), "--only", "data"]) == 0
    own = run / "config.yaml"
    written = own.read_text()
    assert main(["run", str(own), "--only", "data"]) == 0          # its own config.yaml, unchanged: fine
    assert own.read_text() == written
    edited = "# my notes: keep them\n" + written.replace("seed: 0", "seed: 3")
    own.write_text(edited)
    capsys.readouterr()
    rc = main(["run", str(own), f"results_dir={tmp_path / 'results'}", "name=own", "--only", "data"])
    err = flat(capsys.readouterr().err)
    assert rc == 2 and f"the config file {own} is {own}, which this command rewrites" in err
    assert f"cp {own} my.yaml" in err and own.read_text() == edited
    from pipelines import api

    with pytest.raises(ConfigError, match="which this command rewrites"):   # the Python API alike
        api.run(own, only=["data"])
    assert own.read_text() == edited
    (run / "stages" / "mine.yaml").write_text(yaml.safe_dump(yaml.safe_load(written)))
    rc = main(["run", str(run / "stages" / "mine.yaml"), "--only", "data"])
    assert rc == 2 and "a folder the run writes" in flat(capsys.readouterr().err)


def test_train_fusion_never_rewrites_the_config_it_reads(make_pairs, tmp_path, capsys):
    data = make_pairs(4, size=(48, 64))
    out = tmp_path / "fusion-run"
    out.mkdir()
    conf = out / "config.yaml"
    text = "# my fusion settings\n" + yaml.safe_dump({
        "plugins": ["fusion_tiny"], "method": "tiny-trainable", "data_root": str(data), "structure_epochs": 1,
        "epochs": 1, "batch_size": 4, "crop_size": 32, "workers": 0, "device": "cpu"})
    conf.write_text(text)
    rc = main(["train-fusion", str(conf), "--out", str(out), "--no-progress"])
    err = flat(capsys.readouterr().err)
    assert rc == 2 and f"the config file {conf} is {conf}, which this command rewrites" in err
    assert "--resume" in err and conf.read_text() == text and sorted(p.name for p in out.iterdir()) == ["config.yaml"]
