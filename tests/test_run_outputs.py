"""One quick `fuseseg run` with its output going to a file (not a terminal), then everything a
researcher reads from it: the plain log lines, TensorBoard events, the report's figures and links,
the CSV table, class-id predictions, the report rendered in headless Chromium; and one training
job run by the local executor, whose own log gets the plain lines too.
"""
from __future__ import annotations

import base64
import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

QUICK = ["name=quick", "data.synthetic.train=16", "data.synthetic.test=4", "data.synthetic.size=[96,128]",
         "fusion_train.epochs=1", "segmentation.epochs=2", "segmentation.frozen_epochs=1", "segmentation.crop_size=64"]


def quick_overrides() -> list[str]:
    return list(QUICK)


def cli(*args: str, cwd: Path, log: Path | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), FUSESEG_HEARTBEAT_S="1", COLUMNS="200", OMP_NUM_THREADS="1")
    if log is None:
        return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=900)
    with log.open("w") as f:   # stdout and stderr into a file: not a terminal
        return subprocess.run([sys.executable, "-m", "pipelines.cli", *args], cwd=cwd, env=env,
                              stdout=f, stderr=subprocess.STDOUT, text=True, timeout=1500)


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    ws = tmp_path_factory.mktemp("quick")
    log = ws / "run.log"
    r = cli("run", "default", *quick_overrides(), "tensorboard=true", cwd=ws, log=log)
    assert r.returncode == 0, log.read_text()[-4000:]
    return ws, ws / "results" / "quick", log.read_text()


TS = r"^\d\d:\d\d:\d\d "


def assert_plain(log: str) -> None:
    assert not re.search(r"━.*\d+/\d+ +\d+:\d\d:\d\d", log)             # no progress bar drawn,
    assert "\x1b[" not in log and "\r" not in log                    # no terminal codes


def test_log_file_has_plain_epoch_lines_and_no_bars(quick):
    _, _, log = quick
    fusion = re.findall(TS + r"train sspfusion (structure|fusion) epoch 1/1: (.*) \| ETA (\S+)$", log, re.M)
    assert [f[0] for f in fusion] == ["structure", "fusion"], log[-3000:]
    assert all(k in fusion[1][1] for k in ("ssim", "loss", "lr", "images_per_s"))
    seg = re.findall(TS + r"segment epoch (\d)/2 \((frozen|full)\): loss \S+ ce \S+ dice \S+ lr \S+ "
                     r"[\d.]+ img/s \| ETA (\S+)$", log, re.M)
    assert len(seg) == 2 * 5 and seg[0][:2] == ("1", "frozen") and seg[1][:2] == ("2", "full")
    assert seg[1][2] == "0s"                                         # the last epoch: nothing left
    assert re.search(TS + r"fusing \(laplacian, train\): 16/16 done in \S+ \(", log, re.M)
    assert re.search(TS + r"fusing \(gff, test\): 4/4 done in \S+ \(", log, re.M)
    assert re.search(TS + r"scoring the fused test images: 4/4 done", log, re.M)
    assert_plain(log)


def test_tensorboard_events_hold_the_logged_values(quick):
    pytest.importorskip("tensorboard", reason="tensorboard is the optional `tensorboard` extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run, _ = quick
    fus = EventAccumulator(str(run / "train_fusion" / "sspfusion" / "tensorboard"))
    fus.Reload()
    tags = set(fus.Tags()["scalars"])
    assert {"loss/loss", "loss/rec", "loss/ssim", "loss/grad", "lr", "images_per_s"} <= tags
    with (run / "train_fusion" / "sspfusion" / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    logged = [(e.step, e.value) for e in fus.Scalars("loss/loss")]
    assert logged == [(int(r["global_step"]), pytest.approx(float(r["loss"]), rel=1e-5)) for r in rows]
    assert set(fus.Tags()["images"]) == {"fused/fusion", "fused/structure"}
    img = fus.Images("fused/fusion")[-1]
    assert img.height == 3 * 96 and img.width == 3 * 96                # 3 pairs of ir | vi | fused crops

    seg = EventAccumulator(str(run / "segment" / "gff" / "seed0" / "tensorboard"))
    seg.Reload()
    assert {"loss/total", "loss/ce", "loss/dice", "lr", "images_per_s"} <= set(seg.Tags()["scalars"])
    with (run / "segment" / "gff" / "seed0" / "log.csv").open() as f:
        srows = list(csv.DictReader(f))
    assert [(e.step, round(e.value, 5)) for e in seg.Scalars("loss/ce")] == \
        [(int(r["epoch"]), round(float(r["ce"]), 5)) for r in srows]


def test_report_html_is_self_contained_with_every_figure(quick):
    _, run, _ = quick
    html = (run / "report.html").read_text()
    plots = re.findall(r"<img class='plot' src='data:image/png;base64,([^']+)'", html)
    titles = re.findall(r"<h3>([^<]+)</h3><img class='plot'", html)
    assert titles == ["Fusion training curves", "Segmentation training curves", "Per-class IoU per variant",
                      "Confusion matrices (rows normalised; summed over seeds)",
                      "Fusion quality metrics per test image"]
    import cv2

    for b64 in plots:
        png = cv2.imdecode(np.frombuffer(base64.b64decode(b64), np.uint8), cv2.IMREAD_COLOR)
        assert png is not None and png.shape[0] > 200 and png.shape[1] > 400
        assert png.std() > 10                                              # drawn, not blank
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//|file:)""", html)   # nothing to fetch


def test_report_md_links_have_no_spaces_and_resolve(quick):
    _, run, _ = quick
    md = (run / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]*)\)", md)
    assert len(links) > 10 and "figures/curves_fusion.png" in links
    for link in links:
        assert " " not in link and (run / link).is_file(), link
    assert any(link.endswith("_ground-truth.png") for link in links)


def test_stage_table_shows_each_stages_own_peak(quick):
    _, run, _ = quick
    recs = [json.loads(p.read_text()) for p in (run / "stages").glob("*.json")]
    assert {r["peak_rss_scope"] for r in recs} == {"stage"}
    # the process's running maximum is the same figure on every later row; the stages' own are not
    assert len({r["peak_rss_mib"] for r in recs}) > len(recs) // 2
    md = (run / "report.md").read_text()
    for r in recs:
        if r["key"] == "report":   # written before its own record
            continue
        assert re.search(rf"^\| {re.escape(r['key'])} \| {r['seconds']:.1f} \| {r['peak_rss_mib']}( \(children [\d.]+\))? \|$",
                         md, re.M), r["key"]


def test_miou_csv_reads_as_a_table(quick):
    _, run, _ = quick
    table = json.loads((run / "tables" / "miou.json").read_text())
    with (run / "tables" / "miou.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["variant"] for r in rows] == [r["variant"] for r in table["rows"]] == \
        ["ir", "vi", "sspfusion", "laplacian", "gff"]
    for r, t in zip(rows, table["rows"]):
        assert float(r["miou"]) == pytest.approx(t["miou"][0], abs=1e-6)
        assert r["protocol"] == table["protocol_text"]


def test_class_id_predictions_rescore_to_the_recorded_confusion(quick):
    import cv2

    _, run, _ = quick
    out = run / "segment" / "vi" / "seed0"
    ev = json.loads((out / "eval.json").read_text())
    labels = run / "data" / "test" / "Segmentation_labels"
    cm = np.zeros((9, 9), np.int64)
    for stem in ev["images"]:
        ids = cv2.imread(str(out / "predictions" / "class_ids" / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        gt = cv2.imread(str(labels / f"{stem}.png"), cv2.IMREAD_UNCHANGED)
        assert ids.dtype == np.uint8 and ids.ndim == 2 and ids.max() < 9
        keep = gt != 255
        np.add.at(cm, (gt[keep].astype(int), ids[keep].astype(int)), 1)
    assert cm.tolist() == ev["confusion"]


def test_a_local_executor_jobs_log_has_the_plain_lines(quick, tmp_path, monkeypatch):
    """A training run as its own job (executor local): its log file (stdout + stderr of the job
    process) holds one plain line per epoch, no bars."""
    from pipelines.config import from_dict, load_config
    from pipelines.executor import ExecutorConfig, make_executor
    from pipelines.experiment import ExperimentConfig, resolve_config
    from pipelines.stages import SegmentJob

    ws, run, _ = quick
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    cfg = load_config(ExperimentConfig, resolve_config("default"), quick_overrides())
    seg = from_dict(type(cfg.segmentation), {**vars(cfg.segmentation), "device": "cpu"}, "segmentation")
    data = run / "data"
    out = tmp_path / "run" / "segment" / "vi" / "seed0"
    job = SegmentJob(seg, out, {s: data / s / "vi" for s in ("train", "test")},
                     {s: data / s / "Segmentation_labels" for s in ("train", "test")}, "vi", 0, "p")
    with make_executor(ExecutorConfig(kind="local", poll_s=0.2)) as ex:
        info = ex.run(tmp_path / "run", "segment/vi/seed0", "fp", out, job, lambda: out.mkdir(parents=True))
    assert info["miou"] == pytest.approx(json.loads((run / "segment" / "vi" / "seed0" / "eval.json").read_text())["miou"],
                                         abs=0.05)
    log = Path(info["log"]).read_text()
    lines = re.findall(TS + r"segment epoch (\d)/2 \((frozen|full)\): loss \S+ .* img/s \| ETA \S+$", log, re.M)
    assert lines == [("1", "frozen"), ("2", "full")], log[-2000:]
    assert_plain(log)


def chromium_screenshot(page: Path, out: Path, size: str = "1400,3000") -> None:
    """Render ``page`` offline in headless Chromium (no network, fresh profile) into ``out``."""
    import shutil
    import tempfile

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (Debian: apt-get install chromium); the report check "
                    "renders report.html in it")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                        "--disable-component-update", "--disable-sync", "--no-first-run",
                        f"--user-data-dir={profile}", f"--screenshot={out}", f"--window-size={size}",
                        page.resolve().as_uri()], capture_output=True, timeout=180, check=False)
    assert out.is_file(), f"chromium wrote no screenshot of {page}"


def test_report_renders_in_headless_chromium(quick):
    import cv2

    _, run, _ = quick
    shot = run.parent / "report-screenshot.png"      # kept next to the run for a look
    chromium_screenshot(run / "report.html", shot, "1400,4000")
    img = cv2.imread(str(shot), cv2.IMREAD_COLOR)
    assert img is not None and img.shape[:2] == (4000, 1400)
    # the page is drawn: tables, figures and scene images put ink into every quarter
    for part in np.array_split(img, 4):
        assert (part < 200).mean() > 0.01
    # the embedded figures are on the page as drawn (shown at their own size): a patch of each
    # of the first two is found in the screenshot
    for name in ("curves_fusion.png", "curves_segmentation.png"):
        fig = cv2.imread(str(run / "figures" / name), cv2.IMREAD_COLOR)
        h, w = fig.shape[:2]
        patch = fig[h // 4: 3 * h // 4, w // 4: 3 * w // 4]
        score = cv2.matchTemplate(img, patch, cv2.TM_CCOEFF_NORMED).max()
        assert score > 0.9, (name, score)
