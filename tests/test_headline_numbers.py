"""Tests for the numbers the README promises, against independent references: the paired
bootstrap of the mIoU gain (value and coverage), the multi-seed aggregation, Dice + CE, and the
SPF step of SSPFusion (each modality's features enhanced with its own unique-structure mask)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.report import bootstrap_gain, miou_markdown, miou_rows


def np_miou(cm: np.ndarray, exclude_background: bool = False) -> float:
    """mIoU of a confusion matrix (rows = truth), float64, classes absent from both labels and
    predictions left out (never counted as IoU 1)."""
    cm = np.asarray(cm, dtype=np.float64)
    inter = np.diag(cm)
    union = cm.sum(0) + cm.sum(1) - inter
    iou = [i / u for k, (i, u) in enumerate(zip(inter, union)) if u > 0 and not (exclude_background and k == 0)]
    return float(np.mean(iou))


# ------------------------------------------------------------------ bootstrap
def per_image_cms(rng, n: int, acc_lo: float, acc_hi: float, shift: float = 0.0, noise: float = 0.0,
                  base: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2, 2) per-image confusion matrices of 100 pixels (50 per class); per-image accuracy
    uniform in [acc_lo, acc_hi] or ``base + shift + noise`` (paired with another variant)."""
    if base is not None:
        n = len(base)
    acc = rng.uniform(acc_lo, acc_hi, n) if base is None else np.clip(base + shift + noise * rng.standard_normal(n), 0, 1)
    cm = np.zeros((n, 2, 2))
    cm[:, 0, 0] = cm[:, 1, 1] = 50 * acc
    cm[:, 0, 1] = cm[:, 1, 0] = 50 * (1 - acc)
    return cm, acc


def test_bootstrap_gain_is_the_miou_difference_to_the_better_single_modality():
    rng = np.random.default_rng(0)
    ir, _ = per_image_cms(rng, 12, 0.3, 0.6)
    vi, acc = per_image_cms(rng, 12, 0.5, 0.9)
    fused, _ = per_image_cms(rng, 12, 0, 0, shift=0.05, noise=0.05, base=acc)
    g = bootstrap_gain({"ir": ir, "vi": vi, "f": fused}, "f", n_boot=200, seed=1)
    assert g["baseline"] == "vi"
    assert g["gain"] == pytest.approx(np_miou(fused.sum(0)) - np_miou(vi.sum(0)), abs=1e-12)
    assert g["ci_low"] <= g["gain"] <= g["ci_high"]
    # the other way round: the better single modality is chosen on the whole test set
    g2 = bootstrap_gain({"ir": vi, "vi": ir, "f": fused}, "f", n_boot=10)
    assert g2["baseline"] == "ir" and g2["gain"] == pytest.approx(g["gain"], abs=1e-12)
    assert "frac_resamples_gain_le_0" in g and "p_gain_le_0" not in g   # not called a p-value


def test_bootstrap_interval_covers_the_true_gain():
    """Data sets of 40 images drawn from a known population: the 90 % interval must contain the
    population gain in about 90 % of them (binomial tolerance for 150 data sets)."""
    rng = np.random.default_rng(42)
    # the population gain: mIoU of the expected confusion matrices (the limit of the summed ones)
    big_vi, acc = per_image_cms(rng, 400_000, 0.5, 0.9)
    big_f, _ = per_image_cms(rng, 0, 0, 0, shift=0.04, noise=0.08, base=acc)
    truth = np_miou(big_f.mean(0)) - np_miou(big_vi.mean(0))
    assert truth > 0.02
    hits, reps = 0, 150
    for r in range(reps):
        vi, acc = per_image_cms(rng, 40, 0.5, 0.9)
        fused, _ = per_image_cms(rng, 40, 0, 0, shift=0.04, noise=0.08, base=acc)
        ir = vi * 0 + np.array([[10.0, 40.0], [40.0, 10.0]])     # a clearly worse single modality
        g = bootstrap_gain({"ir": ir, "vi": vi, "f": fused}, "f", n_boot=300, seed=r, level=0.90)
        hits += g["ci_low"] <= truth <= g["ci_high"]
    # 0.90 +- ~3 binomial standard deviations (0.0245 each); a percentile interval of a ratio
    # estimator may under-cover slightly
    assert 0.80 <= hits / reps <= 0.98, hits / reps


def test_gain_table_does_not_call_the_bootstrap_share_a_p_value(tmp_path):
    from pipelines.report import write_miou_tables

    g = {"variant": "f", "baseline": "vi", "gain": 0.01, "ci_low": -0.01, "ci_high": 0.03, "level": 0.95,
         "n_boot": 100, "n_images": 5, "frac_resamples_gain_le_0": 0.2}
    write_miou_tables(tmp_path, [], [], "p", {}, [g])
    md = (tmp_path / "miou.md").read_text()
    assert "P(gain" not in md and "resamples with gain <= 0" in md and "0.200" in md


# ------------------------------------------------------------------ seeds
def test_multi_seed_rows_are_mean_and_spread_of_the_seeds():
    rng = np.random.default_rng(3)
    runs = []
    for _ in range(2):        # seg_seeds: [0, 1]
        per = list(rng.uniform(0, 1, 3))
        runs.append({"per_class_iou": per, "miou": float(np.mean(per)), "pixel_accuracy": float(rng.uniform())})
    runs[1]["per_class_iou"][2] = None     # class 2 absent for seed 1
    row = miou_rows({"v": runs}, ["a", "b", "c"])[0]
    mious = [r["miou"] for r in runs]
    assert row["seeds"] == 2
    assert row["miou"][0] == pytest.approx((mious[0] + mious[1]) / 2)
    assert row["miou"][1] == pytest.approx(abs(mious[0] - mious[1]) / 2)     # population spread of 2 values
    acc = [r["pixel_accuracy"] for r in runs]
    assert row["pixel_accuracy"] == pytest.approx(((acc[0] + acc[1]) / 2, abs(acc[0] - acc[1]) / 2))
    b = [r["per_class_iou"][1] for r in runs]
    assert row["per_class"]["b"] == pytest.approx(((b[0] + b[1]) / 2, abs(b[0] - b[1]) / 2))
    assert row["per_class"]["c"] == pytest.approx((runs[0]["per_class_iou"][2], 0.0))  # the seed that saw it
    md = miou_markdown([row], ["a", "b", "c"], "proto")
    assert f"{row['miou'][0]:.3f} ± {row['miou'][1]:.3f}" in md


# ------------------------------------------------------------------ Dice + CE
def hand_dice_ce(logits: np.ndarray, target: np.ndarray, ignore: int = 255) -> tuple[float, float]:
    """float64 reference: CE = mean over non-ignored pixels of -log softmax[gt]; Dice = mean over
    classes of 1 - 2 sum(p g) / sum(p + g) over non-ignored pixels of the batch, 0 for a class
    absent from the labels."""
    x = logits.astype(np.float64)
    p = np.exp(x - x.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    keep = target != ignore
    b, c = logits.shape[:2]
    ce_terms = [-np.log(p[i, target[i, y, x_], y, x_]) for i in range(b)
                for y in range(target.shape[1]) for x_ in range(target.shape[2]) if keep[i, y, x_]]
    ce = float(np.mean(ce_terms)) if ce_terms else 0.0
    dice = []
    for k in range(c):
        g = (target == k) & keep
        if not g.any():
            dice.append(0.0)
            continue
        pk = p[:, k] * keep
        dice.append(1 - 2 * (pk * g).sum() / (pk.sum() + g.sum()))
    return ce, float(np.mean(dice))


def test_dice_ce_against_a_hand_computation_with_ignored_pixels():
    from segmentation.losses import DiceCELoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 6, generator=g)
    target = torch.randint(0, 3, (2, 5, 6), generator=g)     # class 3 absent
    target[0, 0, :] = 255
    target[1, :, 0] = 255
    loss = DiceCELoss(ce_weight=0.7, dice_weight=1.3)
    total, ce, dice = loss(logits, target)
    ce_ref, dice_ref = hand_dice_ce(logits.numpy(), target.numpy())
    assert float(ce) == pytest.approx(ce_ref, rel=1e-5)
    assert float(dice) == pytest.approx(dice_ref, rel=1e-5)
    assert float(total) == pytest.approx(0.7 * ce_ref + 1.3 * dice_ref, rel=1e-5)
    # ignored pixels are ignored by both terms: any logits there give the same loss
    other = logits.clone()
    ignored = (target == 255)[:, None].expand_as(other)
    other[ignored] = torch.randn(int(ignored.sum()), generator=g) * 9
    t2, ce2, dice2 = loss(other, target)
    assert float(ce2) == pytest.approx(float(ce), abs=1e-6) and float(dice2) == pytest.approx(float(dice), abs=1e-6)
    # and a target without the 255s differs (the test can fail)
    assert float(loss(logits, target.clamp(max=2))[1]) != pytest.approx(float(ce), abs=1e-6)


def test_dice_ce_on_an_all_ignored_batch_is_zero_with_finite_gradients():
    from segmentation.losses import DiceCELoss

    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.full((2, 4, 4), 255)
    total, ce, dice = DiceCELoss()(logits, target)
    assert float(total.detach()) == 0.0 and float(ce) == 0.0 and float(dice) == 0.0
    total.backward()
    assert torch.isfinite(logits.grad).all() and float(logits.grad.abs().sum()) == 0.0


# ------------------------------------------------------------------ SPF step
class _Recorded(Exception):
    pass


def test_spf_enhances_each_modality_with_its_own_unique_structure_mask():
    """F^ = F + M F with M_ir = S_ir (1 - S_vi) for the infrared and M_vi = S_vi (1 - S_ir) for
    the visible, on hand-made features and structure maps: a model that swapped the masks (or
    used the XOR for both) fails."""
    from fusion.models.sspfusion import SSPFusion

    m = SSPFusion(levels=1, channels=[2, 2], structure_map="threshold").eval()    # S = [P > 0.5]
    h = w = 4
    f_ir = [torch.full((1, 2, 2 * h, 2 * w), 9.0), torch.arange(1.0, 1 + 2 * h * w).view(1, 2, h, w)]
    f_vi = [torch.full((1, 2, 2 * h, 2 * w), 7.0), -torch.arange(1.0, 1 + 2 * h * w).view(1, 2, h, w) * 10]
    s_ir = torch.tensor([[1, 1, 0, 0]] * 4, dtype=torch.float32).view(1, 1, h, w)   # left half
    s_vi = torch.tensor([[1, 0, 1, 0]] * 4, dtype=torch.float32).view(1, 1, h, w)   # columns 0 and 2
    m.enc_ir.encode = lambda x: f_ir
    m.enc_vi.encode = lambda x: f_vi
    m.enc_ir.structure = lambda x, stem=None: [0.2 + 0.6 * s_ir]   # soft maps on either side of 0.5
    m.enc_vi.structure = lambda x, stem=None: [0.2 + 0.6 * s_vi]
    seen = {}

    class Record(torch.nn.Module):
        def __init__(self, k):
            super().__init__()
            self.k = k

        def forward(self, x):
            seen[self.k] = x.clone()
            if self.k == 1:
                raise _Recorded
            return x[:, :2]

    m.merge[0], m.merge[1] = Record(0), Record(1)
    with pytest.raises(_Recorded):
        m._run(torch.zeros(1, 1, 2 * h, 2 * w), torch.zeros(1, 1, 2 * h, 2 * w), need_structure=False)
    torch.testing.assert_close(seen[0], torch.cat([f_ir[0], f_vi[0]], 1))   # level 0: no SPF
    m_ir = s_ir * (1 - s_vi)            # column 1 only
    m_vi = s_vi * (1 - s_ir)            # column 2 only
    expect = torch.cat([f_ir[1] + m_ir * f_ir[1], f_vi[1] + m_vi * f_vi[1]], 1)
    torch.testing.assert_close(seen[1], expect, rtol=0, atol=0)
    swapped = torch.cat([f_ir[1] + m_vi * f_ir[1], f_vi[1] + m_ir * f_vi[1]], 1)
    assert not torch.equal(seen[1], swapped)
    assert F.l1_loss(seen[1], torch.cat(f_ir[1:] + f_vi[1:], 1)) > 0          # SPF did change something
