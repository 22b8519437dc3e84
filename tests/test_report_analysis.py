"""What the report concludes (pipelines/analysis.py) and how it says it (report_text, report_tables,
report_page): day/night mIoU by hand, the headline and the one-seed warning, seed noise against
image noise, the metric-vs-mIoU section with too few variants, the LaTeX and CSV tables."""
from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from pipelines import analysis, report_tables, report_text
from pipelines import report as rep
from pipelines.report_page import markdown_to_html_table
from segmentation.metrics import miou as ref_miou

NAMES = ["00001D.png", "00002N.png", "00003D.png", "00004N.png", "00005N.png", "00006D.png",
         "00007D.png", "00008N.png", "00009D.png", "00010N.png", "00011D.png", "00012N.png"]


def cms_for(acc: np.ndarray) -> np.ndarray:
    """(n, 2, 2) confusion matrices with per-image accuracy ``acc`` (100 px per class)."""
    cm = np.zeros((len(acc), 2, 2))
    cm[:, 0, 0] = cm[:, 1, 1] = np.round(100 * acc)
    cm[:, 0, 1] = cm[:, 1, 0] = 100 - np.round(100 * acc)
    return cm


def make_run(seeds: int, gap: float, seed_noise: float = 0.0, rng_seed: int = 0):
    """per_seed, rows and gains of ir, vi and a fused variant ``f`` better than vi by ``gap``."""
    rng = np.random.default_rng(rng_seed)
    base = rng.uniform(0.5, 0.8, len(NAMES))
    per_seed = {"ir": [cms_for(np.clip(base - 0.2 + 0.02 * rng.standard_normal(len(NAMES)), 0, 1))
                       for _ in range(seeds)],
                "vi": [cms_for(np.clip(base + 0.02 * rng.standard_normal(len(NAMES)), 0, 1)) for _ in range(seeds)],
                "f": [cms_for(np.clip(base + gap + seed_noise * (-1) ** k   # seeds alternate up and down
                                      + 0.02 * rng.standard_normal(len(NAMES)), 0, 1)) for k in range(seeds)]}
    seg = {v: [{"per_class_iou": [np.nan, np.nan], "miou": ref_miou(c.sum(0)), "pixel_accuracy": 0.5}
               for c in cms] for v, cms in per_seed.items()}
    for v in seg:
        for ev in seg[v]:
            ev["per_class_iou"] = [0.5, 0.5]
    rows = rep.miou_rows(seg, ["a", "b"])
    per_image = {v: np.sum(c, axis=0) for v, c in per_seed.items()}
    gains = [rep.bootstrap_gain(per_image, "f", n_boot=200)]
    return per_seed, rows, gains


def test_day_night_miou_by_hand():
    per_seed, _, _ = make_run(2, 0.05)
    dn = analysis.day_night(per_seed, NAMES)
    day = np.array([n[5] == "D" for n in NAMES])
    assert dn["n_day"] == 6 and dn["n_night"] == 6
    for v, cms in per_seed.items():
        for kind, mask in (("day", day), ("night", ~day)):
            vals = [ref_miou(c[mask].sum(0)) for c in cms]
            assert dn["rows"][v][kind] == pytest.approx((np.mean(vals), np.std(vals)), abs=1e-12)
    # names without a day/night mark: no breakdown, and the report says why
    none = analysis.day_night(per_seed, [f"img{i}.png" for i in range(len(NAMES))])
    assert none["rows"] == {} and "no day/night" in report_text.day_night_markdown(none, ["f"])


def test_headline_names_the_best_gain_interval_and_significance():
    per_seed, rows, gains = make_run(3, 0.10)
    a = analysis.analyse(per_seed, NAMES, rows, gains, None, n_resamples=999)
    h = report_text.headline_markdown(a)
    g = gains[0]
    assert a["baseline"] == "vi" and a["headline"]["best"] == "f"
    assert "Best variant: f" in h and f"{g['gain']:+.3f}" in h and f"[{g['ci_low']:+.3f}, {g['ci_high']:+.3f}]" in h
    assert "**significant**" in h and "one segmentation seed" not in h
    # one seed: the same data say so, and warn
    per1, rows1, gains1 = make_run(1, 0.10)
    h1 = report_text.headline_markdown(analysis.analyse(per1, NAMES, rows1, gains1, None, n_resamples=999))
    assert "Warning: one segmentation seed" in h1 and "seed noise unmeasured" in h1
    # the fused variant worse than vi: no "gain" claimed for a best fused that is not best
    per2, rows2, gains2 = make_run(3, -0.10)
    h2 = report_text.headline_markdown(analysis.analyse(per2, NAMES, rows2, gains2, None, n_resamples=999))
    assert "Best variant: vi" in h2 and "No fused variant beats vi" in h2


def test_a_difference_within_seed_noise_does_not_exceed_the_noise():
    # each seed of f moves all images together by +-0.15: the images agree, the seeds do not
    per_seed, rows, gains = make_run(2, 0.02, seed_noise=0.15, rng_seed=3)
    a = analysis.analyse(per_seed, NAMES, rows, gains, None, n_resamples=999)
    p = analysis.find_pair(a["pairs"], "f", "vi")
    seeds = analysis.seed_mious(per_seed)
    assert p["seed_diff"] == pytest.approx(seeds["f"].mean() - seeds["vi"].mean())
    se = np.sqrt(seeds["f"].var(ddof=1) / 2 + seeds["vi"].var(ddof=1) / 2)
    assert p["seed_se"] == pytest.approx(se)
    assert p["beyond_seeds"] == (abs(p["seed_diff"]) > 2 * se)
    assert p["exceeds_noise"] == (p["significant"] and p["beyond_seeds"])
    assert p["significant"] and not p["beyond_seeds"] and not p["exceeds_noise"]
    assert "within seed noise" in report_text.vs_baseline_markdown(a)


def test_metric_correlation_section_with_too_few_variants():
    rows = [{"variant": v, "miou": (m, 0.01)} for v, m in (("ir", 0.3), ("vi", 0.4), ("a", 0.5), ("b", 0.45),
                                                           ("c", 0.42))]
    mj = {"metrics": ["EN", "MSE"], "lower_is_better": ["MSE"],
          "methods": {"a": {"mean": {"EN": 7.0, "MSE": 0.1}}, "b": {"mean": {"EN": 6.0, "MSE": 0.2}},
                      "c": {"mean": {"EN": 5.0, "MSE": 0.3}}, "gone": {"mean": {"EN": 1.0, "MSE": 9.0}}}}
    c = analysis.metric_correlations(mj, rows)
    assert c["n"] == 3 and c["variants"] == ["a", "b", "c"] and "too small to conclude" in c["note"]
    en = c["results"][0]
    assert en["x"] == {"a": 7.0, "b": 6.0, "c": 5.0} and en["y"] == {"a": 0.5, "b": 0.45, "c": 0.42}
    assert en["spearman"]["statistic"] == pytest.approx(1.0) and not en["spearman"]["conclusive"]
    assert c["results"][1]["lower_is_better"] and c["results"][1]["kendall"]["statistic"] == pytest.approx(-1.0)
    md = report_text.correlation_markdown(c)
    assert "too small to conclude" in md and "MSE (lower better)" in md and "| 3 |" in md
    assert "correlation" in report_tables.correlation_tex(c)


def test_latex_and_csv_tables(tmp_path):
    per_seed, rows, gains = make_run(3, 0.10)
    per_seed["rfn_nest"] = per_seed.pop("f")
    rows[2]["variant"] = gains[0]["variant"] = "rfn_nest"
    a = analysis.analyse(per_seed, NAMES, rows, gains, None, n_resamples=999)
    report_tables.write_analysis_tables(tmp_path, rows, ["a", "b"], gains, a)
    tex = (tmp_path / "miou.tex").read_text()
    assert all(k in tex for k in ("\\toprule", "\\midrule", "\\bottomrule", "\\begin{tabular}{lrrrl}"))
    assert "rfn\\_nest" in tex and "rfn_nest" not in tex.replace("rfn\\_nest", "")
    m, sd = rows[2]["miou"]
    assert f"${m:.3f} \\pm {sd:.3f}$" in tex and "$^\\dagger$" in tex
    pairs = list(csv.DictReader(io.StringIO((tmp_path / "pairwise.csv").read_text())))
    assert len(pairs) == 3 and {(p["a"], p["b"]) for p in pairs} == {("ir", "vi"), ("ir", "rfn_nest"),
                                                                      ("vi", "rfn_nest")}
    rep.write_miou_tables(tmp_path, rows, ["a", "b"], "p", {}, gains, a)
    table = {r["variant"]: r for r in csv.DictReader(io.StringIO((tmp_path / "miou.csv").read_text()))}
    g = gains[0]
    assert float(table["rfn_nest"]["gain"]) == pytest.approx(g["gain"], abs=1e-5)
    assert float(table["rfn_nest"]["gain_ci_low"]) == pytest.approx(g["ci_low"], abs=1e-5)
    assert table["rfn_nest"]["gain_baseline"] == "vi" and table["ir"]["gain"] == ""
    assert float(table["ir"]["day_miou"]) == pytest.approx(a["day_night"]["rows"]["ir"]["day"][0], abs=1e-5)
    assert table["rfn_nest"]["exceeds_noise"] == "True"


def test_markdown_bullets_and_bold_become_html():
    out = markdown_to_html_table("- **Seeds:** 3\n- data\n\nplain **b** `x`\n\n| v | m |\n|---|---:|\n| ir | 0.5 |")
    assert "<ul><li><b>Seeds:</b> 3</li><li>data</li></ul>" in out
    assert "<p>plain <b>b</b> <code>x</code></p>" in out
    assert "<td class='t'>ir</td><td>0.5</td>" in out


def test_headline_says_when_interval_and_test_disagree_and_summary_shows_each_variant():
    per_seed, rows, gains = make_run(3, 0.10)
    a = analysis.analyse(per_seed, NAMES, rows, gains, None, n_resamples=999)
    t = analysis.find_pair(a["pairs"], "f", "vi")
    assert t["significant"] and report_text.UNRESOLVED not in report_text.headline_markdown(a)
    # the same interval (excluding 0) with a test that does not reject: said to be unresolved
    for p in [*a["pairs"], a["headline"]["test"]]:
        p.update(p_holm=0.5, significant=False, exceeds_noise=False)
    h = report_text.headline_markdown(a)
    assert "**not significant**: within test-image noise" in h and report_text.UNRESOLVED in h
    table = report_text.summary_markdown(rows, gains, a).splitlines()
    assert table[0].startswith("| variant | mIoU | gain over vi | 95 % interval | p (Holm) |")
    cells = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in table[2:]}
    assert cells["vi"][1] == "baseline"
    assert cells["ir"][1] == f"{analysis.find_pair(a['pairs'], 'ir', 'vi')['statistic']:+.3f}"   # its test's difference
    assert cells["f"][1] == f"{gains[0]['gain']:+.3f}" and cells["f"][4] == "no"
    assert cells["f"][5] == report_text.pm(*a["day_night"]["rows"]["f"]["day"])


def test_no_results_of_this_protocol_is_said_not_raised(tmp_path):
    """Every result measured under another protocol is left out: the analysis of nothing, with
    fusion metrics present, says so (it once failed on an empty rank correlation)."""
    mj = {"metrics": ["EN"], "lower_is_better": [], "methods": {"a": {"mean": {"EN": 1.0}}}}
    a = analysis.analyse({}, [], [], [], mj)
    assert a["pairs"] == [] and a["correlation"]["n"] == 0
    assert report_text.headline_markdown(a).startswith("No segmentation results yet")
    assert "too small to conclude" in report_text.correlation_markdown(a["correlation"])
    report_tables.write_analysis_tables(tmp_path, [], [], [], a)
    assert "\\bottomrule" in (tmp_path / "correlation.tex").read_text()
