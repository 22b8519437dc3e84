"""Report details: no 'best' among all-zero columns, a plain miou.csv, link-safe figure names,
each stage's own peak memory, the matplotlib figures."""
from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from pipelines import report as rep


def rows_with(values: dict[str, tuple[float, float]]) -> list[dict]:
    """Rows of two classes: {variant: (IoU of 'car', IoU of 'bump')}."""
    return [{"variant": v, "seeds": 1, "per_class": {"car": (a, 0.0), "bump": (b, 0.0)},
             "miou": ((a + b) / 2, 0.0), "pixel_accuracy": (0.9, 0.0)} for v, (a, b) in values.items()]


def test_no_bold_where_every_variant_scores_zero():
    rows = rows_with({"ir": (0.31, 0.0), "vi": (0.52, 0.0), "gff": (0.40, 0.0)})
    md = rep.miou_markdown(rows, ["car", "bump"], "p")
    body = [ln for ln in md.splitlines() if ln.startswith("| ") and "variant" not in ln]
    cells = {ln.split("|")[1].strip(): [c.strip() for c in ln.split("|")[2:-1]] for ln in body}
    assert cells["vi"][0] == "**0.520**" and cells["ir"][0] == "0.310"   # a real best stays bold
    assert [cells[v][1] for v in ("ir", "vi", "gff")] == ["0.000"] * 3       # nothing is best: no bold
    assert "0.900" in md and "**0.900**" not in md   # every variant shows 0.900: none is best


def test_miou_csv_is_a_plain_table_with_the_protocol_in_a_column(tmp_path):
    rows = rows_with({"ir": (0.25, 0.5), "vi": (0.75, 0.0)})
    rep.write_miou_tables(tmp_path, rows, ["car", "bump"], "DeepLabV3+, 1 epoch, seeds [0]", {"epochs": 1}, [])
    text = (tmp_path / "miou.csv").read_text()
    assert not text.startswith(('"#', "#"))
    read = list(csv.DictReader(io.StringIO(text)))
    assert [r["variant"] for r in read] == ["ir", "vi"]
    assert [float(r["miou"]) for r in read] == [0.375, 0.375]
    assert {r["protocol"] for r in read} == {"DeepLabV3+, 1 epoch, seeds [0]"}
    assert float(read[1]["car"]) == 0.75
    assert json.loads((tmp_path / "miou.json").read_text())["protocol"] == {"epochs": 1}


def test_figure_names_have_no_spaces():
    assert rep.figure_name("00161D", "ground truth") == "00161D_ground-truth.png"
    assert rep.figure_name("a b", "pred my method/2") == "a-b_pred-my-method-2.png"


def test_stage_records_hold_the_stages_own_peak_rss(tmp_path):
    from pipelines.stages.base import Plan
    from pipelines.stages.base import Stage as _Stage

    plan = Plan()
    with _Stage(tmp_path, "big", "fp1", plan, "data"):
        block = np.ones(300 * 2**20 // 8)          # 300 MiB touched, then freed
        block[::512] += 1
        del block
    with _Stage(tmp_path, "small", "fp2", plan, "data"):
        pass
    big = json.loads((tmp_path / "stages" / "big.json").read_text())
    small = json.loads((tmp_path / "stages" / "small.json").read_text())
    assert big["peak_rss_scope"] == small["peak_rss_scope"] == "stage"
    assert big["peak_rss_mib"] > small["peak_rss_mib"] + 250     # not the process's running maximum
    assert small["process_peak_rss_mib"] >= big["peak_rss_mib"]  # which is kept as well
    table = rep.stage_table(tmp_path)
    assert "| big | " in table and f"| {small['peak_rss_mib']} |" in table


def test_stages_running_together_say_their_peak_is_shared(tmp_path):
    from pipelines.stages.base import Plan
    from pipelines.stages.base import Stage as _Stage

    plan = Plan()
    with _Stage(tmp_path, "outer", "fp1", plan, "data"):
        with _Stage(tmp_path, "inner", "fp2", plan, "data"):
            pass
    for key in ("outer", "inner"):
        assert json.loads((tmp_path / "stages" / f"{key}.json").read_text())["peak_rss_scope"] == "concurrent stages"
    with _Stage(tmp_path, "alone", "fp3", plan, "data"):
        pass
    assert json.loads((tmp_path / "stages" / "alone.json").read_text())["peak_rss_scope"] == "stage"


def decode(png: bytes) -> np.ndarray:
    import cv2

    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img is not None
    return img


def test_figures_draw_what_they_are_given():
    from pipelines import figures

    rows = rows_with({"ir": (0.31, 0.1), "vi": (0.52, 0.9)})
    bars = decode(figures.class_iou_heatmap(rows, ["car", "bump"]))
    assert bars.shape[0] > 200 and bars.std() > 10
    # a different table draws a different figure (the values reach the plot)
    assert not np.array_equal(bars, decode(figures.class_iou_heatmap(rows_with({"ir": (0.9, 0.1), "vi": (0.1, 0.9)}),
                                                                   ["car", "bump"])))
    eye = decode(figures.confusion_grid({"ir": np.eye(2) * 10, "vi": np.ones((2, 2))}, ["car", "bump"]))
    assert eye.shape[1] > 400
    log = [{"phase": p, "epoch": str(e), "global_step": str(e), "loss": str(1 / e), "ssim": str(0.5 / e),
            "lr": "0.001", "images_per_s": "10", "seconds": "1"} for p, e in (("structure", 1), ("fusion", 1),
                                                                             ("fusion", 2))]
    assert decode(figures.fusion_curves({"sspfusion": log})).std() > 10
    seg_log = [{"epoch": str(e), "loss": str(1 / e), "val_miou": ""} for e in (1, 2, 3)]
    assert decode(figures.segmentation_curves({"ir/seed0": seg_log})).std() > 10
    metrics = {"metrics": ["EN", "MSE"], "lower_is_better": ["MSE"], "n_images": 2,
               "methods": {"gff": {"per_image": {"a": {"EN": 6.0, "MSE": 0.1}, "b": {"EN": 6.5, "MSE": None}}}}}
    assert decode(figures.metric_distributions(metrics)).std() > 10
    # nothing to draw: no figure (the report leaves it out)
    assert figures.fusion_curves({}) is None and figures.class_iou_heatmap([], ["car"]) is None
    assert figures.confusion_grid({}, ["car"]) is None and figures.metric_distributions({}) is None


def test_fusion_curves_scale_to_the_last_phase_when_an_earlier_point_is_off_scale():
    from pipelines import figures

    # fusion-phase totals 0.30..0.20 (span 0.1, margin 0.01); the structure phase's L_rec 5.0 is off
    lim = figures.focus_ylim(np.array([0.30, 0.25, 0.20]), np.array([5.0]))
    assert lim == pytest.approx((0.19, 0.31))
    # every earlier value inside the padded range, or nothing finite: matplotlib's own limits
    assert figures.focus_ylim(np.array([0.30, 0.20]), np.array([0.305])) is None
    assert figures.focus_ylim(np.array([np.nan]), np.array([5.0])) is None
    assert figures.focus_ylim(np.array([0.3]), np.array([])) is None
    # a flat last phase still gets a visible range around its value
    assert figures.focus_ylim(np.array([2.0, 2.0]), np.array([9.0])) == pytest.approx((1.9, 2.1))
    log = [{"phase": p, "epoch": str(e), "global_step": str(e), "total": str(t), "lr": "0.001"}
           for p, e, t in (("structure", 1, 5.0), ("fusion", 1, 0.30), ("fusion", 2, 0.25), ("fusion", 3, 0.20))]
    assert decode(figures.fusion_curves({"sspfusion": log})).std() > 10
