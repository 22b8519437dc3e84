"""Dice + cross-entropy loss (the paper's segmentation loss), 255 ignored by both terms."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from segmentation_models_pytorch.losses import DiceLoss
from torch import nn

from fuseseg.data.pairs import IGNORE_INDEX


class DiceCELoss(nn.Module):
    """``ce_weight * CE + dice_weight * Dice``.

    CE: mean over non-ignored pixels of ``-log softmax(logits)[gt]``. Dice: smp's multiclass soft
    Dice, ``1 - 2 sum(p*g) / (sum(p) + sum(g))`` per class over the batch, averaged over classes
    (classes absent from the batch's labels contribute 0), ignored pixels masked out.
    ``forward(logits (B, C, H, W), target (B, H, W) int64)`` -> ``(total, ce, dice)`` scalars,
    computed in float32 (also under autocast)."""

    def __init__(self, ce_weight: float = 1.0, dice_weight: float = 1.0,
                 ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.ce_weight, self.dice_weight, self.ignore_index = ce_weight, dice_weight, ignore_index
        self.dice = DiceLoss(mode="multiclass", from_logits=True, ignore_index=ignore_index)

    def forward(self, logits: torch.Tensor, target: torch.Tensor):
        logits = logits.float()
        ce = F.cross_entropy(logits, target, ignore_index=self.ignore_index)
        if not (target != self.ignore_index).any():  # an all-ignored batch: no signal, not NaN
            ce = logits.sum() * 0.0
        dice = self.dice(logits, target)
        return self.ce_weight * ce + self.dice_weight * dice, ce.detach(), dice.detach()
