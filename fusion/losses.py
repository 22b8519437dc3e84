"""Losses of SSPFusion (Eqs. 6-11 of the paper, read as in ``../shared/docs/sspfusion-spec.md``).

All inputs are (B, 1, H, W) images in [0, 1] (``F`` fused, ``IR`` infrared, ``VI`` visible Y).
Every loss is computed in float32 (inputs of lower precision are cast), so they are safe under
autocast. Each returns a scalar tensor (mean over the batch).

* ``L_ssim   = 1 - (SSIM(F, IR) + SSIM(F, VI)) / 2``                          (Eq. 9)
* ``L_smooth = mean | F - max(IR, VI) |``                                     (Eq. 10)
* ``L_grad   = mean | |grad F| - max(|grad IR|, |grad VI|) |``                (Eq. 11)
  with ``|grad x| = |Gx| + |Gy|`` (Sobel, replicate padding; see :func:`sobel_l1`)
* ``L_rec    = sqrt(||P - S||^2 + eps^2)`` per image and map, averaged over the batch (Eq. 7 as
  printed: ``||.||`` is the norm of the whole difference map), :func:`rec_norm`; the per-pixel
  form ``mean sqrt((P - S)^2 + eps^2)`` (:func:`charbonnier`) is kept for comparison
* ``L_fus    = w_ssim L_ssim + w_smooth L_smooth + w_grad L_grad``  (Eq. 8; paper: 1 : 1 : 1),
  :func:`fusion_loss`, the loss the diagnostics compare against trivial fusions.

"mean" is over every pixel of every image (the paper's ||.||_1 normalised by the pixel count).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fusion.structure import gaussian_window, no_autocast, sobel

__all__ = ["gaussian_window", "ssim", "SSIMLoss", "ssim_loss", "smooth_loss", "sobel_l1",
           "grad_loss", "fusion_loss", "charbonnier", "CharbonnierLoss", "rec_norm", "REC_REDUCTIONS",
           "rec_loss"]


def _blur(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Separable 'valid' Gaussian filtering of (B, C, H, W): output (B, C, H-s+1, W-s+1)."""
    c = x.shape[1]
    s = g.numel()
    x = F.conv2d(x, g.view(1, 1, 1, s).expand(c, 1, 1, s), groups=c)
    return F.conv2d(x, g.view(1, 1, s, 1).expand(c, 1, s, 1), groups=c)


@no_autocast
def ssim(x: torch.Tensor, y: torch.Tensor, *, window_size: int = 11, sigma: float = 1.5,
         data_range: float = 1.0, k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004) per image: (B, C, H, W) x2 -> (B,).

    With Gaussian-weighted local statistics (window ``window_size`` x ``window_size``, std
    ``sigma``; only windows fully inside the image, i.e. 'valid' filtering, as in the reference
    implementation), ``C1 = (k1 L)^2``, ``C2 = (k2 L)^2``, L = ``data_range``::

        SSIM = (2 mu_x mu_y + C1)(2 s_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(s_x^2 + s_y^2 + C2))

    averaged over all window positions and channels. Computed in float32 (float64 inputs stay
    float64). H and W must be at least ``window_size``."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"ssim expects two (B, C, H, W) tensors of one shape, got {tuple(x.shape)} "
                         f"and {tuple(y.shape)}")
    if min(x.shape[-2:]) < window_size:
        raise ValueError(f"ssim: image {tuple(x.shape[-2:])} is smaller than the {window_size}x"
                         f"{window_size} window; use larger crops or a smaller window_size")
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    x, y = x.to(dt), y.to(dt)
    g = gaussian_window(window_size, sigma, dtype=dt, device=x.device)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    # the five local means in one grouped convolution: PyTorch's CPU kernel for a single-channel
    # convolution is ~10x slower per map than its depthwise one (measured: 415 vs 42 ms for the
    # five maps of a 480x640 image, forward + backward, one thread)
    mu_x, mu_y, exx, eyy, exy = _blur(torch.cat([x, y, x * x, y * y, x * y], dim=1), g).chunk(5, dim=1)
    sxx = exx - mu_x * mu_x
    syy = eyy - mu_y * mu_y
    sxy = exy - mu_x * mu_y
    num = (2 * mu_x * mu_y + c1) * (2 * sxy + c2)
    den = (mu_x * mu_x + mu_y * mu_y + c1) * (sxx + syy + c2)
    return (num / den).mean(dim=(1, 2, 3))


def _check_one_shape(name: str, fused: torch.Tensor, ir: torch.Tensor, vi: torch.Tensor) -> None:
    """The losses that stack fused, ir and vi into one tensor need them of one shape."""
    if fused.shape != ir.shape or fused.shape != vi.shape:
        raise ValueError(f"{name} expects fused, ir and vi of one shape, got {tuple(fused.shape)}, "
                         f"{tuple(ir.shape)} and {tuple(vi.shape)}")


def ssim_loss(fused: torch.Tensor, ir: torch.Tensor, vi: torch.Tensor, **ssim_kwargs) -> torch.Tensor:
    """``L_ssim = 1 - mean_batch (SSIM(F, IR) + SSIM(F, VI)) / 2`` (Eq. 9); scalar.

    Both SSIMs in one call: SSIM averages over channels, so SSIM([F, F], [IR, VI]) over the
    2C channels is (SSIM(F, IR) + SSIM(F, VI)) / 2 (same-sized maps)."""
    _check_one_shape("ssim_loss", fused, ir, vi)
    return 1.0 - ssim(torch.cat([fused, fused], dim=1), torch.cat([ir, vi], dim=1), **ssim_kwargs).mean()


class SSIMLoss(nn.Module):
    """Module form of :func:`ssim_loss`: ``SSIMLoss()(fused, ir, vi)`` -> scalar
    ``1 - (SSIM(F, IR) + SSIM(F, VI)) / 2``, 11x11 Gaussian window, sigma 1.5 by default."""

    def __init__(self, window_size: int = 11, sigma: float = 1.5, data_range: float = 1.0):
        super().__init__()
        self.window_size, self.sigma, self.data_range = window_size, sigma, data_range

    def forward(self, fused: torch.Tensor, ir: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
        return ssim_loss(fused, ir, vi, window_size=self.window_size, sigma=self.sigma,
                         data_range=self.data_range)


@no_autocast
def smooth_loss(fused: torch.Tensor, ir: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
    """Max-intensity L1, ``L_smooth = mean | F - max(IR, VI) |`` (Eq. 10); scalar, float32."""
    f, a, b = fused.float(), ir.float(), vi.float()
    return (f - torch.maximum(a, b)).abs().mean()


def sobel_l1(x: torch.Tensor) -> torch.Tensor:
    """Gradient size used by the losses: ``|Gx| + |Gy|`` (Sobel, replicate padding), (B, C, H, W).

    Chosen over the Euclidean magnitude because its derivative is bounded everywhere: the
    derivative of ``sqrt(Gx^2 + Gy^2)`` is infinite at 0 and gives NaN gradients on flat regions
    (every constant patch of a fused image); ``|.|`` has the sub-gradient 0 there. It is also the
    form used by common max-gradient fusion losses."""
    gx, gy = sobel(x)
    return gx.abs() + gy.abs()


@no_autocast
def grad_loss(fused: torch.Tensor, ir: torch.Tensor, vi: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Max-gradient L1, ``L_grad = mean | |grad F| - gain * max(|grad IR|, |grad VI|) |`` (Eq. 11;
    the paper's ``gain`` is 1), with ``|grad x| = |Gx| + |Gy|`` (:func:`sobel_l1`); scalar, float32.

    ``gain > 1`` asks for edges stronger than the stronger input's (a sharpened max): a documented
    departure from the paper, see ``benchmarks/lfus_optimum.py`` for what it buys."""
    _check_one_shape("grad_loss", fused, ir, vi)
    # the three images' Sobel filters in one grouped convolution (faster on CPU than three calls)
    g_f, g_a, g_b = sobel_l1(torch.cat([fused.float(), ir.float(), vi.float()], dim=1)).chunk(3, dim=1)
    return (g_f - gain * torch.maximum(g_a, g_b)).abs().mean()


def fusion_loss(fused: torch.Tensor, ir: torch.Tensor, vi: torch.Tensor, *, w_ssim: float = 1.0,
                w_smooth: float = 1.0, w_grad: float = 1.0,
                grad_gain: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``L_fus = w_ssim L_ssim + w_smooth L_smooth + w_grad L_grad`` (Eq. 8; the paper's weights are
    1 : 1 : 1; ``grad_gain`` is :func:`grad_loss`'s ``gain``, the paper's 1).
    Returns (scalar float32 total, {"ssim", "smooth", "grad": unweighted scalars}).
    Any (B, 1, H, W) ``fused`` may be scored, e.g. ``torch.maximum(ir, vi)`` as a trivial answer."""
    parts = {"ssim": ssim_loss(fused, ir, vi), "smooth": smooth_loss(fused, ir, vi),
             "grad": grad_loss(fused, ir, vi, grad_gain)}
    total = w_ssim * parts["ssim"] + w_smooth * parts["smooth"] + w_grad * parts["grad"]
    return total, parts


@no_autocast
def charbonnier(pred: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Charbonnier loss ``mean sqrt((P - S)^2 + eps^2)`` (Eq. 7, per pixel as in LapSRN); scalar,
    float32. Its minimum is ``eps`` (at P = S): with the paper's eps = 1 it behaves like
    ``1 + (P - S)^2 / 2`` (a shifted, halved L2) for |P - S| <= 1."""
    d = pred.float() - target.float()
    return torch.sqrt(d * d + eps * eps).mean()


@no_autocast
def rec_norm(pred: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """Eq. 7 as printed: ``sqrt(||P - S||_2^2 + eps^2)`` with ``||.||_2`` the Euclidean norm of the
    whole difference map of one image, averaged over the batch; scalar, float32.

    pred, target: (B, C, H, W). Per image b: ``sqrt(sum_{c,i,j} (P - S)^2 + eps^2)``, range
    ``[eps, sqrt(C H W + eps^2)]`` for maps in [0, 1]. The value grows with the map size (a
    near-flat P of rms error 0.45 on a 128x128 map gives ~58): record the crop with the loss. Its
    gradient ``(P - S) / sqrt(||P - S||^2 + eps^2)`` has unit norm per image whenever the error
    is large against eps."""
    d = pred.float() - target.float()
    return torch.sqrt(d.pow(2).flatten(1).sum(dim=1) + eps * eps).mean()


#: Reductions of L_rec: ``norm`` (Eq. 7 as printed, :func:`rec_norm`) or ``mean`` (per pixel, :func:`charbonnier`).
REC_REDUCTIONS = ("norm", "mean")


def rec_loss(pred: torch.Tensor, target: torch.Tensor, eps: float = 1.0, reduction: str = "norm") -> torch.Tensor:
    """L_rec of one (B, 1, h, w) map pair with the given reduction (:data:`REC_REDUCTIONS`)."""
    if reduction == "norm":
        return rec_norm(pred, target, eps)
    if reduction == "mean":
        return charbonnier(pred, target, eps)
    raise ValueError(f"rec_reduction must be one of {', '.join(REC_REDUCTIONS)}, got {reduction!r}")


class CharbonnierLoss(nn.Module):
    """Module form of :func:`charbonnier` with a fixed ``eps``."""

    def __init__(self, eps: float = 1.0):
        super().__init__()
        self.eps = eps

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return charbonnier(pred, target, self.eps)
