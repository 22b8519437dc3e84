"""What the report concludes from a run's segmentation results: pairwise significance, the
headline, day and night mIoU, and fusion quality against mIoU. Numbers only (dicts and lists);
:mod:`pipelines.report_text` writes them as Markdown and LaTeX, :mod:`pipelines.stats` holds the
tests.

Inputs, as the report stage collects them from the run folder:

* ``per_seed[v]``: list over variant v's segmentation seeds of (n, C, C) per-image confusion
  matrices on the n test images (``segment/<v>/seed<k>/per_image_confusion.npy``), every
  variant in the same image order ``images`` (the stems of ``eval.json``'s ``images``);
* ``rows``: the mIoU table's rows (:func:`pipelines.report.miou_rows`);
* ``gains``: the bootstrap gains over the better single modality
  (:func:`pipelines.report.bootstrap_gain`).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from pipelines import stats

ALPHA = 0.05
SINGLES = ("ir", "vi")


def seed_mious(per_seed: dict[str, list[np.ndarray]], convention: str = "all",
               select: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Per variant, the mIoU of each seed over the test images (or the images where ``select``,
    an (n,) bool mask, is true): (k,) arrays."""
    out = {}
    for v, cms in per_seed.items():
        sums = np.stack([(c if select is None else c[select]).sum(0) for c in cms])   # (k, C, C)
        out[v] = stats.miou_batch(sums, convention)
    return out


def seed_se(values: np.ndarray) -> float:
    """Standard error of a mean over seeds: ``sd / sqrt(k)`` with the sample sd (ddof 1); NaN for
    one seed."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan


def better_single(per_image: dict[str, np.ndarray], convention: str = "all") -> str | None:
    """The single modality (ir or vi) with the higher mIoU over the test set, seeds pooled (the
    baseline of the bootstrap gains); None when either is missing."""
    if not all(s in per_image for s in SINGLES):
        return None
    return max(SINGLES, key=lambda v: float(stats.miou_batch(per_image[v].sum(0), convention)))


def judge_pairs(pairs: list[dict], seeds: dict[str, np.ndarray], alpha: float = ALPHA) -> list[dict]:
    """Add to each :func:`pipelines.stats.pairwise_tests` result whether the difference exceeds
    the noise: ``significant`` (Holm-adjusted p < alpha: beyond test-image noise),
    ``seed_diff`` (difference of the seed means) and ``seed_se`` (its standard error,
    ``sqrt(se_a^2 + se_b^2)``; NaN with one seed), ``beyond_seeds`` (|seed_diff| > 2 seed_se; None
    when unmeasured) and ``exceeds_noise`` (significant and not within seed noise)."""
    out = []
    for p in pairs:
        a, b = seeds[p["a"]], seeds[p["b"]]
        diff = float(a.mean() - b.mean())
        se = math.sqrt(seed_se(a) ** 2 + seed_se(b) ** 2)
        beyond = None if math.isnan(se) else bool(abs(diff) > 2 * se)
        sig = bool(p["p_holm"] < alpha)
        out.append({**p, "seed_diff": diff, "seed_se": se, "significant": sig, "beyond_seeds": beyond,
                    "exceeds_noise": sig and beyond is not False})
    return out


def find_pair(pairs: list[dict], x: str, y: str) -> dict | None:
    """The result of pair (x, y) oriented as x - y (statistic and seed_diff negated when it was
    tested as y - x)."""
    for p in pairs:
        if (p["a"], p["b"]) == (x, y):
            return p
        if (p["a"], p["b"]) == (y, x):
            return {**p, "a": x, "b": y, "statistic": -p["statistic"], "seed_diff": -p["seed_diff"]}
    return None


def headline(rows: list[dict], gains: list[dict], pairs: list[dict], baseline: str | None) -> dict:
    """The report's first sentence, as numbers: the best variant (highest mean mIoU over seeds),
    and the best fused variant with its gain over the better single modality ``baseline``, its
    bootstrap interval and its test against the baseline."""
    if not rows:
        return {}
    # a fused variant tying the best at the table's 3 decimals is the best (no false "beats")
    best = max(rows, key=lambda r: (round(r["miou"][0], 3), r["variant"] not in SINGLES, r["miou"][0]))
    fused = [r for r in rows if r["variant"] not in SINGLES]
    best_fused = max(fused, key=lambda r: r["miou"][0]) if fused else None
    out = {"best": best["variant"], "best_miou": best["miou"], "seeds": best["seeds"], "baseline": baseline}
    if best_fused is not None and baseline is not None:
        g = next((g for g in gains if g["variant"] == best_fused["variant"]), None)
        out.update(best_fused=best_fused["variant"], best_fused_miou=best_fused["miou"], gain=g,
                   test=find_pair(pairs, best_fused["variant"], baseline))
    return out


def day_night(per_seed: dict[str, list[np.ndarray]], images: list[str], convention: str = "all") -> dict:
    """mIoU over the day and over the night test images per variant: mean and population sd over
    seeds (as the mIoU table). Day or night from the MSRS-style stem (``00012N``: night); images
    of neither kind are left out. Returns {n_day, n_night, rows: {v: {day: (mean, sd),
    night: (mean, sd)}}}; empty rows when the names carry no day/night mark."""
    from fuseseg.data.pairs import day_or_night

    kinds = np.array([day_or_night(Path(s).stem) for s in images], dtype=object)
    day, night = kinds == "day", kinds == "night"
    out = {"n_day": int(day.sum()), "n_night": int(night.sum()), "rows": {}}
    if not (day.any() or night.any()):
        return out
    per = {}
    for name, mask in (("day", day), ("night", night)):
        if mask.any():
            for v, vals in seed_mious(per_seed, convention, mask).items():
                with np.errstate(invalid="ignore"):
                    per.setdefault(v, {})[name] = (float(np.nanmean(vals)) if np.isfinite(vals).any() else math.nan,
                                                   float(np.nanstd(vals)) if np.isfinite(vals).any() else math.nan)
    out["rows"] = per
    return out


def metric_correlations(metrics_json: dict | None, rows: list[dict], alpha: float = ALPHA) -> dict:
    """For each fusion quality metric, Spearman's rho and Kendall's tau-b between the metric's
    test-set mean and the mean mIoU over seeds, across the fused variants that have both, with
    exact permutation p-values (:func:`pipelines.stats.rank_correlation`) and Holm's correction
    over the metrics. Returns {n, variants, results: [{metric, lower_is_better, x: {v: metric},
    spearman, kendall}], note}."""
    if not metrics_json:
        return {"n": 0, "variants": [], "results": [], "note": "no fusion quality metrics in this run"}
    miou = {r["variant"]: r["miou"][0] for r in rows if r["variant"] not in SINGLES}
    methods = metrics_json.get("methods", {})
    variants = [v for v in methods if v in miou]
    lower = set(metrics_json.get("lower_is_better", []))
    results = []
    for metric in metrics_json.get("metrics", []):
        have = [v for v in variants if methods[v]["mean"].get(metric) is not None]
        x = np.array([methods[v]["mean"][metric] for v in have], dtype=np.float64)
        y = np.array([miou[v] for v in have], dtype=np.float64)
        results.append({"metric": metric, "lower_is_better": metric in lower,
                        "x": dict(zip(have, x.tolist())), "y": dict(zip(have, y.tolist())),
                        "spearman": stats.rank_correlation(x, y, "spearman", alpha=alpha),
                        "kendall": stats.rank_correlation(x, y, "kendall", alpha=alpha)})
    for method in ("spearman", "kendall"):
        for r, adj in zip(results, stats.holm([r[method]["pvalue"] for r in results])):
            r[method]["p_holm"] = float(adj)
    n = len(variants)
    note = ""
    if n < 5:
        note = (f"Only {n} fused variant(s) with both a metric and an mIoU: too small to conclude "
                "(no rank correlation of fewer than 5 values can reach p < 0.05).")
    return {"n": n, "variants": variants, "results": results, "note": note}


def analyse(per_seed: dict[str, list[np.ndarray]], images: list[str], rows: list[dict], gains: list[dict],
            metrics_json: dict | None, convention: str = "all", n_resamples: int = 9999,
            seed: int = 0) -> dict:
    """Everything the report concludes (see the module docstring for the inputs): the pairwise
    tests of every pair of variants (:func:`judge_pairs`), the better single modality, the
    headline, day and night mIoU and the metric-vs-mIoU correlations."""
    order = [r["variant"] for r in rows if r["variant"] in per_seed]
    # seeds pooled: the mean over a variant's seeds of each image's confusion matrix (the mIoU of the
    # set is that of the sum; the mean keeps two variants' images on one scale when their seed counts differ)
    per_image = {v: np.mean(per_seed[v], axis=0) for v in order}
    seeds = seed_mious({v: per_seed[v] for v in order}, convention)
    pairs = judge_pairs(stats.pairwise_tests(per_image, order, n_resamples=n_resamples, seed=seed,
                                             convention=convention), seeds)
    baseline = better_single(per_image, convention)
    return {"alpha": ALPHA, "n_images": len(images), "n_resamples": n_resamples,
            "max_seeds": max((len(per_seed[v]) for v in order), default=0),
            "min_seeds": min((len(per_seed[v]) for v in order), default=0),
            "variants": order, "baseline": baseline, "pairs": pairs,
            "headline": headline(rows, gains, pairs, baseline),
            "day_night": day_night({v: per_seed[v] for v in order}, images, convention),
            "correlation": metric_correlations(metrics_json, rows)}
