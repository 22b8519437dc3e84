"""Turn a finished ``fuseseg train-fusion`` run into the shipped weights (maintainers only).

    python -m benchmarks.ship_sspfusion RUN_DIR

Copies ``RUN_DIR/final.pt`` to ``fusion/weights/sspfusion.pt`` (checked to load with
``torch.load(weights_only=True)``) and writes ``fusion/weights/sspfusion.json`` beside it: the
command that made it, the recipe (the run's config), the data, steps and training time, a
summary of the loss curve and the verdict (fus against fus_max), the test-set metrics (20 MSRS
pairs and TNO, ``sspfusion`` preset, by :func:`benchmarks.sspfusion_evidence.score_method`) and
the file's SHA-256 (checked whenever the weights are used).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

from benchmarks.sspfusion_evidence import REAL, REPO, score_method
from fuseseg import runtime
from fusion.pretrained import sha256, shipped_files

COMMAND = "fuseseg train-fusion configs/sspfusion-pretrain.yaml --out runs/sspfusion-pretrain"


def plain(x):
    """``x`` with str subclasses (e.g. torch's TorchVersion) as str, so weights_only loading works."""
    if isinstance(x, dict):
        return {plain(k): plain(v) for k, v in x.items()} if not isinstance(x, OrderedDict) else \
            OrderedDict((k, plain(v)) for k, v in x.items())
    if isinstance(x, (list, tuple)):
        return type(x)(plain(v) for v in x)
    if isinstance(x, str) and type(x) is not str:
        return str(x)
    return x


def curve_summary(rows: list[dict]) -> dict:
    fus = [r for r in rows if r.get("phase") == "fusion"]
    pick = ("epoch", "global_step", "fus", "fus_max", "fus_mean", "ssim", "smooth", "grad", "rec",
            "iou1", "iou2", "iou3", "loss", "lr", "images_per_s", "seconds")

    def row(r):
        return {k: r[k] for k in pick if k in r}

    return {"fusion_epochs": len(fus), "first": row(fus[0]), "last": row(fus[-1]),
            "best_fus": min(float(r["fus"]) for r in fus),
            "fus_minus_fus_max_per_epoch": [round(float(r["fus"]) - float(r["fus_max"]), 6) for r in fus],
            "structure": [row(r) for r in rows if r.get("phase") == "structure"]}


def structure_iou(rows: list[dict]) -> dict:
    """IoU of ``P > 0.5`` against S_gt per level: the last structure epoch's and the last fusion
    epoch's means (log.csv's ``iou1..N``), and whether every level reached 0.6 at both."""
    def ious(r):
        return {k: round(float(v), 4) for k, v in (r or {}).items() if k.startswith("iou") and v != ""}

    last_s = next((r for r in reversed(rows) if r.get("phase") == "structure"), None)
    last_f = next((r for r in reversed(rows) if r.get("phase") == "fusion"), None)
    out = {"end_of_structure_phase": ious(last_s), "end_of_training": ious(last_f)}
    vals = [v for d in out.values() for v in d.values()]
    out["all_levels_at_least_0.6"] = bool(vals) and min(vals) >= 0.6
    return out


def rec_vs_fus(rows: list[dict], kwargs: dict) -> dict:
    """alpha L_rec against L_fus in the first and the last fusion epoch (epoch means)."""
    fus = [r for r in rows if r.get("phase") == "fusion" and r.get("rec") not in (None, "")]
    alpha = float(kwargs.get("alpha", 0.01))

    def one(r):
        return {"alpha_rec": round(alpha * float(r["rec"]), 5), "fus": round(float(r["fus"]), 5),
                "ratio": round(alpha * float(r["rec"]) / float(r["fus"]), 4)}

    return {"first_fusion_epoch": one(fus[0]), "last_fusion_epoch": one(fus[-1])} if fus else {}


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    args = ap.parse_args(argv)
    final = args.run / "final.pt"
    ckpt = plain(torch.load(final, map_location="cpu", weights_only=False))
    pt, js = shipped_files(ckpt["method"])
    pt.parent.mkdir(parents=True, exist_ok=True)
    runtime.save_checkpoint(pt, ckpt)
    torch.load(pt, map_location="cpu", weights_only=True)  # tensors and plain types only
    rows = ckpt["log"]
    syn = json.loads((args.run / "synthetic" / "synthetic.json").read_text()) \
        if (args.run / "synthetic" / "synthetic.json").is_file() else None
    cfg = ckpt["config"]
    n_real = len(list(Path(REPO / cfg["data_root"] if not Path(cfg["data_root"]).is_absolute()
                           else cfg["data_root"]).joinpath("ir").iterdir()))
    data = {"real": {"root": cfg["data_root"], "pairs": n_real},
            "synthetic": None if syn is None else {k: syn[k] for k in ("train", "size", "seed", "night_fraction")}}
    metrics = {}
    with tempfile.TemporaryDirectory() as d:
        for name in ("msrs", "tno"):
            metrics[name] = score_method(pt, REAL / name, Path(d) / name)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip() \
        or ((REPO / "COMMIT").read_text().strip() if (REPO / "COMMIT").is_file() else "unknown")
    info = {
        "method": ckpt["method"], "kwargs": ckpt["kwargs"], "command": COMMAND, "commit": commit,
        "recipe": cfg, "data": data,
        "data_summary": f"{n_real} RoadScene pairs + {syn['train'] if syn else 0} synthetic day/night scenes",
        "steps": int(ckpt["global_step"]),  # optimiser steps of both phases
        "structure_steps": max([int(r["global_step"]) for r in rows if r.get("phase") == "structure"] or [0]),
        "batch_size": cfg["batch_size"], "crop_size": cfg["crop_size"],
        "train_seconds": round(sum(float(r["seconds"]) for r in rows), 1),
        "loss_curve": curve_summary(rows), "verdict": ckpt.get("verdict"),
        "metrics_convention": "sspfusion preset (reference conventions, MI in bits; MI and SSIM summed over both sources)",
        "metrics_fusing": "fp32, one torch thread, batch 1 (bit-reproducible PNGs)",
        "metrics": metrics, "sha256": sha256(pt), "versions": ckpt.get("versions"),
        "head": ckpt["kwargs"].get("output"), "rec_reduction": ckpt["kwargs"].get("rec_reduction", "mean"),
        "structure_iou": structure_iou(rows), "rec_vs_fus": rec_vs_fus(rows, ckpt["kwargs"]),
        "precision": ckpt.get("precision"),
    }
    js.write_text(json.dumps(info, indent=1) + "\n")
    print(f"shipped {pt} ({pt.stat().st_size / 2**20:.1f} MiB) and {js}")
    return pt


if __name__ == "__main__":
    main()
