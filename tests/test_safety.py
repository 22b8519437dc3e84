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

from fusion import runtime
from fusion.data.io import atomic_write_bytes, atomic_write_text, write_image
from fusion.errors import CheckpointError
from pipelines.cli import main

REPO = Path(__file__).resolve().parents[1]


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    from pipelines.console import console

    monkeypatch.setattr(console, "_width", 10_000)


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
    out = flat(capsys.readouterr().out)
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
