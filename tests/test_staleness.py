"""Reruns are never stale: the stage cache notices edited data, edited folder methods and plug-in
sources; ``--from STAGE`` really redoes that stage and every later one; ``key=value`` overrides are
accepted anywhere on the command line."""
from __future__ import annotations

import json
import shutil
import textwrap
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from pipelines.cli import build_parser, main, parse_args

PLUGIN = textwrap.dedent('''
    from fusion.base import LuminanceFusion
    from fusion.registry import register_method

    @register_method("stale_plugin")
    class StalePlugin(LuminanceFusion):
        def fuse_y(self, ir, vi_y):
            return 0.5 * ir + 0.5 * vi_y
''')


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from fuseseg.data.synthetic import make_synthetic

    ws = tmp_path_factory.mktemp("stale")
    make_synthetic(ws / "data", 4, 3, size=(40, 48), seed=5, workers=1, progress=False)
    for split in ("train", "test"):
        shutil.copytree(ws / "data" / split / "vi", ws / "published" / split)
    (ws / "stale_plugin_mod.py").write_text(PLUGIN)
    return ws


def config(ws: Path, name: str) -> Path:
    cfg = {
        "name": name, "results_dir": str(ws / "results"), "device": "cpu", "plugins": ["stale_plugin_mod"],
        "data": {"root": str(ws / "data")},
        "fusion": [{"name": "mean"}, {"name": "stale_plugin"},
                   {"name": "published", "type": "folder", "folder": str(ws / "published")}],
        "metrics": {"enabled": False},
        "segmentation": {"encoder": "tu-mobilenetv3_small_050", "epochs": 1, "frozen_epochs": 0, "batch_size": 2,
                         "frozen_batch_size": 2, "crop_size": 32, "workers": 0, "decoder_channels": 16,
                         "max_steps_per_epoch": 1},
        "report": {"bootstrap": 20, "figure_scenes": 1},
    }
    path = ws / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fingerprints(run_dir: Path) -> dict[str, str]:
    return {p.stem: json.loads(p.read_text())["fingerprint"] for p in (run_dir / "stages").glob("*.json")}


def redone(before: dict, after: dict) -> set[str]:
    return {k for k in after if after[k] != before.get(k)}


def rewrite(path: Path, seed: int) -> None:
    """Replace an image with other pixels of the same size (and so the same file size class)."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    time.sleep(0.02)  # file times are coarse (a kernel tick)
    cv2.imwrite(str(path), np.random.default_rng(seed).integers(0, 256, img.shape, dtype=np.uint8))


def test_edits_to_data_folder_methods_and_plugins_invalidate_dependants(ws, monkeypatch, one_torch_thread):
    monkeypatch.chdir(ws)
    cfg, run_dir = config(ws, "edits"), ws / "results" / "edits"
    only = ["--only", "data,train_fusion,fuse"]
    assert main(["run", str(cfg), *only]) == 0
    first = fingerprints(run_dir)
    assert set(first) == {"data", "fuse__mean", "fuse__stale_plugin", "fuse__published"}
    assert main(["run", str(cfg), *only]) == 0
    assert fingerprints(run_dir) == first                       # nothing changed: nothing redone

    # an edited training infrared image: the data stage and everything after it
    rewrite(ws / "data" / "train" / "ir" / sorted(p.name for p in (ws / "data" / "train" / "ir").iterdir())[0], 1)
    assert main(["run", str(cfg), *only]) == 0
    second = fingerprints(run_dir)
    assert redone(first, second) == set(first)

    # a replaced image of a folder method: that method only
    rewrite(sorted((ws / "published" / "test").iterdir())[0], 2)
    assert main(["run", str(cfg), *only]) == 0
    third = fingerprints(run_dir)
    assert redone(second, third) == {"fuse__published"}

    # an edited plug-in module: its method only
    time.sleep(0.02)
    (ws / "stale_plugin_mod.py").write_text(PLUGIN + "\n# tuned\n")
    assert main(["run", str(cfg), *only]) == 0
    fourth = fingerprints(run_dir)
    assert redone(third, fourth) == {"fuse__stale_plugin"}

    # a removed pair (from the data set and the folder method): everything again
    stem = sorted((ws / "data" / "test" / "ir").iterdir())[-1].name
    for sub in ("ir", "vi", "Segmentation_labels"):
        (ws / "data" / "test" / sub / stem).unlink()
    (ws / "published" / "test" / stem).unlink()
    assert main(["run", str(cfg), *only]) == 0
    fifth = fingerprints(run_dir)
    assert redone(fourth, fifth) == set(first)
    assert not (run_dir / "fused" / "mean" / "test" / stem).exists()


def test_from_stage_redoes_that_stage_and_every_later_one(ws, monkeypatch, one_torch_thread):
    monkeypatch.chdir(ws)
    cfg, run_dir = config(ws, "from"), ws / "results" / "from"
    sel = ["--variants", "mean", "--only", "data,train_fusion,fuse,segment"]
    assert main(["run", str(cfg), *sel]) == 0
    fused = sorted((run_dir / "fused" / "mean" / "test").glob("*.png"))[0]
    good = fused.read_bytes()
    final = run_dir / "segment" / "mean" / "seed0" / "final.pt"
    t_final = final.stat().st_mtime_ns
    fused.write_bytes(cv2.imencode(".png", np.zeros((40, 48, 3), np.uint8))[1].tobytes())  # damaged

    records = run_dir / "stages"
    t_data = (records / "data.json").stat().st_mtime_ns
    assert main(["run", str(cfg), "--variants", "mean", "--from", "fuse"]) == 0
    assert fused.read_bytes() == good                           # the fused image was redone
    assert final.stat().st_mtime_ns > t_final                   # and the segmenter retrained
    assert (records / "data.json").stat().st_mtime_ns == t_data  # earlier stages were not redone
    assert (run_dir / "tables" / "miou.json").is_file()         # the report is a later stage too

    t_fuse = (records / "fuse__mean.json").stat().st_mtime_ns
    t_final = final.stat().st_mtime_ns
    assert main(["run", str(cfg), "--variants", "mean", "--from", "segment"]) == 0
    assert final.stat().st_mtime_ns > t_final
    assert (records / "fuse__mean.json").stat().st_mtime_ns == t_fuse


def test_overrides_are_accepted_anywhere(ws, monkeypatch):
    monkeypatch.chdir(ws)
    cfg = config(ws, "anywhere")
    assert main(["run", str(cfg), "--only", "data", "name=moved"]) == 0
    assert (ws / "results" / "moved" / "stages" / "data.json").is_file()
    assert not (ws / "results" / "anywhere").exists()

    parser = build_parser()
    args = parse_args(parser, ["train-fusion", "c.yaml", "--out", "o", "epochs=2", "--resume", "lr=0.1"])
    assert args.config == "c.yaml" and args.overrides == ["epochs=2", "lr=0.1"] and args.resume
    args = parse_args(parser, ["segment", "train", "--images", "i", "epochs=3", "--labels", "l", "--out", "o"])
    assert args.overrides == ["epochs=3"] and args.labels == "l"
    with pytest.raises(SystemExit) as e:
        parse_args(parser, ["fuse", "--ir", "a", "--vi", "b", "--out", "c", "x=1"])  # fuse takes no overrides
    assert e.value.code == 2
