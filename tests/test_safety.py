"""Nothing a user owns is damaged or exposed (issue 14).

* files: every file written gets the mode the umask gives (022 and 002), and is fsynced before
  its rename, the folder after it;
* foreign code: checkpoints load with ``torch.load(weights_only=True)``; a crafted checkpoint
  whose unpickling would create a file is refused with a clear error and creates nothing; RNG
  states are stored as tensors and plain values; checkpoints of older versions still load.
"""
from __future__ import annotations

import io
import json
import os
import random
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import flat

from fuseseg import runtime
from fuseseg.data.io import atomic_write_bytes, atomic_write_text, write_image
from fuseseg.errors import CheckpointError
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("wide_console")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return tmp_path_factory.mktemp("safety")


def tiny_run_config(ws: Path, name: str, **changes) -> Path:
    """A tiny experiment: synthetic data generated in the run folder, a one-step SSPFusion, one
    one-step segmenter per variant, a report."""
    cfg = {
        "name": name, "results_dir": str(ws / "results"), "seed": 0, "device": "cpu",
        "data": {"synthetic": {"train": 4, "test": 2, "size": [48, 64], "seed": 1}},
        "fusion": [{"name": "sspfusion", "kwargs": {"levels": 2, "channels": [4, 8, 8]}}, {"name": "mean"}],
        "fusion_train": {"structure_epochs": 1, "epochs": 1, "batch_size": 4, "crop_size": 32, "workers": 0},
        "metrics": {"enabled": True, "workers": 1},
        "segmentation": {"encoder": "tu-mobilenetv3_small_050", "epochs": 1, "frozen_epochs": 0,
                         "batch_size": 4, "frozen_batch_size": 4, "crop_size": 32, "workers": 0,
                         "decoder_channels": 16, "max_steps_per_epoch": 1},
        "variants": ["ir", "sspfusion"], "seg_seeds": [0], "report": {"bootstrap": 10, "figure_scenes": 1},
        **changes,
    }
    path = ws / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---------------------------------------------------------------------- file modes
@pytest.mark.slow
@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_every_file_of_a_run_gets_the_mode_the_umask_gives(ws, umask, one_torch_thread):
    old = os.umask(umask)
    try:
        assert main(["run", str(tiny_run_config(ws, f"umask{umask:03o}"))]) == 0
    finally:
        os.umask(old)
    run_dir = ws / "results" / f"umask{umask:03o}"
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    assert {".pt", ".png", ".json", ".html", ".md", ".csv", ".yaml", ".npy"} <= kinds, kinds
    wrong = {str(p.relative_to(run_dir)): oct(stat.S_IMODE(p.stat().st_mode)) for p in files
             if stat.S_IMODE(p.stat().st_mode) != 0o666 & ~umask}
    assert wrong == {}, f"{len(wrong)} of {len(files)} files have another mode than {oct(0o666 & ~umask)}"
    dirs = [p for p in run_dir.rglob("*") if p.is_dir()]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o777 & ~umask for p in dirs)
    # every checkpoint the run wrote loads with weights_only=True and no allow-list
    cks = sorted(run_dir.rglob("*.pt"))
    assert len(cks) >= 4
    for ck in cks:
        assert "state_dict" in torch.load(ck, map_location="cpu", weights_only=True)


# ---------------------------------------------------------------------- durability
def test_atomic_write_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", Path(dst).name))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic_write_text(tmp_path / "record.json", "{}")
    runtime.save_checkpoint(tmp_path / "last.pt", {"state_dict": {"w": torch.ones(2)}})
    write_image(tmp_path / "a.png", np.zeros((4, 4), np.uint8))
    expected = []
    for name in ("record.json", "last.pt", "a.png"):
        expected += [("fsync", "file"), ("rename", name), ("fsync", "dir")]
    assert events == expected
    assert json.loads((tmp_path / "record.json").read_text()) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "last.pt", "record.json"]


def test_atomic_write_never_leaves_its_temporary_on_failure(tmp_path, monkeypatch):
    atomic_write_bytes(tmp_path / "x.bin", b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(tmp_path / "x.bin", b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["x.bin"] and (tmp_path / "x.bin").read_bytes() == b"old"


# ---------------------------------------------------------------------- foreign code
class _Evil:
    """Unpickling this object calls ``open(marker, 'w')``: it creates a file (any call could run)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _evil_checkpoint(tmp_path: Path) -> tuple[Path, Path]:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"kind": "fusion", "method": "mean", "kwargs": {}, "state_dict": {}, "x": _Evil(marker)}, path)
    assert not marker.exists()
    return path, marker


def test_a_crafted_checkpoint_runs_no_code_and_is_a_clear_error(tmp_path):
    path, marker = _evil_checkpoint(tmp_path)
    with pytest.raises(CheckpointError) as err:
        runtime.load_checkpoint(path)
    assert not marker.exists()
    msg = str(err.value)
    assert str(path) in msg and "(io.open)" in msg and "can run any code" in msg
    assert "\n" not in msg


def test_fuse_with_a_crafted_checkpoint_runs_no_code(tmp_path, make_pairs, capsys):
    path, marker = _evil_checkpoint(tmp_path)
    pairs = make_pairs(2)
    rc = main(["fuse", "--checkpoint", str(path), "--ir", str(pairs / "ir"), "--vi", str(pairs / "vi"),
               "--out", str(tmp_path / "out"), "--device", "cpu", "--no-progress"])
    out = flat(capsys.readouterr().err)
    assert rc != 0 and not marker.exists()
    assert f"checkpoint {path} holds Python objects other than tensors and plain data" in out
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.png"))


def test_rng_state_is_plain_data_and_round_trips(tmp_path):
    runtime.seed_everything(7)
    state = runtime.get_rng_state()
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)   # no allow-list needed
    a = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), random.gauss(0, 1))
    runtime.seed_everything(99)
    runtime.set_rng_state(loaded)
    b = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist(), random.gauss(0, 1))
    assert a == b


def test_a_checkpoint_of_the_older_format_still_loads_and_restores_its_rng(tmp_path):
    """Older fuseseg saved the raw RNG states: a tuple for Python, numpy's tuple with an ndarray."""
    random.seed(3)
    np.random.seed(3)
    np.random.randn()  # a cached gaussian in numpy's state
    old_rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = (random.random(), np.random.randn(2).tolist())
    path = tmp_path / "old.pt"
    torch.save({"kind": "segmentation", "state_dict": {"w": torch.ones(1)}, "rng": old_rng,
                "log": [{"loss": np.float64(0.5)}]}, path)
    ck = runtime.load_checkpoint(path)
    random.seed(0)
    np.random.seed(0)
    runtime.set_rng_state(ck["rng"])
    assert (random.random(), np.random.randn(2).tolist()) == expected
    assert ck["log"][0]["loss"] == 0.5


def test_a_corrupt_checkpoint_is_still_reported_as_corrupt(tmp_path):
    path = tmp_path / "bad.pt"
    path.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="is corrupt or not a fuseseg checkpoint"):
        runtime.load_checkpoint(path)


# ---------------------------------------------------------------------- path containment
BAD_NAMES = ["..", "", "/abs/dir", "a/b", "../up", ".hidden", "."]


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_a_run_name_that_is_not_a_plain_name_is_refused_and_nothing_is_deleted(tmp_path, bad, capsys):
    """``name=..`` with results_dir=x/results made the data stage delete x/data (issue 14)."""
    (tmp_path / "x" / "data").mkdir(parents=True)
    (tmp_path / "x" / "data" / "keep").write_text("hi")
    cfg = tiny_run_config(tmp_path, "victim", results_dir=str(tmp_path / "x" / "results"))
    rc = main(["run", str(cfg), f"name={bad}", "--only", "data"])
    out = flat(capsys.readouterr().err)
    assert rc == 2
    assert f"name: {bad!r} is not a plain name" in out and "no '/', no '..'" in out
    assert (tmp_path / "x" / "data" / "keep").read_text() == "hi"
    assert not (tmp_path / "x" / "results").exists()


@pytest.mark.parametrize("bad", BAD_NAMES)
def test_a_fusion_variant_name_that_is_not_a_plain_name_is_refused(tmp_path, bad, capsys):
    """A fusion entry ``{name: /some/dir, method: mean}`` made the fuse stage wipe /some/dir."""
    victim = tmp_path / "some" / "dir"
    victim.mkdir(parents=True)
    (victim / "keep").write_text("hi")
    name = str(victim) if bad == "/abs/dir" else bad
    cfg = tiny_run_config(tmp_path, "run", fusion=[{"name": "mean"}, {"name": name, "method": "mean"}],
                          variants=None)
    rc = main(["run", str(cfg)])
    out = flat(capsys.readouterr().err)
    assert rc == 2 and f"fusion[1].name: {name!r} is not a plain name" in out
    assert (victim / "keep").read_text() == "hi"
    assert not (tmp_path / "results").exists()


def test_good_names_are_accepted():
    from fuseseg.data.paths import check_plain_name

    for good in ("default", "msrs-paper", "run_2", "v1.5", "sspfusion+ft", "A0"):
        assert check_plain_name(good, "name") == good


def test_a_stage_folder_fuseseg_did_not_make_is_never_deleted(tmp_path, capsys):
    """The data stage found results/<name>/data without a .fingerprint: refuse, keep the files."""
    data = tmp_path / "results" / "mine" / "data"
    data.mkdir(parents=True)
    (data / "keep").write_text("hi")
    (data.parent / ".fuseseg-run").write_text("{}")   # a run folder of fuseseg's (else refused as a whole)
    cfg = tiny_run_config(tmp_path, "mine")
    rc = main(["run", str(cfg), "--only", "data"])
    out = flat(capsys.readouterr().err)
    assert rc != 0
    assert f"{data} exists but fuseseg did not make it (no .fingerprint file in it)" in out
    assert (data / "keep").read_text() == "hi"


def test_prepare_dir_clears_only_its_own_folders_and_stays_inside_the_run(tmp_path):
    from fuseseg.errors import FusesegError
    from pipelines.stages.base import prepare_dir as _prepare_dir

    run = tmp_path / "run"
    own = run / "fused" / "mean"
    assert _prepare_dir(own, "fp1", run, "fuse/mean") is False          # new folder: made, marked
    (own / "a.png").write_bytes(b"x")
    assert _prepare_dir(own, "fp1", run, "fuse/mean") is True           # same config: resume
    assert (own / "a.png").exists()
    assert _prepare_dir(own, "fp2", run, "fuse/mean") is False          # other config: cleared
    assert not (own / "a.png").exists() and (own / ".fingerprint").read_text() == "fp2"
    empty = run / "fused" / "gff"
    empty.mkdir()
    assert _prepare_dir(empty, "fp", run, "fuse/gff") is False           # an empty folder is taken
    # a link that leads out of the run folder: refused, the target untouched
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / ".fingerprint").write_text("old")
    (outside / "keep").write_text("hi")
    (run / "fused" / "max").symlink_to(outside, target_is_directory=True)
    with pytest.raises(FusesegError, match="outside the run folder"):
        _prepare_dir(run / "fused" / "max", "fp", run, "fuse/max")
    (run / "segment").symlink_to(outside, target_is_directory=True)
    with pytest.raises(FusesegError, match="outside the run folder"):
        _prepare_dir(run / "segment" / "ir", "fp", run, "segment/ir/seed0")
    assert sorted(p.name for p in outside.iterdir()) == [".fingerprint", "keep"]


def test_a_run_folder_whose_subfolder_links_elsewhere_is_refused(tmp_path, capsys):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "keep").write_text("hi")
    run = tmp_path / "results" / "linked"
    run.mkdir(parents=True)
    (run / ".fuseseg-run").write_text("{}")   # a run folder of fuseseg's (else refused as a whole)
    (run / "tables").symlink_to(outside, target_is_directory=True)
    rc = main(["run", str(tiny_run_config(tmp_path, "linked")), "--only", "data"])
    out = flat(capsys.readouterr().err)
    assert rc != 0 and "outside the run folder" in out and str(run / "tables") in out
    assert [p.name for p in outside.iterdir()] == ["keep"]


# ---------------------------------------------------------------------- inputs never overwritten
def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _fuse(pairs: Path, out: Path, *extra: str, method: str = "mean") -> int:
    return main(["fuse", "--method", method, "--ir", str(pairs / "ir"), "--vi", str(pairs / "vi"),
                 "--out", str(out), "--device", "cpu", "--no-progress", *extra])


@pytest.mark.parametrize("where, how", [("vi", "is the input --vi"), ("ir", "is the input --ir"),
                                        (".", "contains the input --ir"),
                                        ("vi/sub", "lies inside the input --vi")])
def test_fuse_never_writes_into_its_inputs(make_pairs, where, how, capsys):
    pairs = make_pairs(2)
    before = _tree(pairs)
    rc = _fuse(pairs, pairs / where, "--overwrite")
    out = flat(capsys.readouterr().err)
    assert rc == 2 and f"--out {pairs / where} {how}" in out and "Give --out a folder of its own" in out
    assert _tree(pairs) == before


def test_fuse_into_the_folder_of_jpg_inputs_adds_no_png(make_pairs, capsys):
    """``--out D/ir`` with .jpg inputs added .png files beside them (check-data then failed)."""
    import cv2

    pairs = make_pairs(2)
    for p in sorted((pairs / "ir").glob("*.png")):
        cv2.imwrite(str(p.with_suffix(".jpg")), cv2.imread(str(p), cv2.IMREAD_UNCHANGED))
        p.unlink()
    before = _tree(pairs)
    assert _fuse(pairs, pairs / "ir") == 2
    assert "is the input --ir" in flat(capsys.readouterr().err)
    assert _tree(pairs) == before


def test_a_fuse_folder_records_its_method_and_refuses_another(make_pairs, tmp_path, capsys):
    pairs = make_pairs(3)
    out = tmp_path / "fused"
    assert _fuse(pairs, out, method="mean") == 0
    record = json.loads((out / ".fuseseg-fuse.json").read_text())
    assert record["method"] == "mean" and record["checkpoint"] is None and record["ir16"] == "minmax"
    mean_images = _tree(out)
    capsys.readouterr()
    # another method into the same folder: refused, the mean images kept as they are
    assert _fuse(pairs, out, method="max") == 2
    msg = flat(capsys.readouterr().err)
    assert f"output folder {out} already holds images fused by method 'mean'" in msg
    assert "not by method 'max'" in msg and "--overwrite" in msg
    assert _tree(out) == mean_images
    # --overwrite: every image redone by max, equal to a fresh max output
    assert _fuse(pairs, out, "--overwrite", method="max") == 0
    assert _fuse(pairs, tmp_path / "fresh_max", method="max") == 0
    got, want = _tree(out), _tree(tmp_path / "fresh_max")
    assert {k: v for k, v in got.items() if k.endswith(".png")} == \
        {k: v for k, v in want.items() if k.endswith(".png")}
    assert json.loads((out / ".fuseseg-fuse.json").read_text())["method"] == "max"
    # the same method again: the images are kept (nothing to redo)
    capsys.readouterr()
    assert _fuse(pairs, out, method="max") == 0
    assert "fused 0 pair(s)" in flat(capsys.readouterr().out)


def test_images_in_a_fuse_folder_without_a_record_are_not_kept_silently(make_pairs, tmp_path, capsys):
    pairs = make_pairs(2)
    out = tmp_path / "fused"
    out.mkdir()
    stem = sorted((pairs / "ir").glob("*.png"))[0].name
    (out / stem).write_bytes((pairs / "vi" / stem).read_bytes())   # somebody else's image
    assert _fuse(pairs, out) == 2
    msg = flat(capsys.readouterr().err)
    assert "that fuseseg has no record of making" in msg and stem in msg
    assert (out / stem).read_bytes() == (pairs / "vi" / stem).read_bytes()
    assert _fuse(pairs, out, "--overwrite") == 0
    assert _fuse(pairs, tmp_path / "fresh") == 0
    assert (out / stem).read_bytes() == (tmp_path / "fresh" / stem).read_bytes()


@pytest.fixture(scope="module")
def seg_run(tmp_path_factory, one_torch_thread):
    """A labelled pair folder and a one-step segmenter trained on it."""
    from tests.conftest import write_png

    root = tmp_path_factory.mktemp("seg")
    rng = np.random.default_rng(0)
    for i in range(2):
        write_png(root / "images" / f"{i}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
        write_png(root / "labels" / f"{i}.png", rng.integers(0, 9, (32, 32), dtype=np.uint8))
    assert main(["segment", "train", "--images", str(root / "images"), "--labels", str(root / "labels"),
                 "--out", str(root / "model"), "--no-progress", *SEG_SETTINGS]) == 0
    return root


SEG_SETTINGS = ["encoder=tu-mobilenetv3_small_050", "epochs=1", "frozen_epochs=0", "batch_size=2",
                "frozen_batch_size=2", "crop_size=32", "workers=0", "decoder_channels=16",
                "max_steps_per_epoch=1", "device=cpu"]


@pytest.mark.parametrize("option, where", [("--save-predictions", "labels"), ("--save-predictions", "images"),
                                           ("--json", "labels/eval.json")])
def test_segment_eval_never_writes_into_its_inputs(seg_run, option, where, capsys):
    before = _tree(seg_run / "labels"), _tree(seg_run / "images")
    rc = main(["segment", "eval", "--checkpoint", str(seg_run / "model" / "final.pt"), "--images",
               str(seg_run / "images"), "--labels", str(seg_run / "labels"), option, str(seg_run / where),
               "--device", "cpu", "--no-progress"])
    out = flat(capsys.readouterr().err)
    assert rc == 2 and f"{option} {seg_run / where}" in out and "Give " in out
    assert (_tree(seg_run / "labels"), _tree(seg_run / "images")) == before


def test_segment_train_never_writes_into_its_inputs(seg_run, capsys):
    before = _tree(seg_run / "labels")
    rc = main(["segment", "train", "--images", str(seg_run / "images"), "--labels", str(seg_run / "labels"),
               "--out", str(seg_run / "labels"), "--no-progress", *SEG_SETTINGS])
    assert rc == 2 and "--out" in flat(capsys.readouterr().err)
    assert _tree(seg_run / "labels") == before


def test_train_fusion_never_writes_into_its_inputs(make_pairs, capsys):
    pairs = make_pairs(2)
    before = _tree(pairs)
    rc = main(["train-fusion", f"data_root={pairs}", "method=sspfusion", "epochs=1", "device=cpu",
               "--out", str(pairs / "vi"), "--no-progress"])
    assert rc == 2 and f"--out {pairs / 'vi'} is the input vi" in flat(capsys.readouterr().err)
    assert _tree(pairs) == before


def _fake_run(run: Path) -> None:
    from pipelines import report as rep

    rows = rep.miou_rows({"ir": [{"per_class_iou": [0.5, 0.25], "miou": 0.375, "pixel_accuracy": 0.8}]},
                         ["a", "b"])
    rep.write_miou_tables(run / "tables", rows, ["a", "b"], "protocol of X", {"encoder": "x"}, [])


@pytest.mark.parametrize("inside", ["tables", "", "..", "sub/deeper"])
def test_compare_never_writes_into_a_run_folder(tmp_path, inside, capsys):
    """``compare X --out X/tables`` overwrote X's own miou.json (its report then looked current)."""
    run = tmp_path / "results" / "X"
    _fake_run(run)
    before = _tree(tmp_path / "results")
    out = (run / inside) if inside else run
    rc = main(["compare", str(run), "--out", str(out)])
    assert rc == 2 and f"the input run folder 1 {run}" in flat(capsys.readouterr().err)
    assert _tree(tmp_path / "results") == before
    assert main(["compare", str(run), "--out", str(tmp_path / "merged")]) == 0   # a folder of its own


def test_metrics_never_writes_into_its_inputs(make_pairs, tmp_path, capsys):
    pairs = make_pairs(2, size=(48, 48))
    assert _fuse(pairs, tmp_path / "fused") == 0
    before = _tree(tmp_path / "fused")
    rc = main(["metrics", "--ir", str(pairs / "ir"), "--vi", str(pairs / "vi"), "--fused",
               f"mean={tmp_path / 'fused'}", "--out", str(tmp_path / "fused"), "--metrics", "EN"])
    assert rc == 2 and "is the input --fused mean" in flat(capsys.readouterr().err)
    assert _tree(tmp_path / "fused") == before


# ---------------------------------------------------------------------- locks
RACER = r'''
import json, os, pathlib, sys, time
from pipelines.runstate import RunLock
from fuseseg.errors import FusesegError

lock_path, start, delay = pathlib.Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
# injected delays: after every open() of a file and before every unlink(), the windows in which
# a check-delete-create lock lets a second process in
real_open, real_unlink = os.open, pathlib.Path.unlink
def slow_open(*a, **k):
    fd = real_open(*a, **k)
    time.sleep(delay)
    return fd
def slow_unlink(self, *a, **k):
    time.sleep(delay)
    return real_unlink(self, *a, **k)
os.open, pathlib.Path.unlink = slow_open, slow_unlink
while time.time() < start:
    time.sleep(0.001)
try:
    with RunLock(lock_path):
        print("GOT", flush=True)
        time.sleep(1.5)   # hold it while the other process tries
except FusesegError as exc:
    print("REFUSED", exc, flush=True)
'''


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "1000",
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}


@pytest.mark.slow
def test_two_processes_racing_for_a_stale_lock_never_both_get_it(tmp_path):
    """A lock left by a dead process, two processes starting together, delays injected into the
    lock's file operations: exactly one holds the lock, the other is refused naming it."""
    import socket
    import time

    script = tmp_path / "racer.py"
    script.write_text(RACER)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    for trial in range(3):
        lock = tmp_path / f"run{trial}" / ".lock"
        lock.parent.mkdir()
        lock.write_text(json.dumps({"host": socket.gethostname(), "pid": int(dead), "since": "earlier"}))
        start = time.time() + 4.0   # both processes have imported torch by then
        procs = [subprocess.Popen([sys.executable, str(script), str(lock), str(start), "0.3"], cwd=REPO,
                                  env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=120)[0] for p in procs]
        got = [o for o in outs if o.startswith("GOT")]
        refused = [o for o in outs if o.startswith("REFUSED")]
        assert len(got) == 1 and len(refused) == 1, outs
        winner = procs[outs.index(got[0])].pid
        assert f"pid {dead}" not in refused[0]   # the dead process is never named as the holder
        assert (f"is in use by another fuseseg process (pid {winner}," in refused[0]
                or "is in use by another fuseseg process (its pid is not recorded yet)" in refused[0]), refused[0]


def test_a_lock_is_free_again_after_its_holder_is_killed(tmp_path):
    import signal

    lock = tmp_path / "run" / ".lock"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom pipelines.runstate import RunLock\n"
                               f"held = RunLock({str(lock)!r}).acquire()\nprint('held', flush=True)\ntime.sleep(120)"],
                              cwd=REPO, env=_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    from fuseseg.errors import FusesegError
    from pipelines.runstate import RunLock

    with pytest.raises(FusesegError, match=f"in use by another fuseseg process \\(pid {holder.pid},"):
        RunLock(lock).acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    with RunLock(lock):   # the kernel dropped the dead process's lock: no stale-lock handling needed
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def _wait_for_lock(lock: Path, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    import time

    t0 = time.monotonic()
    while True:
        try:
            if json.loads(lock.read_text() or "{}").get("pid") == proc.pid and \
                    (lock.parent / "config.yaml").is_file():   # holds the lock, training has started
                return
        except (OSError, json.JSONDecodeError):
            pass
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"the first training never held its lock:\n{log.read_text()}")
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["segment train", "train-fusion"])
def test_a_second_training_into_the_same_folder_is_refused(tmp_path, make_pairs, command, capsys):
    """Two trainings into one --out both exited 0 and one user's final.pt was the other's model."""
    import signal

    pairs = make_pairs(2, size=(32, 32), labels=True)
    out = tmp_path / "model"
    if command == "segment train":
        args = ["segment", "train", "--images", str(pairs / "vi"), "--labels", str(pairs / "Segmentation_labels"),
                "--out", str(out), "--no-progress", *[s for s in SEG_SETTINGS if not s.startswith("epochs=")]]
        first, second = [*args, "epochs=100000"], [*args, "epochs=1", "seed=5"]
    else:
        args = ["train-fusion", f"data_root={pairs}", "method=sspfusion", "method_kwargs={levels: 2, channels: [4, 8, 8]}",
                "batch_size=2", "crop_size=32", "workers=0", "device=cpu", "structure_epochs=1",
                "max_steps_per_epoch=1", "--out", str(out), "--no-progress"]
        first, second = [*args, "epochs=100000"], [*args, "epochs=1", "seed=5"]
    log = tmp_path / "first.log"
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *first], cwd=REPO, env=_env(),
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        _wait_for_lock(out / ".lock", proc, log)
        capsys.readouterr()
        assert main(second) != 0
        msg = "\n".join(ln for ln in capsys.readouterr().err.splitlines() if not ln.startswith("warning: "))
        assert len(msg.strip().splitlines()) == 1, msg
        assert f"output folder {out} is in use by another fuseseg process (pid {proc.pid}," in flat(msg)
        assert f"Wait for it to finish, or give `fuseseg {command} --out` another folder" in flat(msg)
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=300)
    assert rc == 130, log.read_text()
    assert yaml.safe_load((out / "config.yaml").read_text())["epochs"] == 100000   # the first one's run


# ---------------------------------------------------------------------- environment record
def test_a_rerun_that_skips_every_stage_keeps_the_record_of_the_producing_machine(tmp_path):
    cfg = tiny_run_config(tmp_path, "env", data={"synthetic": {"train": 2, "test": 1, "size": [48, 64], "seed": 1},
                                                 "validate": False})
    run_dir = tmp_path / "results" / "env"
    assert main(["run", str(cfg), "--only", "data"]) == 0
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["seed"] == 0 and env["versions"]["torch"] == torch.__version__
    record = json.loads((run_dir / "stages" / "data.json").read_text())
    assert record["environment"] == env          # every stage record names its machine
    # as if the results had been produced on another machine
    produced = {**env, "host": "machine-a", "device": {**env["device"], "gpus": ["A100"]}}
    (run_dir / "environment.json").write_text(json.dumps(produced))
    assert main(["run", str(cfg), "--only", "data"]) == 0   # skipped: nothing redone
    assert json.loads((run_dir / "environment.json").read_text()) == produced
    assert json.loads((run_dir / "stages" / "data.json").read_text()) == record
    assert main(["run", str(cfg), "--from", "data", "--only", "data"]) == 0   # redone here: this machine
    assert json.loads((run_dir / "environment.json").read_text())["host"] == env["host"]
