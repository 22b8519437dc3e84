"""configs/table4.yaml, the Table 4 comparison: what it runs, that MSRS is one key away, and a tiny
run of it (2 seeds, tiny data, one epoch) whose report opens with the headline and carries the
pairwise tests, day/night, the metric-vs-mIoU section and the LaTeX tables.

The tiny run keeps SSPFusion's shipped weights, retrains one learned peer (seafusion, `checkpoint:
null`, one epoch per phase, in two semantic rounds) and drops didfuse and rfn_nest: retraining RFN-Nest alone takes minutes
even at one epoch per phase (its autoencoder phase), too long for CI."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.api import load_config
from pipelines.experiment import REPO_CONFIGS, resolve_config

REPO = Path(__file__).resolve().parents[1]
LEARNED = ["sspfusion", "seafusion", "didfuse", "rfn_nest"]


def test_table4_is_the_comparison_and_msrs_is_one_key_away():
    assert resolve_config("table4") == REPO_CONFIGS / "table4.yaml"      # `fuseseg run table4`
    cfg = load_config("table4")
    assert cfg.all_variants() == ["ir", "vi", *LEARNED, "mean", "max", "laplacian", "gff"]
    assert [str(m.checkpoint) for m in cfg.fusion if m.name in LEARNED] == ["pretrained"] * 4
    assert cfg.seg_seeds == [0, 1, 2] and cfg.data.root is None and cfg.metrics.enabled
    default = load_config("default")
    assert cfg.data.synthetic == default.data.synthetic            # the default synthetic data
    # the default's segmentation protocol, shorter: sized for 33 segmenters in <= 40 min
    same = {k: v for k, v in vars(default.segmentation).items() if k != "epochs"}
    assert {k: v for k, v in vars(cfg.segmentation).items() if k != "epochs"} == same
    assert cfg.segmentation.epochs < default.segmentation.epochs
    msrs = load_config("table4", ["data.root=/data/MSRS"])
    assert msrs.data.root == Path("/data/MSRS") and msrs.all_variants() == cfg.all_variants()
    # retraining a peer in the run is one key too
    again = load_config("table4", ["fusion=[{name: seafusion, checkpoint: null}]"])
    assert again.fusion[0].checkpoint is None


TINY = ["name=tiny4", "data.synthetic.train=8", "data.synthetic.test=6", "data.synthetic.size=[96,128]",
        "fusion=[{name: sspfusion, checkpoint: pretrained}, {name: seafusion, checkpoint: null, train: "
        "{semantic_rounds: 2, semantic_segment: {max_steps_per_epoch: 2}}}, {name: mean}, {name: gff}]", "fusion_train.structure_epochs=1", "fusion_train.epochs=1", "segmentation.epochs=1",
        "segmentation.crop_size=64", "seg_seeds=[0,1]", "metrics.names=[EN, SD, SF, AG]", "report.bootstrap=200",
        "report.permutations=999", "report.figure_scenes=2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    ws = tmp_path_factory.mktemp("table4")
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", COLUMNS="200")
    r = subprocess.run([sys.executable, "-m", "pipelines.cli", "run", "table4", *TINY], cwd=ws, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, (r.stdout + r.stderr)[-4000:]
    return ws / "results" / "tiny4"


@pytest.mark.slow
def test_tiny_table4_report_opens_with_the_headline_and_tests_every_pair(tiny_run):
    md = (tiny_run / "report.md").read_text()
    sections = [ln[3:] for ln in md.splitlines() if ln.startswith("## ")]
    assert sections[:6] == ["Headline", "Protocol", "Segmentation (mIoU)", "Which differences exceed the noise",
                            "Day and night", "Fusion quality against segmentation"]
    head = md.split("## Protocol")[0]
    assert "Best variant:" in head and "better single modality" in head and "paired permutation test" in head
    assert "Warning: one segmentation seed" not in md                   # 2 seeds were run
    protocol = md.split("## Protocol")[1].split("## ")[0]
    assert "{'" not in protocol and "seafusion:** trained from scratch here" in protocol
    # SeAFusion retrained in the run with its semantic rounds: on, since the synthetic data are labelled
    assert "in 2 semantic rounds (beta = 1 x (round - 1)" in protocol
    rounds = json.loads((tiny_run / "train_fusion" / "seafusion" / "rounds.json").read_text())
    assert rounds["semantic_loss"].startswith("on") and [r["beta"] for r in rounds["rounds"]] == [0.0, 1.0]
    assert (tiny_run / "train_fusion" / "seafusion" / "round1" / "segment" / "final.pt").is_file()
    variants = ["ir", "vi", "sspfusion", "seafusion", "mean", "gff"]
    assert "| row - column | " + " | ".join(variants) + " |" in md
    with (tiny_run / "tables" / "pairwise.csv").open(newline="") as f:
        pairs = list(csv.DictReader(f))
    assert len(pairs) == 15 and all(0 < float(p["pvalue"]) <= float(p["p_holm"]) <= 1 for p in pairs)
    day_night = md.split("## Day and night")[1].split("## ")[0]
    assert all(f"| {v} | " in day_night for v in variants) and " day and the " in day_night
    corr = md.split("## Fusion quality against segmentation")[1].split("## ")[0]
    assert "Spearman" in corr and "Kendall" in corr and "n = 4" in corr and "too small to conclude" in corr
    assert "figures/metric_vs_miou.png" in corr and (tiny_run / "figures" / "metric_vs_miou.png").is_file()
    assert (tiny_run / "figures" / "class_colours.png").is_file()
    html = (tiny_run / "report.html").read_text()
    assert html.index("class='headline'") < html.index("<h2>Protocol</h2>") < html.index("<h2>Segmentation (mIoU)")


@pytest.mark.slow
def test_tiny_table4_writes_latex_and_complete_csv(tiny_run):
    tex = (tiny_run / "tables" / "miou.tex").read_text()
    assert "\\toprule" in tex and "\\bottomrule" in tex and "\\pm" in tex
    for name in ("pairwise.tex", "daynight.tex", "correlation.tex"):
        assert "\\midrule" in (tiny_run / "tables" / name).read_text()
    with (tiny_run / "tables" / "miou.csv").open(newline="") as f:
        rows = {r["variant"]: r for r in csv.DictReader(f)}
    for v in ("sspfusion", "seafusion", "mean", "gff"):
        r = rows[v]
        assert r["gain_baseline"] in ("ir", "vi") and float(r["gain_ci_low"]) <= float(r["gain"]) <= float(r["gain_ci_high"])
        assert r["p_vs_baseline"] and r["day_miou"] and r["night_miou"]
    assert rows["ir"]["gain"] == "" and rows["ir"]["day_miou"]
