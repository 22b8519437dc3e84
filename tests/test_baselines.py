"""Classical baselines (fusion/baselines.py): hand-computed values, identities, and independent
float64 numpy references written here with explicit windows."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from conftest import require_shared

from fuseseg.data.colour import luminance
from fusion.baselines import GradientTransferFusion, box_mean, gtf_objective, guided_filter, laplacian_levels
from fusion.registry import create_method

BASELINES = ["mean", "max", "laplacian", "gff", "gtf"]


def t(a) -> torch.Tensor:
    """(H, W) array -> (1, 1, H, W) float32 tensor."""
    return torch.as_tensor(np.asarray(a, dtype=np.float32))[None, None]


def spatial_frequency(x: np.ndarray) -> float:
    """SF per ../shared/docs/metrics.md: sqrt(mean row-diff^2 + mean column-diff^2)."""
    x = x.astype(np.float64)
    return float(np.sqrt(np.mean(np.diff(x, axis=1) ** 2) + np.mean(np.diff(x, axis=0) ** 2)))


# ----------------------------------------------------------------------------- mean / max
def test_mean_and_max_by_hand_grey():
    ir, vi = t([[0.2, 0.9], [0.0, 1.0]]), t([[0.6, 0.1], [0.5, 1.0]])
    assert torch.allclose(create_method("mean")(ir, vi), t([[0.4, 0.5], [0.25, 1.0]]), atol=1e-7)
    assert torch.allclose(create_method("max")(ir, vi), t([[0.6, 0.9], [0.5, 1.0]]), atol=1e-7)


def test_mean_and_max_by_hand_rgb_neutral_grey():
    # A neutral-grey RGB pixel (0.6, 0.6, 0.6) has Y = 0.6 and no chroma, so the fused RGB is
    # the fused Y in every channel: mean (0.2 + 0.6) / 2 = 0.4, max 0.6.
    ir = torch.full((1, 1, 3, 3), 0.2)
    vi = torch.full((1, 3, 3, 3), 0.6)
    assert torch.allclose(create_method("mean")(ir, vi), torch.full((1, 3, 3, 3), 0.4), atol=1e-6)
    assert torch.allclose(create_method("max")(ir, vi), torch.full((1, 3, 3, 3), 0.6), atol=1e-6)


# ----------------------------------------------------------------------------- Laplacian pyramid
def np_blur5(x: np.ndarray, gain: float = 1.0) -> np.ndarray:
    """Reference: separable [1 4 6 4 1]/16 * gain per axis, mirror padding (no edge repeat)."""
    k = np.array([1, 4, 6, 4, 1], np.float64) / 16 * gain
    p = np.pad(x, 2, mode="reflect")
    rows = sum(k[i] * p[i:i + x.shape[0], :] for i in range(5))
    return sum(k[j] * rows[:, j:j + x.shape[1]] for j in range(5))


def np_one_level_laplacian_fusion(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    def expand(small, shape):
        up = np.zeros(shape)
        up[::2, ::2] = small
        return np_blur5(up, gain=2.0)

    ga, gb = np_blur5(a)[::2, ::2], np_blur5(b)[::2, ::2]
    la, lb = a - expand(ga, a.shape), b - expand(gb, b.shape)
    detail = np.where(np.abs(la) >= np.abs(lb), la, lb)
    return np.clip(detail + expand((ga + gb) / 2, a.shape), 0, 1)


def test_laplacian_identical_inputs_give_the_input():
    img = torch.rand(2, 1, 37, 53, generator=torch.Generator().manual_seed(0))
    for levels in (1, 4, 10):
        out = create_method("laplacian", levels=levels)(img, img)
        assert float((out - img).abs().max()) < 1e-5, f"levels={levels}"


def test_laplacian_constant_pair_gives_the_constant():
    m = create_method("laplacian")
    out = m(torch.full((1, 1, 21, 30), 0.3), torch.full((1, 1, 21, 30), 0.3))
    assert float((out - 0.3).abs().max()) < 1e-6
    # Two different constants: no detail anywhere, the bases are averaged.
    out = m(torch.full((1, 1, 21, 30), 0.2), torch.full((1, 1, 21, 30), 0.7))
    assert float((out - 0.45).abs().max()) < 1e-6


def test_laplacian_one_level_choose_max_on_a_step_edge():
    h, w = 24, 33
    ir = np.full((h, w), 0.2)
    ir[:, 16:] = 0.8                      # strong vertical step at column 16
    vi = np.full((h, w), 0.5)
    vi[12:, :] = 0.6                      # weak horizontal step at row 12
    out = create_method("laplacian", levels=1)(t(ir), t(vi))[0, 0].double().numpy()
    ref = np_one_level_laplacian_fusion(ir, vi)
    assert np.abs(out - ref).max() < 1e-5
    # Choose-max keeps the IR edge's full contrast at the step (the mean halves it: 0.3) ...
    jump = out[2, 16] - out[2, 15]
    assert jump > 0.4, f"fused jump at the IR edge {jump:.3f}"
    # ... and far from both edges there is no detail, so the result is the average of the bases.
    assert abs(out[2, 2] - (0.2 + 0.5) / 2) < 1e-6 and abs(out[21, 30] - (0.8 + 0.6) / 2) < 1e-6
    # Swapping the inputs changes nothing (the rule is symmetric up to ties).
    swapped = create_method("laplacian", levels=1)(t(vi), t(ir))[0, 0].double().numpy()
    assert np.abs(swapped - out).max() < 1e-6


def test_laplacian_levels_are_capped_by_the_image_size():
    assert laplacian_levels(37, 53, 4) == 4        # 37 -> 19 -> 10 -> 5 -> 3
    assert laplacian_levels(8, 100, 4) == 1        # 8 -> 4, too small for another 5-tap REDUCE
    assert laplacian_levels(4, 4, 4) == 0
    ir, vi = torch.rand(1, 1, 4, 4), torch.rand(1, 1, 4, 4)   # no level fits: plain average
    out = create_method("laplacian")(ir, vi)
    assert torch.allclose(out, (ir + vi) / 2, atol=1e-6)


# ----------------------------------------------------------------------------- GFF
def np_guided_filter(guide: np.ndarray, p: np.ndarray, r: int, eps: float) -> np.ndarray:
    """He et al.'s formulas with explicit windows w_k = [y-r, y+r] x [x-r, x+r] cut at the border:
    a_k = cov_k(I, p) / (var_k(I) + eps), b_k = mean_k(p) - a_k mean_k(I) (population moments);
    q_i = mean over windows k containing i of (a_k I_i + b_k)."""
    h, w = guide.shape
    a, b = np.zeros((h, w)), np.zeros((h, w))

    def win(y, x):
        return slice(max(0, y - r), min(h, y + r + 1)), slice(max(0, x - r), min(w, x + r + 1))

    for y in range(h):
        for x in range(w):
            wi, wp = guide[win(y, x)], p[win(y, x)]
            a[y, x] = (np.mean(wi * wp) - wi.mean() * wp.mean()) / (wi.var() + eps)
            b[y, x] = wp.mean() - a[y, x] * wi.mean()
    q = np.zeros((h, w))
    for y in range(h):
        for x in range(w):
            q[y, x] = a[win(y, x)].mean() * guide[y, x] + b[win(y, x)].mean()
    return q


@pytest.mark.parametrize("r,eps", [(2, 0.01), (3, 1e-6), (20, 0.3)])
def test_guided_filter_matches_float64_reference(r, eps):
    rng = np.random.default_rng(r)
    guide = rng.random((9, 13))
    p = (rng.random((9, 13)) > 0.5).astype(np.float64)
    ref = np_guided_filter(guide, p, r, eps)
    out = guided_filter(t(guide), t(p), r, eps)[0, 0].double().numpy()
    assert np.abs(out - ref).max() < 1e-5, np.abs(out - ref).max()


def test_box_mean_counts_only_pixels_inside_the_image():
    x = torch.arange(12, dtype=torch.float32).view(1, 1, 3, 4)
    out = box_mean(x, 1)[0, 0]
    # corner (0,0): mean of {0, 1, 4, 5} = 2.5; interior (1,1): mean of the 3x3 block = 5
    assert float(out[0, 0]) == pytest.approx(2.5) and float(out[1, 1]) == pytest.approx(5.0)
    assert torch.allclose(box_mean(x, 50)[0, 0], torch.full((3, 4), 5.5))


def test_gff_identical_inputs_give_the_input_and_paper_defaults():
    m = create_method("gff")
    assert (m.avg_size, m.r_g, m.sigma_g, m.r1, m.eps1, m.r2, m.eps2) == (31, 5, 5.0, 45, 0.3, 7, 1e-6)
    img = torch.rand(2, 1, 37, 53, generator=torch.Generator().manual_seed(1))
    assert float((m(img, img) - img).abs().max()) < 1e-5


def test_gff_takes_detail_from_the_textured_source():
    # IR: flat 0.5 with a textured square; visible flat 0.5. Inside the square the saliency of
    # IR wins, so its detail is kept (the mean would halve it).
    g = torch.Generator().manual_seed(2)
    ir = torch.full((1, 1, 64, 64), 0.5)
    ir[..., 16:48, 16:48] += 0.3 * (torch.rand(1, 1, 32, 32, generator=g) - 0.5)
    vi = torch.full((1, 1, 64, 64), 0.5)
    out = create_method("gff")(ir, vi)
    inner = (slice(None), slice(None), slice(22, 42), slice(22, 42))
    kept = float(out[inner].std() / ir[inner].std())
    assert kept > 0.8, f"fused/IR texture std ratio {kept:.3f} (mean fusion gives 0.5)"


# ----------------------------------------------------------------------------- GTF
def structured_pair(h=40, w=48, seed=3):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    ir = 0.3 + 0.4 * (((yy - 0.5) ** 2 + (xx - 0.4) ** 2) < 0.06).float()       # a warm disc
    vi = 0.2 + 0.5 * xx + 0.2 * (torch.sin(12 * yy) > 0).float()                   # ramp + stripes
    ir = (ir + 0.05 * torch.rand(h, w, generator=g)).clamp(0, 1)
    return ir[None, None], vi[None, None].clamp(0, 1)


def test_gtf_lambda_zero_returns_the_infrared():
    ir, vi = structured_pair()
    out = create_method("gtf", lam=0.0)(ir, vi)
    assert float((out - ir).abs().max()) < 1e-6


def test_gtf_constant_offset_is_solved_exactly():
    # IR = VI + c: x = IR has zero data term and grad x = grad VI, the global minimum.
    _, vi = structured_pair()
    ir = (vi + 0.1).clamp(max=1)
    vi = ir - 0.1
    out = create_method("gtf", iterations=50)(ir, vi)
    assert float((out - ir).abs().max()) < 1e-5


def test_gtf_objective_decreases_with_iterations():
    ir, vi = structured_pair()
    m = GradientTransferFusion(lam=4.0)
    energy = {n: float(gtf_objective(m.solve(ir, vi, n), ir, vi, 4.0)) for n in (0, 20, 300)}
    naive = {"IR": energy[0], "VI": float(gtf_objective(vi, ir, vi, 4.0)),
             "mean": float(gtf_objective((ir + vi) / 2, ir, vi, 4.0))}
    assert energy[300] < energy[20] < energy[0], energy
    assert energy[300] < 0.9 * min(naive.values()), (energy, naive)


# ----------------------------------------------------------------------------- real MSRS pair
@pytest.fixture(scope="module")
def msrs_pair():
    root = require_shared("data/real/msrs")
    name = sorted(p.name for p in (root / "ir").iterdir())[0]
    ir = cv2.imread(str(root / "ir" / name), cv2.IMREAD_GRAYSCALE)
    vi = cv2.cvtColor(cv2.imread(str(root / "vi" / name), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
    assert ir is not None and vi is not None, f"unreadable pair {name} in {root}"
    return (torch.from_numpy(ir).float().div(255)[None, None],
            torch.from_numpy(vi).float().div(255).permute(2, 0, 1)[None].contiguous(), name)


@pytest.mark.parametrize("name", BASELINES)
def test_real_msrs_pair(name, msrs_pair):
    ir, vi, stem = msrs_pair
    kwargs = {"iterations": 60} if name == "gtf" else {}   # keep the suite fast; runs, not converges
    out = create_method(name, **kwargs)(ir, vi)
    assert out.shape == vi.shape and torch.isfinite(out).all()
    assert 0 <= float(out.min()) and float(out.max()) <= 1
    if name in ("laplacian", "gff"):
        sf = spatial_frequency(luminance(out)[0, 0].numpy())
        sf_mean = spatial_frequency(((ir + luminance(vi)) / 2)[0, 0].numpy())
        sf_ir, sf_vi = spatial_frequency(ir[0, 0].numpy()), spatial_frequency(luminance(vi)[0, 0].numpy())
        msg = (f"{name} on MSRS {stem}: SF fused {sf:.5f}, mean fusion {sf_mean:.5f}, "
               f"IR {sf_ir:.5f}, VI-Y {sf_vi:.5f}")
        assert sf > sf_mean and sf > (sf_ir + sf_vi) / 2, msg


@pytest.mark.parametrize("name", BASELINES)
def test_tiny_and_thin_images(name):
    # Smaller than every filter (31x31 mean, r1 = 45, the 5-tap pyramid kernel): still the contract.
    m = create_method(name, **({"iterations": 20} if name == "gtf" else {}))
    for h, w in ((1, 1), (2, 3), (3, 200)):
        out = m(torch.rand(2, 1, h, w), torch.rand(2, 3, h, w))
        assert out.shape == (2, 3, h, w) and torch.isfinite(out).all() and 0 <= out.min() and out.max() <= 1
