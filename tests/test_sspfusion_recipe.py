"""SSPFusion's recipe (issue #22): L_rec as Eq. 7 prints it, a structure branch that learns, the
structure-phase pictures, and the reproduction command of the shipped weights.

References are independent of the code under test: float64 numpy sums, hand-made scenes."""
from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from fuseseg.errors import ConfigError
from fusion.losses import charbonnier, rec_loss, rec_norm
from fusion.registry import create_method
from fusion.structure import structure_pyramid
from tests.conftest import REPO, require_shared

torch.set_num_threads(1)
TINY = {"channels": [4, 4, 6, 8]}


def np_eq7(p: np.ndarray, s: np.ndarray, eps: float) -> float:
    """Eq. 7 per image in float64: sqrt(sum over the map of (P - S)^2 + eps^2), mean over the batch."""
    d = p.astype(np.float64) - s.astype(np.float64)
    per_image = [math.sqrt(float((d[b] ** 2).sum()) + eps * eps) for b in range(d.shape[0])]
    return sum(per_image) / len(per_image)


@pytest.mark.parametrize("eps", [1.0, 0.5])
def test_rec_norm_is_eq7_in_float64(eps):
    rng = np.random.default_rng(3)
    p = rng.random((3, 1, 10, 12)).astype(np.float32)
    s = (rng.random((3, 1, 10, 12)) > 0.6).astype(np.float32)
    got = rec_norm(torch.from_numpy(p), torch.from_numpy(s), eps).item()
    assert got == pytest.approx(np_eq7(p, s, eps), rel=1e-6)
    # the per-pixel mean is a different quantity (about 1 for any P with eps = 1)
    per_pixel = float(np.sqrt((p.astype(np.float64) - s) ** 2 + eps * eps).mean())
    assert charbonnier(torch.from_numpy(p), torch.from_numpy(s), eps).item() == pytest.approx(per_pixel, rel=1e-6)
    assert abs(got - per_pixel) > 1.0
    assert rec_loss(torch.from_numpy(p), torch.from_numpy(s), eps, "mean").item() == pytest.approx(per_pixel, rel=1e-6)


def test_rec_norm_hand_value_and_floor():
    p = torch.tensor([0.5, 1.0, 0.0, 0.25]).view(1, 1, 2, 2)
    s = torch.tensor([1.0, 1.0, 0.0, 1.0]).view(1, 1, 2, 2)
    # ||P - S||^2 = 0.25 + 0.5625 = 0.8125
    assert rec_norm(p, s, 1.0).item() == pytest.approx(math.sqrt(1.8125), abs=1e-6)
    assert rec_norm(s, s, 1.0).item() == pytest.approx(1.0)   # the minimum is eps
    with pytest.raises(ValueError, match="norm, mean"):
        rec_loss(p, s, 1.0, "sum")


@pytest.mark.parametrize("reduction", ["norm", "mean"])
def test_model_rec_loss_matches_float64(reduction):
    """The structure phase's L_rec: Eq. 7 per image, level and modality, averaged over the batch,
    the N levels and both modalities (norm); or the per-pixel mean (mean)."""
    torch.manual_seed(0)
    m = create_method("sspfusion", **TINY, rec_reduction=reduction)
    ir, vi = torch.rand(2, 1, 32, 48), torch.rand(2, 1, 32, 48)
    loss, parts = m.training_losses(ir, vi, "structure")
    with torch.no_grad():
        p_ir, p_vi = m.predict_structure(ir, vi)
    terms = []
    for img, preds in ((ir, p_ir), (vi, p_vi)):
        for p, s in zip(preds, structure_pyramid(img, 3), strict=True):
            p, s = p.double().numpy(), s.double().numpy()
            terms.append(np_eq7(p, s, 1.0) if reduction == "norm" else float(np.sqrt((p - s) ** 2 + 1).mean()))
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    assert parts["rec"] == pytest.approx(loss.item())
    if reduction == "norm":
        assert loss.item() > 3.0   # ~sqrt(pixels) scale, far from the per-pixel form's ~1
    else:
        assert 1.0 <= loss.item() < 1.2


def test_rec_reduction_is_checked_and_recorded():
    assert create_method("sspfusion", **TINY).init_kwargs["rec_reduction"] == "norm"
    assert create_method("sspfusion_no_spf", **TINY, rec_reduction="mean").init_kwargs["rec_reduction"] == "mean"
    with pytest.raises(ConfigError, match="rec_reduction.*norm, mean"):
        create_method("sspfusion", rec_reduction="sum")


def _scenes(n: int, size: int, seed: int) -> torch.Tensor:
    """Dark backgrounds with 4 bright rectangles each: edges a network can learn to find."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 1, size, size)
    for i in range(n):
        x[i] += 0.2 * torch.rand(1, generator=g)
        for _ in range(4):
            h, w = torch.randint(4, size // 2, (2,), generator=g).tolist()
            t = int(torch.randint(0, size - h, (1,), generator=g))
            left = int(torch.randint(0, size - w, (1,), generator=g))
            x[i, 0, t:t + h, left:left + w] = 0.3 + 0.7 * torch.rand(1, generator=g)
    return x


def _train_structure(steps: int) -> tuple[dict, dict]:
    torch.manual_seed(0)
    m = create_method("sspfusion", channels=[8, 8, 8, 8], init="kaiming")
    ir, vi = _scenes(16, 32, 1), _scenes(16, 32, 2)
    opt = torch.optim.Adam(m.parameters_for_phase("structure"), lr=5e-3)
    first = None
    for _ in range(steps):
        loss, parts = m.training_losses(ir, vi, "structure")
        first = first or parts
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return first, m.training_losses(ir, vi, "structure")[1]


def test_structure_phase_learns_the_maps():
    """40 Adam steps on 16 hand-made 32x32 scenes lift IoU(P > 0.5, S_gt) from chance (<= 0.45)
    to >= 0.7 at every level (measured: 0.84 / 0.78 / 0.79). A branch cut off from L_rec (P
    detached, or its parameters not in the phase's optimiser) stays at chance and fails it."""
    first, last = _train_structure(40)
    for k in (1, 2, 3):
        assert first[f"iou{k}"] <= 0.45
        assert last[f"iou{k}"] >= 0.7, last
    assert last["rec"] < first["rec"]


def test_phase_snapshot_shows_inputs_predictions_and_targets():
    torch.manual_seed(0)
    m = create_method("sspfusion", **TINY)
    ir, vi = _scenes(3, 32, 1), _scenes(3, 32, 2)
    pics = m.phase_snapshot(ir, vi, "structure", n=2)
    assert sorted(pics) == ["structure_0", "structure_1"]
    img = pics["structure_1"]
    # 2 rows (IR, VI) of 32 + 2 px; 7 columns (input, P1..3, S1..3) of 32 + 2 px
    assert tuple(img.shape) == (2 * 34, 7 * 34)
    assert torch.equal(img[:32, :32], ir[1, 0])
    assert torch.equal(img[34:66, :32], vi[1, 0])
    s1 = structure_pyramid(vi[1:2], 3)[0][0, 0]
    col = 4 * 34   # S_gt^1 of the visible row, scaled up x2 by nearest neighbour
    assert torch.equal(img[34:66, col:col + 32][::2, ::2], s1)
    assert m.phase_snapshot(ir, vi, "fusion") == {}
    assert create_method("sspfusion_no_sfe", **TINY).phase_snapshot(ir, vi, "structure") == {}


@pytest.mark.slow
def test_reproduction_command_of_the_shipped_weights(tmp_path):
    """`fuseseg train-fusion configs/sspfusion-pretrain.yaml --out DIR`, from the repository root,
    as the README and the config say, for one step per epoch on 4 synthetic scenes."""
    require_shared("data/real/roadscene")
    out = tmp_path / "pretrain"
    cmd = [sys.executable, "-m", "pipelines.cli", "train-fusion", "configs/sspfusion-pretrain.yaml",
           "--out", str(out), "--no-progress", "max_steps_per_epoch=1", "synthetic_pairs=4",
           "structure_epochs=1", "epochs=1", "amp=off"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    recipe = yaml.safe_load((REPO / "configs/sspfusion-pretrain.yaml").read_text())
    ckpt = torch.load(out / "final.pt", map_location="cpu", weights_only=False)
    for key, value in recipe["method_kwargs"].items():
        assert ckpt["kwargs"][key] == value
    assert [row["phase"] for row in ckpt["log"]] == ["structure", "fusion"]
    assert ckpt["global_step"] == 2
    pic = out / "snapshots" / "structure" / "structure_0.png"
    import cv2
    img = cv2.imread(str(pic), cv2.IMREAD_UNCHANGED)
    crop = recipe["crop_size"]
    assert img.shape == (2 * (crop + 2), 7 * (crop + 2))


@pytest.mark.parametrize("kwargs, expect", [("{output: max_residual}", "head max_residual, L_rec norm"),
                                            ("{output: sigmoid, rec_reduction: mean}", "head sigmoid, L_rec mean"),
                                            ("{output: max_detail, grad_gain: 1.1}", "L_rec norm, L_grad target x1.1")])
def test_protocol_line_names_the_head_and_the_rec_reduction(kwargs, expect):
    from pipelines.config import load_config
    from pipelines.experiment import ExperimentConfig
    from pipelines.stages.segment import protocol_of

    cfg = load_config(ExperimentConfig, REPO / "configs" / "default.yaml",
                      [f"fusion=[{{name: sspfusion, kwargs: {kwargs}}}]", "device=cpu"])
    assert "sspfusion trained from scratch here (" in protocol_of(cfg)[1]
    assert expect in protocol_of(cfg)[1]


def test_ablation_summary_hand_values():
    from benchmarks.sspfusion_ablation import TABLE_METRICS, summarise

    def row(x):
        return dict.fromkeys(TABLE_METRICS, x)

    scores = {"msrs": {"sspfusion": [row(1.0), row(2.0), row(3.0)],          # mean 2, sd 1
                       "sspfusion_no_sfe": [row(4.0), row(4.0), row(4.0)],   # mean 4, sd 0
                       "sspfusion_no_spf": [row(1.0), row(3.0), row(2.0)]}}  # mean 2, sd 1
    s = summarise(scores)["msrs"]
    assert s["stats"]["sspfusion"]["SF"] == pytest.approx([2.0, 1.0])
    d = s["vs_full"]["sspfusion_no_sfe"]["VIF"]
    assert d["diff"] == pytest.approx(2.0)
    assert d["se"] == pytest.approx(math.sqrt(1 / 3))          # sqrt((1^2 + 0^2) / 3)
    assert d["ratio"] == pytest.approx(2.0 / math.sqrt(1 / 3))
    assert s["vs_full"]["sspfusion_no_spf"]["MI"]["diff"] == pytest.approx(0.0)
