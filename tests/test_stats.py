"""The report's statistics (pipelines/stats.py) against scipy and hand-computed cases."""
from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as sps

from pipelines import stats
from segmentation.metrics import miou as ref_miou


def random_cms(rng, n, c=3, skill=0.7):
    """(n, c, c) per-image confusion matrices: 100 pixels per present class, a share ``skill``
    right on average, some classes absent from some images."""
    cms = np.zeros((n, c, c))
    for i in range(n):
        for k in range(c):
            if rng.random() < 0.8:
                right = rng.binomial(100, np.clip(skill + 0.1 * rng.standard_normal(), 0, 1))
                cms[i, k, k] = right
                cms[i, k, rng.integers(c)] += 100 - right
    return cms


def test_miou_batch_matches_the_per_matrix_miou():
    rng = np.random.default_rng(0)
    cms = random_cms(rng, 20, 4)
    cms[3] = 0                                                    # an empty image: NaN
    for conv in ("all", "exclude_background"):
        got = stats.miou_batch(cms, conv)
        want = [ref_miou(cm, conv) for cm in cms]
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-12, equal_nan=True)
    assert np.isnan(stats.miou_batch(cms)[3])


def test_paired_test_by_hand_on_two_images():
    """Two images, two classes: the 4 swap arrangements computed one by one."""
    a = np.array([[[8, 2], [1, 9]], [[5, 0], [0, 5]]], float)
    b = np.array([[[4, 6], [3, 7]], [[2, 3], [4, 1]]], float)

    def m(cm):   # mIoU of a 2x2 matrix, written out
        i0 = cm[0, 0] / (cm[0].sum() + cm[:, 0].sum() - cm[0, 0])
        i1 = cm[1, 1] / (cm[1].sum() + cm[:, 1].sum() - cm[1, 1])
        return (i0 + i1) / 2

    t = m(a[0] + a[1]) - m(b[0] + b[1])
    null = [t, m(b[0] + a[1]) - m(a[0] + b[1]), m(a[0] + b[1]) - m(b[0] + a[1]), -t]
    less = np.mean([v <= t + 1e-12 for v in null])
    greater = np.mean([v >= t - 1e-12 for v in null])
    r = stats.paired_miou_test(a, b, n_resamples=100)
    assert r["exact"] and r["n_resamples"] == 4
    assert r["statistic"] == pytest.approx(t, abs=1e-12)
    assert r["pvalue"] == pytest.approx(min(1, 2 * min(less, greater)))
    assert r["pvalue"] == 0.5                               # t is the largest of the 4: 2 * 1/4


@pytest.mark.parametrize("n,shift", [(9, 0.0), (10, 0.15), (11, -0.1)])
def test_paired_test_equals_scipy_permutation_test_when_exact(n, shift):
    rng = np.random.default_rng(n)
    a = random_cms(rng, n, skill=0.6 + shift)
    b = random_cms(rng, n, skill=0.6)
    stack = np.concatenate([a, b])

    def statistic(ia, ib):   # scipy swaps the indices pairwise; the mIoU difference of what it got
        return ref_miou(stack[ia.astype(int)].sum(0)) - ref_miou(stack[ib.astype(int)].sum(0))

    ref = sps.permutation_test((np.arange(n), np.arange(n, 2 * n)), statistic, permutation_type="samples",
                               n_resamples=10_000, alternative="two-sided")
    got = stats.paired_miou_test(a, b, n_resamples=10_000)
    assert got["exact"] and got["n_resamples"] == 2 ** n
    assert got["statistic"] == pytest.approx(ref.statistic, abs=1e-12)
    assert got["pvalue"] == pytest.approx(ref.pvalue, abs=1e-12)


def test_paired_test_randomised_is_close_to_the_exact_one_and_finds_a_real_difference():
    rng = np.random.default_rng(3)
    a, b = random_cms(rng, 14, skill=0.75), random_cms(rng, 14, skill=0.6)
    exact = stats.paired_miou_test(a, b, n_resamples=2 ** 14)
    mc = stats.paired_miou_test(a, b, n_resamples=4000, seed=1)
    assert exact["exact"] and not mc["exact"]
    assert abs(mc["pvalue"] - exact["pvalue"]) < 4 * np.sqrt(exact["pvalue"] * (1 - exact["pvalue"]) / 4000) + 1e-3
    assert mc["pvalue"] >= 2 / 4001                             # the observed arrangement counted
    big_a, big_b = random_cms(rng, 40, skill=0.8), random_cms(rng, 40, skill=0.5)
    assert stats.paired_miou_test(big_a, big_b)["pvalue"] < 0.001
    # the same data both ways: the same p, the opposite statistic
    r1, r2 = stats.paired_miou_test(a, b, 2 ** 14), stats.paired_miou_test(b, a, 2 ** 14)
    assert r1["pvalue"] == pytest.approx(r2["pvalue"]) and r1["statistic"] == pytest.approx(-r2["statistic"])


def test_holm_by_hand():
    got = stats.holm([0.01, 0.04, 0.03, 0.005])
    # sorted 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06
    np.testing.assert_allclose(got, [0.03, 0.06, 0.06, 0.02])
    np.testing.assert_allclose(stats.holm([0.5, 0.9]), [1.0, 1.0])
    got = stats.holm([0.01, np.nan, 0.02])
    assert np.isnan(got[1]) and got[0] == pytest.approx(0.02) and got[2] == pytest.approx(0.02)


def test_pairwise_tests_cover_every_pair_with_holm():
    rng = np.random.default_rng(5)
    per = {v: random_cms(rng, 12, skill=s) for v, s in (("ir", 0.5), ("vi", 0.6), ("f", 0.75))}
    res = stats.pairwise_tests(per, ["ir", "vi", "f", "absent"], n_resamples=500)
    assert [(r["a"], r["b"]) for r in res] == [("ir", "vi"), ("ir", "f"), ("vi", "f")]
    np.testing.assert_allclose([r["p_holm"] for r in res], stats.holm([r["pvalue"] for r in res]))
    assert all(r["p_holm"] >= r["pvalue"] for r in res)


def test_rankdata_matches_scipy():
    x = np.array([3.0, 1.0, 3.0, 2.0, 3.0, 0.5])
    np.testing.assert_array_equal(stats.rankdata(x), sps.rankdata(x))


@pytest.mark.parametrize("method", ["spearman", "kendall"])
@pytest.mark.parametrize("ties", [False, True])
def test_rank_correlation_equals_scipy(method, ties):
    rng = np.random.default_rng(7 + ties)
    x = rng.standard_normal(7)
    y = 0.6 * x + rng.standard_normal(7)
    if ties:
        x[2] = x[4]
        y[1] = y[5]
    got = stats.rank_correlation(x, y, method)
    ref_fn = sps.spearmanr if method == "spearman" else sps.kendalltau
    assert got["statistic"] == pytest.approx(ref_fn(x, y).statistic, abs=1e-12)
    assert got["exact"] and got["n"] == 7

    def statistic(yy):
        return ref_fn(x, yy).statistic

    ref = sps.permutation_test((y,), statistic, permutation_type="pairings", n_resamples=10 ** 6)
    assert got["pvalue"] == pytest.approx(ref.pvalue, abs=1e-12)
    if method == "kendall" and not ties:   # the exact tau distribution of scipy, a third route
        assert got["pvalue"] == pytest.approx(sps.kendalltau(x, y, method="exact").pvalue, abs=1e-12)


def test_rank_correlation_by_hand_and_small_n():
    # n = 3, perfectly concordant: rho = tau = 1; of the 6 pairings only the identity reaches 1
    for method in ("spearman", "kendall"):
        r = stats.rank_correlation([1, 2, 3], [10, 20, 30], method)
        assert r["statistic"] == pytest.approx(1.0)
        assert r["pvalue"] == pytest.approx(2 / 6) and r["min_pvalue"] == pytest.approx(2 / 6)
        assert not r["conclusive"] and "too small to conclude" in r["reason"]
    # n = 5: 2/120 can be reached; a perfect ranking is conclusive
    r = stats.rank_correlation([1, 2, 3, 4, 5], [5, 4, 3, 2, 1], "kendall")
    assert r["statistic"] == pytest.approx(-1.0) and r["pvalue"] == pytest.approx(2 / 120) and r["conclusive"]
    # tau by hand: x = 1,2,3,4; y = 1,3,2,4 -> 5 concordant, 1 discordant pair of 6: (5-1)/6
    assert stats.rank_correlation([1, 2, 3, 4], [1, 3, 2, 4], "kendall")["statistic"] == pytest.approx(4 / 6)
    # no variant or one (every result of a run left out): no correlation, no error
    for n in (0, 1):
        r = stats.rank_correlation(np.ones(n), np.ones(n))
        assert r["n"] == n and np.isnan(r["statistic"]) and np.isnan(r["pvalue"]) and not r["conclusive"]
    # a constant column: no correlation, said so
    r = stats.rank_correlation([1, 2, 3, 4, 5, 6], [2, 2, 2, 2, 2, 2])
    assert np.isnan(r["statistic"]) and not r["conclusive"]


def test_rank_correlation_randomised_beyond_exact():
    rng = np.random.default_rng(11)
    x = rng.standard_normal(10)
    y = x + 0.3 * rng.standard_normal(10)
    r = stats.rank_correlation(x, y, "spearman", n_resamples=20_000, seed=2)
    assert not r["exact"] and r["conclusive"]
    assert r["statistic"] == pytest.approx(sps.spearmanr(x, y).statistic)
    ref = sps.spearmanr(x, y, alternative="two-sided")   # t-approximation; same order of magnitude
    assert r["pvalue"] < 0.01 and ref.pvalue < 0.01
    assert r["pvalue"] >= 1 / 20_001


def test_every_permutation_is_enumerated_once():
    # the exact null of Spearman for n = 4 has 24 values, symmetric about 0
    x = np.arange(4.0)
    null = [sps.spearmanr(x, np.array(p, float)).statistic for p in itertools.permutations(range(4))]
    assert len(null) == 24 and sum(v >= 0.8 - 1e-9 for v in null) == 4   # 1.0 once, 0.8 three times
    r = stats.rank_correlation(x, np.array([0, 1, 3, 2.0]), "spearman")
    assert r["statistic"] == pytest.approx(0.8) and r["pvalue"] == pytest.approx(2 * 4 / 24)
