"""Data-set scorer and the ``fuseseg metrics`` command on small temporary folders."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from fuseseg.errors import DataError
from fusion import metrics as M
from fusion.scoring import results_table, score_folders

H, W = 48, 56


def _write(folder: Path, name: str, img: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    assert cv2.imwrite(str(path), img)
    return path


@pytest.fixture()
def dataset(tmp_path):
    """3 pairs (ir grey PNG, vi colour PNG) and two methods: mean (PNG) and ir copy (BMP)."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:H, 0:W]
    for i, stem in enumerate(["a01", "b02", "c03"]):
        ir = np.clip(100 + 60 * np.sin(xx / (4.0 + i)) + rng.normal(0, 8, (H, W)), 0, 255).astype(np.uint8)
        vi = np.clip(rng.normal(120, 30, (H, W, 3)) + yy[..., None], 0, 255).astype(np.uint8)
        _write(tmp_path / "ir", f"{stem}.png", ir)
        _write(tmp_path / "vi", f"{stem}.png", vi)
        grey = cv2.cvtColor(vi.astype(np.float32), cv2.COLOR_BGR2GRAY)
        _write(tmp_path / "mean", f"{stem}.png", np.round((ir + np.round(grey)) / 2).astype(np.uint8))
        _write(tmp_path / "irc", f"{stem}.bmp", ir)
    return tmp_path


def test_scores_match_compute_all_and_files_are_written(dataset, tmp_path):
    calls = []
    out = tmp_path / "out"
    res = score_folders(dataset / "ir", dataset / "vi", {"mean": dataset / "mean", "irc": dataset / "irc"},
                        out_dir=out, workers=1, conventions="sspfusion",
                        progress=lambda d, t: calls.append((d, t)))
    assert res.stems == ["a01", "b02", "c03"] and res.methods == ["mean", "irc"]
    assert calls == [(1, 3), (2, 3), (3, 3)]
    for stem in res.stems:
        ir = M.read_gray_reference(dataset / "ir" / f"{stem}.png")
        vi = M.read_gray_reference(dataset / "vi" / f"{stem}.png")
        fused = M.read_gray_reference(dataset / "mean" / f"{stem}.png")
        assert res.per_image["mean"][stem] == M.compute_all(fused, ir, vi, conventions="sspfusion")
    for k in M.METRICS:
        want = sum(res.per_image["irc"][s][k] for s in res.stems) / 3
        assert math.isclose(res.means["irc"][k], want, rel_tol=1e-12) or res.means["irc"][k] == want
    # the ir copy has no artefacts (Nabf 0, lower is better) and the larger MI (F = IR)
    best = res.best()
    assert best["Nabf"] == ["irc"] and best["MI"] == ["irc"]
    assert res.means["irc"]["Nabf"] == 0.0

    # CSV: one row per method and image, full precision
    rows = list(csv.reader((out / "metrics.csv").open()))
    assert rows[0] == ["method", "image", *M.METRICS]
    assert len(rows) == 1 + 6
    row = rows[1]
    assert row[:2] == ["mean", "a01"]
    assert float(row[2 + M.METRICS.index("VIF")]) == res.per_image["mean"]["a01"]["VIF"]
    # JSON: convention, means, per image; PSNR of the ir copy is finite here
    data = json.loads((out / "metrics.json").read_text())
    assert data["convention"]["mi_unit"] == "bits"
    assert "MI=MI(F,IR)+MI(F,VI) in bits" in data["convention_text"]
    assert data["n_images"] == 3 and data["lower_is_better"] == ["MSE", "Nabf"]
    assert data["methods"]["mean"]["mean"]["SSIM"] == res.means["mean"]["SSIM"]
    assert data["methods"]["irc"]["per_image"]["c03"]["Qabf"] == res.per_image["irc"]["c03"]["Qabf"]
    assert sorted(p.name for p in out.iterdir()) == ["metrics.csv", "metrics.json"]  # no temp files left
    assert res.files == {"csv": out / "metrics.csv", "json": out / "metrics.json"}


def test_two_workers_give_the_same_numbers(dataset):
    kw = dict(ir_dir=dataset / "ir", vi_dir=dataset / "vi", fused={"mean": dataset / "mean"},
              metrics=["MI", "Qabf", "VIF"])
    one = score_folders(**kw, workers=1)
    two = score_folders(**kw, workers=2)
    assert one.per_image == two.per_image and one.means == two.means


def test_mismatched_file_sets_name_the_files(dataset):
    (dataset / "mean" / "b02.png").unlink()
    _write(dataset / "mean", "zz9.png", np.zeros((H, W), np.uint8))
    with pytest.raises(DataError) as exc:
        score_folders(dataset / "ir", dataset / "vi", {"mean": dataset / "mean"}, workers=1)
    msg = str(exc.value)
    assert "1 file(s) in ir" in msg and "b02.png" in msg  # b02 has no fused partner
    assert "1 file(s) in mean" in msg and "zz9.png" in msg
    with pytest.raises(DataError, match="does not exist"):
        score_folders(dataset / "ir", dataset / "vi", {"m": dataset / "nope"}, workers=1)
    with pytest.raises(DataError, match="method name 'ir' is not allowed"):
        score_folders(dataset / "ir", dataset / "vi", {"ir": dataset / "irc"}, workers=1)


def test_size_mismatch_names_the_file(dataset):
    _write(dataset / "mean", "c03.png", np.zeros((H, W - 2), np.uint8))
    with pytest.raises(DataError) as exc:
        score_folders(dataset / "ir", dataset / "vi", {"mean": dataset / "mean"}, workers=1)
    msg = str(exc.value)
    assert "c03.png" in msg and f"{H}x{W - 2}" in msg and f"{H}x{W}" in msg and "'mean'" in msg
    # the same error crosses the thread-pool boundary
    with pytest.raises(DataError, match="c03.png"):
        score_folders(dataset / "ir", dataset / "vi", {"mean": dataset / "mean"}, workers=2)


def test_results_table_marks_best_and_prints_convention(dataset):
    from rich.console import Console
    res = score_folders(dataset / "ir", dataset / "vi", {"mean": dataset / "mean", "irc": dataset / "irc"},
                        workers=1, metrics=["MI", "Nabf"])
    con = Console(width=200, record=True)
    con.print(results_table(res))
    text = con.export_text()
    assert "Conventions: MI=MI(F,IR)+MI(F,VI) in nats" in text
    nabf_line = next(line for line in text.splitlines() if line.lstrip("│ ").startswith("Nabf"))
    assert "↓" in nabf_line and nabf_line.count("*") == 1 and "0.0000*" in nabf_line


def test_cli_metrics_command(dataset, tmp_path, capsys):
    from pipelines.cli import main
    out = tmp_path / "cli-out"
    rc = main(["metrics", "--ir", str(dataset / "ir"), "--vi", str(dataset / "vi"),
               "--fused", f"mean={dataset / 'mean'}", "--fused", f"irc={dataset / 'irc'}",
               "--out", str(out), "--mi-unit", "bits", "--workers", "1", "--metrics", "MI,SSIM,Nabf"])
    assert rc == 0
    data = json.loads((out / "metrics.json").read_text())
    assert data["metrics"] == ["MI", "SSIM", "Nabf"] and data["convention"]["mi_unit"] == "bits"
    printed = capsys.readouterr().out
    assert "MI (bits)" in printed and "metrics.json" in printed

    rc = main(["metrics", "--ir", str(dataset / "ir"), "--vi", str(dataset / "vi"), "--fused", "nodir"])
    assert rc == 2
    assert "--fused 'nodir': expected NAME=DIR" in capsys.readouterr().err
    rc = main(["metrics", "--ir", str(dataset / "ir"), "--vi", str(dataset / "vi"),
               "--fused", f"m={dataset / 'mean'}", "--metrics", "MI,XYZ"])
    assert rc == 2
    assert "unknown metric 'XYZ'" in capsys.readouterr().err


def test_identical_images_psnr_inf_is_null_in_json(tmp_path):
    img = (np.arange(H * W).reshape(H, W) % 251).astype(np.uint8)
    for d in ("ir", "vi", "same"):
        _write(tmp_path / d, "x.png", img)
    res = score_folders(tmp_path / "ir", tmp_path / "vi", {"same": tmp_path / "same"},
                        out_dir=tmp_path / "o", workers=1, metrics=["PSNR", "MSE"])
    assert res.means["same"]["PSNR"] == math.inf and res.n_images == 1
    data = json.loads((tmp_path / "o" / "metrics.json").read_text())
    assert data["methods"]["same"]["mean"] == {"PSNR": None, "MSE": 0.0}
    assert (tmp_path / "o" / "metrics.csv").read_text().splitlines()[1] == "same,x,0.0,inf"  # canonical metric order: MSE, PSNR
