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

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import cv2
import numpy as np

from fuseseg.data.header import check_image_size
from fuseseg.errors import DataError
from fusion.metric_terms import (
    VIF_MIN_SIDE,
    Triplet,
    ag_t,
    as_image,
    cc_t,
    en_t,
    mi_terms_t,
    mse_t,
    nabf_t,
    psnr_t,
    qabf_t,
    scd_t,
    sd_t,
    sf_t,
    ssim_terms_t,
    vif_terms_t,
)

METRICS = ("EN", "SD", "SF", "AG", "MI", "MSE", "CC", "PSNR", "SCD", "VIF", "Qabf", "SSIM", "Nabf")
LOWER_IS_BETTER = frozenset({"MSE", "Nabf"})


# ----------------------------------------------------------------------------- input handling
def read_gray_reference(path: str | Path) -> np.ndarray:
    """Read an image as the reference evaluator does; returns (H, W) float64 with integer values.

    ``round(cvtColor(float32(cv2.imread(path)), BGR2GRAY))``: a 3-channel 8-bit read (grey files
    become 3 equal channels), OpenCV's 0.299R + 0.587G + 0.114B in float32, rounded half-to-even.
    Raises DataError naming the file when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found. Check the folder given for this image.")
    check_image_size(path)   # pixels and decoded bytes from the header, before decoding
    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DataError(f"{path}: not a readable image (OpenCV could not decode it). "
                        "Re-export it as PNG/JPG or remove it together with its partners.")
    grey = cv2.cvtColor(img.astype(np.float32), cv2.COLOR_BGR2GRAY)
    return np.round(grey).astype(np.float64)


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


# ----------------------------------------------------------------------------- public metrics
def en(fused) -> float:
    """Entropy EN = -sum_k p_k log2 p_k of the 256-bin histogram of uint8(round(clip(F, 0, 255))).

    fused: (H, W). Range 0..8 bits; higher = more information. Constant image: 0."""
    return en_t(Triplet.single(fused))


def sd(fused) -> float:
    """Standard deviation SD = sqrt(mean((F - mean F)^2)) (population, ddof=0), 0..255 scale.

    fused: (H, W). Range 0..127.5; higher = more contrast. Constant image: 0."""
    return float(np.std(as_image(fused, "fused")))


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
