"""Segmentation metrics from one confusion matrix: per-class IoU, mIoU, pixel accuracy.

The field's protocol (MSRS papers): accumulate **one** confusion matrix over every pixel of the
whole test set, then compute IoU per class from it, then average the classes (not a mean of
per-image IoUs). Conventions:

* ``"all"``: the mean over all classes, class 0 (``unlabelled``) included (the field's number);
* ``"exclude_background"``: the mean over classes 1..C-1.

A class that appears neither in the labels nor in the predictions has IoU 0/0: it is reported as
absent (NaN here, ``None`` in JSON) and left out of the mean, never counted as IoU 1.

Everything here is a pure function of arrays; numpy in, numpy out (torch in, torch out for
:func:`confusion_matrix`, so it can run on the GPU during validation).
"""
from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Convention = Literal["all", "exclude_background"]
CONVENTIONS: tuple[str, ...] = ("all", "exclude_background")
IGNORE_INDEX = 255


def confusion_matrix(gt, pred, num_classes: int, ignore_index: int | None = IGNORE_INDEX):
    """Confusion matrix of integer label maps.

    ``gt`` and ``pred``: integer arrays of the same shape (any, e.g. (H, W) or (B, H, W)); numpy
    arrays or torch tensors (then on any device). Pixels whose ``gt`` equals ``ignore_index`` are
    skipped. Returns ``cm`` of shape (C, C), int64, with ``cm[i, j]`` = number of pixels whose
    ground truth is class ``i`` and prediction is class ``j`` (rows: ground truth, columns:
    prediction); computed as ``bincount(C * gt + pred, minlength=C*C).reshape(C, C)``.

    Raises ValueError when shapes differ, or a (non-ignored) value lies outside ``0..C-1``.
    """
    if tuple(gt.shape) != tuple(pred.shape):
        raise ValueError(f"confusion_matrix: ground truth {tuple(gt.shape)} and prediction "
                         f"{tuple(pred.shape)} differ in shape")
    c = int(num_classes)
    if isinstance(gt, torch.Tensor):
        g = gt.reshape(-1).long()
        p = pred.reshape(-1).long().to(g.device)
        if ignore_index is not None:
            keep = g != ignore_index
            g, p = g[keep], p[keep]
        if g.numel() and (int(g.min()) < 0 or int(g.max()) >= c):
            bad = torch.unique(g[(g < 0) | (g >= c)])[:10].tolist()
            raise ValueError(f"confusion_matrix: ground-truth values {bad} outside 0..{c - 1} "
                             f"(and not the ignore index {ignore_index})")
        if p.numel() and (int(p.min()) < 0 or int(p.max()) >= c):
            bad = torch.unique(p[(p < 0) | (p >= c)])[:10].tolist()
            raise ValueError(f"confusion_matrix: predicted values {bad} outside 0..{c - 1}")
        return torch.bincount(c * g + p, minlength=c * c).reshape(c, c)
    g = np.asarray(gt).reshape(-1).astype(np.int64)
    p = np.asarray(pred).reshape(-1).astype(np.int64)
    if ignore_index is not None:
        keep = g != ignore_index
        g, p = g[keep], p[keep]
    if g.size and (g.min() < 0 or g.max() >= c):
        bad = np.unique(g[(g < 0) | (g >= c)])[:10].tolist()
        raise ValueError(f"confusion_matrix: ground-truth values {bad} outside 0..{c - 1} "
                         f"(and not the ignore index {ignore_index})")
    if p.size and (p.min() < 0 or p.max() >= c):
        bad = np.unique(p[(p < 0) | (p >= c)])[:10].tolist()
        raise ValueError(f"confusion_matrix: predicted values {bad} outside 0..{c - 1}")
    return np.bincount(c * g + p, minlength=c * c).reshape(c, c).astype(np.int64)


def _as_numpy(cm) -> np.ndarray:
    if isinstance(cm, torch.Tensor):
        cm = cm.detach().cpu().numpy()
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"expected a square (C, C) confusion matrix, got shape {cm.shape}")
    return cm


def iou_from_confusion(cm) -> np.ndarray:
    """Per-class intersection over union from a (C, C) confusion matrix (rows: ground truth).

    ``IoU_k = TP_k / (TP_k + FP_k + FN_k)`` with ``TP_k = cm[k, k]``, ``FP_k = sum_i cm[i, k] - TP_k``
    (column sum minus diagonal), ``FN_k = sum_j cm[k, j] - TP_k`` (row sum minus diagonal).
    Returns a float64 array of shape (C,), values in [0, 1]; NaN for a class absent from both
    labels and predictions (denominator 0).
    """
    cm = _as_numpy(cm)
    tp = np.diag(cm)
    denom = cm.sum(axis=0) + cm.sum(axis=1) - tp
    out = np.full(cm.shape[0], np.nan)
    present = denom > 0
    out[present] = tp[present] / denom[present]
    return out


def miou(cm, convention: Convention = "all") -> float:
    """Mean IoU over the classes of the ``convention`` (see module docstring), absent classes
    (NaN IoU) left out: ``mean_{k in K, k present} IoU_k`` with ``K = 0..C-1`` (``"all"``) or
    ``1..C-1`` (``"exclude_background"``). NaN when no class of ``K`` is present."""
    iou = iou_from_confusion(cm)
    if convention == "all":
        sel = iou
    elif convention == "exclude_background":
        sel = iou[1:]
    else:
        raise ValueError(f"unknown mIoU convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    sel = sel[~np.isnan(sel)]
    return float(sel.mean()) if sel.size else float("nan")


def pixel_accuracy(cm) -> float:
    """Fraction of (non-ignored) pixels predicted correctly: ``trace(cm) / sum(cm)``; NaN for an
    empty matrix."""
    cm = _as_numpy(cm)
    total = cm.sum()
    return float(np.trace(cm) / total) if total > 0 else float("nan")
