"""One quick `fuseseg run` with its output going to a file (not a terminal), then everything a
researcher reads from it: the plain log lines, TensorBoard events, the report's figures and links,
the CSV table, class-id predictions, the report rendered in headless Chromium, `--dry-run`, the
README's Python API example; and one training job run by the local executor, whose own log gets
the plain lines too.
"""
from __future__ import annotations

import ast
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
import torch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

def readme_example() -> str:
    """The README's Python API example (the code block under '## Python API')."""
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API", 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def quick_overrides() -> list[str]:
    """The ``quick = [...]`` override list of the README example (the quick run is the README's)."""
    for node in ast.parse(readme_example()).body:
        if isinstance(node, ast.Assign) and node.targets[0].id == "quick":
            return ast.literal_eval(node.value)
    raise AssertionError("the README example lost its `quick = [...]` overrides")


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
    # approx, not round(., 5): a float32 event of 1.938995 rounds to 1.93899, the csv's to 1.939
    assert [(e.step, e.value) for e in seg.Scalars("loss/ce")] == \
        [(int(r["epoch"]), pytest.approx(float(r["ce"]), rel=1e-5)) for r in srows]


def test_report_html_is_self_contained_with_every_figure(quick):
    _, run, _ = quick
    html = (run / "report.html").read_text()
    plots = re.findall(r"<img class='plot' src='data:image/png;base64,([^']+)'", html)
    titles = re.findall(r"<h3>([^<]+)</h3><img class='plot'", html)
    assert titles == ["Fusion quality metric against mIoU per fused variant",
                      "Fusion training curves", "Segmentation training curves", "Per-class IoU per variant",
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
    from pipelines.stages.segment import SegmentJob

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


def tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


def dry_lines(stdout: str) -> dict[str, list[str]]:
    """``{stage: [run|skip, stage, why]}`` of a ``--dry-run`` output."""
    return {ln.split()[1]: ln.split(None, 2) for ln in stdout.splitlines() if ln.startswith(("  run", "  skip"))}


def test_dry_run_after_the_run_writes_nothing_and_names_what_changed(quick):
    ws, run, _ = quick
    before = tree(ws)
    r = cli("run", "default", *quick_overrides(), "--dry-run", cwd=ws)
    assert r.returncode == 0, r.stderr
    assert "name: quick" in r.stdout and "0 of 12 stages would run." in r.stdout
    assert set(w[2] for w in dry_lines(r.stdout).values()) == {"up to date"}
    r = cli("run", "default", *quick_overrides(), "fusion_train.lr=0.001", "--dry-run", cwd=ws)
    assert r.returncode == 0, r.stderr
    lines = dry_lines(r.stdout)
    assert lines["train_fusion/sspfusion"][0] == "run" and lines["train_fusion/sspfusion"][2] == \
        "changed: fusion_train.lr"
    assert lines["fuse/sspfusion"][2] == "changed: train_fusion/sspfusion"
    assert lines["metrics"][2] == "changed: fuse.sspfusion"
    assert lines["segment/sspfusion/seed0"][2] == "changed: fuse/sspfusion"
    assert lines["fuse/laplacian"][0] == "skip" and lines["segment/ir/seed0"][0] == "skip"
    assert lines["report"][:1] == ["run"] and lines["report"][2] == "changed: metrics, segment.sspfusion/0"
    assert "5 of 12 stages would run." in r.stdout
    r = cli("run", "default", *quick_overrides(), "segmentation.epochs=3", "--from", "metrics", "--dry-run", cwd=ws)
    lines = dry_lines(r.stdout)
    assert lines["metrics"][2] == "forced by --from" and lines["segment/ir/seed0"][2] == "forced by --from"
    assert lines["data"][2] == "up to date"
    assert tree(ws) == before                                        # nothing written, nothing touched


def test_readme_python_example_runs(quick, monkeypatch, capsys):
    ws, run, _ = quick
    monkeypatch.chdir(ws)
    before = json.loads((run / "stages" / "report.json").read_text())
    ns: dict = {}
    exec(compile(readme_example(), "README.md example", "exec"), ns)
    assert ns["r"]["path"] == Path("results/quick")
    assert json.loads((run / "stages" / "report.json").read_text()) == before   # every stage was up to date
    printed = capsys.readouterr().out
    assert "'sspfusion':" in printed and "'gff':" in printed
    r = ns["r"]
    table = json.loads((run / "tables" / "miou.json").read_text())
    assert {v: row["miou"] for v, row in r["miou"].items()} == {t["variant"]: t["miou"][0] for t in table["rows"]}
    assert set(r["metrics"]["per_image"]["gff"]) == set(r["segmentation"]["gff"][0]["images"])
    assert r["training"]["train_fusion/sspfusion"][-1]["phase"] == "fusion"
    assert r["segmentation"]["vi"][0]["confusion"].shape == (9, 9)
    assert r["segmentation"]["vi"][0]["confusion"].tolist() == \
        json.loads((run / "segment" / "vi" / "seed0" / "eval.json").read_text())["confusion"]
    assert ns["fused"].shape == (64, 64, 3) and ns["fused"].dtype == np.uint8
    # uniform inputs: the fused image is uniform too, its colour the visible's (blue above red)
    f = ns["fused"].reshape(-1, 3).astype(int)
    assert (f.max(0) - f.min(0)).max() <= 1 and f[0, 2] > f[0, 0]


def test_api_dry_run_and_fuse_match_the_cli(quick, monkeypatch):
    from fuseseg.data.io import read_infrared, read_visible
    from pipelines import api as fs

    ws, run, _ = quick
    monkeypatch.chdir(ws)
    decisions = fs.dry_run("default", [*quick_overrides(), "segmentation.lr=0.01"])
    assert [d["stage"] for d in decisions if d["run"]] == [f"segment/{v}/seed0" for v in
                                                           ("ir", "vi", "sspfusion", "laplacian", "gff")] + ["report"]
    assert {d["why"] for d in decisions if d["stage"].startswith("segment/")} == {"changed: segmentation.lr"}
    test = run / "data" / "test"
    stem = sorted(p.stem for p in (test / "ir").glob("*.png"))[0]
    ir, vi = read_infrared(test / "ir" / f"{stem}.png"), read_visible(test / "vi" / f"{stem}.png")
    ours = fs.fuse(ir, vi, "gff")
    assert np.array_equal(ours, read_visible(run / "fused" / "gff" / "test" / f"{stem}.png"))
    as_float = fs.fuse(ir / 255.0, vi / 255.0, "gff")
    assert np.abs(as_float.astype(int) - ours.astype(int)).max() <= 1
    # sspfusion with the run's trained weights and its precision (fusion_train.amp: auto, so bf16 where
    # the CPU has it natively, else fp32), as the fuse stage did
    ck = run / "train_fusion" / "sspfusion" / "final.pt"
    trained_in = torch.load(ck, map_location="cpu", weights_only=False)["precision"]["precision"]
    assert np.array_equal(fs.fuse(ir, vi, "sspfusion", checkpoint=ck, amp="bf16" if trained_in == "bf16" else "off"),
                          read_visible(run / "fused" / "sspfusion" / "test" / f"{stem}.png"))


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
    # of the first two is found in a screenshot of the whole page (they follow the analysis sections)
    tall = run.parent / "report-screenshot-tall.png"
    chromium_screenshot(run / "report.html", tall, "1400,16000")
    img = cv2.imread(str(tall), cv2.IMREAD_COLOR)
    for name in ("curves_fusion.png", "curves_segmentation.png"):
        fig = cv2.imread(str(run / "figures" / name), cv2.IMREAD_COLOR)
        h, w = fig.shape[:2]
        patch = fig[h // 4: 3 * h // 4, w // 4: 3 * w // 4]
        score = cv2.matchTemplate(img, patch, cv2.TM_CCOEFF_NORMED).max()
        assert score > 0.9, (name, score)
