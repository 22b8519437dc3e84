"""Shipping a learned peer's weights (benchmarks/ship_fusion.py) and using them: the JSON record,
``checkpoint: pretrained``, ``fuseseg fuse --method NAME`` and ``list-methods``, with tiny trained
checkpoints written to a temporary weights folder; the convergence rule of the record; the peers'
training configs (same data as SSPFusion's, never the test sets) and, slow, a 2-step smoke run of
each."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import require_shared

import fusion.pretrained as pretrained
from fuseseg.data.io import read_visible
from fusion.fuse import fuse_folder, load_fusion_method
from fusion.train import FusionTrainConfig, train_fusion
from fusion.train_log import loss_convergence
from pipelines.cli import main

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REPO = Path(__file__).resolve().parents[1]
PEERS = ("seafusion", "didfuse", "rfn_nest")
#: tiny settings per peer (RFN-Nest at narrow widths: same code, fast)
TINY_KWARGS = {"seafusion": {}, "didfuse": {}, "rfn_nest": {"widths": [4, 6, 8, 10]}}


@pytest.fixture(scope="module")
def shipped(tmp_path_factory) -> Path:
    """A weights folder holding a tiny trained, shipped checkpoint of every peer (no metrics)."""
    from benchmarks.ship_fusion import main as ship

    base = tmp_path_factory.mktemp("ship")
    rng = np.random.default_rng(0)
    from conftest import write_png
    for i in range(4):
        write_png(base / "pairs" / "ir" / f"{i}.png", rng.integers(0, 256, (24, 32), dtype=np.uint8))
        write_png(base / "pairs" / "vi" / f"{i}.png", rng.integers(0, 256, (24, 32, 3), dtype=np.uint8))
    for name in PEERS:
        cfg = FusionTrainConfig(method=name, method_kwargs=TINY_KWARGS[name], data_root=str(base / "pairs"),
                                epochs=2, structure_epochs=0, batch_size=2, crop_size=16, workers=0,
                                device="cpu", lr=1e-3, amp="off")
        train_fusion(cfg, base / "runs" / name, progress=False)
        ship([str(base / "runs" / name), "--method", name, "--no-metrics", "--weights-dir", str(base / "weights")])
    return base


@pytest.mark.parametrize("name", PEERS)
def test_ship_record_describes_the_run(shipped, name):
    pt, js = shipped / "weights" / f"{name}.pt", shipped / "weights" / f"{name}.json"
    ckpt = torch.load(pt, map_location="cpu", weights_only=True)  # tensors and plain types only
    final = torch.load(shipped / "runs" / name / "final.pt", map_location="cpu", weights_only=False)
    info = json.loads(js.read_text())
    assert info["method"] == ckpt["method"] == name and info["kwargs"] == ckpt["kwargs"]
    assert info["sha256"] == pretrained.sha256(pt)
    assert info["command"] == f"fuseseg train-fusion configs/{name}-pretrain.yaml --out runs/{name}-pretrain"
    assert (REPO / "configs" / f"{name}-pretrain.yaml").is_file()
    n_phases = len(final["schedule"])
    assert info["steps"] == final["global_step"] == 2 * 2 * n_phases   # 4 pairs / batch 2, 2 epochs a phase
    assert info["schedule"] == final["schedule"] == [[p, 2] for p in create_phases(name)]
    assert info["recipe"] == final["config"] and info["data"]["real"]["pairs"] == 4
    assert info["data_summary"] == "4 pairs pairs + 0 synthetic day/night scenes"
    assert len(info["commit"]) >= 7 and info["train_seconds"] > 0
    assert info["metrics"] is None and "--no-metrics" in info["metrics_note"]
    conv = info["convergence"]
    assert set(conv["phases"]) == set(create_phases(name)) and conv["status"] in (
        "converged", "still falling", "not falling")
    assert conv == loss_convergence(final["log"])
    assert set(info["loss_curve"]["phases"]) == set(create_phases(name))
    assert ("semantic_loss" in info) == (name == "seafusion")
    if name == "seafusion":
        assert info["semantic_loss"].startswith("off")
    assert "structure_iou" not in info and "head" not in info   # SSPFusion's only


def create_phases(name: str) -> tuple[str, ...]:
    from fusion.registry import create_method

    return tuple(create_method(name, **TINY_KWARGS[name]).phases)


@pytest.mark.parametrize("name", PEERS)
def test_pretrained_and_fuse_method_use_the_shipped_peer(shipped, name, monkeypatch, make_pairs, tmp_path, capsys):
    from pipelines.experiment import FusionMethodConfig
    from pipelines.stages.train_fusion import check_fusion_methods

    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", shipped / "weights")
    assert pretrained.resolve_checkpoint("pretrained", name) == shipped / "weights" / f"{name}.pt"
    check_fusion_methods([FusionMethodConfig(name=name, checkpoint=Path("pretrained"))])
    root = make_pairs(n=2, size=(20, 28))
    rc = main(["fuse", "--method", name, "--ir", str(root / "ir"), "--vi", str(root / "vi"),
               "--out", str(tmp_path / "a"), "--no-progress"])
    assert rc == 0
    out = capsys.readouterr()
    assert f"using the shipped {name} weights ({name}.pt: {2 * 2 * len(create_phases(name))} steps" in out.out + out.err
    ref = load_fusion_method(checkpoint=shipped / "runs" / name / "final.pt", device="cpu")
    fuse_folder(ref, root / "ir", root / "vi", tmp_path / "b", "cpu", progress=False)
    files = sorted((tmp_path / "b").glob("*.png"))
    assert len(files) == 2
    for f in files:
        assert np.array_equal(read_visible(f), read_visible(tmp_path / "a" / f.name))


def test_ship_scores_the_test_sets_and_compares_with_mean(shipped, tmp_path, monkeypatch):
    from conftest import write_png

    import benchmarks.ship_fusion as sf
    from fusion.scoring import score_folders

    rng = np.random.default_rng(3)
    for name in ("msrs", "tno"):   # stand-ins for ../shared/data/real/{msrs,tno}
        for i in range(2):
            write_png(tmp_path / "real" / name / "ir" / f"{i}.png", rng.integers(0, 256, (48, 56), dtype=np.uint8))
            write_png(tmp_path / "real" / name / "vi" / f"{i}.png", rng.integers(0, 256, (48, 56), dtype=np.uint8))
    monkeypatch.setattr(sf, "REAL", tmp_path / "real")
    sf.main([str(shipped / "runs" / "didfuse"), "--weights-dir", str(tmp_path / "w")])
    info = json.loads((tmp_path / "w" / "didfuse.json").read_text())
    assert info["metrics_convention"] == "reference preset" and "metrics_note" not in info
    for name in ("msrs", "tno"):   # the same numbers by fusing and scoring here
        ts = tmp_path / "real" / name
        fused = {"didfuse": tmp_path / "f" / name / "d", "mean": tmp_path / "f" / name / "m"}
        for key, m in (("didfuse", load_fusion_method(checkpoint=tmp_path / "w" / "didfuse.pt", device="cpu")),
                       ("mean", load_fusion_method("mean", device="cpu"))):
            fuse_folder(m, ts / "ir", ts / "vi", fused[key], "cpu", batch_size=1, progress=False, amp="off")
        res = score_folders(ts / "ir", ts / "vi", fused, workers=1, conventions="reference").to_dict()["methods"]
        for key, got in (("didfuse", info["metrics"][name]), ("mean", info["metrics_vs_mean"][name]["mean"])):
            for k in ("MI", "SF", "AG", "VIF", "Qabf", "SSIM"):
                assert got[k] == pytest.approx(res[key]["mean"][k], rel=1e-6), (name, key, k)
        wins = [k for k in ("MI", "SF", "AG", "VIF", "Qabf", "SSIM") if res["didfuse"]["mean"][k] > res["mean"]["mean"][k]]
        assert info["metrics_vs_mean"][name]["better_than_mean"] == wins
        assert info["metrics_vs_mean"][name]["better_than_mean_on_4_of_6"] == (len(wins) >= 4)


def test_ship_refuses_another_methods_run(shipped, tmp_path):
    from benchmarks.ship_fusion import main as ship

    with pytest.raises(SystemExit, match="holds fusion method 'didfuse', not 'seafusion'"):
        ship([str(shipped / "runs" / "didfuse"), "--method", "seafusion", "--no-metrics",
              "--weights-dir", str(tmp_path)])
    assert not list(tmp_path.iterdir())


def test_list_methods_shows_the_peers_as_trainable(capsys):
    from pipelines.commands.info import method_rows

    rows = {r["name"]: r for r in method_rows([])}
    for name in PEERS:
        assert rows[name]["trainable"] is True and rows[name]["origin"].startswith("built-in (fusion.models.")
    assert main(["list-methods"]) == 0
    text = capsys.readouterr().out
    for name in PEERS:
        line = next(ln for ln in text.splitlines() if f" {name} " in ln)
        assert " yes " in line, line


# ---------------------------------------------------------------- the convergence rule
def rows_of(phase: str, losses) -> list[dict]:
    return [{"phase": phase, "epoch": i + 1, "loss": v} for i, v in enumerate(losses)]


def test_loss_convergence_hand_cases():
    # 8 epochs: window k = 2; drop 10 -> 2 = 8, of which (2.4 - 2) = 0.4 late: 0.05 <= 0.1
    c = loss_convergence(rows_of("autoencoder", [10, 6, 4, 3, 2.6, 2.4, 2.2, 2.0]))
    assert c["phases"]["autoencoder"]["late_share"] == pytest.approx(0.4 / 8)
    assert c["phases"]["autoencoder"]["window_epochs"] == 2 and c["status"] == "converged"
    # still falling: (5 - 3) / (10 - 3) = 2/7 of the drop in the last epoch (k = 1 of 3)
    c = loss_convergence(rows_of("fusion", [10, 5, 3]))
    assert c["phases"]["fusion"]["late_share"] == pytest.approx(2 / 7) and c["status"] == "still falling"
    # negative losses (DIDFuse's minus tanh term) work the same way
    c = loss_convergence(rows_of("autoencoder", [-1.0, -2.0, -2.95, -3.0]))
    assert c["phases"]["autoencoder"]["late_share"] == pytest.approx(0.05 / 2.0) and c["status"] == "converged"
    # two phases: overall is the first one that did not converge
    c = loss_convergence(rows_of("autoencoder", [5, 4]) + rows_of("fusion", [1, 1.5]))
    assert c["phases"]["autoencoder"]["status"] == "still falling"
    assert c["phases"]["fusion"]["status"] == "not falling" and c["status"] == "still falling"
    assert loss_convergence(rows_of("fusion", [3.0]))["status"] == "unknown"
    assert loss_convergence([])["status"] == "unknown"


# ---------------------------------------------------------------- the training configs
@pytest.mark.parametrize("name", PEERS)
def test_pretrain_config_trains_on_sspfusions_data_never_the_test_sets(name):
    from pipelines.commands.fusion import load_train_config

    cfg = load_train_config(REPO / "configs" / f"{name}-pretrain.yaml", [])
    ref = load_train_config(REPO / "configs" / "sspfusion-pretrain.yaml", [])
    assert cfg.method == name and cfg.amp == "auto"
    for key in ("data_root", "extra_data", "ir_dir", "vi_dir", "synthetic_pairs", "synthetic_size", "synthetic_seed",
                "aug_gain", "aug_gamma", "split"):
        assert getattr(cfg, key) == getattr(ref, key), key
    named = " ".join(str(x) for x in (cfg.data_root, cfg.ir_dir, cfg.vi_dir, *cfg.extra_data)).lower()
    assert "msrs" not in named and "tno" not in named
    from fusion.registry import create_method

    sched = cfg.schedule(tuple(create_method(name, **cfg.method_kwargs).phases))
    assert all(n >= 4 for _, n in sched), sched   # >= 4 epochs a phase: the convergence rule has a window
    text = (REPO / "configs" / f"{name}-pretrain.yaml").read_text()
    assert f"fuseseg train-fusion configs/{name}-pretrain.yaml --out runs/{name}-pretrain" in text


@pytest.mark.slow
@pytest.mark.parametrize("name", PEERS)
def test_pretrain_config_smoke_run(name, tmp_path, monkeypatch):
    require_shared("data/real/roadscene")
    from pipelines.commands.fusion import load_train_config

    monkeypatch.chdir(REPO)   # data_root is relative to the repository root
    path = REPO / "configs" / f"{name}-pretrain.yaml"
    phases = yaml.safe_load(path.read_text())["phase_epochs"]
    cfg = load_train_config(path, [f"phase_epochs.{p}=1" for p in phases]
                            + ["max_steps_per_epoch=2", "synthetic_pairs=1", "cache_images=false", "crop_size=32",
                               "batch_size=2"])   # smaller steps: the config's data, kwargs, schedule, amp
    train_fusion(cfg, tmp_path / "run", progress=False)
    ck = torch.load(tmp_path / "run" / "final.pt", map_location="cpu", weights_only=True)
    assert ck["method"] == name and ck["global_step"] == 2 * len(phases)
    assert ck["precision"]["precision"] in ("fp32", "bf16")
    assert all(np.isfinite(float(r["loss"])) for r in ck["log"])
