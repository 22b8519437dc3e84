"""Fusion quality metrics: the field's reference definitions, fast, with named conventions.

Every metric is a pure function over float64 arrays on the **0..255 scale**. Shapes: ``fused``,
``ir`` and ``vi`` are (H, W) grey images of one size (any real dtype; uint8 is converted to
float64 first, so none of the reference's uint8 wrap-around pitfalls apply). ``F`` = fused,
``A`` = infrared, ``B`` = visible, ``M x N`` = image size.

Reference (the default): the ``Evaluator`` class of MMIF-CDDFuse as run in its pinned
environment, see ``../shared/docs/metrics.md``: sum over the two sources for MI, VIF and SSIM;
MI in nats; SSIM with a 7x7 uniform window, sample covariance and data_range=2; Qabf with
zero-padded Sobel; VIF = Sheikh-Bovik multiscale pixel VIF (sigma_n^2 = 2). Nabf (not in that
class) follows Linfeng Tang's ``analysis_nabf.m`` with the arguments in the documented order.
Common alternatives are named options (``mi(..., unit="bits")``, ``ag(..., convention="matlab")``,
``mse/psnr(..., convention="tang")`` ...) collected in :class:`Convention`; every printed table
carries :meth:`Convention.describe`.

Speed (see benchmarks/bench_metrics.py; the reference takes ~2.3 s per 480x640 triplet): the
windowed metrics run as compiled single passes (numba, ``fusion/_metric_kernels.py``): VIF's and
SSIM's eight windowed moments per scale come from one separable filtering pass whose rows live
in cache and feed the per-pixel formula at once; Qabf and Nabf compute their Sobel responses,
magnitudes and masks in compiled loops and leave only atan and exp to numpy's SIMD functions;
SF and AG share one pass. For integer images (the reference reads images as integers) SD, MSE,
PSNR, CC and SCD come from exact integer sums of products (one compiled pass, float64 partial
sums below 2^53, combined as Python ints), joint histograms from ``cv2.calcHist`` (``np.bincount`` beyond 2^24
pixels). One :class:`Triplet` cache per image computes shared inputs once when several metrics
are requested (:func:`compute_all`). Functions are thread-safe (each thread has its own
buffers; the compiled kernels release the GIL); a Triplet object belongs to one thread. The
kernels compile on first use (about 15 s on the 2-core machine) and load from numba's on-disk
cache after that (about 1 s).
"""
from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from functools import cached_property
from pathlib import Path

import cv2
import numpy as np

from fuseseg.errors import DataError
from fusion import _metric_kernels as _K

METRICS = ("EN", "SD", "SF", "AG", "MI", "MSE", "CC", "PSNR", "SCD", "VIF", "Qabf", "SSIM", "Nabf")
LOWER_IS_BETTER = frozenset({"MSE", "Nabf"})
VIF_MIN_SIDE = 41  # smallest side for which every VIF scale has a non-empty 'valid' region

_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- input handling
def read_gray_reference(path: str | Path) -> np.ndarray:
    """Read an image as the reference evaluator does; returns (H, W) float64 with integer values.

    ``round(cvtColor(float32(cv2.imread(path)), BGR2GRAY))``: a 3-channel 8-bit read (grey files
    become 3 equal channels), OpenCV's 0.299R + 0.587G + 0.114B in float32, rounded half-to-even.
    Raises DataError naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found. Check the folder given for this image.")
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: not a readable image (OpenCV could not decode it). "
                        "Re-export it as PNG/JPG or remove it together with its partners.")
    grey = cv2.cvtColor(img.astype(np.float32), cv2.COLOR_BGR2GRAY)
    return np.round(grey).astype(np.float64)


def _as_image(x, name: str) -> np.ndarray:
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


# ----------------------------------------------------------------------------- conventions
_CHOICES = {
    "mi_unit": ("nats", "bits"),
    "ag": ("reference", "matlab"),
    "sf": ("reference", "mn"),
    "mse": ("reference", "tang"),
    "psnr": ("reference", "tang"),
    "nabf_order": ("correct", "tang_head"),
}


@dataclass(frozen=True)
class Convention:
    """Which variant of each metric to compute. Defaults = the reference (CDDFuse Evaluator).

    mi_unit:        "nats" (reference, sklearn) | "bits" (Tang MATLAB; = nats / ln 2)
    mi_tang_uint8_quirk: Tang's MI_evaluation exactly: the joint histogram merges grey values 254 and
                    255 (Hab.m's uint8 "+1" saturates), the marginal entropies do not (up to +0.38 %)
    ag:             "reference" (sum / MN) | "matlab" (sum / ((M-1)(N-1)); Tang, VIFB, MEFB)
    sf:             "reference" (means over the M(N-1) and (M-1)N differences) | "mn" (both sums / MN; VIFB, MEFB)
    mse:            "reference" (0..255 scale) | "tang" (0..1 scale, = reference / 65025)
    psnr:           "reference" (peak = max(F)) | "tang" (10 log10(255^2 / MSE on 0..1), ~ +48.13 dB)
    ssim_data_range: 2.0 reproduces the reference's implicit float data range; 255 = IF-FILM's copy
    nabf_order:     "correct" | "tang_head" (analysis_Reference.m HEAD calls analysis_nabf(ir, vi, fused))
    """

    mi_unit: str = "nats"
    mi_tang_uint8_quirk: bool = False
    ag: str = "reference"
    sf: str = "reference"
    mse: str = "reference"
    psnr: str = "reference"
    ssim_data_range: float = 2.0
    nabf_order: str = "correct"

    def __post_init__(self):
        for key, valid in _CHOICES.items():
            if getattr(self, key) not in valid:
                raise ValueError(f"Convention.{key}={getattr(self, key)!r} is not valid; "
                                 f"choose one of {', '.join(valid)}")
        if not self.ssim_data_range > 0:
            raise ValueError(f"Convention.ssim_data_range must be > 0, got {self.ssim_data_range}")

    @classmethod
    def preset(cls, name: str) -> Convention:
        """A named preset: ``reference``, ``sspfusion`` (reference with MI in bits: matches the
        SSPFusion paper's MSRS table) or ``tang`` (Tang's MATLAB scales for MI/AG/MSE/PSNR)."""
        try:
            return PRESETS[name]
        except KeyError:
            raise ValueError(f"unknown convention preset {name!r}; valid: {', '.join(PRESETS)}") from None

    def with_options(self, **changes) -> Convention:
        """A copy with some fields changed (validated)."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown Convention field(s) {sorted(unknown)}; valid: "
                             f"{', '.join(f.name for f in fields(self))}")
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One human-readable line stating every convention (printed under every metric table)."""
        mi = f"MI=MI(F,IR)+MI(F,VI) in {self.mi_unit}" + (" (Tang uint8 254/255 merge)"
                                                           if self.mi_tang_uint8_quirk else "")
        ag = "AG=sum/((M-1)(N-1)) [MATLAB]" if self.ag == "matlab" else "AG=sum/(MN)"
        sf = "SF=sums/(MN) [VIFB]" if self.sf == "mn" else "SF=mean of differences"
        mse = "MSE on 0..1 [Tang]" if self.mse == "tang" else "MSE on 0..255"
        psnr = ("PSNR=10log10(255^2/MSE_0..1) [Tang]" if self.psnr == "tang"
                else "PSNR peak=max(F)")
        dr = f"{self.ssim_data_range:g}"
        nabf = ("Nabf args as Tang HEAD driver (ir,vi,fused)" if self.nabf_order == "tang_head"
                else "Nabf=Tang analysis_nabf.m")
        return (f"{mi}; VIF=sum of Sheikh-Bovik vifp (sigma_n^2=2); SSIM=sum, 7x7 uniform, "
                f"data_range={dr}; Qabf zero-padded Sobel; {ag}; {sf}; {mse}; {psnr}; {nabf}; "
                "EN log2; SD population; CC/SCD Pearson")


PRESETS = {
    "reference": Convention(),
    "sspfusion": Convention(mi_unit="bits"),
    "tang": Convention(mi_unit="bits", mi_tang_uint8_quirk=True, ag="matlab", mse="tang", psnr="tang"),
}


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
        self.F = _as_image(fused, "fused")
        self.A = _as_image(ir, "ir")
        self.B = _as_image(vi, "vi")
        _check_same({"fused": self.F.shape, "ir": self.A.shape, "vi": self.B.shape})
        self.shape = self.F.shape

    @classmethod
    def single(cls, fused) -> Triplet:
        """A cache for the fused-only metrics (EN, SD, SF, AG): ir = vi = fused."""
        t = cls.__new__(cls)
        t.F = t.A = t.B = _as_image(fused, "fused")
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


# ----------------------------------------------------------------------------- public metrics
def en(fused) -> float:
    """Entropy EN = -sum_k p_k log2 p_k of the 256-bin histogram of uint8(round(clip(F, 0, 255))).

    fused: (H, W). Range 0..8 bits; higher = more information. Constant image: 0."""
    return en_t(Triplet.single(fused))


def sd(fused) -> float:
    """Standard deviation SD = sqrt(mean((F - mean F)^2)) (population, ddof=0), 0..255 scale.

    fused: (H, W). Range 0..127.5; higher = more contrast. Constant image: 0."""
    return float(np.std(_as_image(fused, "fused")))


def sf(fused, *, convention: str = "reference") -> float:
    """Spatial frequency SF = sqrt(RF^2 + CF^2).

    reference: RF^2 = mean over the M(N-1) horizontal differences (F[i,j]-F[i,j-1])^2, CF^2 = mean
    over the (M-1)N vertical ones (= Tang MATLAB). ``convention="mn"``: both sums divided by MN
    (VIFB/MEFB). fused: (H, W). Range >= 0; higher = more detail. Constant image: 0."""
    return sf_t(Triplet.single(fused), convention)


def ag(fused, *, convention: str = "reference") -> float:
    """Average gradient AG = (1/MN) sum sqrt((Gx^2 + Gy^2)/2).

    Gx, Gy as ``np.gradient``/MATLAB ``gradient``: central differences /2 inside, one-sided at the
    borders. ``convention="matlab"`` divides the same sum by (M-1)(N-1) (Tang, VIFB, MEFB;
    x1.003656 at 480x640). fused: (H, W). Range >= 0. Constant image: 0."""
    return ag_t(Triplet.single(fused), convention)


def mi(fused, ir, vi, *, unit: str = "nats", tang_uint8_quirk: bool = False) -> float:
    """Mutual information MI = MI(F, IR) + MI(F, VI) (sum over sources).

    MI(F, X) = sum_{f,x} p(f,x) ln(p(f,x) / (p(f) p(x))) over the joint histogram of the exact pixel
    values (sklearn ``mutual_info_score``; 256x256 for integer images). ``unit="bits"`` divides by
    ln 2 (Tang MATLAB; SSPFusion's tables). ``tang_uint8_quirk=True`` reproduces Tang's
    MI_evaluation exactly: H(F) + H(X) - H(F, X) where only the joint histogram merges the values
    254 and 255 (Hab.m's saturating uint8 "+1"; needs integer images). Shapes: (H, W) each. Range 0..2*ln(256) nats. Constant F: 0."""
    a, b = mi_terms_t(Triplet(fused, ir, vi), unit=unit, tang_uint8_quirk=tang_uint8_quirk)
    return a + b


def mse(fused, ir, vi, *, convention: str = "reference") -> float:
    """MSE = 1/2 [mean((IR - F)^2) + mean((VI - F)^2)] on the 0..255 scale (range 0..65025; lower
    is better). ``convention="tang"``: on the 0..1 scale (/65025). Shapes: (H, W) each."""
    return mse_t(Triplet(fused, ir, vi), convention)


def psnr(fused, ir, vi, *, convention: str = "reference") -> float:
    """PSNR = 10 log10(max(F)^2 / MSE) in dB, peak = the fused image's maximum (not 255).

    ``convention="tang"``: 10 log10(255^2 / MSE_0..1) = 10 log10(255^2 * 65025 / MSE) (about
    +48.13 dB over the standard 255-peak PSNR). +inf when MSE = 0 (F = IR = VI); -inf when F is all
    zero but MSE > 0 (reference convention). Shapes: (H, W) each."""
    return psnr_t(Triplet(fused, ir, vi), convention)


def cc(fused, ir, vi) -> float:
    """Correlation coefficient CC = 1/2 [r(IR, F) + r(VI, F)], Pearson r.

    r(X, Y) = sum (X-mean X)(Y-mean Y) / sqrt(sum (X-mean X)^2 sum (Y-mean Y)^2); r = 0 when either
    image is constant (the reference gives NaN). Range -1..1. Shapes: (H, W) each."""
    return cc_t(Triplet(fused, ir, vi))


def scd(fused, ir, vi) -> float:
    """Sum of correlations of differences SCD = r(IR, F - VI) + r(VI, F - IR) (MATLAB corr2).

    r = 0 when an argument is constant. Range -2..2. Shapes: (H, W) each."""
    return scd_t(Triplet(fused, ir, vi))


def vif(fused, ir, vi) -> float:
    """VIF = vifp(IR, F) + vifp(VI, F): Sheikh-Bovik multiscale pixel-domain VIF (vifp_mscale.m).

    4 scales, window N = 2^(5-s)+1 Gaussian (sigma N/5, fspecial), 'valid' filtering, scales > 1
    filter then keep every other row/column; sigma_n^2 = 2, eps = 1e-10, clamps in the reference
    order (sigma1^2 < eps; sigma2^2 < eps; g < 0; sv^2 <= eps). vifp = num/den, 1.0 when that is
    NaN (constant source). Range >= 0 (each term ~0..1, can exceed 1 for contrast enhancement).
    Needs >= 41 px per side: DataError otherwise. Shapes: (H, W) each. Not Han et al.'s VIFF."""
    a, b = vif_terms_t(Triplet(fused, ir, vi))
    return a + b


def qabf(fused, ir, vi) -> float:
    """Xydeas-Petrovic edge preservation Qabf (analysis_Qabf.m variant).

    Sobel by conv2 with zero padding; g = sqrt(Sx^2 + Sy^2), alpha = atan(Sy/Sx) (pi/2 where Sx = 0);
    G = min/max of gX, gF but G = gF where gX == gF (MATLAB original); A = 1 - |aX - aF|/(pi/2);
    Q^XF = 0.9994/(1+exp(-15(G-0.5))) * 0.9879/(1+exp(-22(A-0.8))); Qabf = sum(Q^AF gA + Q^BF gB) /
    sum(gA + gB). Range 0..1, higher is better. The zero padding makes the border of a constant
    non-zero image an edge (reference behaviour); sources without any gradient (all zero) give
    0/0, returned as 0. For non-integer inputs the angles of nearly flat areas are ill-conditioned
    (a Sobel response of 1e-14 instead of 0 moves atan by up to pi/2), as in every implementation."""
    return qabf_t(Triplet(fused, ir, vi))


def ssim(fused, ir, vi, *, data_range: float = 2.0) -> float:
    """SSIM = SSIM(F, IR) + SSIM(F, VI) as the reference computes it (skimage 0.19 defaults).

    7x7 uniform window, sample covariance (x 49/48), K1 = 0.01, K2 = 0.03, C = (K R)^2 with
    R = data_range = 2 (the reference's implicit float range; 255 = IF-FILM's copy), map cropped by
    3 px then averaged. Range up to 2 (sum). Constant images: finite (the C terms keep it defined).
    Shapes: (H, W) each, >= 7 px per side."""
    a, b = ssim_terms_t(Triplet(fused, ir, vi), data_range)
    return a + b


def nabf(fused, ir, vi, *, order: str = "correct") -> float:
    """Fusion artefacts Nabf (Shreyamsha Kumar's modification; Tang's analysis_nabf.m). Lower is better.

    Sobel /8 as correlation on mirror-padded (no edge repeat) images: gv = horizontal derivative,
    gh = vertical, g = sqrt(gv^2 + gh^2), alpha = atan(gv/gh) (0 where both are 0).
    gXF = min/max of gX, gF (0 if either is 0); aXF = ||aX - aF| - pi/2| 2/pi;
    Q^XF = sqrt(0.9999/(1+exp(-19(gXF-0.5))) * 0.9995/(1+exp(-22(aXF-0.5))));
    wX = gX^1.5 where gX >= 2 else 0.001; na = [gF > gA and gF > gB];
    Nabf = sum na((1-Q^AF)wA + (1-Q^BF)wB) / sum(wA + wB). Range 0..1. Constant images: 0.
    ``order="tang_head"`` reproduces analysis_Reference.m's swapped call (ir, vi, fused)."""
    return nabf_t(Triplet(fused, ir, vi), order)


# ----------------------------------------------------------------------------- all together
def _run_metric(name: str, t: Triplet, c: Convention) -> float:
    if name == "EN":
        return en_t(t)
    if name == "SD":
        return sd_t(t)
    if name == "SF":
        return sf_t(t, c.sf)
    if name == "AG":
        return ag_t(t, c.ag)
    if name == "MI":
        return sum(mi_terms_t(t, unit=c.mi_unit, tang_uint8_quirk=c.mi_tang_uint8_quirk))
    if name == "MSE":
        return mse_t(t, c.mse)
    if name == "CC":
        return cc_t(t)
    if name == "PSNR":
        return psnr_t(t, c.psnr)
    if name == "SCD":
        return scd_t(t)
    if name == "VIF":
        return sum(vif_terms_t(t))
    if name == "Qabf":
        return qabf_t(t)
    if name == "SSIM":
        return sum(ssim_terms_t(t, c.ssim_data_range))
    if name == "Nabf":
        return nabf_t(t, c.nabf_order)
    raise ValueError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}")


def resolve_metrics(metrics: Iterable[str] | None) -> tuple[str, ...]:
    """Validate metric names (case-insensitive) and return them in canonical spelling and order."""
    if metrics is None:
        return METRICS
    lookup = {m.lower(): m for m in METRICS}
    chosen = []
    for m in metrics:
        key = str(m).strip().lower()
        if key not in lookup:
            raise ValueError(f"unknown metric {m!r}; valid: {', '.join(METRICS)}")
        chosen.append(lookup[key])
    return tuple(m for m in METRICS if m in chosen)


def compute_all(fused, ir, vi, metrics: Iterable[str] | None = None,
                conventions: Convention | str | None = None) -> dict[str, float]:
    """Every requested metric of one triplet, sharing intermediate results.

    fused, ir, vi: (H, W) on the 0..255 scale. metrics: names from METRICS (default all 13).
    conventions: a Convention or a preset name (default: reference). Returns {name: value} in
    METRICS order. Qabf and Nabf share their Sobel responses (Nabf's are computed first)."""
    c = resolve_convention(conventions)
    names = resolve_metrics(metrics)
    t = Triplet(fused, ir, vi)
    if "VIF" in names:
        _ = t.vif_pyramid  # raise the size error before spending time on the others
    out = {}
    for name in _COMPUTE_ORDER:
        if name in names:
            out[name] = _run_metric(name, t, c)
    return {name: out[name] for name in names}


_COMPUTE_ORDER = ("Nabf",) + tuple(m for m in METRICS if m != "Nabf")


def warm_up() -> None:
    """Compile (or load from numba's on-disk cache) every compiled metric kernel now.

    The first call in a fresh installation compiles for about 15 s; later processes load the
    cached machine code in well under a second. The data-set scorer calls this once before it
    starts its worker processes, so that they find the cache filled rather than all compiling."""
    rng = np.random.default_rng(0)
    f, a, b = rng.integers(0, 256, (3, VIF_MIN_SIDE + 7, VIF_MIN_SIDE + 8)).astype(np.float64)
    compute_all(f, a, b)


def resolve_convention(conventions: Convention | str | None) -> Convention:
    if conventions is None:
        return PRESETS["reference"]
    if isinstance(conventions, str):
        return Convention.preset(conventions)
    if isinstance(conventions, Convention):
        return conventions
    raise TypeError(f"conventions must be a Convention or a preset name, got {type(conventions)}")


def describe_conventions(conventions: Convention | str | None = None) -> str:
    """The human-readable convention line for a Convention or preset name."""
    return resolve_convention(conventions).describe()


METRIC_FUNCTIONS: dict[str, Callable] = {
    "EN": en, "SD": sd, "SF": sf, "AG": ag, "MI": mi, "MSE": mse, "CC": cc, "PSNR": psnr,
    "SCD": scd, "VIF": vif, "Qabf": qabf, "SSIM": ssim, "Nabf": nabf,
}
