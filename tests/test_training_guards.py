"""Guards against a fusion training that collapses (fusion/README.md, "The 12,000-step run"):
SSPFusion's restoring clamp (a saturated output keeps the gradient that brings it back), gradient
clipping in the trainer (norm logged before clipping) and the weights kept every N epochs."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import fusion_tiny
import numpy as np
import pytest
import torch

from fuseseg import runtime
from fuseseg.errors import ConfigError
from fusion.models.sspfusion import SSPFusion, restoring_clamp
from fusion.train import _clip_gradients, train_fusion

pytestmark = pytest.mark.usefixtures("one_torch_thread", "tiny_knobs")


# ---------------------------------------------------------------------- the restoring clamp
def test_restoring_clamp_hand_values():
    x = torch.tensor([-0.5, -0.5, 0.0, 0.3, 1.0, 1.5, 1.5], requires_grad=True)
    g = torch.tensor([-2.0, 2.0, 3.0, -1.0, 4.0, 5.0, -5.0])
    y = restoring_clamp(x)
    assert y.tolist() == pytest.approx([0.0, 0.0, 0.0, 0.3, 1.0, 1.0, 1.0])
    y.backward(g)
    # below 0: a descent step -g raises x only when g < 0; above 1 it lowers x only when g > 0;
    # inside [0, 1] (ends included, as torch.clamp) g passes unchanged
    assert x.grad.tolist() == [-2.0, 0.0, 3.0, -1.0, 4.0, 5.0, 0.0]
    # torch's clamp on the same input: no gradient at all outside [0, 1]
    x2 = x.detach().clone().requires_grad_(True)
    x2.clamp(0.0, 1.0).backward(g)
    assert [x2.grad[i].item() for i in (0, 1, 5, 6)] == [0.0] * 4
    assert x2.grad[3].item() == -1.0


def _saturated(clamp_grad: str) -> SSPFusion:
    """A max_residual SSPFusion whose head adds +3 everywhere: every output pixel is clamped to 1."""
    torch.manual_seed(0)
    model = SSPFusion(channels=(4, 4, 4, 4), output="max_residual", clamp_grad=clamp_grad)
    with torch.no_grad():
        model.head.bias.fill_(3.0)
    return model


def test_saturated_max_residual_gets_a_gradient_only_with_the_restoring_clamp():
    torch.manual_seed(1)
    ir, vi = torch.rand(2, 1, 32, 32) * 0.5, torch.rand(2, 1, 32, 32) * 0.5
    grads = {}
    for mode in ("zero", "restoring"):
        model = _saturated(mode)
        fused = model.fuse_y(ir, vi)
        assert torch.equal(fused, torch.ones_like(fused))   # the collapsed state: an all-white image
        loss, _ = model.training_losses(ir, vi, "fusion")
        loss.backward()
        grads[mode] = float(model.head.bias.grad)
    assert grads["zero"] == 0.0           # torch's clamp: stuck for good
    # restoring: L_smooth = mean |F - max| alone gives d/d(bias) = +1 (F > max everywhere), so the
    # descent step lowers the bias towards the unsaturated range
    assert grads["restoring"] > 0.5


def test_clamp_grad_changes_no_fused_pixel_and_rejects_unknown_values():
    torch.manual_seed(2)
    ir, vi = torch.rand(1, 1, 24, 40), torch.rand(1, 1, 24, 40)
    a = SSPFusion(channels=(4, 4, 4, 4), output="max_residual", init="kaiming", clamp_grad="zero")
    b = SSPFusion(channels=(4, 4, 4, 4), output="max_residual", init="kaiming", clamp_grad="restoring")
    with torch.no_grad():
        a.head.weight.normal_(0, 0.5)   # a head far from zero: many pixels clamped at 0 or 1
    b.load_state_dict(a.state_dict())
    fa, fb = a.fuse_y(ir, vi), b.fuse_y(ir, vi)
    assert ((fa == 0) | (fa == 1)).float().mean() > 0.05
    assert torch.equal(fa, fb)
    assert b.init_kwargs["clamp_grad"] == "restoring"
    with pytest.raises(ConfigError, match="clamp_grad.*restoring, zero"):
        SSPFusion(clamp_grad="straight")


# ---------------------------------------------------------------------- gradient clipping
def test_clip_gradients_returns_the_norm_before_and_scales_to_max_norm():
    w = torch.nn.Parameter(torch.zeros(2))
    v = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.Adam([w, v], lr=1.0)
    w.grad, v.grad = torch.tensor([3.0, 0.0]), torch.tensor([4.0])
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert _clip_gradients(opt, scaler, 1.0) == pytest.approx(5.0)   # sqrt(3^2 + 4^2)
    assert w.grad.tolist() == pytest.approx([0.6, 0.0], abs=1e-6)
    assert v.grad.tolist() == pytest.approx([0.8], abs=1e-6)
    w.grad, v.grad = torch.tensor([0.3, 0.0]), torch.tensor([0.4])   # norm 0.5 < 1: unchanged
    assert _clip_gradients(opt, scaler, 1.0) == pytest.approx(0.5)
    assert w.grad.tolist() == pytest.approx([0.3, 0.0])


@pytest.mark.parametrize("bad", [{"grad_clip": 0.0}, {"grad_clip": -1.0}, {"keep_every": -1}])
def test_bad_guard_settings_are_rejected(bad, tmp_path):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        fusion_tiny.train_config(tmp_path, **bad)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pairs")
    fusion_tiny.make_pairs(root, n=12, size=(40, 48))
    return root


def test_run_with_grad_clip_and_keep_every(data, tmp_path):
    cfg = fusion_tiny.train_config(data, grad_clip=0.05, keep_every=2)
    train_fusion(cfg, tmp_path, progress=False)
    with open(tmp_path / "log.csv") as f:
        rows = list(csv.DictReader(f))
    norms = [float(r["grad_norm"]) for r in rows]
    assert all(math.isfinite(n) and n > 0 for n in norms)
    assert max(norms) > 0.05   # logged before clipping: the clip was active
    # kept: every 2nd epoch of each phase (structure has 1 epoch: none; fusion 3: epoch 2)
    kept = sorted(p.name for p in (tmp_path / "epochs").iterdir())
    assert kept == ["fusion-0002.pt"]
    ck = runtime.load_checkpoint(tmp_path / "epochs" / "fusion-0002.pt",
                                 expect={"kind": "fusion", "method": "tiny-trainable"})
    assert ck["epoch"] == 2 and ck["phase"] == "fusion" and ck["global_step"] == 9
    assert len(ck["log"]) == 3 and "optimizer" not in ck
    final = runtime.load_checkpoint(tmp_path / "final.pt")
    changed = [k for k in final["state_dict"] if not torch.equal(final["state_dict"][k], ck["state_dict"][k])]
    assert changed   # one more epoch of training moved the weights after the kept ones
    # the kept weights are a usable model: rebuilt from the file alone, they fuse
    model = fusion_tiny.TinyFusion(**ck["kwargs"])
    model.load_state_dict(ck["state_dict"])
    out = model.fuse_y(torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16))
    assert out.shape == (1, 1, 16, 16) and torch.isfinite(out).all()


def test_grad_clip_changes_training_and_keep_every_does_not(data, tmp_path):
    """keep_every only writes files (same weights as without it); grad_clip changes the steps."""
    runs = {}
    for name, kw in {"plain": {}, "keep": {"keep_every": 1}, "clip": {"grad_clip": 1e-3}}.items():
        out = tmp_path / name
        train_fusion(fusion_tiny.train_config(data, **kw), out, progress=False)
        runs[name] = runtime.load_checkpoint(out / "final.pt")["state_dict"]
    assert all(torch.equal(runs["plain"][k], runs["keep"][k]) for k in runs["plain"])
    assert any(not torch.equal(runs["plain"][k], runs["clip"][k]) for k in runs["plain"])


def test_max_detail_head_adds_only_the_high_pass_of_its_output():
    """output="max_detail": F = clamp(max + z - blur(z)), blur = OpenCV's 5x5 Gaussian (sigma 1,
    reflect-101) on the padded z; a constant head output shifts nothing (max_residual's does)."""
    import cv2

    torch.manual_seed(3)
    ir, vi = torch.rand(1, 1, 24, 40) * 0.8, torch.rand(1, 1, 24, 40) * 0.8
    mx = torch.maximum(ir, vi)
    detail = SSPFusion(channels=(4, 4, 4, 4), output="max_detail", init="kaiming")
    assert torch.equal(detail.fuse_y(ir, vi), mx)        # zero-initialised head: exactly the max
    resid = SSPFusion(channels=(4, 4, 4, 4), output="max_residual", init="kaiming")
    resid.load_state_dict(detail.state_dict())
    with torch.no_grad():
        detail.head.bias.fill_(0.1)
        resid.head.bias.fill_(0.1)
    assert torch.allclose(detail.fuse_y(ir, vi), mx, atol=1e-6)
    assert torch.allclose(resid.fuse_y(ir, vi), (mx + 0.1).clamp(0, 1), atol=1e-6)
    with torch.no_grad():
        detail.head.weight.normal_(0, 0.2)
    seen = {}
    detail.head.register_forward_hook(lambda mod, args, out: seen.update(z=out.detach()))
    fused = detail.fuse_y(ir, vi)[0, 0].detach().double().numpy()
    z = seen["z"][0, 0].double().numpy()                 # padded to the model's multiple
    hp = z - cv2.GaussianBlur(z, (5, 5), 1.0, borderType=cv2.BORDER_REFLECT_101)
    want = np.clip(mx[0, 0].double().numpy() + hp[:24, :40], 0, 1)
    assert np.abs(hp).max() > 0.01                        # the head really adds detail
    np.testing.assert_allclose(fused, want, atol=1e-5)
