"""Learned fusion peers of issue #23 (fusion/models/): SeAFusion, DIDFuse, RFN-Nest.

Checked here: parameter counts and FLOPs per 480x640 pair against the papers' layer tables
(counted independently of the code), every training loss against a float64 numpy recomputation,
the shape/range contract on odd and tiny sizes, that a few Adam steps lower each phase's loss,
the phase/parameter split, and the errors of bad kwargs. The fusion contract itself (tests/
test_fusion_contract.py) covers these methods through the registry."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from torch.utils.flop_counter import FlopCounterMode

from fuseseg.errors import ConfigError
from fusion.models.didfuse import l1_norm_fuse
from fusion.models.seafusion import content_loss
from fusion.registry import create_method, get_entry, list_methods

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PEERS = ("seafusion", "didfuse", "rfn_nest")
H, W = 480, 640


# ---------------------------------------------------------------- independent references (float64)
def np_sobel_l1(x: np.ndarray) -> np.ndarray:
    """|Sobel_x| + |Sobel_y| of a 2-D array, edge (replicate) padding."""
    p = np.pad(x, 1, mode="edge")
    kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    gx = sum(kx[u, v] * p[u:u + x.shape[0], v:v + x.shape[1]] for u in range(3) for v in range(3))
    gy = sum(kx.T[u, v] * p[u:u + x.shape[0], v:v + x.shape[1]] for u in range(3) for v in range(3))
    return np.abs(gx) + np.abs(gy)


def np_ssim(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM of two 2-D arrays in [0, 1]: 11x11 Gaussian window (sigma 1.5), valid windows only."""
    i = np.arange(11) - 5.0
    g = np.exp(-i * i / (2 * 1.5 ** 2))
    win = np.outer(g, g) / np.outer(g, g).sum()

    def filt(a):
        return np.einsum("ijkl,kl->ij", sliding_window_view(a, (11, 11)), win)

    mx, my = filt(x), filt(y)
    sxx, syy, sxy = filt(x * x) - mx * mx, filt(y * y) - my * my, filt(x * y) - mx * my
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    return float(np.mean((2 * mx * my + c1) * (2 * sxy + c2) / ((mx * mx + my * my + c1) * (sxx + syy + c2))))


def np_batch_ssim(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over a (B, 1, H, W) batch of :func:`np_ssim`."""
    a, b = x.detach().double().numpy(), y.detach().double().numpy()
    return float(np.mean([np_ssim(a[i, 0], b[i, 0]) for i in range(a.shape[0])]))


def npd(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def scene(seed: int = 0, b: int = 2, h: int = 32, w: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth infrared-like image and a visible one that is dark where the infrared is bright."""
    g = torch.Generator().manual_seed(seed)
    base = F.avg_pool2d(torch.rand(b, 1, h + 6, w + 6, generator=g), 7, 1)
    base = (base - base.amin()) / (base.amax() - base.amin())
    vi = 0.7 * (1 - base) + 0.3 * torch.rand(b, 1, h, w, generator=g)
    return (base ** 2).clamp(0, 1), vi.clamp(0, 1)


# ---------------------------------------------------------------- architecture: the papers' tables
def _seafusion_table():
    """Layer table: (cin, cout, k, resolution divisor, runs per pair, copies) of every learned conv
    (copies: separately weighted instances, e.g. one extractor per modality; runs: passes of one
    weighted instance, e.g. a shared encoder on both images); depthwise Sobel MACs per pixel; other
    parameters."""
    per_mod = [(1, 16, 3)]
    for c, c2 in ((16, 32), (32, 48)):   # GRDB(c -> c2): dense 3x3 x2, 1x1 main, 1x1 gradient
        per_mod += [(c, c, 3), (2 * c, c, 3), (3 * c, c2, 1), (c, c2, 1)]
    layers = [(ci, co, k, 1, 1, 2) for ci, co, k in per_mod]       # two extractors (not shared)
    layers += [(ci, co, 3, 1, 1, 1) for ci, co in ((96, 64), (64, 32), (32, 16), (16, 1))]
    sobel_macs = 2 * (2 * 9 * 16 + 2 * 9 * 32)                      # per pixel, both extractors
    return layers, sobel_macs, 0


def _didfuse_table():
    enc = [(1, 64), (64, 64), (64, 64), (64, 64)]
    dec = [(128, 64), (128, 64), (128, 1)]
    layers = [(ci, co, 3, 1, 2, 1) for ci, co in enc] + [(ci, co, 3, 1, 1, 1) for ci, co in dec]  # shared encoder
    extra = 6 * 2 * 64 + 4   # BatchNorm weight+bias on six 64-channel layers, four 1-parameter PReLUs
    return layers, 0, extra


def _rfn_nest_table():
    c1, c2, c3, c4 = 64, 112, 160, 208

    def blk(ci, co, s, runs):   # ECB / DCB: 3x3 to ci/2, 1x1 to co
        return [(ci, ci // 2, 3, s, runs, 1), (ci // 2, co, 1, s, runs, 1)]

    layers = [(1, 16, 1, 1, 2, 1)]
    for ci, co, s in ((16, c1, 1), (c1, c2, 2), (c2, c3, 4), (c3, c4, 8)):
        layers += blk(ci, co, s, 2)                     # encoder, run on both images
    for ci, co, s in ((c1 + c2, c1, 1), (c2 + c3, c2, 2), (c3 + c4, c3, 4),
                      (2 * c1 + c2, c1, 1), (2 * c2 + c3, c2, 2), (3 * c1 + c2, c1, 1)):
        layers += blk(ci, co, s, 1)                     # nest decoder
    layers.append((c1, 1, 1, 1, 1, 1))
    for c, s in ((c1, 1), (c2, 2), (c3, 4), (c4, 8)):  # RFN: conv_ir, conv_vi, 1x1, 3x3, 3x3, residual 3x3
        layers += [(ci, co, k, s, 1, 1) for ci, co, k in
                   ((c, c, 3), (c, c, 3), (2 * c, c, 1), (c, c, 3), (c, c, 3), (2 * c, c, 3))]
    return layers, 0, 0


TABLES = {"seafusion": _seafusion_table, "didfuse": _didfuse_table, "rfn_nest": _rfn_nest_table}


def table_counts(name: str) -> tuple[int, int]:
    """(parameters, FLOPs per 480x640 pair at 2 FLOPs per multiply-add) from the layer table."""
    layers, sobel_macs, extra = TABLES[name]()
    params = sum((ci * co * k * k + co) * copies for ci, co, k, _, _, copies in layers) + extra
    macs = sum(ci * co * k * k * (H // s) * (W // s) * runs * copies for ci, co, k, s, runs, copies in layers)
    return params, 2 * (macs + sobel_macs * H * W)


def counted(name: str) -> tuple[int, int]:
    """(parameters, FlopCounterMode FLOPs of one 480x640 fuse_y) of the registered model (meta tensors)."""
    params = sum(p.numel() for p in create_method(name).parameters())
    with torch.device("meta"):
        model = create_method(name).eval()
        ir, vi = torch.empty(1, 1, H, W), torch.empty(1, 1, H, W)
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        model.fuse_y(ir, vi)
    return params, fc.get_total_flops()


def test_peers_are_registered_trainable_builtins():
    for name in PEERS:
        assert name in list_methods()
        entry = get_entry(name)
        assert entry.trainable and entry.module.startswith("fusion.models."), entry


@pytest.mark.parametrize("name", PEERS)
def test_parameters_and_flops_match_the_papers_layer_tables(name, capsys):
    params, flops = counted(name)
    want_params, want_flops = table_counts(name)
    with capsys.disabled():
        print(f"\n{name}: {params:,} parameters, {flops / 1e9:.2f} GFLOP per {H}x{W} pair")
    assert params == want_params
    assert flops == want_flops


# ---------------------------------------------------------------- losses against numpy
def test_seafusion_content_loss_known_value():
    ir, vi = scene(1, h=16, w=20)
    fused = torch.rand(2, 1, 16, 20, generator=torch.Generator().manual_seed(5))
    loss, parts = content_loss(fused, ir, vi, alpha=10.0)
    f, a, b = npd(fused)[:, 0], npd(ir)[:, 0], npd(vi)[:, 0]
    l_int = np.mean(np.abs(f - np.maximum(a, b)))
    l_tex = np.mean([np.abs(np_sobel_l1(f[i]) - np.maximum(np_sobel_l1(a[i]), np_sobel_l1(b[i]))) for i in range(2)])
    assert float(parts["int"]) == pytest.approx(l_int, rel=1e-5)
    assert float(parts["texture"]) == pytest.approx(l_tex, rel=1e-5)
    assert float(loss) == pytest.approx(l_int + 10 * l_tex, rel=1e-5)


def test_seafusion_training_loss_is_content_loss_of_its_output_and_semantic_hook():
    ir, vi = scene(2, h=16, w=20)
    m = create_method("seafusion").eval()
    total, parts = m.training_losses(ir, vi, "fusion")
    f, a, b = npd(m.fuse_y(ir, vi))[:, 0], npd(ir)[:, 0], npd(vi)[:, 0]
    assert float(f.min()) >= 0 and float(f.max()) <= 1
    want = np.mean(np.abs(f - np.maximum(a, b))) + 10 * np.mean(
        [np.abs(np_sobel_l1(f[i]) - np.maximum(np_sobel_l1(a[i]), np_sobel_l1(b[i]))) for i in range(2)])
    assert float(total.detach()) == pytest.approx(want, rel=1e-5)
    with torch.no_grad():
        assert parts["fus"] == pytest.approx(want, rel=1e-5) == float(m.fusion_loss(m.fuse_y(ir, vi), ir, vi))
    assert "semantic" not in parts
    # beta > 0: L_f = L_content + beta L_semantic, with the hook's loss; no hook -> a ConfigError
    m2 = create_method("seafusion", semantic_weight=0.5).eval()
    m2.load_state_dict(m.state_dict())
    with pytest.raises(ConfigError, match="semantic_weight=0.5 needs a semantic loss"):
        m2.training_losses(ir, vi, "fusion")
    labels = torch.full((2, 16, 20), 255, dtype=torch.long)
    visible = vi.repeat(1, 3, 1, 1)
    assert m2.batch_extras == ("labels", "visible") and m.batch_extras == ()
    seen = []

    def sem(fused, visible_, labels_):   # a stand-in segmenter loss: mean (1 - fused)^2 of labelled samples
        seen.append(labels_.shape[0])
        return (1.0 - fused).pow(2).mean()
    m2.set_semantic_loss(sem)
    # no labelled pair in the batch (RoadScene): the semantic term is off, total = L_content
    total_off, parts_off = m2.training_losses(ir, vi, "fusion", labels=labels, visible=visible)
    assert parts_off["semantic"] == 0.0 and parts_off["labelled"] == 0.0 and seen == []
    assert float(total_off.detach()) == pytest.approx(want, rel=1e-5)
    # the second pair labelled: L_f = L_content + beta L_semantic over that pair only
    labels[1, 3:5, 4:9] = 2
    total2, parts2 = m2.training_losses(ir, vi, "fusion", labels=labels, visible=visible)
    assert seen == [1] and parts2["labelled"] == 0.5
    assert parts2["semantic"] == pytest.approx(np.mean((1 - f[1]) ** 2), rel=1e-5)
    assert float(total2.detach()) == pytest.approx(want + 0.5 * np.mean((1 - f[1]) ** 2), rel=1e-5)
    with pytest.raises(ConfigError, match="labels and visible RGB"):
        m2.training_losses(ir, vi, "fusion")


def test_didfuse_training_loss_known_value():
    ir, vi = scene(3, h=16, w=24)
    m = create_method("didfuse").eval()
    total, parts = m.training_losses(ir, vi, "autoencoder")
    f_ir, f_vi = m.encode(ir), m.encode(vi)
    rec_ir, rec_vi = npd(m.decode(*f_ir)), npd(m.decode(*f_vi))
    x_ir, x_vi = npd(ir), npd(vi)

    def f(x, r):   # ||X - X^||^2 + lam (1 - SSIM) / 2, lam = 5
        return np.mean((x - r) ** 2) + 5 * 0.5 * (1 - np.mean([np_ssim(x[i, 0], r[i, 0]) for i in range(2)]))

    d_base = np.mean((npd(f_vi[2]) - npd(f_ir[2])) ** 2)
    d_detail = np.mean((npd(f_vi[3]) - npd(f_ir[3])) ** 2)
    # ||grad V - grad V^||_1: Sobel / 8 per component, mean over pixels and the two components
    grad = np.mean([np_sobel_l1(x_vi[i, 0] - rec_vi[i, 0]) / 8 / 2 for i in range(2)])
    want = np.tanh(d_base) - 0.5 * np.tanh(d_detail) + 2 * f(x_ir, rec_ir) + 2 * f(x_vi, rec_vi) + 10 * grad
    assert parts["base"] == pytest.approx(d_base, rel=1e-5)
    assert parts["detail"] == pytest.approx(d_detail, rel=1e-5)
    assert parts["grad"] == pytest.approx(grad, rel=1e-5)
    assert float(total.detach()) == pytest.approx(want, rel=1e-5)
    # the "l1" distance (the released code's) is a mean absolute difference inside the tanh
    m1 = create_method("didfuse", decomposition_norm="l1").eval()
    m1.load_state_dict(m.state_dict())
    assert m1.training_losses(ir, vi, "autoencoder")[1]["base"] == pytest.approx(
        np.mean(np.abs(npd(f_vi[2]) - npd(f_ir[2]))), rel=1e-5)


def test_didfuse_l1_norm_rule_known_value():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(1, 3, 5, 6, generator=g), torch.randn(1, 3, 5, 6, generator=g)
    a[..., :3, :3] = 0.0
    b[..., :3, :3] = 0.0   # a patch where both activities vanish at its centre: equal weights
    out = npd(l1_norm_fuse(a, b))
    na, nb = npd(a)[0], npd(b)[0]
    act = [np.pad(np.abs(x).sum(0), 1) for x in (na, nb)]   # channel L1, zero padding, 3x3 mean
    box = [sum(p[u:u + 5, v:v + 6] for u in range(3) for v in range(3)) / 9 for p in act]
    tot = box[0] + box[1]
    wa = np.where(tot > 1e-8, box[0] / np.where(tot > 1e-8, tot, 1.0), 0.5)
    want = wa * na + (1 - wa) * nb
    assert np.abs(out[0] - want).max() < 1e-5
    assert wa[1, 1] == 0.5


def test_didfuse_has_no_fusion_loss_so_the_trainer_scores_nothing():
    from fusion.train import trivial_fusion_losses

    m = create_method("didfuse")
    assert not hasattr(m, "fusion_loss")
    ir, vi = scene(0, h=16, w=16)
    assert trivial_fusion_losses(m, ir, vi) == {}


def test_rfn_nest_losses_known_value():
    ir, vi = scene(5, h=16, w=24)
    m = create_method("rfn_nest").eval()
    s = 255.0
    # phase "autoencoder": mean over both modalities of s^2 mean (O - I)^2 + 100 (1 - SSIM(O, I))
    total, parts = m.training_losses(ir, vi, "autoencoder")
    want = []
    for x in (ir, vi):
        rec = m.decode(m.encode(x))
        want.append(s * s * np.mean((npd(rec) - npd(x)) ** 2) + 100 * (1 - np_batch_ssim(rec, x)))
    assert float(total.detach()) == pytest.approx(np.mean(want), rel=1e-5)
    # phase "fusion": 700 (1 - SSIM(O, VI)) + sum_m w_m mean (Phi_f - (6 Phi_ir + 3 Phi_vi))^2
    total, parts = m.training_losses(ir, vi, "fusion")
    f_ir, f_vi = m.encode(ir), m.encode(vi)
    f_f = m.fuse_features(f_ir, f_vi)
    raw = npd(m.decode(f_f))
    # output_norm "minmax" (the default): in training the batch's output stretched to [0, 1] before L_detail
    lo, hi = raw.min(), raw.max()
    out = torch.from_numpy((raw - lo) / (hi - lo + 1e-8)).float()
    feat = sum(w * np.mean((npd(ff) - (6 * npd(a) + 3 * npd(b))) ** 2)
               for w, ff, a, b in zip((1, 10, 100, 1000), f_f, f_ir, f_vi, strict=True))
    detail = 1 - np_batch_ssim(out, vi)
    assert parts["feature"] == pytest.approx(feat, rel=1e-5)
    assert parts["detail"] == pytest.approx(detail, rel=1e-5, abs=1e-6)
    assert float(total.detach()) == pytest.approx(700 * detail + feat, rel=1e-5)
    # fusion_loss of any image: the same L_RFN with Phi_f = E(image)
    mx = torch.maximum(ir, vi)
    f_mx = m.encode(mx)
    want_mx = 700 * (1 - np_batch_ssim(mx, vi)) + sum(
        w * np.mean((npd(ff) - (6 * npd(a) + 3 * npd(b))) ** 2)
        for w, ff, a, b in zip((1, 10, 100, 1000), f_mx, f_ir, f_vi, strict=True))
    assert float(m.fusion_loss(mx, ir, vi).detach()) == pytest.approx(want_mx, rel=1e-5)
    assert parts["fus"] == pytest.approx(float(m.fusion_loss(out, ir, vi).detach()), rel=1e-5)


def test_rfn_nest_losses_on_an_odd_size_pad_by_reflection_and_crop():
    """13x19: inputs reflect-padded at the bottom/right to 16x24 (numpy's pad here), the losses
    taken on the output cropped back and on the padded inputs' features."""
    ir, vi = scene(11, h=13, w=19)
    m = create_method("rfn_nest", widths=[8, 12, 16, 20]).eval()
    s = 255.0

    def pad(x):
        return torch.from_numpy(np.pad(x.numpy(), ((0, 0), (0, 0), (0, 3), (0, 5)), mode="reflect"))

    ir_p, vi_p = pad(ir), pad(vi)
    total, _ = m.training_losses(ir, vi, "autoencoder")
    want = [s * s * np.mean((npd(m.decode(m.encode(xp)))[..., :13, :19] - npd(x)) ** 2)
            + 100 * (1 - np_batch_ssim(m.decode(m.encode(xp))[..., :13, :19], x)) for x, xp in ((ir, ir_p), (vi, vi_p))]
    assert float(total.detach()) == pytest.approx(np.mean(want), rel=1e-5)
    total, parts = m.training_losses(ir, vi, "fusion")
    f_ir, f_vi = m.encode(ir_p), m.encode(vi_p)
    f_f = m.fuse_features(f_ir, f_vi)
    out = m.decode(f_f)[..., :13, :19]
    out = (out - out.min()) / (out.max() - out.min() + 1e-8)
    feat = sum(w * np.mean((npd(ff) - (6 * npd(a) + 3 * npd(b))) ** 2)
               for w, ff, a, b in zip((1, 10, 100, 1000), f_f, f_ir, f_vi, strict=True))
    assert parts["feature"] == pytest.approx(feat, rel=1e-5)
    assert float(total.detach()) == pytest.approx(700 * (1 - np_batch_ssim(out, vi)) + feat, rel=1e-5)


def test_rfn_nest_output_norm_stretches_each_image_and_none_keeps_the_raw_output():
    """output_norm minmax (the release's test-time and training normalisation): each fused image spans
    [0, 1] on its own (batch-independent); "none": the decoder's raw output, as before."""
    ir, vi = scene(3, h=16, w=24)
    ir2, vi2 = torch.cat([ir, 0.3 * ir]), torch.cat([vi, 0.3 * vi])
    raw_m = create_method("rfn_nest", widths=[8, 12, 16, 20], output_norm="none").eval()
    m = create_method("rfn_nest", widths=[8, 12, 16, 20]).eval()
    m.load_state_dict(raw_m.state_dict())
    assert m.init_kwargs["output_norm"] == "minmax" and raw_m.init_kwargs["output_norm"] == "none"
    with torch.no_grad():
        raw, out = npd(raw_m.fuse_y(ir2, vi2)), npd(m.fuse_y(ir2, vi2))
        alone = npd(m.fuse_y(ir2[1:], vi2[1:]))
    for b in range(2):
        r = raw[b]
        np.testing.assert_allclose(out[b], (r - r.min()) / (r.max() - r.min() + 1e-8), rtol=1e-4, atol=1e-5)
        assert out[b].min() == pytest.approx(0.0, abs=1e-6) and out[b].max() == pytest.approx(1.0, abs=1e-3)   # eps vs a flat untrained output
    np.testing.assert_allclose(alone[0], out[1], atol=1e-4)   # per image, not per batch
    assert np.ptp(raw[1]) < 0.9   # so the stretch did change something
    # a constant image maps to 0, not NaN
    from fusion.models.rfn_nest import minmax_per_image
    assert torch.equal(minmax_per_image(torch.full((1, 1, 4, 4), 0.7)), torch.zeros(1, 1, 4, 4))


# ---------------------------------------------------------------- contract on odd and tiny sizes
@pytest.mark.parametrize("name", PEERS)
def test_any_size_grey_and_rgb(name):
    m = create_method(name).eval()
    g = torch.Generator().manual_seed(6)
    for h, w in ((1, 1), (3, 7), (13, 17), (21, 9)):
        for c in (1, 3):
            ir, vi = torch.rand(2, 1, h, w, generator=g), torch.rand(2, c, h, w, generator=g)
            with torch.no_grad():
                out = m(ir, vi)
            assert out.shape == (2, c, h, w) and out.dtype == torch.float32
            assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    # training losses on an odd size (padding inside) are finite
    ir, vi = scene(7, h=21, w=27)
    for phase in m.phases:
        loss, parts = m.training_losses(ir, vi, phase)
        assert torch.isfinite(loss) and loss.ndim == 0 and parts["total"] == pytest.approx(float(loss.detach()))


# ---------------------------------------------------------------- learning, phases
#: RFN-Nest at a quarter of the paper's widths (same code; the paper's 7.5 M parameters take ~1 s a
#: step here). Its auto-encoder loss starts at about the image variance in grey levels^2 (the
#: untrained output is flat mid-grey) and falls slowly at first, hence the looser margin.
SMALL_RFN = {"widths": [16, 24, 32, 40]}
#: (method, kwargs, phase, Adam lr, steps, the loss after the steps must be below this fraction of the first)
LEARNING = [("seafusion", {}, "fusion", 1e-3, 20, 0.7), ("didfuse", {}, "autoencoder", 1e-3, 20, 0.5),
            ("rfn_nest", SMALL_RFN, "autoencoder", 3e-3, 20, 0.9), ("rfn_nest", SMALL_RFN, "fusion", 1e-3, 15, 0.7)]


@pytest.mark.parametrize("name,kwargs,phase,lr,steps,margin", LEARNING, ids=[f"{n}-{p}" for n, _, p, *_ in LEARNING])
def test_adam_steps_lower_the_training_loss(name, kwargs, phase, lr, steps, margin):
    torch.manual_seed(0)
    ir, vi = scene(0, h=24, w=24)
    m = create_method(name, **kwargs).train()
    opt = torch.optim.Adam(m.parameters_for_phase(phase), lr=lr)
    first = None
    for _ in range(steps):
        loss, _ = m.training_losses(ir, vi, phase)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        last = float(m.training_losses(ir, vi, phase)[0])
    assert last < margin * first, f"{name}/{phase}: loss {first:.4g} -> {last:.4g} (want < {margin} x)"


@pytest.mark.parametrize("name", PEERS)
def test_phases_and_parameters_for_phase(name):
    m = create_method(name)
    everything = {id(p) for p in m.parameters()}
    sets = {ph: {id(p) for p in m.parameters_for_phase(ph)} for ph in m.phases}
    assert set().union(*sets.values()) == everything
    if name == "rfn_nest":
        assert m.phases == ("autoencoder", "fusion")
        assert not sets["autoencoder"] & sets["fusion"]
        assert sets["fusion"] == {id(p) for p in m.rfn.parameters()}
    else:
        assert m.phases == {"seafusion": ("fusion",), "didfuse": ("autoencoder",)}[name]
    with pytest.raises(ValueError, match=f"unknown training phase 'structure'.*{m.phases[0]}"):
        m.training_losses(*scene(0, h=16, w=16), "structure")
    with pytest.raises(ValueError, match="unknown training phase"):
        m.parameters_for_phase("structure")


def test_rfn_nest_phase_gradients_reach_only_that_phases_parameters():
    ir, vi = scene(8, h=16, w=16)
    m = create_method("rfn_nest")
    rfn = {id(p) for p in m.rfn.parameters()}
    enc = {id(p) for mod in (m.stem, m.ecb) for p in mod.parameters()}
    for phase in m.phases:
        m.zero_grad(set_to_none=True)
        m.training_losses(ir, vi, phase)[0].backward()
        with_grad = {id(p) for p in m.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        if phase == "autoencoder":   # every encoder/decoder parameter, no RFN parameter
            assert with_grad == {id(p) for p in m.parameters()} - rfn
        else:                        # every RFN parameter; the frozen encoder is not even traced
            assert rfn <= with_grad and not enc & with_grad


# ---------------------------------------------------------------- kwargs
BAD_KWARGS = [
    ("didfuse", {"fusion_rule": "max"}, ["fusion_rule", "sum", "average", "l1_norm", "'max'"]),
    ("didfuse", {"decomposition_norm": "l3"}, ["decomposition_norm", "l2", "l1"]),
    ("didfuse", {"alpha4": -1}, ["alpha4", ">= 0"]),
    ("seafusion", {"alpha": -1.0}, ["alpha", ">= 0"]),
    ("seafusion", {"semantic_weight": "high"}, ["semantic_weight", ">= 0"]),
    ("rfn_nest", {"widths": [64, 112]}, ["widths", "4 integers"]),
    ("rfn_nest", {"feature_weights": [1, 10, 100]}, ["feature_weights", "4 numbers"]),
    ("rfn_nest", {"intensity_scale": 0}, ["intensity_scale", "> 0"]),
    ("rfn_nest", {"output_norm": "clip"}, ["output_norm", "minmax", "none", "'clip'"]),
    ("seafusion", {"beta": 1.0}, ["'seafusion' rejected its settings", "beta"]),
]


@pytest.mark.parametrize("name,kwargs,words", BAD_KWARGS, ids=[f"{n}-{next(iter(k))}" for n, k, _ in BAD_KWARGS])
def test_bad_kwargs_name_the_key_and_the_valid_values(name, kwargs, words):
    with pytest.raises(ConfigError) as e:
        create_method(name, **kwargs)
    for word in words:
        assert word in str(e.value), str(e.value)


@pytest.mark.parametrize("name,kwargs", [("seafusion", {"alpha": 5, "semantic_weight": 0.25}),
                                         ("didfuse", {"fusion_rule": "l1_norm", "lam": 3}),
                                         ("rfn_nest", {"widths": [8, 12, 16, 20], "intensity_scale": 1})])
def test_init_kwargs_are_json_and_rebuild_the_model(name, kwargs):
    m = create_method(name, **kwargs)
    again = create_method(name, **json.loads(json.dumps(m.init_kwargs)))
    assert again.init_kwargs == m.init_kwargs
    again.load_state_dict(m.state_dict())   # same architecture
    for key, val in kwargs.items():
        assert m.init_kwargs[key] == val


@pytest.mark.parametrize("name,kwargs", [("seafusion", {}), ("didfuse", {}), ("rfn_nest", SMALL_RFN)])
def test_losses_stay_float32_under_bf16_autocast(name, kwargs):
    ir, vi = scene(9, h=16, w=16)
    m = create_method(name, **kwargs).train()
    for phase in m.phases:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, parts = m.training_losses(ir, vi, phase)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        loss.backward()
