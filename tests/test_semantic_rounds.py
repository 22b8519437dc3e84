"""SeAFusion's joint rounds (pipelines.semantic_rounds): labels and visible RGB reach the loss with
the crops of their images, the segmenter's loss is the one an independent recomputation gives, the
semantic loss is on with labels and off without them, and a tiny two-round run trains, records
and resumes."""
from __future__ import annotations

import json
import os

import cv2
import numpy as np
import pytest
import torch
from fusion_tiny import make_pairs, train_config

from fuseseg.data.io import write_image
from fuseseg.data.pairs import find_pairs
from fuseseg.errors import ConfigError
from fusion.datasets import PairDataset
from fusion.train_config import FusionTrainConfig


def _labelled_pairs(root, n=3, size=(20, 28), label_all=True):
    """Pairs whose label is ir // 32 and whose visible red channel is the infrared itself, so a
    crop's labels and visible can be checked against its infrared pixel by pixel."""
    rng = np.random.default_rng(1)
    for i in range(n):
        ir = rng.integers(0, 256, size, dtype=np.uint8)
        vi = np.stack([ir, rng.integers(0, 256, size, dtype=np.uint8), 255 - ir], axis=2)
        write_image(os.path.join(root, "ir", f"s{i}.png"), ir)
        write_image(os.path.join(root, "vi", f"s{i}.png"), vi)
        if label_all or i == 0:
            write_image(os.path.join(root, "labels", f"s{i}.png"), (ir // 32).astype(np.uint8))
    pairs = find_pairs(root / "ir", root / "vi")
    pairs.labels_dir = root / "labels"
    pairs.labels = {p.stem: p for p in sorted((root / "labels").iterdir())}
    return pairs


@pytest.mark.parametrize("crop", [16, 32])   # 32 > the 20x28 images: padded by reflection first
def test_extras_are_cropped_and_flipped_with_their_images(tmp_path, crop):
    pairs = _labelled_pairs(tmp_path, label_all=False)
    ds = PairDataset(pairs, crop=crop, train=True, seed=3, vflip=True, extras=("labels", "visible"))
    for i in range(len(ds)):
        for epoch in range(4):
            ir, vi_y, labels, visible = ds[(i, epoch)]
            assert labels.dtype == torch.int64 and labels.shape == (crop, crop)
            assert visible.shape == (3, crop, crop) and ir.shape == (1, crop, crop)
            ir_u8 = torch.round(ir[0] * 255).long()
            assert torch.equal(torch.round(visible[0] * 255).long(), ir_u8)
            assert torch.equal(torch.round(visible[2] * 255).long(), 255 - ir_u8)
            if pairs.stems[i] in pairs.labels:
                assert torch.equal(labels, ir_u8 // 32)
            else:
                assert bool((labels == 255).all())   # a pair without a label file: ignored everywhere
    with pytest.raises(Exception, match="unknown extra item"):
        PairDataset(pairs, extras=("depth",))


def test_segmenter_loss_equals_an_independent_recomputation(tmp_path):
    """recolour (fused Y + visible Cb/Cr, against OpenCV's YCrCb->RGB), ImageNet normalisation,
    padding to the output stride, Dice + CE: the value and a non-zero gradient in fused_y."""
    from fuseseg import runtime
    from pipelines.semantic_rounds import SegmenterLoss
    from segmentation.config import SegConfig
    from segmentation.losses import DiceCELoss
    from segmentation.model import build_model

    cfg = SegConfig(encoder="tu-resnet10t", decoder_channels=16, num_classes=4, crop_size=32, device="cpu")
    torch.manual_seed(0)
    model = build_model(cfg.model_kwargs())
    ck = tmp_path / "seg.pt"
    runtime.save_checkpoint(ck, {"kind": "segmentation", "arch": "DeepLabV3Plus", "kwargs": cfg.model_kwargs(),
                                 "config": cfg.to_dict(), "normalisation": "imagenet",
                                 "state_dict": model.state_dict()})
    loss_fn = SegmenterLoss(ck)
    rng = np.random.default_rng(0)
    fused = torch.tensor(rng.random((2, 1, 20, 24)), dtype=torch.float32, requires_grad=True)
    visible = torch.tensor(rng.random((2, 3, 20, 24)), dtype=torch.float32)
    labels = torch.tensor(rng.integers(0, 4, (2, 20, 24)))
    labels[0, :5] = 255
    got = loss_fn(fused, visible, labels)
    # the reference: OpenCV's colour conversion, numpy normalisation, explicit reflection padding
    rgbs = []
    for b in range(2):
        vis = visible[b].permute(1, 2, 0).numpy().astype(np.float32)
        ycrcb = cv2.cvtColor(vis, cv2.COLOR_RGB2YCrCb)
        ycrcb[..., 0] = fused[b, 0].detach().numpy()
        rgb = np.clip(cv2.cvtColor(ycrcb, cv2.COLOR_YCrCb2RGB), 0, 1)
        rgbs.append((rgb - np.array([0.485, 0.456, 0.406])) / np.array([0.229, 0.224, 0.225]))
    x = torch.tensor(np.stack(rgbs), dtype=torch.float32).permute(0, 3, 1, 2)
    x = torch.nn.functional.pad(x, (0, 8, 0, 12), mode="reflect")   # 20x24 -> 32x32 (stride 16)
    model.eval()
    with torch.no_grad():
        want = DiceCELoss()(model(x)[..., :20, :24], labels)[0]
    assert float(got.detach()) == pytest.approx(float(want), rel=1e-4, abs=1e-5)
    got.backward()
    assert fused.grad is not None and float(fused.grad.abs().sum()) > 0
    assert all(not p.requires_grad for p in loss_fn.segmenter.parameters())


def _rounds_cfg(tmp_path, **kw):
    base = dict(method="seafusion", synthetic_pairs=8, synthetic_size=(48, 64), epochs=1, batch_size=4,
                crop_size=32, max_steps_per_epoch=2, workers=0, lr=1e-3, device="cpu", log_every=1,
                semantic_rounds=2, semantic_gamma=1.0,
                semantic_segment={"epochs": 1, "crop_size": 32, "batch_size": 2, "max_steps_per_epoch": 2,
                                  "decoder_channels": 16, "scale_range": [1.0, 1.0]})
    base.update(kw)
    return FusionTrainConfig(**base)


@pytest.mark.slow
def test_two_rounds_train_with_the_semantic_loss_on_record_it_and_resume(tmp_path, capsys):
    from fusion.fuse import fuse_arrays, load_fusion_method
    from pipelines.semantic_rounds import train_semantic_rounds

    unlabelled = tmp_path / "unlabelled"
    make_pairs(unlabelled, n=4, size=(48, 64))
    cfg = _rounds_cfg(tmp_path, data_root=str(unlabelled))
    out = tmp_path / "run"
    final = train_semantic_rounds(cfg, out, progress=False)
    rec = json.loads((out / "rounds.json").read_text())
    assert rec["semantic_loss"].startswith("on") and [r["beta"] for r in rec["rounds"]] == [0.0, 1.0]
    assert rec["rounds"][0]["segmenter"] is not None and rec["rounds"][1]["segmenter"] is None
    assert (out / "round1" / "segment" / "final.pt").is_file() and len(os.listdir(out / "round1" / "fused")) >= 8
    # round 1: content loss only; round 2: the segmenter's loss on the labelled (synthetic) share
    r1 = [r for r in torch.load(out / "round1" / "fusion" / "final.pt", weights_only=True)["log"]]
    r2 = torch.load(out / "round2" / "fusion" / "final.pt", weights_only=True)["log"]
    assert "semantic" not in r1[-1] and r2[-1]["semantic"] > 0 and 0 < r2[-1]["labelled"] < 1
    assert r2[-1]["total"] == pytest.approx(r2[-1]["fus"] + 1.0 * r2[-1]["semantic"], rel=1e-3)
    ck = torch.load(final, weights_only=True)
    assert ck["config"]["semantic_rounds"] == 2 and ck["rounds"]["rounds"][1]["beta"] == 1.0
    assert [r["round"] for r in ck["log"]] == [1, 2] and ck["kwargs"]["semantic_weight"] == 0.0
    # round 2 started from round 1's weights
    import yaml
    r2cfg = yaml.safe_load((out / "round2" / "fusion" / "config.yaml").read_text())
    assert r2cfg["init_checkpoint"] == str(out / "round1" / "fusion" / "final.pt")
    assert r2cfg["method_kwargs"]["semantic_weight"] == 1.0
    method = load_fusion_method(checkpoint=final, device="cpu")
    fused = fuse_arrays(method, np.full((32, 32), 200, np.uint8), np.dstack([np.full((32, 32), v, np.uint8) for v in (50, 90, 130)]))
    assert fused.shape == (32, 32, 3)
    # shipping it records the rounds: the state of the semantic loss, beta and the steps of every round
    from benchmarks.ship_fusion import main as ship
    pt = ship([str(out), "--no-metrics", "--weights-dir", str(tmp_path / "w")])
    info = json.loads(pt.with_suffix(".json").read_text())
    assert info["semantic_loss"].startswith("on") and [r["beta"] for r in info["semantic_rounds"]] == [0.0, 1.0]
    assert info["steps"] == 2 * 2 and [r["steps"] for r in info["semantic_rounds"]] == [2, 2]  # 1 epoch x 2 steps
    assert info["semantic_rounds"][1]["semantic"] > 0 and "round 2 of 2" in info["convergence_scope"]
    # again without --resume: refused; with it: nothing is retrained
    with pytest.raises(ConfigError, match="already holds SeAFusion rounds"):
        train_semantic_rounds(cfg, out, progress=False)
    before = (out / "round2" / "fusion" / "final.pt").stat().st_mtime_ns
    assert train_semantic_rounds(cfg, out, resume=True, progress=False) == final
    assert (out / "round2" / "fusion" / "final.pt").stat().st_mtime_ns == before
    with pytest.raises(ConfigError, match="semantic_gamma"):
        train_semantic_rounds(_rounds_cfg(tmp_path, data_root=str(unlabelled), semantic_gamma=2.0), out,
                              resume=True, progress=False)


def test_without_labels_the_semantic_loss_is_off_and_said(tmp_path, capsys):
    from pipelines.semantic_rounds import train_semantic_rounds

    data = tmp_path / "roadscene"
    make_pairs(data, n=4, size=(40, 48))
    cfg = _rounds_cfg(tmp_path, data_root=str(data), synthetic_pairs=0, max_steps_per_epoch=1)
    train_semantic_rounds(cfg, tmp_path / "run", progress=False)
    rec = json.loads((tmp_path / "run" / "rounds.json").read_text())
    assert rec["semantic_loss"].startswith("off") and len(rec["rounds"]) == 1 and rec["rounds"][0]["beta"] == 0
    assert "semantic loss is off" in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "run" / "round1" / "segment").exists()


def test_init_checkpoint_starts_from_its_weights(tmp_path):
    """A run with init_checkpoint and a vanishing lr ends (to 1e-6) at the given weights, which
    differ from the seeded random init; another method's file is refused naming it."""
    from fusion.train import train_fusion

    make_pairs(tmp_path / "d", n=8)
    first = train_fusion(train_config(tmp_path / "d", seed=1), tmp_path / "a", progress=False)
    w0 = torch.load(first, weights_only=True)["state_dict"]
    cfg = train_config(tmp_path / "d", init_checkpoint=str(first), lr=1e-12, structure_epochs=0, epochs=1)
    w1 = torch.load(train_fusion(cfg, tmp_path / "b", progress=False), weights_only=True)["state_dict"]
    fresh = torch.load(train_fusion(train_config(tmp_path / "d", lr=1e-12, structure_epochs=0, epochs=1),
                                    tmp_path / "c", progress=False), weights_only=True)["state_dict"]
    floats = [k for k in w0 if w0[k].is_floating_point()]
    assert max(float((w0[k] - w1[k]).abs().max()) for k in floats) < 1e-6
    assert max(float((w0[k] - fresh[k]).abs().max()) for k in floats) > 1e-3
    with pytest.raises(Exception, match="seafusion|method"):
        train_fusion(train_config(tmp_path / "d", init_checkpoint=str(first), method="seafusion",
                                  plugins=[]), tmp_path / "e", progress=False)


def test_rounds_need_a_method_with_a_semantic_loss_and_the_pipeline(tmp_path):
    from fusion.train import train_fusion
    from pipelines.semantic_rounds import train_semantic_rounds

    make_pairs(tmp_path / "d", n=4)
    with pytest.raises(ConfigError, match="no semantic loss"):
        train_semantic_rounds(train_config(tmp_path / "d", semantic_rounds=2), tmp_path / "a", progress=False)
    with pytest.raises(ConfigError, match="pipelines.semantic_rounds"):
        train_fusion(train_config(tmp_path / "d", semantic_rounds=2), tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="semantic_rounds must be >= 0"):
        train_config(tmp_path / "d", semantic_rounds=-1)


def test_an_experiment_refuses_rounds_for_a_method_without_a_semantic_loss():
    """Checked before any stage runs, naming the variant; SeAFusion's rounds pass the check."""
    from pipelines.api import load_config
    from pipelines.stages.train_fusion import check_fusion_methods

    bad = load_config("default", ["fusion=[{name: sspfusion, checkpoint: null, train: {semantic_rounds: 2}}]"])
    with pytest.raises(ConfigError, match=r"fusion\[sspfusion\].*semantic_rounds=2.*no semantic loss"):
        check_fusion_methods(bad.fusion, bad.fusion_train)
    good = load_config("default", ["fusion=[{name: seafusion, checkpoint: null, train: {semantic_rounds: 2}}]"])
    check_fusion_methods(good.fusion, good.fusion_train)
