"""Commands end to end: `fuseseg check-data` against an independent count of the files, and
`fuseseg run --launcher torchrun --gpus 2` on CPU (gloo)."""
from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from fuseseg.data.pairs import MSRS_CLASSES
from pipelines.cli import main


def test_check_data_prints_what_the_files_hold(tmp_path, capsys):
    from fuseseg.data.synthetic import make_synthetic

    root = tmp_path / "d"
    make_synthetic(root, 3, 2, size=(40, 56), seed=9, workers=1, progress=False)
    lab = sorted((root / "train" / "Segmentation_labels").iterdir())[0]
    img = cv2.imread(str(lab), cv2.IMREAD_UNCHANGED)
    img[:3] = 255                                   # some ignored pixels
    cv2.imwrite(str(lab), img)
    capsys.readouterr()
    assert main(["check-data", str(root)]) == 0
    out = capsys.readouterr().out
    lines = {ln.split("│")[1].strip(): [c.strip() for c in ln.split("│")[1:-1]] for ln in out.splitlines()
             if ln.count("│") > 3}
    for split in ("train", "test"):
        names = sorted(p.stem for p in (root / split / "ir").iterdir())
        day = sum(n[-1] == "D" for n in names)
        row = lines[split]
        assert row[1] == str(len(names)) and row[2] == f"40x56 ({len(names)})"
        assert (row[3], row[4], row[5]) == (str(day), str(len(names) - day), "0")
        # per-class pixel share, counted here from the label files
        counts = np.zeros(256, np.int64)
        for p in (root / split / "Segmentation_labels").iterdir():
            counts += np.bincount(cv2.imread(str(p), cv2.IMREAD_UNCHANGED).ravel(), minlength=256)
        share = 100 * np.append(counts[:9], counts[255]) / counts.sum()
        col = 1 + ["train", "test"].index(split)
        for k, name in enumerate([*MSRS_CLASSES, "ignore (255)"]):
            label = f"{255 if k == 9 else k} {name}"
            assert lines[label][col] == f"{share[k]:.2f}", (split, label)
    assert lines["255 ignore (255)"][1] != "0.00"          # the ignored rows were counted
    assert "OK: 5 pairs, no problems found." in out


@pytest.mark.slow
def test_run_under_torchrun_with_two_processes(tmp_path, monkeypatch, capfd):
    """Every training stage runs under `torchrun --nproc_per_node=2` (gloo on CPU) and the
    protocol records 2 processes; the global batch of 4 is split 2 + 2."""
    from fuseseg.data.synthetic import make_synthetic
    from fuseseg.runtime import load_checkpoint

    make_synthetic(tmp_path / "data", 4, 2, size=(48, 64), seed=1, workers=1, progress=False)
    cfg = {"name": "ddp", "results_dir": str(tmp_path / "results"), "device": "cpu",
           "data": {"root": str(tmp_path / "data")},
           "fusion": [{"name": "sspfusion", "kwargs": {"levels": 2, "channels": [4, 8, 8]}}],
           "variants": ["sspfusion"],
           "fusion_train": {"structure_epochs": 1, "epochs": 1, "batch_size": 4, "crop_size": 32, "workers": 0},
           "metrics": {"enabled": False},
           "segmentation": {"encoder": "tu-mobilenetv3_small_050", "epochs": 1, "frozen_epochs": 0,
                            "batch_size": 4, "crop_size": 32, "workers": 0, "decoder_channels": 16},
           "report": {"bootstrap": 10, "figure_scenes": 1}}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert main(["run", str(path), "--launcher", "torchrun", "--gpus", "2"]) == 0
    printed = capfd.readouterr().out
    assert printed.count("--nproc_per_node=2") == 2          # train_fusion and segment
    run = tmp_path / "results" / "ddp"
    seg = load_checkpoint(run / "segment" / "sspfusion" / "seed0" / "final.pt")
    assert seg["sampler"]["world"] == 2 and seg["sampler"]["batch_size"] == 2   # 2 per process
    assert seg["global_step"] == 1                                               # (4 // 2) // 2
    assert (run / "train_fusion" / "sspfusion" / "final.pt").is_file()
    table = json.loads((run / "tables" / "miou.json").read_text())
    assert table["protocol"]["world_size"] == 2 and "2 processes" in table["protocol_text"]
    assert [r["variant"] for r in table["rows"]] == ["sspfusion"]
    assert Path(run / "segment" / "sspfusion" / "seed0" / "eval.json").is_file()
