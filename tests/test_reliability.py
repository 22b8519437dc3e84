"""Reliability of the whole pipeline (issue 7), on a tiny CPU experiment.

* crash safety: Ctrl-C (SIGINT) during fusion training stops cleanly after a checkpoint and says
  how to resume; SIGKILL during the fuse stage, then the same command, finishes the experiment;
  a second run on a folder in use is refused; the finished run equals an uninterrupted one
  (fused image bytes, checkpoint state_dicts, tables), which is also the determinism check
  (same config and seed on CPU -> identical results in two run folders);
* bad inputs: every broken data set, config or checkpoint makes ``fuseseg run`` exit 2 with a
  message naming the file/key and the fix, before anything is trained, and leaves an earlier
  finished run folder byte-identical;
* non-finite losses and CUDA out-of-memory errors (simulated on CPU) stop training with a
  message naming the step / the setting to lower, keeping the last good checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from conftest import flat

from fuseseg.errors import FusesegError
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY_SSP = {"levels": 2, "channels": [4, 8, 8]}


def tiny_config(ws: Path, name: str, **changes) -> dict:
    """The tiny experiment: 6 + 4 synthetic scenes of 48x64, a tiny SSPFusion (1 structure epoch +
    4 fusion epochs of one step), one-step segmenters on ``ir`` and ``sspfusion``."""
    cfg = {
        "name": name, "results_dir": str(ws / "results"), "seed": 0, "device": "cpu",
        "data": {"root": str(ws / "data")},
        "fusion": [{"name": "sspfusion", "kwargs": TINY_SSP}],
        "fusion_train": {"structure_epochs": 1, "epochs": 4, "batch_size": 4, "crop_size": 32, "workers": 0},
        "fuse_batch_size": 4,
        "metrics": {"enabled": True, "workers": 1},
        "segmentation": {"encoder": "tu-mobilenetv3_small_050", "epochs": 1, "frozen_epochs": 0,
                         "batch_size": 4, "frozen_batch_size": 4, "crop_size": 32, "workers": 0,
                         "decoder_channels": 16, "max_steps_per_epoch": 1},
        "variants": ["ir", "sspfusion"],
        "seg_seeds": [0],
        "report": {"bootstrap": 20, "figure_scenes": 1},
    }
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def write_config(ws: Path, cfg: dict, file: str | None = None) -> Path:
    path = ws / (file or f"{cfg['name']}.yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """{relative path: sha256} of every file under ``folder``."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def state_dict(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["state_dict"]


pytestmark = pytest.mark.usefixtures("wide_console")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from fuseseg.data.synthetic import make_synthetic

    ws = tmp_path_factory.mktemp("reliability")
    make_synthetic(ws / "data", 6, 4, size=(48, 64), seed=3, workers=1, progress=False)
    return ws


@pytest.fixture(scope="module")
def reference(ws, one_torch_thread) -> Path:
    """An uninterrupted run of the tiny experiment (run folder ``results/ref``)."""
    assert main(["run", str(write_config(ws, tiny_config(ws, "ref")))]) == 0
    return ws / "results" / "ref"


# ---------------------------------------------------------------------- crash safety, determinism
def start_run(cfg: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "COLUMNS": "1000",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(cfg)], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    """Poll ``condition`` every 10 ms while ``proc`` runs."""
    t0 = time.monotonic()
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before the kill point:\n{log.read_text()}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            pytest.fail(f"kill point not reached in {timeout} s:\n{log.read_text()}")
        time.sleep(0.01)


def lock_is_free(run_dir: Path) -> bool:
    """Nobody holds the run folder's OS lock (its ``.lock`` file stays; released, it names nobody)."""
    from pipelines.runstate import RunLock

    with RunLock(run_dir / ".lock"):
        pass
    return (run_dir / ".lock").read_text() == ""


def assert_same_results(a: Path, b: Path) -> None:
    """Two run folders hold identical fused images, checkpoints and tables."""
    fused_a = {str(p.relative_to(a)): p.read_bytes() for p in sorted((a / "fused").rglob("*.png"))}
    fused_b = {str(p.relative_to(b)): p.read_bytes() for p in sorted((b / "fused").rglob("*.png"))}
    assert len(fused_a) == 10 and fused_a.keys() == fused_b.keys()
    assert [k for k in fused_a if fused_a[k] != fused_b[k]] == []
    for rel in ("train_fusion/sspfusion/final.pt", "segment/ir/seed0/final.pt",
                "segment/sspfusion/seed0/final.pt"):
        sa, sb = state_dict(a / rel), state_dict(b / rel)
        assert sa.keys() == sb.keys()
        assert [k for k in sa if not torch.equal(sa[k], sb[k])] == [], rel
    for rel in ("tables/miou.json", "metrics/metrics.json", "segment/sspfusion/seed0/eval.json"):
        assert json.loads((a / rel).read_text()) == json.loads((b / rel).read_text()), rel
    assert (a / "tables" / "miou.csv").read_bytes() == (b / "tables" / "miou.csv").read_bytes()


def test_interrupt_kill_concurrent_run_and_resume_equal_uninterrupted_run(ws, reference, capsys):
    cfg = write_config(ws, tiny_config(ws, "crash"))
    run_dir = ws / "results" / "crash"
    last = run_dir / "train_fusion" / "sspfusion" / "last.pt"

    # 1. Ctrl-C during fusion training: checkpoint at the stop position, resume hint, exit 130
    log = ws / "sigint.log"
    proc = start_run(cfg, log)
    wait_for(last.is_file, proc, log)          # first epoch done, four steps still to go
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=120) == 130, log.read_text()
    out = flat(log.read_text())
    assert f"interrupted: saved {last}" in out and "--resume" in out   # the trainer's hint
    assert "run the same command again" in out                         # the pipeline's hint
    ck = torch.load(last, map_location="cpu", weights_only=False)
    assert ck["complete"] is False and ck["global_step"] < 5
    assert lock_is_free(run_dir)
    assert not (run_dir / "stages" / "train_fusion__sspfusion.json").exists()

    # 2. the same command; SIGKILL as soon as the fuse stage wrote its first image. Before the
    # kill (process stopped), a second run on the same folder is refused and changes nothing.
    log = ws / "sigkill.log"
    proc = start_run(cfg, log)
    fused_train = run_dir / "fused" / "sspfusion" / "train"
    wait_for(lambda: any(fused_train.glob("*.png")), proc, log)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        before = snapshot(run_dir)
        capsys.readouterr()
        assert main(["run", str(cfg)]) == 1
        err = flat(capsys.readouterr().err)
        assert f"run folder {run_dir} is in use by another fuseseg process (pid {proc.pid}" in err
        assert "Wait for it to finish, or use another experiment name (name=...)" in err
        assert snapshot(run_dir) == before
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert (run_dir / ".lock").exists() and (run_dir / "stages" / "train_fusion__sspfusion.json").exists()
    # what a kill in the middle of a write leaves: a temporary file beside the final names
    stem = sorted((ws / "data" / "train" / "ir").glob("*.png"))[-1].stem
    (fused_train / f".{stem}.png.k1ll3d.tmp").write_bytes(b"\x89PNG\r\n\x1a\n half")

    # 3. the same command again: takes over the dead run's lock and finishes
    assert main(["run", str(cfg)]) == 0
    assert lock_is_free(run_dir)
    assert list(run_dir.rglob("*.tmp")) == []
    assert {p.stem.split("__")[0] for p in (run_dir / "stages").glob("*.json")} == {
        "data", "train_fusion", "fuse", "metrics", "segment", "report"}
    for png in (run_dir / "fused").rglob("*.png"):
        assert cv2.imread(str(png), cv2.IMREAD_UNCHANGED) is not None, png

    # same config and seed, two run folders (one interrupted twice): identical results
    assert_same_results(reference, run_dir)
    env = json.loads((run_dir / "environment.json").read_text())
    assert env["seed"] == 0 and env["versions"]["torch"] == torch.__version__
    assert env["versions"]["numpy"] == np.__version__ and env["device"]["requested"] == "cpu"
    assert env["versions"]["segmentation_models_pytorch"] and env["device"]["torch_threads"] == 1


# ---------------------------------------------------------------------- bad inputs
def _first(root: Path, split: str, folder: str) -> Path:
    return sorted((root / split / folder).glob("*.png"))[0]


def _missing(root):
    shutil.rmtree(root)


def _empty(root):
    shutil.rmtree(root)
    root.mkdir()


def _unmatched(root):
    p = _first(root, "train", "vi")
    p.rename(p.with_name("renamed.png"))


def _sizes(root):
    cv2.imwrite(str(_first(root, "test", "vi")), np.zeros((40, 60, 3), np.uint8))


def _truncated(root):
    p = _first(root, "train", "ir")
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _zero_bytes(root):
    _first(root, "train", "vi").write_bytes(b"")


def _text_file(root):
    _first(root, "train", "ir").write_text("this is not an image\n")


def _label_size(root):
    cv2.imwrite(str(_first(root, "test", "Segmentation_labels")), np.zeros((24, 32), np.uint8))


def _label_values(root):
    p = _first(root, "train", "Segmentation_labels")
    lab = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
    lab[:2, :3] = 17
    cv2.imwrite(str(p), lab)


BAD_DATA = {  # breakage -> (file named in the message, what the message says)
    "missing folder": (_missing, None, ["does not exist", "Set data.root in the config"]),
    "empty folder": (_empty, None, ["has no 'train' split folder", "MSRS layout"]),
    "unmatched names": (_unmatched, "renamed", ["unmatched file names", "Remove or rename"]),
    "pair sizes differ": (_sizes, "test/vi/", ["different sizes", "64x48", "60x40",
                                               "so both images have the same size"]),
    "truncated png": (_truncated, "train/ir/", ["truncated or not a PNG", "Re-copy or re-export"]),
    "zero-byte file": (_zero_bytes, "train/vi/", ["the file is empty (0 bytes)", "Re-copy"]),
    "text file named .png": (_text_file, "train/ir/", ["not a PNG", "Re-copy or re-export"]),
    "labels of the wrong size": (_label_size, "test/Segmentation_labels/",
                                 ["is 32x24 but its images are 64x48", "Labels must have the image size"]),
    "stray label values": (_label_values, "train/Segmentation_labels/",
                           ["has values [17] outside 0..8 (255 = ignore)", "Fix the labels"]),
}


@pytest.mark.parametrize("case", list(BAD_DATA))
def test_bad_data_fails_fast_and_leaves_a_finished_run_untouched(ws, reference, case, capsys):
    """``fuseseg run`` on a broken copy of the data set, into the finished run's folder: exit 2,
    the file and the fix named, nothing trained, nothing in the run folder changed."""
    breaker, named, expected = BAD_DATA[case]
    root = ws / "bad" / case.replace(" ", "_")
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(ws / "data", root)
    names = {split: sorted(p.name for p in (root / split / "ir").glob("*.png")) for split in ("train", "test")}
    breaker(root)
    before = snapshot(reference)
    cfg = write_config(ws, tiny_config(ws, "ref", data={"root": str(root)}), "bad.yaml")
    capsys.readouterr()
    assert main(["run", str(cfg)]) == 1
    out = flat(capsys.readouterr().err)
    assert "error:" in out and "Traceback" not in out
    for text in expected:
        assert text in out, (text, out)
    if named:  # the broken file, by folder and name
        split = named.split("/")[0]
        file = named if named == "renamed" else named + names[split][0]
        assert file in out, (file, out)
    else:
        assert str(root) in out
    assert "> train_fusion" not in out   # failed in the data stage
    assert snapshot(reference) == before


def test_16bit_infrared_is_accepted_and_ir16_is_checked(ws, reference, capsys):
    root = ws / "ir16"
    shutil.rmtree(root, ignore_errors=True)
    shutil.copytree(ws / "data", root)
    for p in (root / "train" / "ir").glob("*.png"):   # 16-bit raw counts in a narrow band
        ir8 = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
        assert cv2.imwrite(str(p), (ir8.astype(np.uint16) * 16 + 20000))
    assert cv2.imread(str(p), cv2.IMREAD_UNCHANGED).dtype == np.uint16
    cfg = write_config(ws, tiny_config(ws, "ir16", data={"root": str(root)}), "ir16.yaml")
    assert main(["run", str(cfg), "--only", "data"]) == 0
    rec = json.loads((ws / "results" / "ir16" / "stages" / "data.json").read_text())
    assert rec["status"] == "done" and rec["train"]["pairs"] == 6
    assert main(["run", str(cfg), "data.ir16=scale", "--only", "data"]) == 0
    before = snapshot(reference)
    capsys.readouterr()
    assert main(["run", str(cfg), "name=ref", "data.ir16=linear"]) == 2
    out = flat(capsys.readouterr().err)
    assert "data.ir16" in out and "minmax" in out and "scale" in out
    assert snapshot(reference) == before


def _corrupt(ws, ref):
    p = ws / "corrupt.pt"
    p.write_bytes((ref / "train_fusion" / "sspfusion" / "final.pt").read_bytes()[:5000])
    return p, {}, ["corrupt or not a fuseseg checkpoint", "Delete it and retrain"]


def _other_method(ws, ref):
    ck = torch.load(ref / "train_fusion" / "sspfusion" / "final.pt", map_location="cpu", weights_only=False)
    ck["method"] = "sspfusion_no_sfe"
    p = ws / "other_method.pt"
    torch.save(ck, p)
    return p, {}, ["holds fusion method 'sspfusion_no_sfe', not 'sspfusion'", "Pass --method sspfusion_no_sfe"]


def _segmentation_ckpt(ws, ref):
    return (ref / "segment" / "ir" / "seed0" / "final.pt", {},
            ["is not a fusion checkpoint (kind='segmentation')", "written by `fuseseg train-fusion`"])


def _other_shape(ws, ref):
    return (ref / "train_fusion" / "sspfusion" / "final.pt", {"levels": 2, "channels": [4, 8, 12]},
            ["parameters but its weights hold only", "do not match its weights", "Use the settings it was trained with"])


BAD_CKPT = {"corrupt": _corrupt, "another method": _other_method, "a segmentation checkpoint": _segmentation_ckpt,
            "another shape": _other_shape}


@pytest.mark.parametrize("case", list(BAD_CKPT))
def test_bad_fusion_checkpoint_is_refused_before_the_run_folder_changes(ws, reference, case, capsys):
    path, kwargs, expected = BAD_CKPT[case](ws, reference)
    before = snapshot(reference)
    cfg = tiny_config(ws, "ref", fusion=[{"name": "sspfusion", "kwargs": kwargs or TINY_SSP,
                                          "checkpoint": str(path)}])
    capsys.readouterr()
    assert main(["run", str(write_config(ws, cfg, "badckpt.yaml"))]) == 1
    out = flat(capsys.readouterr().err)
    assert "fusion[sspfusion].checkpoint:" in out and str(path) in out
    for text in expected:
        assert text in out, (text, out)
    assert snapshot(reference) == before   # the earlier fused images and records are intact


@pytest.mark.parametrize("change, expected", [
    ({"fusion_trian": {"epochs": 2}}, ["fusion_trian", "Valid keys", "fusion_train"]),
    ({"seed": "zero"}, ["seed", "expected an integer"]),
    ({"segmentation": {"batch_size": 1}}, ["batch_size=1", "must be >= 2"]),
    ({"fusion": [{"name": "sspfusion", "kwargs": {"levels": 2, "chanels": [4, 8, 8]}}]}, ["fusion[sspfusion].kwargs:", "chanels",
                                                                              "Check the method's keyword arguments"]),
])
def test_bad_config_file_names_the_key(ws, reference, change, expected, capsys):
    """Errors in the YAML file itself (test_pipeline checks command-line overrides)."""
    before = snapshot(reference)
    cfg = tiny_config(ws, "ref")
    cfg.update(change)
    capsys.readouterr()
    assert main(["run", str(write_config(ws, cfg, "badcfg.yaml"))]) == 2
    out = flat(capsys.readouterr().err)
    for text in expected:
        assert text in out, (text, out)
    assert snapshot(reference) == before


# ---------------------------------------------------------------------- NaN and out of memory
def seg_cfg(**changes):
    from segmentation.config import SegConfig

    base = dict(encoder="tu-mobilenetv3_small_050", decoder_channels=16, epochs=2, frozen_epochs=1,
                batch_size=4, frozen_batch_size=2, crop_size=32, workers=0, max_steps_per_epoch=1,
                device="cpu", seed=0)
    return SegConfig(**{**base, **changes})


def seg_data(ws):
    return ws / "data" / "train" / "ir", ws / "data" / "train" / "Segmentation_labels"


def test_segmentation_nan_keeps_the_last_good_checkpoint(ws, one_torch_thread, tmp_path, monkeypatch):
    import segmentation.train as seg_train

    class NaNInSecondEpoch(seg_train.DiceCELoss):
        calls = 0

        def forward(self, logits, target):
            total, ce, dice = super().forward(logits, target)
            NaNInSecondEpoch.calls += 1
            return (total + float("inf") if NaNInSecondEpoch.calls == 2 else total), ce, dice

    monkeypatch.setattr(seg_train, "DiceCELoss", NaNInSecondEpoch)
    with pytest.raises(FusesegError) as e:
        seg_train.train_segmenter(*seg_data(ws), seg_cfg(), tmp_path, progress=False)
    msg = str(e.value)
    assert "loss is inf at epoch 2, step 1 (global step 2" in msg and "phase full" in msg
    assert "ce " in msg and "dice " in msg and str(tmp_path / "last.pt") in msg and "Lower lr" in msg
    ck = torch.load(tmp_path / "last.pt", map_location="cpu", weights_only=False)
    assert ck["epoch"] == 1 and ck["global_step"] == 1
    assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "final.pt").exists()


def _oom(*args, **kwargs):
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_out_of_memory_names_the_setting_to_lower(ws, reference, one_torch_thread, tmp_path, monkeypatch):
    import fusion.train as fusion_train
    import segmentation.evaluate as seg_eval
    import segmentation.train as seg_train
    from fusion.fuse import fuse_folder
    from fusion.registry import create_method

    # fusion trainer: the first forward runs out of memory
    cfg = fusion_train.FusionTrainConfig(method="sspfusion", method_kwargs=TINY_SSP, data_root=str(ws / "data"),
                                         structure_epochs=1, epochs=1, batch_size=4, crop_size=32, workers=0,
                                         device="cpu")
    with monkeypatch.context() as m:
        m.setattr(fusion_train._Losses, "forward", _oom)
        with pytest.raises(FusesegError) as e:
            fusion_train.train_fusion(cfg, tmp_path / "fusion", progress=False)
    msg = str(e.value)
    assert msg.startswith("out of GPU memory training sspfusion in phase 'structure', epoch 1/1, step 1/1")
    assert "lower fusion_train.batch_size (now 4, e.g. to 2)" in msg and "CUDA out of memory" in msg

    # segmentation trainer: the key of the phase that ran out (frozen phase first, then full)
    for calls_before_oom, key, value in ((0, "segmentation.frozen_batch_size", 2),
                                         (1, "segmentation.batch_size", 4)):
        calls = {"n": 0}
        real = seg_train.DiceCELoss.forward

        def forward(self, logits, target, calls=calls, limit=calls_before_oom, real=real):
            calls["n"] += 1
            if calls["n"] > limit:
                _oom()
            return real(self, logits, target)

        with monkeypatch.context() as m:
            m.setattr(seg_train.DiceCELoss, "forward", forward)
            out = tmp_path / f"seg{calls_before_oom}"
            with pytest.raises(FusesegError) as e:
                seg_train.train_segmenter(*seg_data(ws), seg_cfg(), out, progress=False)
        msg = str(e.value)
        assert f"lower {key} (now {value}" in msg and f"epoch {calls_before_oom + 1}" in msg, msg
        assert (out / "last.pt").is_file() == (calls_before_oom == 1)

    # fuse_folder: the batch size of the fuse stage
    method = create_method("mean")
    monkeypatch.setattr(method, "forward", _oom)
    with pytest.raises(FusesegError) as e:
        fuse_folder(method, ws / "data" / "test" / "ir", ws / "data" / "test" / "vi", tmp_path / "fused",
                    "cpu", batch_size=3, progress=False)
    msg = str(e.value)
    assert "out of GPU memory fusing 3 pair(s) of 64x48" in msg and "fuse_batch_size" in msg
    assert "(now 3)" in msg and "--batch-size" in msg
    assert list((tmp_path / "fused").glob("*.png")) == []

    # evaluation (batch 1 at full size): says what to change instead
    monkeypatch.setattr(seg_eval, "predict", _oom)
    with pytest.raises(FusesegError) as e:
        seg_eval.evaluate_segmenter(reference / "segment" / "ir" / "seed0" / "final.pt",
                                    ws / "data" / "test" / "ir", ws / "data" / "test" / "Segmentation_labels",
                                    device="cpu")
    msg = str(e.value)
    assert "out of GPU memory evaluating" in msg and "64x48 (batch 1)" in msg
    assert "device=cpu" in msg and "segmentation.amp (now 'auto')" in msg
