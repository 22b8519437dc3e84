"""Structure maps of SSPFusion: the transformation G (Sobel edges, Eq. 2 of the paper, read as in
``../shared/docs/sspfusion-spec.md``), the multi-scale ground-truth pyramid, and the XOR masks of
Eq. 3.

Conventions (all tensors (B, 1, H, W), float):

* Sobel kernels (cross-correlation, as ``torch.nn.functional.conv2d`` computes it)::

      Kx = [[-1, 0, 1],        Ky = [[-1, -2, -1],
            [-2, 0, 2],              [ 0,  0,  0],
            [-1, 0, 1]]              [ 1,  2,  1]]

  applied with **replicate** padding of 1 pixel, so the output has the input's size and a flat
  image has zero gradient everywhere, borders included (zero padding would put false edges on
  every border; reflect padding forces the normal derivative on the border row/column to 0).
* ``G(x)_ij = 1`` if ``|grad x|_ij > mean_ij |grad x|`` (per image, per channel), else 0, with
  ``|grad x| = sqrt(Gx^2 + Gy^2)`` (the Euclidean magnitude; G is never differentiated, so the
  square root's singularity at 0 does not matter here). 1 = edge, the reading of the text (the
  printed inequality of Eq. 2 is the other way round; see the spec).
* Level k of the pyramid has size ``ceil(H / 2^k) x ceil(W / 2^k)`` (the size a stride-2, 3x3,
  padding-1 convolution chain produces) and is made by ``F.interpolate(mode="area")``, i.e. the
  mean over each 2^k x 2^k block when H, W are multiples of 2^k (anti-aliased, unlike bilinear
  down-sampling by 2^k, which would sample only 4 of the 4^k pixels of a block).
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

__all__ = ["no_autocast", "sobel", "gaussian_window", "gaussian_blur", "high_pass", "gradient_magnitude",
           "structure_map", "structure_gt", "structure_pyramid", "level_size", "xor_masks"]


def no_autocast(fn):
    """Decorator: run ``fn`` with autocast disabled on the device of its first tensor argument, so
    its convolutions stay in the input's (float32) precision under mixed-precision training."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        dev = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        if dev in ("cuda", "cpu", "xpu", "mps") and torch.is_autocast_enabled(dev):
            with torch.autocast(device_type=dev, enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return wrapper


def gaussian_window(size: int = 11, sigma: float = 1.5, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """Normalised 1-D Gaussian (size,): ``g_i = exp(-(i - c)^2 / (2 sigma^2)) / sum``, c = (size-1)/2.
    The 2-D window is the outer product ``g g^T`` (sums to 1)."""
    c = (size - 1) / 2.0
    g = torch.tensor([math.exp(-((i - c) ** 2) / (2.0 * sigma * sigma)) for i in range(size)],
                     dtype=torch.float64)
    return (g / g.sum()).to(dtype=dtype, device=device)


def gaussian_blur(x: torch.Tensor, sigma: float = 1.0, radius: int = 2) -> torch.Tensor:
    """Separable Gaussian blur of (B, C, H, W), kernel :func:`gaussian_window` of size
    ``2 radius + 1``, **reflect** padding (replicate where a side is not longer than ``radius``);
    same shape and dtype; channels filtered independently (one grouped convolution per direction)."""
    if x.ndim != 4:
        raise ValueError(f"gaussian_blur expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    c = x.shape[1]
    k = gaussian_window(2 * radius + 1, sigma, dtype=x.dtype, device=x.device)
    mode = "reflect" if min(x.shape[-2:]) > radius else "replicate"
    x = F.pad(x, (radius, radius, radius, radius), mode=mode)
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def high_pass(x: torch.Tensor, sigma: float = 1.0, radius: int = 2) -> torch.Tensor:
    """``x - gaussian_blur(x)``: the detail of ``x`` finer than the Gaussian (a constant or a
    linear ramp away from the borders gives 0). (B, C, H, W) -> same shape."""
    return x - gaussian_blur(x, sigma, radius)


_KX = ((-1.0, 0.0, 1.0), (-2.0, 0.0, 2.0), (-1.0, 0.0, 1.0))
_KY = ((-1.0, -2.0, -1.0), (0.0, 0.0, 0.0), (1.0, 2.0, 1.0))


def sobel(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sobel derivatives of ``x`` (B, C, H, W) -> (gx, gy), each (B, C, H, W), same dtype/device.

    ``gx = Kx * x`` (horizontal change, positive where x grows to the right), ``gy = Ky * x``
    (positive where x grows downwards); replicate padding. Channels are filtered independently.
    Differentiable."""
    if x.ndim != 4:
        raise ValueError(f"sobel expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    c = x.shape[1]
    k = torch.tensor((_KX, _KY), dtype=x.dtype, device=x.device)  # (2, 3, 3)
    weight = k.unsqueeze(1).repeat(c, 1, 1, 1)  # (2C, 1, 3, 3): [Kx, Ky] per channel
    xp = F.pad(x, (1, 1, 1, 1), mode="replicate")
    g = F.conv2d(xp, weight, groups=c)  # (B, 2C, H, W), channel 2i = gx_i, 2i+1 = gy_i
    return g[:, 0::2], g[:, 1::2]


def gradient_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Euclidean Sobel magnitude ``sqrt(gx^2 + gy^2)``, (B, C, H, W). Not meant for back-prop
    (the gradient of sqrt is infinite at 0); losses use :func:`fusion.losses.sobel_l1`."""
    gx, gy = sobel(x)
    return torch.sqrt(gx * gx + gy * gy)


@torch.no_grad()
@no_autocast
def structure_map(x: torch.Tensor) -> torch.Tensor:
    """The transformation G of the paper: binary edge map of ``x`` (B, C, H, W) -> (B, C, H, W)
    float in {0, 1}, with ``1`` where the Sobel magnitude exceeds its per-image, per-channel mean
    (global average pooling). Computed in float32 whatever the input dtype; no gradient."""
    mag = gradient_magnitude(x.float())
    out_dtype = x.dtype if x.is_floating_point() else torch.float32
    return (mag > mag.mean(dim=(-2, -1), keepdim=True)).to(out_dtype)


def structure_gt(img: torch.Tensor) -> torch.Tensor:
    """Ground-truth structure map of an image (B, 1, H, W) in [0, 1]: ``G(img)`` (1 = edge)."""
    if img.ndim != 4 or img.shape[1] != 1:
        raise ValueError(f"structure_gt expects a (B, 1, H, W) image, got shape {tuple(img.shape)}")
    return structure_map(img)


def level_size(h: int, w: int, k: int) -> tuple[int, int]:
    """Spatial size of pyramid level ``k`` (k = 0 is full resolution): ceil(h/2^k), ceil(w/2^k)."""
    s = 2 ** k
    return -(-h // s), -(-w // s)


@torch.no_grad()
@no_autocast
def structure_pyramid(img: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """Ground-truth structure maps at levels 1..``levels``: ``[G(area_resize(img, level k))]``,
    entry k-1 of size :func:`level_size` (H, W, k). img (B, 1, H, W) -> list of (B, 1, h_k, w_k)
    binary float maps."""
    if levels < 1:
        raise ValueError(f"structure_pyramid needs levels >= 1, got {levels}")
    h, w = img.shape[-2:]
    out = []
    for k in range(1, levels + 1):
        x = F.interpolate(img.float(), size=level_size(h, w, k), mode="area")
        out.append(structure_gt(x))
    return out


def xor_masks(s_ir: torch.Tensor, s_vi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique-structure masks of Eq. 3 from binary maps of equal shape:

        M_ir = S_ir * (1 - S_vi)   (edges only in the infrared)
        M_vi = S_vi * (1 - S_ir)   (edges only in the visible)

    ``M_ir + M_vi`` is the XOR ``J(S_ir, S_vi) = (1 - S_ir) S_vi + (1 - S_vi) S_ir`` of the paper.
    Returns (M_ir, M_vi)."""
    if s_ir.shape != s_vi.shape:
        raise ValueError(f"xor_masks: structure maps differ in shape: {tuple(s_ir.shape)} vs {tuple(s_vi.shape)}")
    return s_ir * (1 - s_vi), s_vi * (1 - s_ir)
