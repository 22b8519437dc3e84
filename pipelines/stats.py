"""Significance tests and rank correlations of the report, as pure numpy functions.

* :func:`paired_miou_test` -- is the mIoU of variant A different from that of variant B on the
  same test images? A paired permutation (sign-flip) test over test images, seeds pooled;
* :func:`holm` -- Holm's step-down correction of a family of p-values;
* :func:`pairwise_tests` -- every pair of variants, Holm-corrected over the pairs;
* :func:`rank_correlation` -- Spearman's rho or Kendall's tau-b between two vectors with a
  permutation p-value (exact for up to 8 values), and whether the count allows a conclusion.

The two-sided p-value convention is scipy's (``scipy.stats.permutation_test``): twice the
smaller one-sided p-value, capped at 1; a randomised null distribution counts the observed
arrangement once (``(k + 1) / (N + 1)``), an enumerated one does not (``k / N``).
"""
from __future__ import annotations

import itertools
import math

import numpy as np

MAX_EXACT = 50_000      # enumerate every arrangement up to this many (8! = 40,320; 2^15 = 32,768)


def miou_batch(cms: np.ndarray, convention: str = "all") -> np.ndarray:
    """mIoU of a stack of confusion matrices (rows: ground truth), vectorised.

    ``cms``: (..., C, C), non-negative counts. ``IoU_k = cm[k,k] / (row_k + col_k - cm[k,k])``;
    classes with a zero denominator (absent from labels and predictions) are left out of the mean
    (convention ``"all"``: classes 0..C-1; ``"exclude_background"``: 1..C-1). Returns (...)
    float64 in [0, 1], NaN where no class of the convention is present -- per matrix the same value
    as :func:`segmentation.metrics.miou`."""
    cms = np.asarray(cms, dtype=np.float64)
    tp = np.diagonal(cms, axis1=-2, axis2=-1)
    denom = cms.sum(-1) + cms.sum(-2) - tp
    if convention == "exclude_background":
        tp, denom = tp[..., 1:], denom[..., 1:]
    elif convention != "all":
        raise ValueError(f"unknown mIoU convention {convention!r}; valid: all, exclude_background")
    present = denom > 0
    iou = np.where(present, tp / np.where(present, denom, 1.0), 0.0)
    count = present.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, iou.sum(-1) / count, np.nan)


def _two_sided(null: np.ndarray, observed: float, adjustment: int) -> float:
    """scipy's two-sided permutation p-value of ``observed`` against the null values ``null``:
    ``min(1, 2 min(P(T* <= t), P(T* >= t)))`` with a relative tolerance of 100 machine epsilons."""
    gamma = abs(observed) * 100 * np.finfo(np.float64).eps
    n = null.size
    less = (np.count_nonzero(null <= observed + gamma) + adjustment) / (n + adjustment)
    greater = (np.count_nonzero(null >= observed - gamma) + adjustment) / (n + adjustment)
    return float(min(1.0, 2 * min(less, greater)))


def _min_p(null: np.ndarray, adjustment: int) -> float:
    """The smallest two-sided p-value this null distribution can give (at its extremes)."""
    return min(_two_sided(null, float(null.max()), adjustment), _two_sided(null, float(null.min()), adjustment))


def paired_miou_test(a: np.ndarray, b: np.ndarray, n_resamples: int = 9999, seed: int = 0,
                     convention: str = "all") -> dict:
    """Paired permutation (sign-flip) test of ``mIoU(A) - mIoU(B)`` over test images.

    ``a``, ``b``: (n, C, C) per-image confusion matrices of the two variants on the same n test
    images in the same order, each pooled over the variant's segmentation seeds (summed, or
    averaged where the variants have different numbers of seeds).
    Statistic: ``T = mIoU(sum_i a_i) - mIoU(sum_i b_i)``, the difference of the mIoUs the table
    reports. Null hypothesis: per image, the two variants' results are exchangeable; each null
    arrangement swaps ``a_i`` and ``b_i`` for a subset of images. All ``2^n`` subsets are
    enumerated when ``2^n <= n_resamples`` (exact), else ``n_resamples`` random ones are drawn
    (each image swapped with probability 1/2, generator seeded by ``seed``). The test covers the
    sampling of test images; seed-to-seed noise only enters through the pooled matrices (see the
    report's seed column). Returns {statistic, pvalue (two-sided, in (0, 1]), n_images,
    n_resamples, exact, min_pvalue}."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 3:
        raise ValueError(f"paired_miou_test needs two (n, C, C) stacks of the same shape, got {a.shape} and {b.shape}")
    n = a.shape[0]
    d = (a - b).reshape(n, -1)                                       # (n, C*C)
    sa, sb = a.sum(0).reshape(-1), b.sum(0).reshape(-1)
    exact = n <= 62 and 2 ** n <= n_resamples
    if exact:
        swap = ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1).astype(np.float64)   # (2^n, n)
    else:
        swap = np.random.default_rng(seed).integers(0, 2, size=(n_resamples, n)).astype(np.float64)
    shape = a.shape[1:]
    null = np.empty(swap.shape[0])
    for start in range(0, swap.shape[0], 4096):                      # bounded memory: 4096 x C*C at a time
        s = swap[start:start + 4096]
        moved = s @ d                                                # what the swapped images take from A
        null[start:start + 4096] = (miou_batch((sa - moved).reshape(-1, *shape), convention)
                                    - miou_batch((sb + moved).reshape(-1, *shape), convention))
    observed = float(miou_batch(a.sum(0), convention) - miou_batch(b.sum(0), convention))
    adj = 0 if exact else 1
    return {"statistic": observed, "pvalue": _two_sided(null, observed, adj), "n_images": int(n),
            "n_resamples": int(swap.shape[0]), "exact": bool(exact), "min_pvalue": _min_p(null, adj)}


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error rate), in the input order.

    With the m p-values sorted ascending, ``p_(1) <= ... <= p_(m)``:
    ``adj_(j) = max_{i <= j} min(1, (m - i + 1) p_(i))``. Rejecting where ``adj < alpha`` controls
    the chance of any false rejection at alpha. NaN p-values are passed through and not counted."""
    p = np.asarray(pvalues, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = ok.size
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = np.minimum(1.0, (m - np.arange(m)) * p[order])
    out[order] = np.maximum.accumulate(scaled)
    return out


def pairwise_tests(per_image: dict[str, np.ndarray], variants: list[str], n_resamples: int = 9999,
                   seed: int = 0, convention: str = "all") -> list[dict]:
    """:func:`paired_miou_test` for every pair (i < j in ``variants`` order) of the variants in
    ``per_image`` (variant -> (n, C, C) per-image confusion matrices, seeds summed), with Holm's
    correction over all the pairs. Each result: {a, b, statistic (= mIoU(a) - mIoU(b)), pvalue,
    p_holm, ...}; the same seed for every pair."""
    names = [v for v in variants if v in per_image]
    out = []
    for x, y in itertools.combinations(names, 2):
        r = paired_miou_test(per_image[x], per_image[y], n_resamples=n_resamples, seed=seed, convention=convention)
        out.append({"a": x, "b": y, **r})
    for r, adj in zip(out, holm([r["pvalue"] for r in out])):
        r["p_holm"] = float(adj)
    return out


def rankdata(x) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties given the average of the ranks they span (as
    ``scipy.stats.rankdata(method='average')``)."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(x.size)
    xs = x[order]
    start = 0
    for end in range(1, x.size + 1):
        if end == x.size or xs[end] != xs[start]:
            ranks[order[start:end]] = (start + end + 1) / 2.0      # mean of ranks start+1 .. end
            start = end
    return ranks


def _spearman(rx: np.ndarray, ry: np.ndarray) -> np.ndarray:
    """Pearson correlation of the rank vector ``rx`` (n,) with each row of ``ry`` (k, n)."""
    cx = rx - rx.mean()
    cy = ry - ry.mean(-1, keepdims=True)
    den = np.sqrt((cx ** 2).sum() * (cy ** 2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (cy @ cx) / den


def _kendall(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Kendall's tau-b of ``x`` (n,) with each row of ``y`` (k, n)."""
    i, j = np.triu_indices(x.size, 1)
    sx = np.sign(x[j] - x[i])                                       # (pairs,)
    sy = np.sign(y[:, j] - y[:, i])                                 # (k, pairs)
    den = np.sqrt(np.abs(sx).sum() * np.abs(sy).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (sy @ sx) / den


def rank_correlation(x, y, method: str = "spearman", n_resamples: int = MAX_EXACT, seed: int = 0,
                     alpha: float = 0.05, min_n: int = 5) -> dict:
    """Rank correlation of ``x`` and ``y`` (1-D, same length n) with a permutation p-value.

    ``method``: ``"spearman"`` -- rho = Pearson correlation of the average ranks,
    ``sum (r_i - rbar)(s_i - sbar) / sqrt(sum (r_i - rbar)^2 sum (s_i - sbar)^2)``;
    ``"kendall"`` -- tau-b = ``sum_{i<j} sgn(x_j - x_i) sgn(y_j - y_i) / sqrt(n_x n_y)`` with
    n_x, n_y the pairs not tied in x, in y. Both in [-1, 1] (NaN when x or y is constant).
    Null hypothesis: every pairing of the y values with the x values is equally likely; all n!
    pairings are enumerated when ``n! <= n_resamples`` (exact), else ``n_resamples`` random ones.
    Returns {statistic, pvalue (two-sided), n, exact, min_pvalue, conclusive, reason}: not
    ``conclusive`` when n < ``min_n`` or when even the most extreme pairing could not reach
    p <= ``alpha`` (then ``reason`` says which)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"rank_correlation needs two 1-D arrays of one length, got {x.shape} and {y.shape}")
    if method not in ("spearman", "kendall"):
        raise ValueError(f"unknown rank correlation {method!r}; valid: spearman, kendall")
    n = x.size
    if n < 2:                                                       # nothing to rank
        return {"method": method, "statistic": math.nan, "pvalue": math.nan, "n": int(n), "exact": True,
                "min_pvalue": math.nan, "conclusive": False, "reason": f"n = {n} < {min_n}: too small to conclude"}
    exact = math.factorial(n) <= n_resamples
    if exact:
        perms = np.array(list(itertools.permutations(range(n))), dtype=np.intp)
    else:
        rng = np.random.default_rng(seed)
        perms = np.argsort(rng.random((n_resamples, n)), axis=1)
    if method == "spearman":
        rx, ry = rankdata(x), rankdata(y)
        stat = float(_spearman(rx, ry[None])[0])
        null = _spearman(rx, ry[perms])
    else:
        stat = float(_kendall(x, y[None])[0])
        null = _kendall(x, y[perms])
    adj = 0 if exact else 1
    if not np.isfinite(stat):
        p = min_p = math.nan
    else:
        p, min_p = _two_sided(null, stat, adj), _min_p(null, adj)
    reason = ""
    if n < min_n:
        reason = f"n = {n} < {min_n}: too small to conclude"
    elif not np.isfinite(stat):
        reason = "every variant has the same value (of the metric or of mIoU): nothing to rank"
    elif min_p > alpha:
        reason = f"n = {n}: the smallest attainable p is {min_p:.3g} > {alpha}: too small to conclude"
    return {"method": method, "statistic": stat, "pvalue": p, "n": int(n), "exact": bool(exact),
            "min_pvalue": min_p, "conclusive": not reason, "reason": reason}
