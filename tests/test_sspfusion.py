"""SSPFusion: structure maps, losses, model shapes, training interface and ablation switches.

References are independent of the code under test: explicit numpy loops in float64."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from fuseseg.errors import ConfigError
from fusion.losses import SSIMLoss, charbonnier, fusion_loss, grad_loss, smooth_loss, ssim, ssim_loss
from fusion.models.sspfusion import SSPFusion
from fusion.registry import create_method, get_entry
from fusion.structure import structure_gt, structure_pyramid, xor_masks

torch.set_num_threads(min(2, torch.get_num_threads()))
TINY = {"channels": [4, 4, 6, 8]}


# ------------------------------------------------------------------ numpy references
def np_sobel_replicate(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sobel gx, gy of a 2-D array by explicit loops, edge (replicate) padding."""
    p = np.pad(img.astype(np.float64), 1, mode="edge")
    h, w = img.shape
    gx = np.zeros((h, w))
    gy = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            a = p[i:i + 3, j:j + 3]
            gx[i, j] = (a[0, 2] + 2 * a[1, 2] + a[2, 2]) - (a[0, 0] + 2 * a[1, 0] + a[2, 0])
            gy[i, j] = (a[2, 0] + 2 * a[2, 1] + a[2, 2]) - (a[0, 0] + 2 * a[0, 1] + a[0, 2])
    return gx, gy


def np_structure(img: np.ndarray) -> np.ndarray:
    gx, gy = np_sobel_replicate(img)
    mag = np.sqrt(gx ** 2 + gy ** 2)
    return (mag > mag.mean()).astype(np.float64)


def np_ssim(x: np.ndarray, y: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Gaussian-window SSIM, valid windows only, explicit loops, float64."""
    r = np.arange(size) - (size - 1) / 2
    g2 = np.exp(-(r[:, None] ** 2 + r[None, :] ** 2) / (2 * sigma ** 2))
    g2 /= g2.sum()
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    vals = []
    for i in range(x.shape[0] - size + 1):
        for j in range(x.shape[1] - size + 1):
            a, b = x[i:i + size, j:j + size], y[i:i + size, j:j + size]
            mx, my = (g2 * a).sum(), (g2 * b).sum()
            vx = (g2 * (a - mx) ** 2).sum()
            vy = (g2 * (b - my) ** 2).sum()
            cxy = (g2 * (a - mx) * (b - my)).sum()
            vals.append((2 * mx * my + c1) * (2 * cxy + c2) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
    return float(np.mean(vals))


def t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None, None]


# ------------------------------------------------------------------ structure maps
def test_structure_gt_matches_hand_sobel_threshold():
    rng = np.random.default_rng(0)
    img = np.zeros((9, 11))
    img[3:7, 2:8] = 0.8  # a bright rectangle: edges on its border
    img += 0.05 * rng.random(img.shape)
    got = structure_gt(t(img))[0, 0].numpy()
    expect = np_structure(img)
    assert got.shape == (9, 11)
    np.testing.assert_array_equal(got, expect)
    assert 0 < expect.sum() < expect.size  # both classes present: the test can fail
    assert got[5, 5] == 0 and got[3, 4] == 1  # flat interior vs rectangle edge


def test_structure_gt_flat_image_has_no_edges():
    assert structure_gt(torch.full((2, 1, 8, 8), 0.3)).sum() == 0


def test_structure_pyramid_is_area_resize_then_G():
    rng = np.random.default_rng(1)
    img = rng.random((16, 24))
    pyr = structure_pyramid(t(img), 2)
    assert [tuple(p.shape[-2:]) for p in pyr] == [(8, 12), (4, 6)]
    for k, p in enumerate(pyr, start=1):
        s = 2 ** k
        small = img.reshape(16 // s, s, 24 // s, s).mean(axis=(1, 3))  # block means
        np.testing.assert_array_equal(p[0, 0].numpy(), np_structure(small))


def test_xor_masks_on_hand_maps():
    s_ir = torch.tensor([[1.0, 1.0, 0.0, 0.0]]).view(1, 1, 1, 4)
    s_vi = torch.tensor([[1.0, 0.0, 1.0, 0.0]]).view(1, 1, 1, 4)
    m_ir, m_vi = xor_masks(s_ir, s_vi)
    assert m_ir.flatten().tolist() == [0.0, 1.0, 0.0, 0.0]
    assert m_vi.flatten().tolist() == [0.0, 0.0, 1.0, 0.0]
    assert (m_ir + m_vi).flatten().tolist() == [0.0, 1.0, 1.0, 0.0]  # XOR
    with pytest.raises(ValueError, match="differ in shape"):
        xor_masks(s_ir, s_vi[..., :3])


# ------------------------------------------------------------------ losses
def test_ssim_identical_is_one_and_matches_numpy_float64():
    rng = np.random.default_rng(2)
    x = rng.random((16, 18))
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    assert ssim(t(x), t(x)).item() == pytest.approx(1.0, abs=1e-6)
    got64 = ssim(torch.from_numpy(x)[None, None], torch.from_numpy(y)[None, None]).item()
    assert got64 == pytest.approx(np_ssim(x, y), abs=1e-10)
    assert ssim(t(x), t(y)).item() == pytest.approx(np_ssim(x, y), abs=1e-5)
    assert np_ssim(x, y) < 0.9  # the pair really differs
    with pytest.raises(ValueError, match="smaller than the 11x11 window"):
        ssim(torch.rand(1, 1, 8, 30), torch.rand(1, 1, 8, 30))


def test_ssim_loss_formula():
    rng = np.random.default_rng(3)
    f, a, b = (rng.random((12, 14)) for _ in range(3))
    expect = 1 - (np_ssim(f, a) + np_ssim(f, b)) / 2
    assert ssim_loss(t(f), t(a), t(b)).item() == pytest.approx(expect, abs=1e-5)
    assert SSIMLoss()(t(f), t(a), t(b)).item() == pytest.approx(expect, abs=1e-5)
    assert SSIMLoss()(t(f), t(f), t(f)).item() == pytest.approx(0.0, abs=1e-6)


def test_ssim_batches_and_channels_match_numpy_per_map():
    # ssim() blurs its five local statistics of every channel in one grouped convolution: each
    # (image, channel) must still get its own SSIM, averaged over channels, per batch item
    rng = np.random.default_rng(4)
    x = rng.random((2, 3, 13, 15))
    y = np.clip(x + 0.3 * rng.standard_normal(x.shape), 0, 1)
    got = ssim(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    want = [np.mean([np_ssim(x[i, c], y[i, c]) for c in range(3)]) for i in range(2)]
    np.testing.assert_allclose(got, want, atol=1e-10)
    f, a, b = (rng.random((3, 1, 12, 14)) for _ in range(3))
    expect = 1 - np.mean([(np_ssim(f[i, 0], a[i, 0]) + np_ssim(f[i, 0], b[i, 0])) / 2 for i in range(3)])
    assert ssim_loss(*(torch.from_numpy(v) for v in (f, a, b))).item() == pytest.approx(expect, abs=1e-10)
    with pytest.raises(ValueError, match="one shape"):
        ssim_loss(torch.rand(1, 1, 12, 12), torch.rand(1, 1, 12, 12), torch.rand(2, 1, 12, 12))


def test_smooth_loss_hand_value():
    f = torch.tensor([0.2, 0.5, 0.9, 0.0]).view(1, 1, 2, 2)
    a = torch.tensor([0.1, 0.7, 0.3, 0.4]).view(1, 1, 2, 2)
    b = torch.tensor([0.6, 0.2, 0.8, 0.1]).view(1, 1, 2, 2)
    # max = [0.6, 0.7, 0.8, 0.4]; |f - max| = [0.4, 0.2, 0.1, 0.4]
    assert smooth_loss(f, a, b).item() == pytest.approx(1.1 / 4, abs=1e-7)


def test_grad_loss_matches_numpy_and_is_nan_free_on_flat_images():
    rng = np.random.default_rng(4)
    f, a, b = (rng.random((7, 9)) for _ in range(3))

    def l1grad(x):
        gx, gy = np_sobel_replicate(x)
        return np.abs(gx) + np.abs(gy)

    expect = np.abs(l1grad(f) - np.maximum(l1grad(a), l1grad(b))).mean()
    assert grad_loss(t(f), t(a), t(b)).item() == pytest.approx(expect, rel=1e-5)
    # grad_gain (a departure, default 1 = the paper): the target is gain x the stronger gradient
    expect_gain = np.abs(l1grad(f) - 1.3 * np.maximum(l1grad(a), l1grad(b))).mean()
    assert grad_loss(t(f), t(a), t(b), 1.3).item() == pytest.approx(expect_gain, rel=1e-5)
    assert expect_gain != pytest.approx(expect, rel=1e-3)
    flat = torch.full((1, 1, 8, 8), 0.5, requires_grad=True)
    grad_loss(flat, t(rng.random((8, 8))), t(rng.random((8, 8)))).backward()
    assert torch.isfinite(flat.grad).all()


def test_charbonnier_hand_value():
    p = torch.tensor([0.5, 1.0, 0.0, 0.25]).view(1, 1, 2, 2)
    s = torch.tensor([1.0, 1.0, 0.0, 1.0]).view(1, 1, 2, 2)
    expect = (math.sqrt(0.25 + 1) + 1 + 1 + math.sqrt(0.5625 + 1)) / 4
    assert charbonnier(p, s, eps=1.0).item() == pytest.approx(expect, abs=1e-6)
    expect_small = (0.5 + 1e-3 + 1e-3 + math.sqrt(0.5625 + 1e-6)) / 4
    assert charbonnier(p, s, eps=1e-3).item() == pytest.approx(expect_small, abs=1e-6)


# ------------------------------------------------------------------ model
@pytest.mark.parametrize("vis_channels", [3, 1])
def test_output_shape_and_range_odd_size(vis_channels):
    torch.manual_seed(0)
    m = create_method("sspfusion", **TINY).eval()
    ir, vi = torch.rand(2, 1, 37, 53), torch.rand(2, vis_channels, 37, 53)
    with torch.no_grad():
        out = m(ir, vi)
        y = m.fuse_y(ir, vi[:, :1])
    assert out.shape == (2, vis_channels, 37, 53)
    assert y.shape == (2, 1, 37, 53)
    assert out.min() >= 0 and out.max() <= 1 and torch.isfinite(out).all()
    with torch.no_grad():  # tiny input: padding larger than the side falls back to replicate
        assert m(torch.rand(1, 1, 3, 5), torch.rand(1, 3, 3, 5)).shape == (1, 3, 3, 5)


def test_channels_last_gives_the_same_output():
    torch.manual_seed(0)
    m = SSPFusion(**TINY).eval()
    ir, vi = torch.rand(1, 1, 32, 48), torch.rand(1, 3, 32, 48)
    with torch.no_grad():
        ref = m(ir, vi)
        m = m.to(memory_format=torch.channels_last)
        cl = m(ir.contiguous(memory_format=torch.channels_last), vi.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(cl, ref, atol=1e-5, rtol=1e-5)


def test_training_losses_components_and_formula():
    torch.manual_seed(0)
    m = SSPFusion(**TINY, alpha=0.5)
    ir, vi = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    loss, parts = m.training_losses(ir, vi, "fusion")
    assert set(parts) == {"rec", "ssim", "smooth", "grad", "fus", "total", "iou1", "iou2", "iou3"}
    assert parts["total"] == pytest.approx(0.5 * parts["rec"] + parts["ssim"] + parts["smooth"] + parts["grad"], rel=1e-5)
    assert parts["fus"] == pytest.approx(parts["ssim"] + parts["smooth"] + parts["grad"], rel=1e-5)
    # loss weights: L_fus = w_ssim L_ssim + w_smooth L_smooth + w_grad L_grad
    torch.manual_seed(0)
    w = SSPFusion(**TINY, alpha=0.5, w_ssim=2.0, w_smooth=0.5, w_grad=3.0)
    _, pw = w.training_losses(ir, vi, "fusion")
    assert pw["ssim"] == pytest.approx(parts["ssim"], rel=1e-6)
    assert pw["fus"] == pytest.approx(2 * pw["ssim"] + 0.5 * pw["smooth"] + 3 * pw["grad"], rel=1e-5)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(parts["total"], rel=1e-6)
    assert parts["rec"] >= 1.0  # Charbonnier with eps = 1 is at least eps
    loss_s, parts_s = m.training_losses(ir, vi, "structure")
    assert set(parts_s) == {"rec", "total", "iou1", "iou2", "iou3"} and parts_s["rec"] == pytest.approx(parts["rec"], rel=1e-6)
    with pytest.raises(ValueError, match="unknown training phase 'warmup'"):
        m.training_losses(ir, vi, "warmup")
    # odd-size training inputs are padded internally
    _, parts_odd = m.training_losses(torch.rand(1, 1, 27, 30), torch.rand(1, 1, 27, 30), "fusion")
    assert all(math.isfinite(v) for v in parts_odd.values())


def test_training_losses_under_bf16_autocast_are_float32():
    torch.manual_seed(0)
    m = SSPFusion(**TINY)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = m.training_losses(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32), "fusion")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


@pytest.mark.parametrize("phase", ["structure", "fusion"])
def test_one_optimisation_step_lowers_the_loss(phase):
    torch.manual_seed(0)
    m = SSPFusion(**TINY)
    g = torch.Generator().manual_seed(1)
    ir, vi = torch.rand(2, 1, 32, 32, generator=g), torch.rand(2, 1, 32, 32, generator=g)
    opt = torch.optim.Adam(m.parameters_for_phase(phase), lr=1e-3)
    before, _ = m.training_losses(ir, vi, phase)
    opt.zero_grad()
    before.backward()
    opt.step()
    with torch.no_grad():
        after, _ = m.training_losses(ir, vi, phase)
    assert after.item() < before.item()


def test_parameters_for_phase():
    m = SSPFusion(**TINY)
    struct = {id(p) for p in m.parameters_for_phase("structure")}
    everything = {id(p) for p in m.parameters_for_phase("fusion")}
    assert struct < everything
    assert {id(p) for p in m.structure_only_parameters()} <= struct
    # the structure loss reaches exactly the structure-phase parameters
    m.zero_grad()
    m.training_losses(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32), "structure")[0].backward()
    with_grad = {id(p) for p in m.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == struct
    sep = SSPFusion(**TINY, structure_branch="separate")
    assert {id(p) for p in sep.parameters_for_phase("structure")} == {id(p) for p in sep.structure_only_parameters()}


def test_hard_structure_maps_carry_no_gradient():
    """With alpha = 0 the fusion losses reach the heads only through S = G(P): no gradient."""
    torch.manual_seed(0)
    m = SSPFusion(**TINY, alpha=0.0)
    m.training_losses(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32), "fusion")[0].backward()
    heads = m.structure_only_parameters()
    assert heads and all(p.grad is None or p.grad.abs().sum() == 0 for p in heads)
    assert m.head.weight.grad.abs().sum() > 0  # while the decoder does get gradients


def test_structure_map_switch():
    m_g = SSPFusion(**TINY)
    m_t = SSPFusion(**TINY, structure_map="threshold")
    p = torch.tensor([0.2, 0.6, 0.5, 0.9]).view(1, 1, 2, 2)
    assert m_t._hard_map(p).flatten().tolist() == [0.0, 1.0, 0.0, 1.0]
    p = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    expect = np_structure(p[0, 0].double().numpy())          # hand Sobel + mean threshold
    assert 0 < expect.sum() < expect.size
    np.testing.assert_array_equal(m_g._hard_map(p)[0, 0].numpy(), expect)
    with pytest.raises(ConfigError, match="structure_map"):
        SSPFusion(structure_map="otsu")


def test_grad_gain_reaches_the_models_loss_and_its_record():
    rng = np.random.default_rng(9)
    f, a, b = (t(rng.random((16, 16))) for _ in range(3))
    paper, gained = SSPFusion(**TINY), SSPFusion(**TINY, grad_gain=1.5)
    assert paper.init_kwargs["grad_gain"] == 1.0 and gained.init_kwargs["grad_gain"] == 1.5
    # only L_grad's target changes: the difference of the two totals is L_grad(1.5) - L_grad(1)
    diff = gained.fusion_loss(f, a, b) - paper.fusion_loss(f, a, b)
    assert diff.item() == pytest.approx((grad_loss(f, a, b, 1.5) - grad_loss(f, a, b)).item(), abs=1e-6)
    assert abs(diff.item()) > 1e-3
    assert fusion_loss(f, a, b, grad_gain=1.5)[1]["grad"].item() == pytest.approx(grad_loss(f, a, b, 1.5).item())
    with pytest.raises(ConfigError, match="grad_gain.*> 0"):
        SSPFusion(grad_gain=0.0)


# ------------------------------------------------------------------ ablations and registry
def _perturb(params):
    with torch.no_grad():
        for p in params:
            p.add_(torch.randn_like(p) * 2.0)


@pytest.mark.parametrize("branch", ["shared", "separate"])
def test_no_spf_output_ignores_structure_branch_but_full_model_does_not(branch):
    ir, vi = torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32)
    for name, should_change in (("sspfusion_no_spf", False), ("sspfusion", True)):
        torch.manual_seed(0)
        m = create_method(name, **TINY, structure_branch=branch).eval()
        with torch.no_grad():
            ref = m.fuse_y(ir, vi)
            assert m.structure_only_parameters()
            _perturb(m.structure_only_parameters())
            out = m.fuse_y(ir, vi)
        assert (not torch.equal(out, ref)) is should_change, name


def test_no_sfe_has_no_structure_branch_and_no_rec_loss():
    m = create_method("sspfusion_no_sfe", **TINY)
    assert m.phases == ("fusion",) and m.use_sfe is False
    assert m.structure_only_parameters() == []
    assert not any(".heads." in n or ".s_" in n for n, _ in m.named_parameters())
    _, parts = m.training_losses(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32), "fusion")
    assert set(parts) == {"ssim", "smooth", "grad", "fus", "total"}
    with pytest.raises(ValueError, match=r"phases are \['fusion'\]"):
        m.training_losses(torch.rand(1, 1, 32, 32), torch.rand(1, 1, 32, 32), "structure")
    # full model with the same seed has strictly more parameters (the heads)
    full = SSPFusion(**TINY)
    assert sum(p.numel() for p in full.parameters()) > sum(p.numel() for p in m.parameters())


def test_registry_names_and_self_describing_kwargs():
    for name, cls_phases in (("sspfusion", ("structure", "fusion")), ("sspfusion_no_sfe", ("fusion",)),
                             ("sspfusion_no_spf", ("structure", "fusion"))):
        entry = get_entry(name)
        assert entry.trainable
        m = create_method(name, **TINY)
        assert isinstance(m, SSPFusion) and m.phases == cls_phases
        kwargs = json.loads(json.dumps(m.init_kwargs))  # JSON-able
        again = create_method(name, **kwargs)
        assert {k: v.shape for k, v in again.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}
    assert create_method("sspfusion_no_spf").init_kwargs["use_spf"] is False
    with pytest.raises(ConfigError, match="fixes use_sfe=False"):
        create_method("sspfusion_no_sfe", use_sfe=True)
    with pytest.raises(ConfigError, match="levels \\+ 1 = 4 positive widths"):
        create_method("sspfusion", channels=[8, 8])
    with pytest.raises(ConfigError, match="rejected its settings"):
        create_method("sspfusion", width=3)
