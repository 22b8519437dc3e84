"""RGB <-> YCbCr, ITU-R BT.601 full range, OpenCV's ``COLOR_RGB2YCrCb`` convention.

    Y  = 0.299 R + 0.587 G + 0.114 B
    Cr = (R - Y) * 0.713 + delta
    Cb = (B - Y) * 0.564 + delta

with ``delta = 128`` on the 0..255 scale and ``0.5`` on the 0..1 scale. The inverse used here is
the exact algebraic inverse of those three lines (R = Y + (Cr - delta) / 0.713, B = Y + (Cb -
delta) / 0.564, G = (Y - 0.299 R - 0.114 B) / 0.587), so a float round trip is exact to rounding
error and a uint8 round trip is within 1/255 per channel.

Channel order everywhere in fuseseg is **Y, Cb, Cr** (note: OpenCV returns Y, Cr, Cb).
"""
from __future__ import annotations

import numpy as np
import torch

KR, KG, KB = 0.299, 0.587, 0.114
CR_SCALE, CB_SCALE = 0.713, 0.564


def _delta(arr) -> float:
    return 128.0 if (isinstance(arr, np.ndarray) and arr.dtype == np.uint8) else 0.5


def rgb_to_ycbcr_np(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) RGB -> (H, W, 3) Y, Cb, Cr.

    uint8 input gives float32 on the 0..255 scale (delta 128); float input in [0, 1] gives float
    in [0, 1] (delta 0.5)."""
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB array, got shape {rgb.shape}")
    delta = _delta(rgb)
    x = rgb.astype(np.float32) if rgb.dtype == np.uint8 else rgb
    r, g, b = x[..., 0], x[..., 1], x[..., 2]
    y = KR * r + KG * g + KB * b
    cb = (b - y) * CB_SCALE + delta
    cr = (r - y) * CR_SCALE + delta
    return np.stack([y, cb, cr], axis=-1)


def ycbcr_to_rgb_np(ycbcr: np.ndarray, *, scale: str = "unit") -> np.ndarray:
    """(H, W, 3) Y, Cb, Cr -> RGB float, the exact inverse of :func:`rgb_to_ycbcr_np`.

    ``scale='unit'`` for [0, 1] data (delta 0.5), ``'255'`` for 0..255 data (delta 128). The
    result is not clipped."""
    delta = 0.5 if scale == "unit" else 128.0
    y, cb, cr = ycbcr[..., 0], ycbcr[..., 1], ycbcr[..., 2]
    r = y + (cr - delta) / CR_SCALE
    b = y + (cb - delta) / CB_SCALE
    g = (y - KR * r - KB * b) / KG
    return np.stack([r, g, b], axis=-1)


def rgb_to_ycbcr(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in [0, 1] -> (B, 3, H, W) Y, Cb, Cr in [0, 1]. Differentiable."""
    if rgb.ndim != 4 or rgb.shape[1] != 3:
        raise ValueError(f"expected a (B, 3, H, W) RGB tensor, got shape {tuple(rgb.shape)}")
    r, g, b = rgb[:, 0:1], rgb[:, 1:2], rgb[:, 2:3]
    y = KR * r + KG * g + KB * b
    cb = (b - y) * CB_SCALE + 0.5
    cr = (r - y) * CR_SCALE + 0.5
    return torch.cat([y, cb, cr], dim=1)


def ycbcr_to_rgb(ycbcr: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) Y, Cb, Cr in [0, 1] -> (B, 3, H, W) RGB (not clipped)."""
    y, cb, cr = ycbcr[:, 0:1], ycbcr[:, 1:2], ycbcr[:, 2:3]
    r = y + (cr - 0.5) / CR_SCALE
    b = y + (cb - 0.5) / CB_SCALE
    g = (y - KR * r - KB * b) / KG
    return torch.cat([r, g, b], dim=1)


def recolour(fused_y: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Put a fused luminance back into the visible image's colour.

    fused_y (B, 1, H, W) in [0, 1]; visible (B, C, H, W), C = 1 (grey: the result is fused_y) or
    3 (RGB: the result is RGB from fused_y with the visible Cb/Cr). Output clipped to [0, 1]."""
    if visible.shape[1] == 1:
        return fused_y.clamp(0, 1)
    cbcr = rgb_to_ycbcr(visible)[:, 1:]
    return ycbcr_to_rgb(torch.cat([fused_y, cbcr], dim=1)).clamp(0, 1)


def luminance(visible: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) visible, C in {1, 3} -> (B, 1, H, W) Y (BT.601 weights for RGB)."""
    if visible.shape[1] == 1:
        return visible
    return KR * visible[:, 0:1] + KG * visible[:, 1:2] + KB * visible[:, 2:3]
