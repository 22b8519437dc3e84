"""The terms of every fusion quality metric for one image triplet (fused, infrared, visible): the
:class:`Triplet` cache that computes shared inputs once (grey levels, histograms, gradients,
windowed moments), and one function per metric over it (``en_t``, ``mi_terms_t``, ``vif_terms_t``
...). :mod:`fusion.metrics` builds the public metrics and :func:`fusion.metrics.compute_all`
on these; the formulas and conventions are documented there.
"""
from __future__ import annotations

import math
import threading
import weakref
from functools import cached_property

import cv2
import numpy as np

from fuseseg.errors import DataError
from fusion import _metric_kernels as _K

_LN2 = math.log(2.0)


def as_image(x, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim != 2:
        raise DataError(f"{name}: expected a grey (H, W) image, got shape {arr.shape}. Convert colour "
                        "images with read_gray_reference() (OpenCV BGR2GRAY) first.")
    if min(arr.shape) < 2:
        raise DataError(f"{name}: image of shape {arr.shape} is too small; every side needs >= 2 px.")
    return np.ascontiguousarray(arr, dtype=np.float64)


def _check_same(shapes: dict[str, tuple]) -> None:
    ref_shape = next(iter(shapes.values()))
    for shape in shapes.values():
        if shape != ref_shape:
            listing = ", ".join(f"{k} {v[0]}x{v[1]}" for k, v in shapes.items())
            raise DataError(f"image sizes differ ({listing}): metrics compare pixel by pixel, so "
                            "fused, ir and vi must have the same HxW. Resize or crop them to match.")


def _uint8_labels(x: np.ndarray) -> np.ndarray | None:
    """x as uint8 when every value is an integer in 0..255, else None (one cast + one compare)."""
    with np.errstate(invalid="ignore"):
        u = x.astype(np.uint8)
    return u if np.array_equal(u, x) else None


VIF_MIN_SIDE = 41  # smallest side for which every VIF scale has a non-empty 'valid' region


# ----------------------------------------------------------------------------- workspace
_STRIP_ROWS = 32  # Qabf works on strips of rows whose intermediates stay in the L2 cache


class _Workspace(threading.local):
    """Per-thread reusable scratch buffers, keyed by name and size.

    Re-using them across triplets of one size avoids fresh multi-MB allocations (page faults)
    for every image; a new image size replaces the set."""

    def __init__(self):
        self.shape = None
        self.bufs: dict[str, np.ndarray] = {}
        self.owner = None  # weak reference to the Triplet whose cached results live in the buffers

    def get(self, name: str, shape: tuple[int, ...], frame: tuple[int, int]) -> np.ndarray:
        if frame != self.shape:
            self.shape, self.bufs = frame, {}
        key = f"{name}{shape}"
        buf = self.bufs.get(key)
        if buf is None:
            buf = self.bufs[key] = np.empty(shape, np.float64)
        return buf


_WS = _Workspace()


# ----------------------------------------------------------------------------- shared cache
def _gauss_1d(n: int) -> np.ndarray:
    """1-D factor of MATLAB ``fspecial('gaussian', n, n/5)`` (normalised to sum 1).

    The 2-D window is the outer product of this vector with itself: none of its entries is
    below eps * max for n in (3, 5, 9, 17), so fspecial's zeroing step never applies."""
    r = (n - 1) / 2.0
    x = np.arange(-r, r + 1.0)
    g = np.exp(-(x * x) / (2.0 * (n / 5.0) ** 2))
    return g / g.sum()


_VIF_WINDOWS = {s: _gauss_1d(2 ** (5 - s) + 1) for s in range(1, 5)}


class Triplet:
    """One (fused, ir, vi) triplet plus lazily computed intermediates shared between metrics.

    Construct once and call the ``*_t`` metric kernels, or simply use :func:`compute_all`.
    Not shared between threads (each thread has its own buffer workspace)."""

    def __init__(self, fused, ir, vi):
        self.F = as_image(fused, "fused")
        self.A = as_image(ir, "ir")
        self.B = as_image(vi, "vi")
        _check_same({"fused": self.F.shape, "ir": self.A.shape, "vi": self.B.shape})
        self.shape = self.F.shape

    @classmethod
    def single(cls, fused) -> Triplet:
        """A cache for the fused-only metrics (EN, SD, SF, AG): ir = vi = fused."""
        t = cls.__new__(cls)
        t.F = t.A = t.B = as_image(fused, "fused")
        t.shape = t.F.shape
        return t

    _BUFFERED = ("centred",)  # cached results held in workspace buffers

    def buf(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """A reusable buffer of this thread's workspace. When another Triplet used the workspace
        last, its cached results that live in workspace buffers are dropped (recomputed on use)."""
        prev = _WS.owner() if _WS.owner is not None else None
        if prev is not self:
            if prev is not None:
                for key in self._BUFFERED:
                    prev.__dict__.pop(key, None)
            _WS.owner = weakref.ref(self)
        return _WS.get(name, shape or self.shape, self.shape)

    # --- labels / histogram inputs
    @cached_property
    def u8(self) -> dict[str, np.ndarray | None]:
        return {"F": _uint8_labels(self.F), "A": _uint8_labels(self.A), "B": _uint8_labels(self.B)}

    @cached_property
    def integer_sums(self) -> dict[str, int] | None:
        """Exact sums of the images and of their pairwise products, as Python ints, when all three
        images hold integers 0..255 (else None).

        Keys "F", "A", "B" (sums) and "FF", "AA", "BB", "AF", "BF", "AB" (sums of products). The
        float64 sums are exact: every product and every partial sum is an integer below 2^53 for
        images of fewer than 2^53 / 255^2 (1.4e11) pixels. (One compiled pass rather than BLAS dot
        products: OpenBLAS's thread pool serialised the scorer's threads, measured 0.95x with two.)"""
        if any(v is None for v in self.u8.values()):
            return None
        sums = _K.moment_sums(self.F, self.A, self.B).tolist()
        return {k: int(v) for k, v in zip(("F", "A", "B", "FF", "AA", "BB", "AF", "BF", "AB"), sums,
                                          strict=True)}

    @cached_property
    def gradient_sums(self) -> tuple[float, float, float]:
        """(sum of squared horizontal neighbour differences, of vertical ones, sum over pixels of
        sqrt((Gx^2 + Gy^2) / 2) with np.gradient's Gx, Gy) of the fused image, in one pass."""
        return _K.gradient_sums(self.F)

    # --- centred images for CC / SCD (non-integer images)
    @cached_property
    def centred(self) -> dict[str, np.ndarray]:
        """X - mean(X), flattened, for X in F, A, B."""
        return {k: np.subtract(x, x.mean(), out=self.buf(f"c{k}")).ravel()
                for k, x in (("F", self.F), ("A", self.A), ("B", self.B))}

    # --- VIF: (F, A, B) at each of the 4 scales
    @cached_property
    def vif_pyramid(self) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
        h, w = self.shape
        if min(h, w) < VIF_MIN_SIDE:
            raise DataError(f"VIF needs images of at least {VIF_MIN_SIDE}x{VIF_MIN_SIDE} px (4 scales of "
                            f"'valid' Gaussian filtering); got {h}x{w}. The reference code silently "
                            "returns meaningless numbers (scipy swaps the operands) and MATLAB returns "
                            "empty scales, so no value is given: leave VIF out for images this small "
                            "(`fuseseg metrics --metrics EN,SD,...`; in an experiment metrics.names=[...]).")
        levels = {1: (self.F, self.A, self.B)}
        for s in range(2, 5):  # scale s: valid Gaussian filter of scale s, then rows/columns 0, 2, 4, ...
            levels[s] = tuple(_K.decimate(x, _VIF_WINDOWS[s]) for x in levels[s - 1])
        return levels


# ----------------------------------------------------------------------------- kernels
_EXACT_HIST = 1 << 24  # cv2.calcHist counts in float32: exact below 2^24 pixels


def _hist256(u8: np.ndarray) -> np.ndarray:
    if u8.size < _EXACT_HIST:
        return cv2.calcHist([u8], [0], None, [256], [0, 256]).ravel().astype(np.float64)
    return np.bincount(u8.ravel(), minlength=256).astype(np.float64)


def _joint256(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """256x256 joint histogram of two uint8 images (rows: a, columns: b)."""
    if a.size < _EXACT_HIST:
        return cv2.calcHist([a, b], [0, 1], None, [256, 256], [0, 256, 0, 256]).astype(np.float64)
    return np.bincount(a.ravel().astype(np.intp) * 256 + b.ravel(), minlength=65536).reshape(256, 256)


def _entropy_bits(u8: np.ndarray) -> float:
    counts = _hist256(u8)
    p = counts[counts > 0] / u8.size
    return float(-(p * np.log2(p)).sum())


def en_t(t: Triplet) -> float:
    u = t.u8["F"]
    if u is None:
        u = np.round(np.clip(t.F, 0, 255)).astype(np.uint8)
    return _entropy_bits(u)


def _pair_labels(x: np.ndarray, u: np.ndarray | None, quirk: bool) -> tuple[np.ndarray, int]:
    """Integer labels of the exact pixel values and their count (for the joint histogram)."""
    if u is not None:
        return u.ravel().astype(np.intp), 256
    if quirk:
        raise DataError("mi_tang_uint8_quirk needs integer images in 0..255 (Tang's Hab.m works on "
                        "uint8); round the images or switch the quirk off.")
    if not np.isfinite(x).all():
        raise DataError("MI: image holds NaN or inf values; replace them before scoring.")
    _, inv = np.unique(x.ravel(), return_inverse=True)
    return inv.ravel().astype(np.intp), int(inv.max()) + 1


def _mi_nats(lf: np.ndarray, nf: int, lx: np.ndarray, nx: int) -> float:
    n = lf.size
    if nf * nx <= 1 << 22:
        joint = np.bincount(lf * nx + lx, minlength=nf * nx).reshape(nf, nx)
        pf = joint.sum(axis=1)
        px = joint.sum(axis=0)
        i, j = np.nonzero(joint)
        c = joint[i, j]
        pfi, pxj = pf[i], px[j]
    else:  # many distinct float values: count the pairs that occur
        pairs, c = np.unique(lf.astype(np.int64) * nx + lx, return_counts=True)
        pf = np.bincount(lf, minlength=nf)
        px = np.bincount(lx, minlength=nx)
        pfi, pxj = pf[pairs // nx], px[pairs % nx]
    c = c.astype(np.float64)
    mi = float((c * np.log(c * n / (pfi.astype(np.float64) * pxj))).sum() / n)
    return max(mi, 0.0)


def mi_terms_t(t: Triplet, *, unit: str = "nats", tang_uint8_quirk: bool = False) -> tuple[float, float]:
    """(MI(F, IR), MI(F, VI)) in ``unit``."""
    if unit not in ("nats", "bits"):
        raise ValueError(f"unit={unit!r}; choose 'nats' or 'bits'")
    out = []
    uf = t.u8["F"]
    for key, x in (("A", t.A), ("B", t.B)):
        ux = t.u8[key]
        if uf is not None and ux is not None:  # fast path: 256x256 joint histogram
            if tang_uint8_quirk:
                # Tang's MI_evaluation: H(F) + H(X) from the images, H(F,X) from Hab.m, whose
                # uint8 "+1" saturates so that 254 and 255 share a joint bin.
                v = (_entropy_nats(_hist256(uf)) + _entropy_nats(_hist256(ux))
                     - _entropy_nats(_joint256(np.minimum(uf, 254), np.minimum(ux, 254))))
                v = max(v, 0.0)
            else:
                v = _mi_from_joint(_joint256(uf, ux))
        else:
            lf, nf = _pair_labels(t.F, uf, tang_uint8_quirk)
            lx, nx = _pair_labels(x, ux, tang_uint8_quirk)
            v = _mi_nats(lf, nf, lx, nx)
        out.append(v / _LN2 if unit == "bits" else v)
    return out[0], out[1]


def _entropy_nats(counts: np.ndarray) -> float:
    c = counts[counts > 0].astype(np.float64)
    p = c / c.sum()
    return float(-(p * np.log(p)).sum())


def _mi_from_joint(joint: np.ndarray) -> float:
    n = float(joint.sum())
    pf = joint.sum(axis=1).astype(np.float64)
    px = joint.sum(axis=0).astype(np.float64)
    i, j = np.nonzero(joint)
    c = joint[i, j].astype(np.float64)
    if n == 0:
        return 0.0
    return max(float((c * np.log(c * n / (pf[i] * px[j]))).sum() / n), 0.0)


def _exact_centred(n: int, sx: int, sy: int, sxy: int) -> int:
    """n * sum (X - mean X)(Y - mean Y) as an exact integer: n sum XY - sum X sum Y."""
    return n * sxy - sx * sy


def sd_t(t: Triplet) -> float:
    s = t.integer_sums
    if s is not None:
        n = t.F.size
        return math.sqrt(_exact_centred(n, s["F"], s["F"], s["FF"])) / n
    c = t.centred["F"]
    return math.sqrt(float(np.einsum("i,i->", c, c)) / c.size)


def sf_t(t: Triplet, convention: str = "reference") -> float:
    if convention not in ("reference", "mn"):
        raise ValueError(f"SF convention {convention!r}; choose 'reference' or 'mn'")
    sx, sy, _ = t.gradient_sums
    m, n = t.shape
    if convention == "reference":
        return math.sqrt(sx / (m * (n - 1)) + sy / ((m - 1) * n))
    return math.sqrt((sx + sy) / (m * n))


def ag_t(t: Triplet, convention: str = "reference") -> float:
    if convention not in ("reference", "matlab"):
        raise ValueError(f"AG convention {convention!r}; choose 'reference' or 'matlab'")
    total = t.gradient_sums[2]
    m, n = t.shape
    if convention == "reference":
        return total / (m * n)
    return total / ((m - 1) * (n - 1))


def _sse(t: Triplet) -> tuple[float, float]:
    """(sum (IR - F)^2, sum (VI - F)^2)."""
    s = t.integer_sums
    if s is not None:  # exact integers
        return (float(s["AA"] - 2 * s["AF"] + s["FF"]), float(s["BB"] - 2 * s["BF"] + s["FF"]))
    d = t.buf("mse")
    np.subtract(t.A, t.F, out=d)
    sa = float(np.einsum("ij,ij->", d, d))
    np.subtract(t.B, t.F, out=d)
    return sa, float(np.einsum("ij,ij->", d, d))


def mse_t(t: Triplet, convention: str = "reference") -> float:
    if convention not in ("reference", "tang"):
        raise ValueError(f"MSE convention {convention!r}; choose 'reference' or 'tang'")
    sa, sb = _sse(t)
    v = (sa + sb) / (2.0 * t.F.size)
    return v / 65025.0 if convention == "tang" else v


def psnr_t(t: Triplet, convention: str = "reference") -> float:
    m = mse_t(t)
    if convention == "reference":
        peak2 = float(t.F.max()) ** 2
    elif convention == "tang":
        peak2 = 255.0 ** 2 * 65025.0
    else:
        raise ValueError(f"PSNR convention {convention!r}; choose 'reference' or 'tang'")
    if m == 0.0:
        return math.inf
    if peak2 == 0.0:
        return -math.inf
    return 10.0 * math.log10(peak2 / m)


def _pearson(xc: np.ndarray, yc: np.ndarray) -> float:
    """Pearson r of two centred vectors; 0.0 when either is constant (documented choice)."""
    sxx = float(np.einsum("i,i->", xc, xc))
    syy = float(np.einsum("i,i->", yc, yc))
    if sxx == 0.0 or syy == 0.0:
        return 0.0
    return float(np.einsum("i,i->", xc, yc)) / math.sqrt(sxx * syy)


def _pearson_exact(cxy: int, cxx: int, cyy: int) -> float:
    """Pearson r from exact integer centred sums (any common factor); 0.0 for a constant input."""
    if cxx == 0 or cyy == 0:
        return 0.0
    return cxy / math.sqrt(cxx) / math.sqrt(cyy)


def cc_t(t: Triplet) -> float:
    s = t.integer_sums
    if s is not None:
        n = t.F.size
        cff = _exact_centred(n, s["F"], s["F"], s["FF"])
        r = [_pearson_exact(_exact_centred(n, s[k], s["F"], s[k + "F"]),
                            _exact_centred(n, s[k], s[k], s[k + k]), cff) for k in "AB"]
        return 0.5 * (r[0] + r[1])
    c = t.centred
    return 0.5 * (_pearson(c["A"], c["F"]) + _pearson(c["B"], c["F"]))


def scd_t(t: Triplet) -> float:
    s = t.integer_sums
    if s is not None:
        # r(X, F - Y) from sums: sum X(F - Y) = XF - XY, sum (F - Y)^2 = FF - 2 FY + YY (exact ints)
        n = t.F.size
        out = 0.0
        for x, y in (("A", "B"), ("B", "A")):
            sd_ = s["F"] - s[y]
            cxd = _exact_centred(n, s[x], sd_, s[x + "F"] - s["AB"])
            cdd = _exact_centred(n, sd_, sd_, s["FF"] - 2 * s[y + "F"] + s[y + y])
            out += _pearson_exact(cxd, _exact_centred(n, s[x], s[x], s[x + x]), cdd)
        return out
    c = t.centred
    d = t.buf("scd").ravel()
    r1 = _pearson(c["A"], np.subtract(c["F"], c["B"], out=d))
    return r1 + _pearson(c["B"], np.subtract(c["F"], c["A"], out=d))


def _vif_flush_rows(levels) -> int:
    """Rows of per-column products per log10 in the VIF kernel, so that no product overflows.

    Every factor is 1 + g^2 s1 / (sv + 2) <= 1 + s2 / 2 (Cauchy-Schwarz: g^2 s1 <= s12^2 / s1 <= s2)
    or 1 + s1 / 2, and a windowed variance is at most (max - min)^2 / 4 of its image."""
    F, A, B = levels[1]
    spread = max(float(x.max()) - float(x.min()) for x in (F, A, B))
    if not math.isfinite(spread):
        return 1
    per_factor = math.log10(2.0 + 0.13 * spread * spread)  # 1 + 1.04 * spread^2 / 8, with margin
    return max(1, min(64, int(250.0 / max(per_factor, 1e-3))))


def vif_terms_t(t: Triplet) -> tuple[float, float]:
    """(vifp(IR, F), vifp(VI, F)): reference = source, distorted = fused.

    Each scale is one pass of :func:`fusion._metric_kernels.vif_scale` (the eight windowed
    moments and the per-pixel clamping chain for both sources, in cache); the scales' images
    come from :func:`fusion._metric_kernels.decimate`."""
    levels = t.vif_pyramid
    flush = _vif_flush_rows(levels)
    num = [0.0, 0.0]
    den = [0.0, 0.0]
    for s in range(1, 5):
        F, A, B = levels[s]
        n_a, d_a, n_b, d_b = _K.vif_scale(F, A, B, _VIF_WINDOWS[s], flush)
        num[0] += n_a
        den[0] += d_a
        num[1] += n_b
        den[1] += d_b
    out = []
    for n_, d_ in zip(num, den, strict=True):
        with np.errstate(invalid="ignore", divide="ignore"):
            v = np.float64(n_) / np.float64(d_)
        out.append(1.0 if np.isnan(v) else float(v))
    return out[0], out[1]


def qabf_t(t: Triplet) -> float:
    """Qabf on strips of rows: a compiled pass for the Sobel magnitudes and slopes, numpy's
    arctan, a compiled pass for the exponent arguments, numpy's exp, a compiled sum."""
    H, W = t.shape
    h = min(_STRIP_ROWS, H)
    g_buf = t.buf("qg", (3 * h * W,))
    a_buf = t.buf("qa", (3 * h * W,))
    e_buf = t.buf("qe", (4 * h * W,))
    scratch = t.buf("qs", (5, W))
    num = 0.0
    den = 0.0
    for r0 in range(0, H, h):
        hh = min(h, H - r0)
        g = g_buf[:3 * hh * W].reshape(3, hh, W)
        a = a_buf[:3 * hh * W].reshape(3, hh, W)
        e = e_buf[:4 * hh * W].reshape(4, hh, W)
        _K.qabf_prepare(t.F, t.A, t.B, r0, g, a, scratch)
        np.arctan(a, out=a)
        _K.qabf_arguments(g, a, e)
        np.exp(e, out=e)
        n_, d_ = _K.qabf_sums(g, e)
        num += n_
        den += d_
    if den == 0.0:
        return 0.0  # gradient-free (all-zero) sources: nothing to transfer (documented)
    return num / den


def nabf_t(t: Triplet, order: str = "correct") -> float:
    """Nabf: a compiled dense pass (gradients, weights, the artefact mask), then the angles and
    logistic factors of the masked pixels only."""
    if order not in ("correct", "tang_head"):
        raise ValueError(f"Nabf order {order!r}; choose 'correct' or 'tang_head'")
    # analysis_Reference.m HEAD: analysis_nabf(img1=ir, img2=vi, img_f) vs signature (f, I1, I2)
    f, i1, i2 = (t.F, t.A, t.B) if order == "correct" else (t.A, t.B, t.F)
    H, W = t.shape
    comp = t.buf("nc", (6, H * W))
    den, m = _K.nabf_dense(f, i1, i2, comp, t.buf("ns", (12, W)))
    if m == 0:
        return 0.0
    angles = comp[3:6, :m]
    np.arctan(angles, out=angles)
    e = t.buf("ne", (4 * H * W,))[:4 * m].reshape(4, m)
    _K.nabf_arguments(comp, m, e)
    np.exp(e, out=e)
    return _K.nabf_numerator(comp, m, e) / den


def ssim_terms_t(t: Triplet, data_range: float = 2.0) -> tuple[float, float]:
    """(SSIM(F, IR), SSIM(F, VI)) with skimage's defaults (7x7 uniform, sample covariance).

    One compiled pass (:func:`fusion._metric_kernels.ssim_pair`): 7x7 window sums of the eight
    moments and the SSIM map on the interior the reference averages (3 px cropped)."""
    h, w = t.shape
    if min(h, w) < 7:
        raise DataError(f"SSIM needs images of at least 7x7 px; got {h}x{w}.")
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    a, b = _K.ssim_pair(t.F, t.A, t.B, c1, c2)
    n = (h - 6) * (w - 6)
    return a / n, b / n


