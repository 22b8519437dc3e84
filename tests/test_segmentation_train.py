"""Training/evaluation end to end on tiny labelled scenes: frozen phase, loss, checkpoints,
evaluation reproducibility, resume == uninterrupted, errors, CLI."""
from __future__ import annotations

import argparse
import copy
import csv
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import segmentation_models_pytorch as smp
import torch
from torch.nn.modules.batchnorm import _BatchNorm

import segmentation.train as seg_train
from fuseseg.errors import CheckpointError, ConfigError, DataError, FusesegError
from fuseseg.runtime import load_checkpoint, seed_everything
from fuseseg.runtime import save_checkpoint as real_save_checkpoint
from segmentation.config import SegConfig
from segmentation.data import IMAGENET_MEAN, IMAGENET_STD
from segmentation.evaluate import evaluate_segmenter
from segmentation.model import build_model, set_phase, train_mode
from segmentation.train import build_optimizer, cosine_lr, train_segmenter
from tests.conftest import write_png

CFG = dict(encoder="resnet18", decoder_channels=32, epochs=3, frozen_epochs=1, batch_size=2,
           frozen_batch_size=4, crop_size=64, scale_range=(0.75, 1.25), lr=0.05, min_lr=0.0,
           workers=0, val_every=1, device="cpu")


def make_scenes(root: Path, n: int, size=(64, 64), seed=0):
    """Grey scenes: dark noisy background (class 0) with rectangles of class k drawn at intensity
    ~25k; the top row is ignore (255)."""
    rng = np.random.default_rng(seed)
    h, w = size
    for i in range(n):
        img = rng.integers(0, 20, (h, w)).astype(np.uint8)
        lab = np.zeros((h, w), np.uint8)
        for _ in range(3):
            k = int(rng.integers(1, 9))
            y0, x0 = int(rng.integers(0, h - 12)), int(rng.integers(0, w - 12))
            hh, ww = int(rng.integers(8, 24)), int(rng.integers(8, 24))
            img[y0:y0 + hh, x0:x0 + ww] = 25 * k + rng.integers(0, 10, img[y0:y0 + hh, x0:x0 + ww].shape)
            lab[y0:y0 + hh, x0:x0 + ww] = k
        lab[0, :] = 255
        write_png(root / "img" / f"s{i:03d}.png", img)
        write_png(root / "lab" / f"s{i:03d}.png", lab)
    return root / "img", root / "lab"


class Capture:
    """Wraps save_checkpoint: keeps a copy of every payload; can interrupt after an epoch."""

    def __init__(self, stop_after: int | None = None):
        self.payloads, self.stop_after = [], stop_after
        self.orig = seg_train.save_checkpoint

    def __call__(self, path, payload):
        self.orig(path, payload)
        if Path(path).name == "last.pt":
            self.payloads.append(copy.deepcopy({k: payload[k] for k in
                                                ("epoch", "phase", "state_dict", "optimizer")}))
            if self.stop_after is not None and payload["epoch"] == self.stop_after:
                raise KeyboardInterrupt


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    tr = make_scenes(root / "train", 8)
    te = make_scenes(root / "test", 3, size=(56, 72), seed=5)  # not multiples of 16
    cfg = SegConfig(**CFG)
    cap = Capture()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(seg_train, "save_checkpoint", cap)
        final = train_segmenter(*tr, cfg, root / "out", progress=False,
                                val_images_dir=te[0], val_labels_dir=te[1])
    return {"root": root, "train": tr, "test": te, "cfg": cfg, "final": final, "payloads": cap.payloads}


def _rows(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def test_loss_decreases_and_log(run):
    rows = _rows(run["final"].parent / "log.csv")
    assert [r["phase"] for r in rows] == ["frozen", "full", "full"]
    assert [int(r["steps"]) for r in rows] == [2, 4, 4]  # 8 images at batch 4, then batch 2
    losses = [float(r["loss"]) for r in rows]
    assert losses[-1] < losses[0]
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] > lrs[1] > lrs[2]
    total = 2 + 4 + 4  # last step of epoch 1 is global step 1 (0-based)
    assert lrs[0] == pytest.approx(cosine_lr(1, total, 0.05), rel=1e-4)
    assert all(0 <= float(r["val_miou"]) <= 1 for r in rows)
    assert all(float(r["images_per_s"]) > 0 for r in rows)
    assert (run["final"].parent / "config.yaml").is_file()


def test_cosine_schedule():
    assert cosine_lr(0, 10, 7e-3, 7e-5) == pytest.approx(7e-3)
    assert cosine_lr(10, 10, 7e-3, 7e-5) == pytest.approx(7e-5)
    assert cosine_lr(5, 10, 7e-3, 0.0) == pytest.approx(3.5e-3)


def _encoder_keys(sd):
    return [k for k in sd if k.startswith("encoder.")]


def test_frozen_phase_really_freezes(run):
    cfg = run["cfg"]
    seed_everything(cfg.seed)  # the trainer's initial model
    init = build_model(cfg.model_kwargs()).state_dict()
    ep1, ep2 = run["payloads"][0], run["payloads"][1]
    assert (ep1["phase"], ep2["phase"]) == ("frozen", "full")
    enc = _encoder_keys(init)
    assert any("running_mean" in k for k in enc)
    for k in enc:  # weights AND BatchNorm running stats untouched in the frozen phase
        assert torch.equal(ep1["state_dict"][k], init[k]), k
    dec = [k for k in init if k.startswith(("decoder.", "segmentation_head.")) and k.endswith("weight")]
    assert any(not torch.equal(ep1["state_dict"][k], init[k]) for k in dec)
    changed_w = [k for k in enc if k.endswith("conv1.weight") and not torch.equal(ep2["state_dict"][k], init[k])]
    changed_bn = [k for k in enc if k.endswith("running_mean") and not torch.equal(ep2["state_dict"][k], init[k])]
    assert changed_w and changed_bn  # both move once unfrozen
    # the optimiser held only decoder + head in phase 1, everything in phase 2
    model = build_model(cfg.model_kwargs())
    n_all = len(list(model.parameters()))
    n_dec = n_all - len(list(model.encoder.parameters()))
    assert len(ep1["optimizer"]["param_groups"][0]["params"]) == n_dec
    assert len(ep2["optimizer"]["param_groups"][0]["params"]) == n_all


def test_phase_switch_unit():
    cfg = SegConfig(**CFG)
    model = build_model(cfg.model_kwargs())
    set_phase(model, "frozen")
    train_mode(model)
    assert not model.encoder.training and model.decoder.training
    assert all(not m.training for m in model.encoder.modules() if isinstance(m, _BatchNorm))
    opt = build_optimizer(model, cfg)
    enc_ids = {id(p) for p in model.encoder.parameters()}
    held = [p for g in opt.param_groups for p in g["params"]]
    assert held and not any(id(p) in enc_ids for p in held)
    assert {id(p) for p in held} == {id(p) for p in model.parameters()} - enc_ids
    x = torch.randn(2, 3, 32, 32)
    model(x).mean().backward()
    opt.step()
    assert all(p.grad is None for p in model.encoder.parameters())
    head_w = model.segmentation_head[0].weight
    buf = opt.state[head_w]["momentum_buffer"]
    set_phase(model, "full")
    train_mode(model)
    assert model.encoder.training
    opt2 = build_optimizer(model, cfg, opt)
    assert len(opt2.param_groups[0]["params"]) == len(list(model.parameters()))
    assert opt2.state[head_w]["momentum_buffer"] is buf  # decoder momentum carried over
    # the encoder's first full-phase step is plain SGD (d = g + wd*p), as without a buffer
    enc_w = next(model.encoder.parameters())
    before = enc_w.detach().double().clone()
    opt2.zero_grad(set_to_none=True)
    model(x).mean().backward()
    d = enc_w.grad.double() + cfg.weight_decay * before
    opt2.step()
    torch.testing.assert_close(enc_w.detach().double(), before - cfg.lr * d, rtol=0, atol=1e-6)


def test_checkpoint_reload_reproduces_confusion(run, tmp_path):
    ck = load_checkpoint(run["final"])
    assert ck["kind"] == "segmentation" and ck["arch"] == "DeepLabV3Plus"
    assert ck["kwargs"]["encoder_name"] == "resnet18" and ck["kwargs"]["classes"] == 9
    assert ck["epoch"] == 3 and ck["normalisation"] == "imagenet" and ck["config"]["lr"] == 0.05
    res = evaluate_segmenter(run["final"], *run["test"], device="cpu", save_predictions=tmp_path / "pred")
    np.testing.assert_array_equal(res.confusion, ck["val_confusion"])  # same as during training
    np.testing.assert_array_equal(res.per_image_confusion.sum(0), res.confusion)
    assert res.image_names == ["s000", "s001", "s002"] and res.num_images == 3
    assert res.confusion.sum() == 3 * 55 * 72  # every non-ignored pixel at full size

    # independent recomputation: smp model from the file, numpy reflect padding, np.add.at
    from fuseseg.data.io import read_label, read_visible

    model = smp.DeepLabV3Plus(encoder_weights=None, **ck["kwargs"])
    model.load_state_dict(ck["state_dict"])
    model.eval()
    cm = np.zeros((9, 9), np.int64)
    rescored = np.zeros((9, 9), np.int64)
    for stem in res.image_names:
        img = read_visible(run["test"][0] / f"{stem}.png").astype(np.float64)
        lab = read_label(run["test"][1] / f"{stem}.png")
        h, w = img.shape
        pad = np.pad(img, ((0, (-h) % 16), (0, (-w) % 16)), mode="reflect") / 255.0
        x = np.stack([(pad - IMAGENET_MEAN[c]) / IMAGENET_STD[c] for c in range(3)])
        with torch.no_grad():
            pred = model(torch.from_numpy(x[None]).float())[0, :, :h, :w].argmax(0).numpy()
        keep = lab != 255
        np.add.at(cm, (lab[keep].astype(int), pred[keep]), 1)
        saved = read_visible(tmp_path / "pred" / f"{stem}.png")
        assert saved.shape == (h, w, 3)
        # the class-id PNG re-scores to the same counts (what others re-score with)
        ids = cv2.imread(str(tmp_path / "pred" / "class_ids" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert ids.dtype == np.uint8 and ids.shape == (h, w) and ids.max() < 9
        np.add.at(rescored, (lab[keep].astype(int), ids[keep].astype(int)), 1)
    np.testing.assert_array_equal(res.confusion, cm)
    np.testing.assert_array_equal(rescored, cm)
    d = res.to_dict()
    assert d["miou"] == pytest.approx(res.miou) and len(d["per_class"]) == 9
    assert len(res.per_class_iou_list()) == 9
    res_ex = evaluate_segmenter(run["final"], *run["test"], device="cpu", convention="exclude_background")
    assert res_ex.miou == pytest.approx(res.miou_exclude_background)


def test_resume_equals_uninterrupted(run, monkeypatch):
    out = run["root"] / "resumed"
    cfg = SegConfig(**CFG)
    kw = dict(progress=False, val_images_dir=run["test"][0], val_labels_dir=run["test"][1])
    monkeypatch.setattr(seg_train, "save_checkpoint", Capture(stop_after=1))
    with pytest.raises(KeyboardInterrupt):
        train_segmenter(*run["train"], cfg, out, **kw)
    monkeypatch.setattr(seg_train, "save_checkpoint", real_save_checkpoint)
    assert load_checkpoint(out / "last.pt")["epoch"] == 1
    with pytest.raises(ConfigError, match="--resume"):
        train_segmenter(*run["train"], cfg, out, **kw)
    with pytest.raises(CheckpointError, match="lr: 0.05 -> 0.1"):
        train_segmenter(*run["train"], SegConfig(**{**CFG, "lr": 0.1}), out, resume=True, **kw)
    final = train_segmenter(*run["train"], cfg, out, resume=True, **kw)
    a = load_checkpoint(final)["state_dict"]
    b = load_checkpoint(run["final"])["state_dict"]
    for k in b:
        assert torch.equal(a[k], b[k]), k
    assert [r["loss"] for r in _rows(out / "log.csv")] == [r["loss"] for r in _rows(run["final"].parent / "log.csv")]


def test_resume_without_checkpoint_and_bad_labels(run, tmp_path):
    cfg = SegConfig(**{**CFG, "epochs": 1, "frozen_epochs": 0})
    with pytest.raises(CheckpointError, match="nothing to resume"):
        train_segmenter(*run["train"], cfg, tmp_path / "none", resume=True, progress=False)
    img, lab = make_scenes(tmp_path / "bad", 4)
    a = np.zeros((64, 64), np.uint8)
    a[3, 3] = 9
    write_png(lab / "s002.png", a)
    with pytest.raises(DataError, match=r"s002.png: label values 9 "):
        train_segmenter(img, lab, cfg, tmp_path / "o", progress=False)
    with pytest.raises(DataError, match="4 training image.* too few for a batch of 8"):
        seg_train.steps_per_epoch(4, 8, 1, None)
    assert seg_train.steps_per_epoch(9, 2, 2, None) == 2 and seg_train.steps_per_epoch(9, 2, 1, 3) == 3


def test_batch_sizes_are_global_under_ddp():
    """One rule for both trainers: the configured batch is the global one, split over processes."""
    cfg = SegConfig(batch_size=8, frozen_batch_size=6, epochs=2, frozen_epochs=1, crop_size=32)
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert seg_train.per_process_batch("full", cfg, 1, cpu) == 8
    assert seg_train.per_process_batch("full", cfg, 4, cpu) == 2
    assert seg_train.per_process_batch("frozen", cfg, 3, cpu) == 2
    assert seg_train.per_process_batch("full", cfg, 8, cuda) == 1            # SyncBatchNorm on CUDA
    with pytest.raises(ConfigError, match=r"segmentation.frozen_batch_size=6 is the global batch; 4 processes"):
        seg_train.per_process_batch("frozen", cfg, 4, cpu)
    with pytest.raises(ConfigError, match=r"segmentation.batch_size=8 .* at least 16 \(e.g. batch_size=16\)"):
        seg_train.per_process_batch("full", cfg, 8, cpu)


def test_loader_workers_do_not_change_the_result(run, tmp_path):
    """Augmentation draws are a function of (seed, epoch, index): 0 or 2 worker processes train
    the same model."""
    base = {**CFG, "epochs": 1, "frozen_epochs": 0, "max_steps_per_epoch": 2, "val_every": 0}
    sds = []
    for workers in (0, 2):
        final = train_segmenter(*run["train"], SegConfig(**{**base, "workers": workers}),
                                tmp_path / f"w{workers}", progress=False)
        sds.append(load_checkpoint(final)["state_dict"])
    for k in sds[0]:
        assert torch.equal(sds[0][k], sds[1][k]), k


def test_nan_loss_names_the_step(run, tmp_path, monkeypatch):
    class NaNAtSecondStep(seg_train.DiceCELoss):
        calls = 0

        def forward(self, logits, target):
            total, ce, dice = super().forward(logits, target)
            NaNAtSecondStep.calls += 1
            return (total * float("nan") if NaNAtSecondStep.calls == 2 else total), ce, dice

    monkeypatch.setattr(seg_train, "DiceCELoss", NaNAtSecondStep)
    cfg = SegConfig(**{**CFG, "epochs": 1, "frozen_epochs": 1, "val_every": 0})
    with pytest.raises(FusesegError, match=r"loss is nan at epoch 1, step 2 \(global step 2"):
        train_segmenter(*run["train"], cfg, tmp_path / "nan", progress=False)


def test_encoder_weights_local_file_and_errors(tmp_path, monkeypatch):
    kwargs = SegConfig(**CFG).model_kwargs()
    torch.manual_seed(123)
    src = build_model(kwargs)
    sd = {f"encoder.{k}": v for k, v in src.encoder.state_dict().items()}
    sd["fc.weight"] = torch.zeros(3, 3)  # a classifier head is ignored
    torch.save({"state_dict": sd}, tmp_path / "enc.pth")
    torch.manual_seed(0)
    model = build_model(kwargs, str(tmp_path / "enc.pth"))
    for k, v in src.encoder.state_dict().items():
        assert torch.equal(model.encoder.state_dict()[k], v)
    # weights of another encoder: clear error
    other = build_model({**kwargs, "encoder_name": "mobilenet_v2"})
    torch.save(other.encoder.state_dict(), tmp_path / "mnv2.pth")
    with pytest.raises(ConfigError, match=r"mnv2.pth does not fit encoder.*missing"):
        build_model(kwargs, str(tmp_path / "mnv2.pth"))
    with pytest.raises(ConfigError, match="is not a file"):
        build_model(kwargs, str(tmp_path / "nope.pth"))

    # 'imagenet' with no network: ConfigError with the fix (no real download attempted)
    real = smp.DeepLabV3Plus

    def offline(*a, encoder_weights=None, **k):
        if encoder_weights is not None:
            raise OSError("could not reach download.pytorch.org")
        return real(*a, encoder_weights=None, **k)

    import segmentation.model as seg_model
    monkeypatch.setattr(seg_model.smp, "DeepLabV3Plus", offline)
    with pytest.raises(ConfigError, match=r"ImageNet weights.*OSError.*encoder_weights: null"):
        build_model(kwargs, "imagenet")
    with pytest.raises(ConfigError, match="cannot build"):
        build_model({**kwargs, "encoder_name": "no_such_net"})


def test_cli_train_and_eval(run, tmp_path, capsys):
    from pipelines.commands import segment

    parser = argparse.ArgumentParser()
    segment.register(parser.add_subparsers())
    cfg_path = tmp_path / "seg.yaml"
    cfg_path.write_text("segmentation:\n  encoder: resnet18\n  decoder_channels: 16\n  crop_size: 64\n"
                        "  workers: 0\n  device: cpu\n")
    img, lab = run["train"]
    args = parser.parse_args(["segment", "train", "--images", str(img), "--labels", str(lab),
                              "--out", str(tmp_path / "o"), "--config", str(cfg_path), "epochs=1",
                              "frozen_epochs=0", "batch_size=4", "max_steps_per_epoch=1",
                              "--no-progress"])
    assert args.func(args) == 0
    ck = load_checkpoint(tmp_path / "o" / "final.pt")
    assert ck["config"]["decoder_channels"] == 16 and ck["config"]["max_steps_per_epoch"] == 1
    assert ck["global_step"] == 1
    args = parser.parse_args(["segment", "eval", "--checkpoint", str(tmp_path / "o" / "final.pt"),
                              "--images", str(run["test"][0]), "--labels", str(run["test"][1]),
                              "--convention", "exclude_background", "--json", str(tmp_path / "r.json"),
                              "--device", "cpu", "--no-progress"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "color_cone" in out and "mIoU (exclude_background)" in out
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["convention"] == "exclude_background" and len(data["confusion"]) == 9
    with pytest.raises(ConfigError, match="unknown key"):
        segment.load_seg_config(None, ["epochz=1"])


def test_fused_sgd_steps_match_a_float64_hand_computation():
    """Two SGD steps of build_optimizer (fused kernel on CPU) against torch.optim.SGD's update
    written out in float64: d = g + wd*p; buf = d (step 1), buf = m*buf + d; p -= lr*buf."""
    cfg = SegConfig(**CFG)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    opt = build_optimizer(model, cfg)
    assert all(g["fused"] for g in opt.param_groups)
    ref = [p.detach().double().clone() for p in model.parameters()]
    bufs = [None] * len(ref)
    x = torch.randn(2, 3, 8, 8)
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        (model(x) ** 2).mean().backward()
        for i, p in enumerate(model.parameters()):
            d = p.grad.double() + cfg.weight_decay * ref[i]
            bufs[i] = d.clone() if bufs[i] is None else cfg.momentum * bufs[i] + d
            ref[i] = ref[i] - cfg.lr * bufs[i]
        opt.step()
        for p, r in zip(model.parameters(), ref, strict=True):
            torch.testing.assert_close(p.detach().double(), r, rtol=0, atol=1e-6)
            p.data.copy_(r.float())   # the next step starts from the same point in both


def test_resume_keeps_the_fused_optimizer_and_the_momentum(run):
    """A checkpoint's optimizer state, also one written by an unfused SGD, resumes in a fused SGD
    with its momentum buffers; parameters off CPU/CUDA (here: meta) get the plain kernel."""
    from segmentation.train import fused_sgd_supported, restore_optimizer

    ck = load_checkpoint(run["final"])
    cfg = SegConfig(**ck["config"])
    model = build_model(ck["kwargs"])
    state = ck["optimizer"]
    for g in state["param_groups"]:
        g["fused"] = None                       # as written before the fused kernel was used
    opt = restore_optimizer(model, cfg, state)
    assert all(g["fused"] for g in opt.param_groups)
    head_w = model.segmentation_head[0].weight
    idx = [id(p) for p in opt.param_groups[0]["params"]].index(id(head_w))
    saved_buf = state["state"][idx]["momentum_buffer"]
    torch.testing.assert_close(opt.state[head_w]["momentum_buffer"], saved_buf, rtol=0, atol=0)
    assert not fused_sgd_supported([torch.nn.Parameter(torch.zeros(2, device="meta"))])
    assert not fused_sgd_supported([])
