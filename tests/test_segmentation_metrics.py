"""mIoU from one confusion matrix: hand-computed cases, absent classes, ignore pixels, and
agreement with segmentation-models-pytorch's stats where the conventions coincide."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from segmentation.metrics import confusion_matrix, iou_from_confusion, miou, pixel_accuracy
from segmentation.palette import colorize, palette

GT = np.array([[0, 0, 1, 1],
               [0, 2, 2, 1],
               [255, 2, 2, 255]])
PRED = np.array([[0, 1, 1, 1],
                 [0, 2, 1, 1],
                 [0, 2, 0, 2]])
# by hand: (gt, pred) over the 10 non-ignored pixels
CM = np.array([[2, 1, 0],
               [0, 3, 0],
               [1, 1, 2]])


def test_confusion_matrix_by_hand_numpy_and_torch():
    cm = confusion_matrix(GT, PRED, 3)
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, CM)
    assert cm.sum() == 10  # the two 255 pixels are skipped
    cmt = confusion_matrix(torch.from_numpy(GT), torch.from_numpy(PRED), 3)
    assert isinstance(cmt, torch.Tensor)
    np.testing.assert_array_equal(cmt.numpy(), CM)


def test_iou_miou_accuracy_by_hand():
    # IoU_k = TP / (TP + FP + FN): class 0: 2/(2+1+2) ... computed from rows/cols of CM
    iou = iou_from_confusion(CM)
    np.testing.assert_allclose(iou, [2 / 4, 3 / 5, 2 / 4])
    assert miou(CM, "all") == pytest.approx((0.5 + 0.6 + 0.5) / 3)
    assert miou(CM, "exclude_background") == pytest.approx((0.6 + 0.5) / 2)
    assert pixel_accuracy(CM) == pytest.approx(7 / 10)


def test_absent_class_is_nan_and_left_out_never_one():
    cm = confusion_matrix(GT, PRED, 4)  # class 3 appears in neither map
    iou = iou_from_confusion(cm)
    assert math.isnan(iou[3])
    assert miou(cm, "all") == pytest.approx((0.5 + 0.6 + 0.5) / 3)  # not (1.6 + 1) / 4
    # a class only predicted (never labelled) has IoU 0 and counts in the mean
    pred = PRED.copy()
    pred[0, 0] = 3
    iou2 = iou_from_confusion(confusion_matrix(GT, pred, 4))
    assert iou2[3] == 0.0
    np.testing.assert_allclose(iou2[:3], [1 / 4, 3 / 5, 2 / 4])
    assert miou(confusion_matrix(GT, pred, 4)) == pytest.approx((0.25 + 0.6 + 0.5 + 0) / 4)
    # nothing present at all
    assert math.isnan(miou(np.zeros((3, 3), dtype=np.int64)))
    assert math.isnan(pixel_accuracy(np.zeros((3, 3))))


def test_random_maps_against_float64_loops():
    rng = np.random.default_rng(1)
    gt = rng.integers(0, 5, (3, 7, 9))
    gt[rng.random(gt.shape) < 0.1] = 255
    pred = rng.integers(0, 5, gt.shape)
    cm = confusion_matrix(gt, pred, 5)
    ref = np.zeros((5, 5))
    for g, p in zip(gt.ravel(), pred.ravel(), strict=True):
        if g != 255:
            ref[g, p] += 1
    np.testing.assert_array_equal(cm, ref)
    for k in range(5):
        tp = float(np.sum((gt == k) & (pred == k)))
        fp = float(np.sum((gt != k) & (gt != 255) & (pred == k)))
        fn = float(np.sum((gt == k) & (pred != k)))
        assert iou_from_confusion(cm)[k] == pytest.approx(tp / (tp + fp + fn), rel=1e-12)


def test_agrees_with_smp_summed_stats():
    """smp's per-class IoU from stats summed over the whole set (= its 'macro' reduction) is the
    field's one-confusion-matrix IoU; only absent classes differ (smp: 1.0, here: NaN)."""
    smp = pytest.importorskip("segmentation_models_pytorch")
    rng = np.random.default_rng(2)
    n, c = 4, 9
    gt = rng.integers(0, c, (n, 16, 20))
    gt[rng.random(gt.shape) < 0.15] = 255
    pred = np.where(rng.random(gt.shape) < 0.6, np.where(gt == 255, 0, gt), rng.integers(0, c, gt.shape))
    tp, fp, fn, tn = smp.metrics.get_stats(torch.from_numpy(pred).long(), torch.from_numpy(gt).long(),
                                           mode="multiclass", num_classes=c, ignore_index=255)
    cm = confusion_matrix(gt, pred, c)
    per_class = smp.metrics.iou_score(tp.sum(0), fp.sum(0), fn.sum(0), tn.sum(0), reduction=None)
    np.testing.assert_allclose(iou_from_confusion(cm), per_class.double().numpy(), rtol=1e-6)
    macro = smp.metrics.iou_score(tp, fp, fn, tn, reduction="macro")
    assert miou(cm, "all") == pytest.approx(float(macro), rel=1e-6)
    # per-image averaging ('macro-imagewise') is a different number: not the protocol
    imagewise = float(smp.metrics.iou_score(tp, fp, fn, tn, reduction="macro-imagewise"))
    assert abs(imagewise - miou(cm)) > 1e-4

    # an absent class: smp counts it as IoU 1 (zero_division=1), the protocol leaves it out
    gt2, pred2 = np.minimum(gt, 7), np.minimum(pred, 7)
    gt2[gt == 255] = 255
    tp, fp, fn, tn = smp.metrics.get_stats(torch.from_numpy(pred2).long(), torch.from_numpy(gt2).long(),
                                           mode="multiclass", num_classes=c, ignore_index=255)
    smp_iou = smp.metrics.iou_score(tp.sum(0), fp.sum(0), fn.sum(0), tn.sum(0), reduction=None)
    ours = iou_from_confusion(confusion_matrix(gt2, pred2, c))
    assert float(smp_iou[8]) == 1.0 and math.isnan(ours[8])
    np.testing.assert_allclose(ours[:8], smp_iou[:8].double().numpy(), rtol=1e-6)


def test_out_of_range_values_raise():
    with pytest.raises(ValueError, match=r"ground-truth values \[7\]"):
        confusion_matrix(np.array([0, 7]), np.array([0, 1]), 3)
    with pytest.raises(ValueError, match=r"predicted values \[5\]"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 5]), 3)
    with pytest.raises(ValueError, match="differ in shape"):
        confusion_matrix(np.zeros((2, 2)), np.zeros((2, 3)), 3)
    with pytest.raises(ValueError, match="unknown mIoU convention"):
        miou(CM, "mean")


def test_palette_distinct_and_colorize():
    for c in (9, 30):
        pal = palette(c)
        assert pal.shape == (c, 3) and len({tuple(x) for x in pal.tolist()}) == c
    lab = np.array([[0, 1], [8, 255]], dtype=np.uint8)
    rgb = colorize(lab, 9)
    assert rgb.shape == (2, 2, 3)
    np.testing.assert_array_equal(rgb[0, 1], palette(9)[1])
    np.testing.assert_array_equal(rgb[1, 1], [255, 255, 255])
