"""Fusion-training diagnostics (fus / fus_max / fus_mean, structure IoU, the verdict) and the
joint photometric augmentation, checked against independent float64 references."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from scipy import ndimage
from skimage.metrics import structural_similarity

from fuseseg.data.io import read_infrared, read_visible
from fuseseg.data.pairs import find_pairs
from fusion.datasets import PairDataset, visible_luminance_u8
from fusion.train import FusionTrainConfig, train_fusion, verdict

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def lfus_reference(f: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
    """L_fus (weights 1:1:1) of one image, float64, with skimage SSIM and scipy Sobel."""
    ssim = [structural_similarity(f, x, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                  data_range=1.0) for x in (a, b)]

    def grad(x):
        return np.abs(ndimage.sobel(x, axis=1, mode="nearest")) + np.abs(ndimage.sobel(x, axis=0, mode="nearest"))

    l_ssim = 1 - (ssim[0] + ssim[1]) / 2
    l_smooth = np.abs(f - np.maximum(a, b)).mean()
    l_grad = np.abs(grad(f) - np.maximum(grad(a), grad(b))).mean()
    return l_ssim + l_smooth + l_grad


def test_log_has_diagnostics_and_fus_max_matches_independent_reference(make_pairs, tmp_path):
    root = make_pairs(n=4, size=(40, 48), seed=3)
    cfg = FusionTrainConfig(method="sspfusion", method_kwargs={"channels": [4, 4, 4, 4]},
                            data_root=str(root), structure_epochs=1, epochs=2, batch_size=4,
                            crop_size=None, workers=0, device="cpu", lr=1e-3)
    out = tmp_path / "run"
    train_fusion(cfg, out, progress=False)
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [r["phase"] for r in rows] == ["structure", "fusion", "fusion"]
    for col in ("fus", "fus_max", "fus_mean", "iou1", "iou2", "iou3"):
        assert col in rows[0], col
    for r in rows:
        assert 0.0 <= float(r["iou1"]) <= 1.0
    # one batch = all 4 whole images (flips leave L_fus unchanged): fus_max, fus_mean are exact
    pairs = find_pairs(root / "ir", root / "vi")
    ref_max, ref_mean = [], []
    for stem in pairs.stems:
        a = read_infrared(pairs.ir[stem]).astype(np.float64) / 255
        b = visible_luminance_u8(read_visible(pairs.vi[stem])).astype(np.float64) / 255
        ref_max.append(lfus_reference(np.maximum(a, b), a, b))
        ref_mean.append(lfus_reference((a + b) / 2, a, b))
    for r in rows[1:]:
        assert float(r["fus_max"]) == pytest.approx(np.mean(ref_max), abs=2e-5)
        assert float(r["fus_mean"]) == pytest.approx(np.mean(ref_mean), abs=2e-5)
    assert np.mean(ref_max) < np.mean(ref_mean)  # not the same number twice
    # the verdict: recorded in the run folder and the final checkpoint, from the last epoch
    v = json.loads((out / "verdict.json").read_text())
    assert v["status"] in ("converged", "undertrained")
    assert v["beat_max"] == (float(rows[-1]["fus"]) < float(rows[-1]["fus_max"]))
    assert v["fus"] == pytest.approx(float(rows[-1]["fus"]), rel=1e-5)
    ckpt = torch.load(out / "final.pt", map_location="cpu", weights_only=True)  # plain types only
    assert ckpt["verdict"]["status"] == v["status"]


def test_verdict_flags_an_undertrained_model():
    rows = [{"phase": "structure", "epoch": 1, "global_step": 2, "rec": 1.1},
            {"phase": "fusion", "epoch": 1, "global_step": 4, "fus": 0.40, "fus_max": 0.45, "fus_mean": 0.5},
            {"phase": "fusion", "epoch": 2, "global_step": 6, "fus": 0.47, "fus_max": 0.45, "fus_mean": 0.5}]
    v = verdict(rows)
    assert v["status"] == "undertrained" and v["beat_max"] is False and v["epoch"] == 2
    rows[-1]["fus"] = 0.44
    assert verdict(rows)["status"] == "converged"
    assert verdict(rows[:1])["status"] == "unknown"


def test_photometric_augmentation_applies_one_transform_to_both_modalities(make_pairs):
    root = make_pairs(n=3, size=(40, 48), seed=5)
    pairs = find_pairs(root / "ir", root / "vi")
    plain = PairDataset(pairs, crop=32, train=True, seed=2)
    aug = PairDataset(pairs, crop=32, train=True, seed=2, photometric=((0.3, 0.9), (1.2, 2.5)))
    fits = []
    for key in [(0, 0), (1, 0), (2, 4)]:
        ir0, vi0 = (x[0].double().numpy() for x in plain[key])
        ir1, vi1 = (x[0].double().numpy() for x in aug[key])
        per_modality = []
        for x0, x1 in ((ir0, ir1), (vi0, vi1)):
            ok = (x0 > 0.02) & (x1 > 0.002) & (x1 < 0.998)  # unclipped pixels: log x1 = log g + gamma log x0
            gamma, log_g = np.polyfit(np.log(x0[ok]), np.log(x1[ok]), 1)
            resid = np.log(x1[ok]) - (log_g + gamma * np.log(x0[ok]))
            assert np.abs(resid).max() < 1e-4  # an exact power law on every pixel, same crop
            per_modality.append((np.exp(log_g), gamma))
        (g_ir, e_ir), (g_vi, e_vi) = per_modality
        assert g_ir == pytest.approx(g_vi, rel=1e-4) and e_ir == pytest.approx(e_vi, rel=1e-4)
        assert 0.3 <= g_ir <= 0.9 and 1.2 <= e_ir <= 2.5
        fits.append((g_ir, e_ir))
    assert len({round(g, 3) for g, _ in fits}) == 3  # a new draw per sample
    # off by default and at the identity ranges: byte-identical to no augmentation
    ident = PairDataset(pairs, crop=32, train=True, seed=2, photometric=((1, 1), (1, 1)))
    assert torch.equal(ident[(1, 0)][0], plain[(1, 0)][0])


def test_training_data_sources_are_merged_without_name_clashes(make_pairs, tmp_path):
    from fusion.train import render_synthetic, resolve_pairs

    a = make_pairs(n=3, size=(24, 32), root=tmp_path / "a")
    b = make_pairs(n=2, size=(24, 32), root=tmp_path / "b")  # same file names as in a
    cfg = FusionTrainConfig(data_root=str(a), extra_data=[str(b)], synthetic_pairs=2,
                            synthetic_size=(32, 48), synthetic_seed=4)
    out = tmp_path / "run"
    render_synthetic(cfg, out)
    stamp = (out / "synthetic" / "synthetic.json").stat().st_mtime_ns
    render_synthetic(cfg, out)  # the same set is kept, not rendered again
    assert (out / "synthetic" / "synthetic.json").stat().st_mtime_ns == stamp
    ps = resolve_pairs(cfg, out)
    assert len(ps) == 3 + 2 + 2 and len(set(ps.stems)) == 7
    assert ps.ir["0/00001D"].parent == a / "ir" and ps.ir["1/00001D"].parent == b / "ir"
    assert {p.parent for k, p in ps.vi.items() if k.startswith("2/")} == {out / "synthetic" / "train" / "vi"}
