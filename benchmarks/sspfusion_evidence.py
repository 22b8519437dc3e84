"""Evidence for the SSPFusion issue: train on real RoadScene pairs (CPU-sized schedule), fuse the
real MSRS pairs, and score SSPFusion, its two ablations and the trivial mean / max fusions with
the reference metrics.

    python -m benchmarks.sspfusion_evidence [--epochs 20] [--structure-epochs 3] [--out DIR]

Needs ../shared/data/real (roadscene for training, msrs for testing). Prints one table (best per
metric marked) and writes ``evidence.json`` and the fused images into the output folder.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"
VARIANTS = ("sspfusion", "sspfusion_no_sfe", "sspfusion_no_spf")


def main(argv=None) -> dict:
    from fusion.fuse import fuse_folder, load_fusion_method
    from fusion.scoring import results_table, score_folders
    from fusion.train import FusionTrainConfig, train_fusion
    from pipelines.config import from_dict
    from pipelines.console import console

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--structure-epochs", type=int, default=3)
    ap.add_argument("--crop", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3, help="CPU schedule (see fusion/README.md); paper: 2e-4")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", type=Path, default=REPO / "results" / "evidence-sspfusion")
    args = ap.parse_args(argv)
    if not (REAL / "roadscene").is_dir():
        raise SystemExit(f"{REAL} is absent: this evidence needs ../shared/data/real")
    torch.manual_seed(0)
    out = args.out
    msrs = REAL / "msrs"
    fused_dirs, timings = {}, {}
    for name in args.variants.split(","):
        cfg = from_dict(FusionTrainConfig, {
            "method": name, "data_root": str(REAL / "roadscene"), "structure_epochs": args.structure_epochs,
            "epochs": args.epochs, "batch_size": args.batch_size, "crop_size": args.crop, "lr": args.lr, "workers": 0,
            "cache_images": True, "device": "cpu"})
        run = out / "train" / name
        t0 = time.perf_counter()
        resume = (run / "last.pt").is_file()
        ckpt = run / "final.pt"
        if not ckpt.is_file():
            ckpt = train_fusion(cfg, run, resume=resume)
        timings[f"train {name} (s)"] = round(time.perf_counter() - t0, 1)
        method = load_fusion_method(checkpoint=ckpt, device="cpu")
        fused_dirs[name] = out / "fused" / name
        t0 = time.perf_counter()
        fuse_folder(method, msrs / "ir", msrs / "vi", fused_dirs[name], "cpu", batch_size=4)
        timings[f"fuse msrs {name} (s)"] = round(time.perf_counter() - t0, 1)
    for name in ("mean", "max"):
        fused_dirs[name] = out / "fused" / name
        fuse_folder(load_fusion_method(name, device="cpu"), msrs / "ir", msrs / "vi", fused_dirs[name], "cpu")
    res = score_folders(msrs / "ir", msrs / "vi", fused_dirs, out_dir=out, workers=2)
    console.print(results_table(res, title="SSPFusion (trained on RoadScene) vs trivial fusions, MSRS real pairs"))
    summary = {"config": vars(args) | {"out": str(out)}, "timings": timings,
               "means": {m: res.to_dict()["methods"][m]["mean"] for m in fused_dirs}}
    (out / "evidence.json").write_text(json.dumps(summary, indent=2, default=str))
    console.print(timings)
    return summary


if __name__ == "__main__":
    main()
