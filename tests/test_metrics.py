"""Fusion metrics against the reference values (../shared/data/metric-vectors), against independent
straightforward re-implementations of the spec (../shared/docs/metrics.md) on non-integer inputs,
and against identities."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import convolve2d

from fuseseg.errors import DataError
from fusion import metric_terms as MT
from fusion import metrics as M

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
VECTORS = SHARED / "data" / "metric-vectors"


def _load_cases():
    path = VECTORS / "vectors.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())["cases"]


CASES = _load_cases()
needs_vectors = pytest.mark.skipif(CASES is None, reason=f"metric test vectors absent ({VECTORS})")


@pytest.fixture(scope="module")
def images():
    if CASES is None:
        pytest.skip(f"metric test vectors absent ({VECTORS})")
    out = {}
    for c in CASES:
        out[c["id"]] = tuple(M.read_gray_reference(VECTORS / c["files"][k]) for k in ("fused", "ir", "vi"))
    return out


@pytest.fixture(scope="module")
def computed(images):
    return {cid: M.compute_all(*trip) for cid, trip in images.items()}


def rel(a, b):
    return abs(a - b) / max(abs(b), 1e-300)


def case_ids():
    return [c["id"] for c in CASES] if CASES else []


def case(cid):
    return next(c for c in CASES if c["id"] == cid)


# ----------------------------------------------------------------------------- reference values
@needs_vectors
@pytest.mark.parametrize("cid", case_ids())
def test_all_metrics_match_reference(cid, computed):
    c = case(cid)
    got = computed[cid]
    assert list(got) == list(M.METRICS)
    for k, v in got.items():
        if k in c["expected_float64_inputs"]:
            assert rel(v, c["expected_float64_inputs"][k]) < 1e-9, (k, v, c["expected_float64_inputs"][k])
        tol = 1e-4 if k == "SSIM" else 1e-6
        assert rel(v, c["expected"][k]) < tol, (k, v, c["expected"][k])
    # Nabf: float64 MATLAB semantics, Tang's code run in Octave
    assert rel(got["Nabf"], c["matlab_refs_via_octave"]["tang_Nabf"]) < 1e-9


@needs_vectors
@pytest.mark.parametrize("cid", case_ids())
def test_per_source_terms(cid, images):
    c = case(cid)
    t = M.Triplet(*images[cid])
    p = c["per_source_terms"]
    mi_a, mi_b = M.mi_terms_t(t)
    assert rel(mi_a, p["MI_F_ir_nats"]) < 1e-9 and rel(mi_b, p["MI_F_vi_nats"]) < 1e-9
    v_a, v_b = M.vif_terms_t(t)
    assert rel(v_a, p["VIF_ir_F"]) < 1e-9 and rel(v_b, p["VIF_vi_F"]) < 1e-9
    s_a, s_b = M.ssim_terms_t(t)
    assert rel(s_a, p["SSIM_F_ir_dr2"]) < 1e-4 and rel(s_b, p["SSIM_F_vi_dr2"]) < 1e-4


@needs_vectors
@pytest.mark.parametrize("cid", case_ids())
def test_convention_options_match_other_implementations(cid, images):
    c = case(cid)
    F, A, B = images[cid]
    v, m = c["convention_variants"], c["matlab_refs_via_octave"]
    assert rel(M.mi(F, A, B, unit="bits"), v["MI_bits (= MI / ln 2)"]) < 1e-9
    assert rel(M.mi(F, A, B, unit="bits"), m["tang_MI_without_uint8_saturation"]) < 1e-9
    assert rel(M.mi(F, A, B, unit="bits", tang_uint8_quirk=True), m["tang_MI"]) < 1e-9
    assert rel(M.ag(F, convention="matlab"), m["tang_AG"]) < 1e-9
    assert rel(M.ag(F, convention="matlab"), m["vifb_AG"]) < 1e-9
    assert rel(M.sf(F, convention="mn"), m["vifb_SF"]) < 1e-9
    assert rel(M.sf(F), m["tang_SF"]) < 1e-9
    assert rel(M.mse(F, A, B, convention="tang"), m["tang_MSE"]) < 1e-9
    assert rel(M.psnr(F, A, B, convention="tang"), m["tang_PSNR"]) < 1e-9
    assert rel(M.ssim(F, A, B, data_range=255), v["SSIM_sum_data_range_255 (IF-FILM Evaluator)"]) < 1e-4
    assert rel(M.nabf(F, A, B, order="tang_head"), m["tang_Nabf_as_called_in_analysis_Reference_HEAD"]) < 1e-9
    for ours, key in ((M.en(F), "tang_EN"), (M.sd(F), "tang_SD"), (M.cc(F, A, B), "tang_CC"),
                      (M.scd(F, A, B), "tang_SCD"), (M.vif(F, A, B), "tang_VIF"),
                      (M.qabf(F, A, B), "tang_Qabf"), (M.mi(F, A, B), "vifb_MI")):
        assert rel(ours, m[key]) < 1e-9, key
    # the presets route the options through compute_all
    tang = M.compute_all(F, A, B, ["MI", "AG", "MSE", "PSNR"], conventions="tang")
    assert rel(tang["MI"], m["tang_MI"]) < 1e-9 and rel(tang["AG"], m["tang_AG"]) < 1e-9
    assert rel(tang["MSE"], m["tang_MSE"]) < 1e-9 and rel(tang["PSNR"], m["tang_PSNR"]) < 1e-9


def test_convention_validation_and_description():
    with pytest.raises(ValueError, match="mi_unit='log'"):
        M.Convention(mi_unit="log")
    with pytest.raises(ValueError, match="unknown convention preset 'x'; valid: reference"):
        M.Convention.preset("x")
    with pytest.raises(ValueError, match="unknown Convention field"):
        M.Convention().with_options(colour=1)
    text = M.Convention.preset("sspfusion").describe()
    assert "in bits" in text and "data_range=2" in text and "VIF=sum" in text
    assert "(M-1)(N-1)" in M.Convention(ag="matlab").describe()
    with pytest.raises(ValueError, match="unknown metric 'FOO'"):
        M.compute_all(np.zeros((50, 50)), np.zeros((50, 50)), np.zeros((50, 50)), ["FOO"])


# ----------------------------------------------------------------------------- independent references
def _ref_vifp(ref, dist):
    """vifp_mscale as written in the spec: 2-D convolve2d 'valid' and masked assignments."""
    num = den = 0.0
    for s in range(1, 5):
        n = 2 ** (5 - s) + 1
        x = np.arange(n) - (n - 1) / 2
        xx, yy = np.meshgrid(x, x)
        win = np.exp(-(xx ** 2 + yy ** 2) / (2 * (n / 5) ** 2))
        win[win < np.finfo(float).eps * win.max()] = 0
        win /= win.sum()
        if s > 1:
            ref = convolve2d(ref, win, mode="valid")[::2, ::2]
            dist = convolve2d(dist, win, mode="valid")[::2, ::2]
        mu1, mu2 = convolve2d(ref, win, mode="valid"), convolve2d(dist, win, mode="valid")
        s1 = convolve2d(ref * ref, win, mode="valid") - mu1 * mu1
        s2 = convolve2d(dist * dist, win, mode="valid") - mu2 * mu2
        s12 = convolve2d(ref * dist, win, mode="valid") - mu1 * mu2
        s1[s1 < 0] = 0
        s2[s2 < 0] = 0
        g = s12 / (s1 + 1e-10)
        sv = s2 - g * s12
        g[s1 < 1e-10] = 0
        sv[s1 < 1e-10] = s2[s1 < 1e-10]
        s1[s1 < 1e-10] = 0
        g[s2 < 1e-10] = 0
        sv[s2 < 1e-10] = 0
        sv[g < 0] = s2[g < 0]
        g[g < 0] = 0
        sv[sv <= 1e-10] = 1e-10
        num += np.sum(np.log10(1 + g ** 2 * s1 / (sv + 2)))
        den += np.sum(np.log10(1 + s1 / 2))
    return 1.0 if np.isnan(num / den) else num / den


def _ref_qabf(F, A, B):
    h1 = np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], float)
    h3 = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], float)

    def ga(x):
        sx, sy = convolve2d(x, h3, mode="same"), convolve2d(x, h1, mode="same")
        a = np.full_like(x, math.pi / 2)
        nz = sx != 0
        a[nz] = np.arctan(sy[nz] / sx[nz])
        return np.sqrt(sx ** 2 + sy ** 2), a

    def q(gx, ax, gf, af):
        G = np.zeros_like(gx)
        G[gx > gf] = gf[gx > gf] / gx[gx > gf]
        G[gx == gf] = gf[gx == gf]
        G[gx < gf] = gx[gx < gf] / gf[gx < gf]
        Aa = 1 - np.abs(ax - af) / (math.pi / 2)
        return 0.9994 / (1 + np.exp(-15 * (G - 0.5))) * 0.9879 / (1 + np.exp(-22 * (Aa - 0.8)))

    (gF, aF), (gA, aA), (gB, aB) = ga(F), ga(A), ga(B)
    return np.sum(q(gA, aA, gF, aF) * gA + q(gB, aB, gF, aF) * gB) / np.sum(gA + gB)


def _ref_nabf(F, A, B):
    kv = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], float) / 8
    kh = kv.T

    def corr(x, k):
        p = np.pad(x, 1, mode="reflect")
        out = np.zeros_like(x)
        for i in range(3):
            for j in range(3):
                out += k[i, j] * p[i:i + x.shape[0], j:j + x.shape[1]]
        return out

    def ga(x):
        gv, gh = corr(x, kv), corr(x, kh)
        a = np.zeros_like(x)
        nz = ~((gv == 0) & (gh == 0))
        with np.errstate(divide="ignore"):
            a[nz] = np.arctan(gv[nz] / gh[nz])
        return np.sqrt(gv ** 2 + gh ** 2), a

    (gF, aF), (gA, aA), (gB, aB) = ga(F), ga(A), ga(B)

    def q(gx, ax):
        G = np.zeros_like(gx)
        ok = (gx != 0) & (gF != 0)
        G[ok] = np.minimum(gx[ok], gF[ok]) / np.maximum(gx[ok], gF[ok])
        Aa = np.abs(np.abs(ax - aF) - math.pi / 2) * 2 / math.pi
        return np.sqrt(0.9999 / (1 + np.exp(-19 * (G - 0.5))) * 0.9995 / (1 + np.exp(-22 * (Aa - 0.5))))

    wA = np.where(gA >= 2, gA ** 1.5, 0.001)
    wB = np.where(gB >= 2, gB ** 1.5, 0.001)
    na = (gF > gA) & (gF > gB)
    return np.sum(na * ((1 - q(gA, aA)) * wA + (1 - q(gB, aB)) * wB)) / np.sum(wA + wB)


@pytest.fixture(scope="module")
def float_triplet():
    """Non-integer images with structure (smooth ramps + noise + flat block), 72x90."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:72, 0:90]
    A = 120 + 80 * np.sin(xx / 7.0) + rng.normal(0, 6, (72, 90))
    B = 90 + 0.9 * yy + 40 * np.cos(yy / 5.0 + xx / 11.0) + rng.normal(0, 4, (72, 90))
    A[10:30, 20:45] = 77.25  # a flat patch exercises the clamping branches
    B[10:30, 20:45] = 140.5
    F = np.clip(0.55 * A + 0.45 * B + rng.normal(0, 3, (72, 90)), 0, 255)
    F[10:20, 20:30] = 100.0
    return F, np.clip(A, 0, 255), np.clip(B, 0, 255)


def test_vif_qabf_nabf_match_spec_reimplementation(float_triplet):
    F, A, B = float_triplet
    assert rel(M.vif(F, A, B), _ref_vifp(A, F) + _ref_vifp(B, F)) < 1e-9
    # Qabf/Nabf: gradient angles of nearly flat areas are ill-conditioned for non-integer input
    # (a Sobel response of 1e-14 versus an exact 0 flips atan by pi/2), so the independent check
    # uses integer-valued images, whose Sobel responses are exact in any summation order.
    F, A, B = (np.round(x) for x in (F, A, B))
    assert rel(M.vif(F, A, B), _ref_vifp(A, F) + _ref_vifp(B, F)) < 1e-9
    assert rel(M.qabf(F, A, B), _ref_qabf(F, A, B)) < 1e-9
    assert rel(M.nabf(F, A, B), _ref_nabf(F, A, B)) < 1e-9
    # a fused image with strong edges so that Nabf's artefact mask is not empty
    G = np.clip(np.round(2.0 * F - 0.5 * A), 0, 255)
    assert M.nabf(G, A, B) > 0
    assert rel(M.nabf(G, A, B), _ref_nabf(G, A, B)) < 1e-9
    assert rel(M.qabf(G, A, B), _ref_qabf(G, A, B)) < 1e-9


def test_simple_metrics_match_direct_formulas_on_float_images(float_triplet):
    F, A, B = float_triplet
    gy, gx = np.gradient(F)
    assert rel(M.ag(F), np.mean(np.sqrt((gx ** 2 + gy ** 2) / 2))) < 1e-12
    assert rel(M.ag(F, convention="matlab"), np.sum(np.sqrt((gx ** 2 + gy ** 2) / 2)) / (71 * 89)) < 1e-12
    rf = np.mean(np.diff(F, axis=1) ** 2)
    cf = np.mean(np.diff(F, axis=0) ** 2)
    assert rel(M.sf(F), math.sqrt(rf + cf)) < 1e-12
    assert rel(M.sd(F), np.std(F)) < 1e-12
    mse = (np.mean((A - F) ** 2) + np.mean((B - F) ** 2)) / 2
    assert rel(M.mse(F, A, B), mse) < 1e-12
    assert rel(M.psnr(F, A, B), 10 * math.log10(F.max() ** 2 / mse)) < 1e-12
    r = lambda x, y: np.corrcoef(x.ravel(), y.ravel())[0, 1]  # noqa: E731
    assert rel(M.cc(F, A, B), (r(A, F) + r(B, F)) / 2) < 1e-12
    assert rel(M.scd(F, A, B), r(A, F - B) + r(B, F - A)) < 1e-12
    u = np.round(F).astype(np.uint8)
    p = np.bincount(u.ravel(), minlength=256) / u.size
    assert rel(M.en(F), -np.sum(p[p > 0] * np.log2(p[p > 0]))) < 1e-12


@pytest.mark.filterwarnings("ignore:Clustering metrics expects discrete values")
def test_mi_matches_sklearn_on_float_and_integer_images(float_triplet):
    import sklearn.metrics as sk  # in the dev extra: the independent reference always runs
    F, A, B = float_triplet
    Fq = np.round(F / 4) * 4 + 0.5  # non-integer values with repeats
    want = sk.mutual_info_score(Fq.ravel(), A.ravel()) + sk.mutual_info_score(Fq.ravel(), B.ravel())
    assert rel(M.mi(Fq, A, B), want) < 1e-9
    Fi, Ai, Bi = (np.round(x) for x in (F, A, B))
    want = sk.mutual_info_score(Fi.ravel(), Ai.ravel()) + sk.mutual_info_score(Fi.ravel(), Bi.ravel())
    assert rel(M.mi(Fi, Ai, Bi), want) < 1e-9
    assert rel(M.mi(Fi, Ai, Bi, unit="bits"), want / math.log(2)) < 1e-12


def test_ssim_matches_skimage_with_data_range_2(float_triplet):
    import skimage.metrics as skm  # in the dev extra
    F, A, B = float_triplet
    for dr in (2.0, 255.0):
        want = (skm.structural_similarity(F, A, data_range=dr)
                + skm.structural_similarity(F, B, data_range=dr))
        assert rel(M.ssim(F, A, B, data_range=dr), want) < 1e-9


# ----------------------------------------------------------------------------- identities
def test_identities(float_triplet):
    F, A, B = float_triplet
    X = np.round(A)
    # MI of an image with itself is its entropy, in the same unit
    a, b = M.mi_terms_t(M.Triplet(X, X, np.round(B)), unit="bits")
    assert rel(a, M.en(X)) < 1e-12
    a_n, _ = M.mi_terms_t(M.Triplet(X, X, np.round(B)))
    assert rel(a_n, M.en(X) * math.log(2)) < 1e-12
    # each SSIM term of an image with itself is 1; VIF of an image with itself is 1 per term
    s_a, s_b = M.ssim_terms_t(M.Triplet(F, F, B))
    assert abs(s_a - 1.0) < 1e-12 and s_b < 1
    v_a, _ = M.vif_terms_t(M.Triplet(F, F, B))
    assert abs(v_a - 1.0) < 1e-9  # not exactly 1: the eps = 1e-10 regularisers of the reference
    # CC is unchanged under a positive scale and shift of F; SCD is not required to be
    assert abs(M.cc(2.5 * F + 17.0, A, B) - M.cc(F, A, B)) < 1e-12
    # uint8 input gives the same values as float input (no wrap-around)
    u = [np.round(x).astype(np.uint8) for x in (F, A, B)]
    f = [x.astype(np.float64) for x in u]
    assert M.compute_all(*u) == M.compute_all(*f)


def test_constant_images_give_documented_values():
    c = np.full((48, 50), 90.0)
    vals = M.compute_all(c, c, c)
    assert all(not math.isnan(v) for v in vals.values()), vals
    assert vals["EN"] == 0 and vals["SD"] == 0 and vals["SF"] == 0 and vals["AG"] == 0
    assert vals["MI"] == 0 and vals["MSE"] == 0 and vals["CC"] == 0 and vals["SCD"] == 0
    assert vals["PSNR"] == math.inf
    assert vals["VIF"] == 2.0  # vifp = 0/0 -> 1.0 per source, as the reference
    assert vals["Nabf"] == 0.0
    assert abs(vals["SSIM"] - 2.0) < 1e-12
    # Qabf's zero padding turns the border of a constant non-zero image into edges (reference
    # behaviour); only gradient-free sources (all zero) give 0/0, returned as 0
    assert 0 < vals["Qabf"] <= 1 and rel(vals["Qabf"], _ref_qabf(c, c, c)) < 1e-12
    z = np.zeros((48, 50))
    assert M.qabf(c, z, z) == 0.0 and M.qabf(z, z, z) == 0.0
    # constant fused image against textured sources
    rng = np.random.default_rng(0)
    A, B = rng.integers(0, 256, (2, 48, 50)).astype(float)
    vals = M.compute_all(c, A, B)
    assert all(math.isfinite(v) for v in vals.values()), vals
    assert vals["CC"] == 0 and vals["SF"] == 0 and vals["AG"] == 0 and vals["EN"] == 0
    assert M.psnr(np.zeros((48, 50)), A, B) == -math.inf


def test_vif_needs_41_pixels_per_side():
    rng = np.random.default_rng(1)
    small = rng.integers(0, 256, (3, 40, 60)).astype(float)
    with pytest.raises(DataError, match=r"at least 41x41 px .*got 40x60.*leave VIF out"):
        M.vif(*small)
    with pytest.raises(DataError, match="got 40x60"):
        M.compute_all(*small)
    # the other metrics still work on the same images
    vals = M.compute_all(*small, metrics=[m for m in M.METRICS if m != "VIF"])
    assert "VIF" not in vals and len(vals) == 12
    ok = rng.integers(0, 256, (3, 41, 41)).astype(float)
    assert math.isfinite(M.vif(*ok))


def test_errors_for_bad_shapes():
    a = np.zeros((50, 60))
    with pytest.raises(DataError, match=r"image sizes differ \(fused 50x60, ir 50x61, vi 50x60\)"):
        M.mi(a, np.zeros((50, 61)), a)
    with pytest.raises(DataError, match=r"fused: expected a grey \(H, W\) image, got shape \(50, 60, 3\)"):
        M.en(np.zeros((50, 60, 3)))
    with pytest.raises(DataError, match="NaN or inf"):
        M.mi(np.full((50, 60), np.nan), a, a)


def test_read_gray_reference(tmp_path):
    import cv2
    rgb = np.zeros((4, 5, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 10, 200, 31  # B, G, R as cv2 stores them
    cv2.imwrite(str(tmp_path / "c.png"), rgb)
    got = M.read_gray_reference(tmp_path / "c.png")
    assert got.dtype == np.float64 and got.shape == (4, 5)
    assert np.all(got == round(0.299 * 31 + 0.587 * 200 + 0.114 * 10))
    grey = np.arange(20, dtype=np.uint8).reshape(4, 5) * 12
    cv2.imwrite(str(tmp_path / "g.png"), grey)
    assert np.array_equal(M.read_gray_reference(tmp_path / "g.png"), grey.astype(float))
    with pytest.raises(DataError, match="missing.png: file not found"):
        M.read_gray_reference(tmp_path / "missing.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match="bad.png: not a readable image"):
        M.read_gray_reference(tmp_path / "bad.png")


def test_interleaved_triplets_do_not_share_cached_buffers(float_triplet):
    F, A, B = (np.round(x) for x in float_triplet)
    t1, t2 = M.Triplet(F, A, B), M.Triplet(A, B, F)
    want1 = (M.cc(F, A, B), M.scd(F, A, B), M.qabf(F, A, B), M.nabf(F, A, B))
    want2 = (M.cc(A, B, F), M.qabf(A, B, F))
    assert M.cc_t(t1) == want1[0] and M.nabf_t(t1) == want1[3]
    assert M.cc_t(t2) == want2[0] and M.qabf_t(t2) == want2[1]  # reuses the workspace buffers
    assert M.scd_t(t1) == want1[1] and M.qabf_t(t1) == want1[2]  # t1 recomputes, not t2's data


# ----------------------------------------------------------------------------- compiled kernels
@pytest.mark.parametrize("shape", [(48, 50), (61, 77), (62, 76)])
def test_vif_pyramid_is_valid_filtering_then_every_other_pixel(shape):
    """decimate() = convolve2d(x, outer(w, w), 'valid')[::2, ::2] for odd and even sizes."""
    rng = np.random.default_rng(5)
    x = rng.normal(100, 40, shape)
    t = M.Triplet(x, x, x)
    levels = t.vif_pyramid
    ref = x
    for s in range(2, 5):
        w = MT._VIF_WINDOWS[s]
        ref = convolve2d(ref, np.outer(w, w), mode="valid")[::2, ::2]
        got = levels[s][0]
        assert got.shape == ref.shape
        assert np.max(np.abs(got - ref)) < 1e-10


def test_vif_log_products_stay_finite_for_wide_value_ranges():
    """The kernel sums logarithms as the log of row products; for values far beyond 0..255 fewer
    rows go into one product, so nothing overflows: compare with the spec version. (Textured
    images: in flat areas the spec's E[x^2] - E[x]^2 cancellation at 1e8-scale values is itself
    larger than eps, so neither implementation is meaningful there.)"""
    rng = np.random.default_rng(8)
    yy, xx = np.mgrid[0:60, 0:70]
    A = 120 + 80 * np.sin(xx / 5.0) + rng.normal(0, 20, (60, 70))
    B = 90 + yy + rng.normal(0, 30, (60, 70))
    F = 0.5 * (A + B) + rng.normal(0, 10, (60, 70))
    for scale in (1.0, 250.0, 1e6):
        f, a, b = F * scale, A * scale, B * scale
        got = M.vif(f, a, b)
        assert math.isfinite(got) and rel(got, _ref_vifp(a, f) + _ref_vifp(b, f)) < 1e-9, scale
    # the guard matters: 64 rows per product overflow at this scale
    levels = M.Triplet(f, a, b).vif_pyramid
    assert MT._vif_flush_rows(levels) < 64
    with np.errstate(all="ignore"):
        n_a, d_a, _, _ = MT._K.vif_scale(*levels[1], MT._VIF_WINDOWS[1], 64)
    assert not math.isfinite(d_a)


def _ref_ssim(x, y, data_range):
    """skimage 0.19's structural_similarity (7x7 uniform, sample covariance), written with scipy."""
    from scipy.ndimage import uniform_filter
    ux, uy = uniform_filter(x, 7), uniform_filter(y, 7)
    cov = 49 / 48
    vx = cov * (uniform_filter(x * x, 7) - ux * ux)
    vy = cov * (uniform_filter(y * y, 7) - uy * uy)
    vxy = cov * (uniform_filter(x * y, 7) - ux * uy)
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux ** 2 + uy ** 2 + c1) * (vx + vy + c2))
    return s[3:-3, 3:-3].mean()


def test_ssim_matches_scipy_reimplementation(float_triplet):
    F, A, B = float_triplet
    for dr in (2.0, 255.0):
        want = _ref_ssim(F, A, dr) + _ref_ssim(F, B, dr)
        assert rel(M.ssim(F, A, B, data_range=dr), want) < 1e-9
    Fi, Ai, Bi = (np.round(x) for x in float_triplet)
    assert rel(M.ssim(Fi, Ai, Bi), _ref_ssim(Fi, Ai, 2.0) + _ref_ssim(Fi, Bi, 2.0)) < 1e-9


def test_exact_integer_sums_match_float_formulas():
    """SD, MSE, PSNR, CC and SCD of integer images come from exact integer sums; they must equal
    the textbook float64 formulas, also where n * sum(XY) is far beyond 2^53 (Python ints)."""
    rng = np.random.default_rng(11)
    for shape in ((50, 60), (1500, 2100)):
        A = rng.integers(0, 256, shape).astype(float)
        B = np.clip(np.round(0.5 * A + rng.normal(60, 30, shape)), 0, 255)
        F = np.clip(np.round(0.5 * A + 0.5 * B + rng.normal(0, 5, shape)), 0, 255)
        assert M.Triplet(F, A, B).integer_sums is not None
        r = lambda x, y: np.corrcoef(x.ravel(), y.ravel())[0, 1]  # noqa: E731
        mse = (np.mean((A - F) ** 2) + np.mean((B - F) ** 2)) / 2
        assert rel(M.sd(F), np.std(F)) < 1e-12
        assert rel(M.mse(F, A, B), mse) < 1e-12
        assert rel(M.psnr(F, A, B), 10 * math.log10(F.max() ** 2 / mse)) < 1e-12
        assert rel(M.cc(F, A, B), (r(A, F) + r(B, F)) / 2) < 1e-12
        assert rel(M.scd(F, A, B), r(A, F - B) + r(B, F - A)) < 1e-11
    # F == VI exactly: F - VI is constant, so r(IR, F - VI) is the documented 0
    assert rel(M.scd(B, A, B), r(B, B - A)) < 1e-12
    assert M.Triplet(F + 0.5, A, B).integer_sums is None  # non-integer: the centred float path


def test_metrics_are_thread_safe(float_triplet):
    """The compiled kernels release the GIL and every thread has its own buffers: scoring
    different triplets in parallel threads gives each one's sequential values."""
    from concurrent.futures import ThreadPoolExecutor
    F, A, B = (np.round(x) for x in float_triplet)
    trips = [(F, A, B), (A, B, F), (B, F, A), (np.round(0.5 * (A + B)), A, B)]
    want = [M.compute_all(*t) for t in trips]
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda t: M.compute_all(*t), trips * 3))
    assert got == want * 3
