"""The shipped SSPFusion weights (fusion/weights/): loading, the one-line note, integrity check,
`checkpoint: pretrained`, and the metrics recorded beside them, re-scored."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import require_shared

import fusion.pretrained as pretrained
from fuseseg.data.io import read_visible
from fuseseg.errors import CheckpointError
from fusion.fuse import fuse_folder, load_fusion_method
from pipelines.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
PT, JS = pretrained.shipped_files("sspfusion")


def test_shipped_checkpoint_is_plain_and_described():
    ckpt = torch.load(PT, map_location="cpu", weights_only=True)  # tensors and plain types only
    assert ckpt["method"] == "sspfusion" and ckpt["complete"] is True
    info = json.loads(JS.read_text())
    assert info["sha256"] == pretrained.sha256(PT)
    assert info["steps"] == ckpt["global_step"] and info["kwargs"] == ckpt["kwargs"]
    assert "train-fusion configs/sspfusion-pretrain.yaml" in info["command"]
    assert {"msrs", "tno"} <= set(info["metrics"])
    assert PT.stat().st_size < 8 * 2**20  # a few MB


def test_fuse_without_checkpoint_uses_the_shipped_weights(make_pairs, tmp_path, capsys):
    root = make_pairs(n=2, size=(40, 56))
    rc = main(["fuse", "--method", "sspfusion", "--ir", str(root / "ir"), "--vi", str(root / "vi"),
               "--out", str(tmp_path / "a"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr()
    notes = [ln for ln in (out.out + out.err).splitlines() if "shipped sspfusion weights" in ln]
    assert len(notes) == 1
    # the same images as fusing with the shipped file given explicitly
    ref = load_fusion_method(checkpoint=PT, device="cpu")
    fuse_folder(ref, root / "ir", root / "vi", tmp_path / "b", "cpu", progress=False)
    for f in sorted((tmp_path / "b").glob("*.png")):
        assert np.array_equal(read_visible(f), read_visible(tmp_path / "a" / f.name))
    # and they are not random: a fresh (untrained) model fuses differently
    fresh = load_fusion_method("sspfusion", kwargs=ref.init_kwargs, device="cpu", allow_untrained=True)
    x = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(ref.fuse_y(*x), fresh.fuse_y(*x))


def test_checkpoint_pretrained_resolves_to_the_shipped_file():
    assert pretrained.resolve_checkpoint("pretrained", "sspfusion") == PT
    assert pretrained.resolve_checkpoint(Path("pretrained"), "sspfusion") == PT  # as the config reads it
    assert pretrained.resolve_checkpoint("x/final.pt", "sspfusion") == Path("x/final.pt")
    with pytest.raises(CheckpointError, match="no shipped weights for fusion method 'gff'"):
        pretrained.resolve_checkpoint("pretrained", "gff")


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_shipped_file_is_a_clear_error(make_pairs, tmp_path, monkeypatch, capsys, damage):
    wd = tmp_path / "weights"
    wd.mkdir()
    shutil.copy(JS, wd / JS.name)
    data = bytearray(PT.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 3]
    (wd / PT.name).write_bytes(bytes(data))
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", wd)
    with pytest.raises(CheckpointError, match="damaged"):
        load_fusion_method("sspfusion", device="cpu")
    root = make_pairs(n=1, size=(32, 32))
    rc = main(["fuse", "--method", "sspfusion", "--ir", str(root / "ir"), "--vi", str(root / "vi"),
               "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr()
    text = err.out + err.err
    assert rc != 0 and "damaged" in text and "reinstall" in text and "Traceback" not in text
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").glob("*.png"))


@pytest.mark.slow
def test_shipped_metrics_are_reproduced_on_msrs(tmp_path):
    msrs = require_shared("data/real/msrs")
    from benchmarks.sspfusion_evidence import score_method

    recorded = json.loads(JS.read_text())["metrics"]["msrs"]
    got = score_method("pretrained", msrs, tmp_path)
    assert {"MI", "SF", "AG", "VIF", "Qabf", "SSIM"} <= set(recorded)
    for k, v in recorded.items():
        if v is not None:  # null: a non-finite mean (PSNR of identical images)
            # rel 1e-7: float sums of large metrics (MSE ~2,550) differ by ~1e-5 between CPUs'
            # vector widths (measured: AVX-512 against the AVX2 machine that wrote the record)
            assert got[k] == pytest.approx(v, rel=1e-7, abs=1e-6), k


def test_experiment_checkpoint_pretrained_uses_the_shipped_weights(tmp_path, monkeypatch):
    from pipelines.experiment import FusionMethodConfig
    from pipelines.stages.train_fusion import check_fusion_methods as _check_fusion_methods

    m = FusionMethodConfig(name="sspfusion", checkpoint=Path("pretrained"))
    _check_fusion_methods([m])  # builds the method from the shipped file: no error
    wd = tmp_path / "weights"
    wd.mkdir()
    shutil.copy(JS, wd / JS.name)
    (wd / PT.name).write_bytes(PT.read_bytes()[:1000])
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", wd)
    with pytest.raises(CheckpointError, match=r"fusion\[sspfusion\]\.checkpoint: .*damaged"):
        _check_fusion_methods([m])
