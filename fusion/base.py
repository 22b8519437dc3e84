"""Helpers shared by fusion methods (the contract itself is in :mod:`fusion.registry`)."""
from __future__ import annotations

import torch
from torch import nn

from fuseseg.data.colour import luminance, recolour


class LuminanceFusion(nn.Module):
    """Base class for methods that fuse the infrared with the visible luminance.

    Subclasses implement ``fuse_y(ir, vi_y) -> fused_y`` on (B, 1, H, W) tensors in [0, 1].
    ``forward(ir, vi)`` follows the fusion contract: grey in, grey out; RGB in, RGB out with the
    visible chroma."""

    def fuse_y(self, ir: torch.Tensor, vi_y: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, ir: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
        check_inputs(ir, vi)
        fused_y = self.fuse_y(ir, luminance(vi)).clamp(0, 1)
        return recolour(fused_y, vi)


def check_inputs(ir: torch.Tensor, vi: torch.Tensor) -> None:
    """Raise a ValueError if ``ir``/``vi`` break the fusion contract's shapes."""
    if ir.ndim != 4 or ir.shape[1] != 1:
        raise ValueError(f"infrared must be (B, 1, H, W), got {tuple(ir.shape)}")
    if vi.ndim != 4 or vi.shape[1] not in (1, 3):
        raise ValueError(f"visible must be (B, 1 or 3, H, W), got {tuple(vi.shape)}")
    if ir.shape[0] != vi.shape[0] or ir.shape[-2:] != vi.shape[-2:]:
        raise ValueError(f"infrared {tuple(ir.shape)} and visible {tuple(vi.shape)} differ in batch or size")
