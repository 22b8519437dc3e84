"""End to end: `fuseseg run` on a few tiny synthetic scenes with tiny networks (CPU).

Checks that every stage runs, the mIoU table has a row per variant, a second run skips every
stage, a changed fusion setting reruns only what depends on it, and that a plug-in module and a
folder of already fused images both enter the table. Also `fuseseg compare`.
"""
from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

from fuseseg.errors import ConfigError, DataError, FusesegError
from pipelines.cli import main

TINY = {
    "name": "tiny",
    "seed": 0,
    "device": "cpu",
    "plugins": ["my_fusion_plugin"],
    "data": {"root": None, "validate": True},
    "fusion": [
        {"name": "sspfusion", "kwargs": {"levels": 2, "channels": [4, 8, 8]}},
        {"name": "mean"},
        {"name": "plugin_avg"},
        {"name": "published", "type": "folder", "folder": None},
    ],
    "fusion_train": {"structure_epochs": 1, "epochs": 1, "batch_size": 4, "crop_size": 32, "workers": 0},
    "fuse_batch_size": 4,
    "metrics": {"enabled": True, "workers": 1},
    "segmentation": {"encoder": "tu-mobilenetv3_small_050", "epochs": 1, "frozen_epochs": 0, "batch_size": 4,
                     "frozen_batch_size": 4, "crop_size": 32, "workers": 0, "decoder_channels": 16,
                     "max_steps_per_epoch": 1},
    "seg_seeds": [0],
    "report": {"bootstrap": 50, "figure_scenes": 2},
}

PLUGIN = textwrap.dedent('''
    """A user's fusion method, registered from a plug-in module."""
    from fusion.base import LuminanceFusion
    from fusion.registry import register_method

    @register_method("plugin_avg")
    class PluginAverage(LuminanceFusion):
        """0.7 IR + 0.3 visible luminance."""

        def fuse_y(self, ir, vi_y):
            return 0.7 * ir + 0.3 * vi_y
''')


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A data set, a folder of 'published' fused images and a plug-in module, shared by the tests."""
    from fuseseg.data.synthetic import make_synthetic

    ws = tmp_path_factory.mktemp("pipeline")
    make_synthetic(ws / "data", 6, 4, size=(48, 64), seed=3, workers=1, progress=False)
    for split in ("train", "test"):   # the 'published' method: the visible images themselves
        shutil.copytree(ws / "data" / split / "vi", ws / "published" / split)
    (ws / "my_fusion_plugin.py").write_text(PLUGIN)
    return ws


def write_config(ws: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(TINY))
    cfg["data"]["root"] = str(ws / "data")
    cfg["results_dir"] = str(ws / "results")
    cfg["fusion"][3]["folder"] = str(ws / "published")
    for key, value in changes.items():
        cfg[key] = value
    path = ws / "exp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def records(run_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (run_dir / "stages").glob("*.json")}


def test_run_end_to_end_skip_and_selective_rerun(workspace, monkeypatch):
    monkeypatch.chdir(workspace)  # plug-ins import from the working directory
    cfg = write_config(workspace)
    run_dir = workspace / "results" / "tiny"
    assert main(["run", str(cfg)]) == 0

    variants = ["ir", "vi", "sspfusion", "mean", "plugin_avg", "published"]
    table = json.loads((run_dir / "tables" / "miou.json").read_text())
    assert [r["variant"] for r in table["rows"]] == variants
    assert "DeepLabV3+" in table["protocol_text"] and table["protocol"]["encoder"] == "tu-mobilenetv3_small_050"
    md = (run_dir / "tables" / "miou.md").read_text()
    assert md.startswith("Protocol: ") and all(f"| {v} |" in md for v in variants)
    assert len(table["gains"]) == 4 and {g["baseline"] for g in table["gains"]} <= {"ir", "vi"}
    metrics = json.loads((run_dir / "metrics" / "metrics.json").read_text())
    assert set(metrics["methods"]) == {"sspfusion", "mean", "plugin_avg", "published"}
    first = records(run_dir)
    stages = {k.split("__")[0] for k in first}
    assert stages == {"data", "train_fusion", "fuse", "metrics", "segment", "report"}
    assert "plugin_avg" in (run_dir / "report.html").read_text()
    html = (run_dir / "report.html").read_text()
    assert "<svg" in html and "data:image/png;base64," in html
    assert (run_dir / "config.yaml").is_file() and json.loads((run_dir / "environment.json").read_text())["seed"] == 0
    # fused images: same names and sizes as the inputs
    assert sorted(p.name for p in (run_dir / "fused" / "mean" / "test").glob("*.png")) == \
        sorted(p.name for p in (workspace / "data" / "test" / "ir").glob("*.png"))

    # the headline gain: mIoU(fused) - mIoU(better single), recomputed from the per-image matrices
    import numpy as np

    def np_miou(cm):
        inter = np.diag(cm).astype(float)
        union = cm.sum(0) + cm.sum(1) - inter
        return float(np.mean(inter[union > 0] / union[union > 0]))

    cms = {v: np.load(run_dir / "segment" / v / "seed0" / "per_image_confusion.npy") for v in variants}
    assert all(cms[v].shape == (4, 9, 9) for v in variants)        # 4 test images
    single = {v: np_miou(cms[v].sum(0)) for v in ("ir", "vi")}
    best = max(single, key=single.get)
    for g in table["gains"]:
        assert g["baseline"] == best
        assert g["gain"] == pytest.approx(np_miou(cms[g["variant"]].sum(0)) - single[best], abs=1e-9)
    row = {r["variant"]: r for r in table["rows"]}
    assert row["mean"]["miou"][0] == pytest.approx(np_miou(cms["mean"].sum(0)), abs=1e-9)

    # second run: every stage skipped, nothing rewritten
    assert main(["run", str(cfg)]) == 0
    assert records(run_dir) == first

    # change a fusion setting of one method: only what depends on it is redone
    cfg2 = write_config(workspace, fusion=[
        {"name": "sspfusion", "kwargs": {"levels": 2, "channels": [4, 8, 12]}}, *TINY["fusion"][1:3],
        {"name": "published", "type": "folder", "folder": str(workspace / "published")}])
    assert main(["run", str(cfg2)]) == 0
    second = records(run_dir)
    changed = {k for k in second if second[k] != first.get(k)}
    assert changed == {"train_fusion__sspfusion", "fuse__sspfusion", "metrics",
                       "segment__sspfusion__seed0", "report"}

    # a report never mixes protocols: results of other segmentation settings are left out
    assert main(["run", str(cfg2), "segmentation.epochs=2", "--only", "report"]) == 0
    rows = json.loads((run_dir / "tables" / "miou.json").read_text())["rows"]
    assert rows == []
    assert main(["run", str(cfg2)]) == 0       # back to the run's own protocol: all rows again
    assert len(json.loads((run_dir / "tables" / "miou.json").read_text())["rows"]) == 6

    # compare: the run with itself merges; a run with another protocol is refused
    other = workspace / "results" / "other"
    shutil.copytree(run_dir, other)
    tj = json.loads((other / "tables" / "miou.json").read_text())
    tj["protocol"]["epochs"] = 340
    (other / "tables" / "miou.json").write_text(json.dumps(tj))
    assert main(["compare", str(run_dir), str(run_dir)]) == 0
    from pipelines.report import compare_runs

    rows, _, _ = compare_runs([run_dir, run_dir, workspace / "results" / ".." / "results" / "tiny"])
    assert [r["variant"] for r in rows] == variants        # one run given three times: listed once
    assert main(["compare", str(run_dir), str(other)]) == 1
    assert main(["compare", str(run_dir), str(other), "--force", "--out", str(workspace / "merged")]) == 0
    merged = (workspace / "merged" / "miou.md").read_text()
    assert "PROTOCOLS DIFFER" in merged and "other:ir" in merged


def test_variants_subset_and_only(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    cfg = write_config(workspace, name="subset")
    run_dir = workspace / "results" / "subset"
    assert main(["run", str(cfg), "--variants", "ir,mean", "--only", "data,train_fusion,fuse,segment,report"]) == 0
    rec = records(run_dir)
    assert "segment__ir__seed0" in rec and "segment__mean__seed0" in rec
    assert not any(k.startswith("segment__vi") for k in rec) and "metrics" not in rec
    rows = json.loads((run_dir / "tables" / "miou.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["ir", "mean"]


def test_run_config_errors(workspace, monkeypatch, capsys):
    monkeypatch.chdir(workspace)
    cfg = write_config(workspace, name="bad")
    assert main(["run", str(cfg), "segmentation.epochz=3"]) == 2
    err = capsys.readouterr().err
    assert "epochz" in err and "Valid keys" in err
    assert main(["run", str(cfg), "segmentation.epochs=many"]) == 2
    assert "expected an integer" in capsys.readouterr().err
    bad = write_config(workspace, name="bad2", fusion=[{"name": "no_such_method"}])
    assert main(["run", str(bad)]) == 2
    out = capsys.readouterr().err
    assert "unknown fusion method 'no_such_method'" in out and "laplacian" in out
    (workspace / "broken_plugin.py").write_text("raise RuntimeError('plugin exploded')\n")
    bad = write_config(workspace, name="bad3", plugins=["broken_plugin"])
    assert main(["run", str(bad)]) == 2
    assert "plugin exploded" in capsys.readouterr().err


def test_folder_method_validation(workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    broken = workspace / "published_broken"
    shutil.copytree(workspace / "published", broken)
    victim = sorted((broken / "test").glob("*.png"))[0]
    victim.unlink()
    cfg = write_config(workspace, name="folderbad",
                       fusion=[{"name": "published", "type": "folder", "folder": str(broken)}])
    from pipelines.commands.run import load_experiment
    from pipelines.run import run_experiment
    from pipelines.stages.base import Plan

    with pytest.raises(DataError) as e:
        run_experiment(load_experiment(str(cfg), []), Plan(only={"data", "train_fusion", "fuse"}))
    assert victim.name in str(e.value) and "no partner" in str(e.value)
    import cv2
    import numpy as np
    cv2.imwrite(str(victim), np.zeros((10, 10, 3), np.uint8))
    with pytest.raises(DataError, match="must keep the source size"):
        run_experiment(load_experiment(str(cfg), []), Plan(only={"data", "train_fusion", "fuse"}))


def test_lock_refuses_second_run(workspace):
    from pipelines.runstate import RunLock

    lock = workspace / "locked" / ".lock"
    with RunLock(lock):
        with pytest.raises(FusesegError, match="in use by another fuseseg process"):
            other = RunLock(lock)
            other._pid_alive = lambda pid: True
            import os
            lock.write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": os.getpid() + 10**6}))
            other.acquire()
    # a lock left by a dead process is taken over
    lock.write_text(json.dumps({"host": __import__("socket").gethostname(), "pid": 2**22 + 12345}))
    with RunLock(lock):
        assert json.loads(lock.read_text())["pid"] == __import__("os").getpid()
    assert lock.read_text() == ""   # released: the file (not the lock) stays, naming nobody


def test_protocol_states_world_size_and_global_batch():
    from pipelines.config import load_config
    from pipelines.experiment import ExperimentConfig
    from pipelines.runstate import fingerprint
    from pipelines.stages.segment import protocol_of

    one = load_config(ExperimentConfig, None, [])
    four = load_config(ExperimentConfig, None, ["launcher=torchrun", "gpus=4"])
    (k1, t1), (k4, t4) = protocol_of(one), protocol_of(four)
    assert k1["world_size"] == 1 and k4["world_size"] == 4 and fingerprint(k1) != fingerprint(k4)
    assert "(global batches, 1 process)" in t1 and "(global batches, 4 processes)" in t4
    assert f"at batch {one.segmentation.batch_size} (global" in t1


def test_paper_config_freezes_a_pretrained_encoder():
    from pipelines.config import load_config
    from pipelines.experiment import REPO_CONFIGS, ExperimentConfig

    paper = load_config(ExperimentConfig, REPO_CONFIGS / "msrs.yaml")
    assert paper.segmentation.frozen_epochs == 100 and paper.segmentation.encoder_weights == "imagenet"
    assert paper.segmentation.random_frozen_encoder_warning() is None
    random = load_config(ExperimentConfig, REPO_CONFIGS / "msrs.yaml", ["segmentation.encoder_weights=null"])
    warning = random.segmentation.random_frozen_encoder_warning()
    assert "freeze a randomly initialised encoder" in warning and "encoder_weights: imagenet" in warning
    assert "\n" not in warning
    assert load_config(ExperimentConfig, None, ["segmentation.frozen_epochs=0"]) \
        .segmentation.random_frozen_encoder_warning() is None


def test_config_validation_messages():
    from pipelines.config import load_config
    from pipelines.experiment import ExperimentConfig

    with pytest.raises(ConfigError, match="appear twice"):
        load_config(ExperimentConfig, None, ["fusion=[{name: a}, {name: a}]"])
    with pytest.raises(ConfigError, match="reserved"):
        load_config(ExperimentConfig, None, ["fusion=[{name: ir}]"])
    with pytest.raises(ConfigError, match="unknown variant"):
        load_config(ExperimentConfig, None, ["variants=[ir, nope]"])
    with pytest.raises(ConfigError, match="type: folder but no `folder:`"):
        load_config(ExperimentConfig, None, ["fusion=[{name: x, type: folder}]"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ExperimentConfig, "nope.yaml")
