"""A run folder is fingerprinted relative to itself: moved or copied, a finished run stays up to
date; the data set it generated is fingerprinted by its files (an edited PNG makes every stage
that reads it stale); a run folder written before (the run's path in the training's fingerprint,
no manifest of the generated files) stays up to date in place and moved."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import cv2
import pytest
import yaml

import pipelines.stages.train_fusion as stage_train
from pipelines.api import dry_run
from pipelines.cli import main
from pipelines.runstate import accept_earlier_form, mark_stage_done, run_relative

TINY = {
    "name": "tiny", "seed": 0, "device": "cpu", "plugins": ["fusion_tiny"],
    "data": {"root": None, "synthetic": {"train": 4, "test": 3, "size": [48, 64]}},
    "fusion": [{"name": "tiny", "method": "tiny-trainable"}, {"name": "mean"}], "variants": ["ir", "tiny", "mean"],
    "fusion_train": {"structure_epochs": 1, "epochs": 1, "batch_size": 4, "crop_size": 32, "workers": 0},
    "fuse_batch_size": 4,
    "metrics": {"enabled": True, "workers": 1},
    "segmentation": {"encoder": "tu-mobilenetv3_small_050", "epochs": 1, "frozen_epochs": 0, "batch_size": 2,
                     "frozen_batch_size": 2, "crop_size": 32, "workers": 0, "decoder_channels": 16,
                     "max_steps_per_epoch": 1},
    "seg_seeds": [0],
    "report": {"bootstrap": 20, "figure_scenes": 1},
}


def records(run_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (run_dir / "stages").glob("*.json")}


def decisions(cfg: Path, results: Path) -> dict[str, tuple[bool, str]]:
    return {d["stage"]: (d["run"], d["why"]) for d in dry_run(cfg, [f"results_dir={results}"])}


def edit_png(path: Path) -> None:
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    time.sleep(0.02)  # file times are coarse (a kernel tick)
    assert cv2.imwrite(str(path), 255 - img)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished tiny run (generated data, a trained tiny fusion method, a classical one)."""
    ws = tmp_path_factory.mktemp("reloc")
    cfg = ws / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "results_dir": str(ws / "a")}))
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["run", str(cfg)]) == 0
    finally:
        torch.set_num_threads(n)
    return cfg, ws / "a" / "tiny"


def test_run_relative_names_paths_inside_the_run_only(tmp_path):
    run = tmp_path / "r"
    (run / "data").mkdir(parents=True)
    assert run_relative(run / "data", run) == "<run>/data"
    assert run_relative(tmp_path / "r" / ".." / "r" / "data" / "x.png", run) == "<run>/data/x.png"
    assert run_relative(tmp_path / "rr" / "data", run) is None   # a sibling with the same prefix
    assert run_relative(tmp_path / "data", run) is None


def test_accept_earlier_form_only_for_a_finished_record_holding_it(tmp_path):
    assert accept_earlier_form(tmp_path, "s", "new", ["old"]) == "new"      # no record
    mark_stage_done(tmp_path, "s", "old", 1.0)
    assert accept_earlier_form(tmp_path, "s", "new", ["other", "old"]) == "old"
    assert accept_earlier_form(tmp_path, "s", "new", ["other"]) == "new"
    mark_stage_done(tmp_path, "s", "new", 1.0)
    assert accept_earlier_form(tmp_path, "s", "new", ["old"]) == "new"


def test_copied_run_folder_is_up_to_date_and_edited_data_is_stale(finished, tmp_path, one_torch_thread):
    cfg, run_dir = finished
    before = records(run_dir)
    assert {k.split("__")[0] for k in before} == {"data", "train_fusion", "fuse", "metrics", "segment", "report"}
    assert "files" in before["data"]
    moved = tmp_path / "elsewhere"
    shutil.copytree(run_dir, moved / "tiny")   # (copies modification times, as cp -a / rsync -a do)
    dec = decisions(cfg, moved)
    assert len(dec) == len(before) and all(not run for run, _ in dec.values()), dec
    # the copy's data: one generated visible image edited -> everything that reads the data is stale
    edit_png(sorted((moved / "tiny" / "data" / "train" / "vi").glob("*.png"))[0])
    dec = decisions(cfg, moved)
    assert dec["data"] == (False, "up to date")
    stale = {k for k, (run, _) in dec.items() if run}
    assert stale == set(dec) - {"data"}, dec
    assert dec["train_fusion/tiny"][1] == "changed: data"
    assert dec["segment/ir/seed0"][1] == "changed: data"
    # the original is untouched and still up to date
    assert all(not run for run, _ in decisions(cfg, run_dir.parent).values())


def test_run_folder_written_before_stays_up_to_date_in_place_and_moved(tmp_path, monkeypatch, capsys,
                                                                      one_torch_thread):
    """The earlier form: the training fingerprinted with ``str(<run>/data)``, the data record
    without ``files`` (as fuseseg wrote them before fingerprints became run-relative)."""
    cfg = tmp_path / "tiny.yaml"
    small = {**TINY, "fusion": [TINY["fusion"][0]], "metrics": {"enabled": False}, "variants": ["tiny"],
             "results_dir": str(tmp_path / "old")}
    cfg.write_text(yaml.safe_dump(small))
    with monkeypatch.context() as m:
        m.setattr(stage_train, "run_relative", lambda path, run_dir: None)
        assert main(["run", str(cfg), "--threads", "1"]) == 0
    run_dir = tmp_path / "old" / "tiny"
    # (--threads: said once in the run's header, recorded with why in environment.json)
    assert "1 torch thread(s): 1 as given (--threads / threads:)" in " ".join(capsys.readouterr().out.split())
    env = json.loads((run_dir / "environment.json").read_text())["threads"]
    assert env["threads"] == 1 and env["adaptive"] is False and env["usable_cpus"] >= 1
    rec = json.loads((run_dir / "stages" / "data.json").read_text())
    del rec["files"]
    (run_dir / "stages" / "data.json").write_text(json.dumps(rec))
    train = json.loads((run_dir / "stages" / "train_fusion__tiny.json").read_text())
    assert train["inputs"]["fusion_train.data_root"] == stage_train.fingerprint(str(run_dir / "data"))
    shutil.copytree(run_dir, tmp_path / "moved" / "tiny")
    assert all(not run for run, _ in decisions(cfg, tmp_path / "old").values())
    assert all(not run for run, _ in decisions(cfg, tmp_path / "moved").values())
    # a real rerun in place skips every stage and adds the generated files' manifest to the record
    before = records(run_dir)
    assert main(["run", str(cfg)]) == 0
    after = records(run_dir)
    assert {k: r["fingerprint"] for k, r in after.items()} == {k: r["fingerprint"] for k, r in before.items()}
    assert "files" in after["data"]
    edit_png(sorted((run_dir / "data" / "test" / "ir").glob("*.png"))[0])
    dec = decisions(cfg, tmp_path / "old")
    assert {k for k, (run, _) in dec.items() if run} == set(dec) - {"data"}, dec
