"""The paper's Table 5 ablation done with seeds: full SSPFusion, without SFE, without SPF.

    python -m benchmarks.sspfusion_ablation [--seeds 0,1,2] [--structure-epochs 4] [--epochs 4]
                                            [--jobs 2] [--out results/ablation-sspfusion]

Each variant is trained once per seed by the shipped weights' command with the same recipe
(``configs/sspfusion-pretrain.yaml``: data, crops, augmentation, lr, precision), only the method,
the seed and the budget changed (``--structure-epochs`` / ``--epochs``; "w/o SFE" has no structure
phase, as in the paper). Runs go to ``OUT/<variant>/seed<k>`` (a finished run is reused, a broken
one resumed), ``--jobs`` at a time, each with one torch thread. Then every model fuses the 20
MSRS pairs and TNO (fp32, one thread, batch 1) and is scored with the ``sspfusion`` preset.

Printed and written to ``OUT/ablation.json``: per set, variant and metric the mean and standard
deviation over seeds, and for each ablation its difference from the full model with the
standard error of that difference (``sqrt(sd_full^2 / n + sd_abl^2 / n)``) and their ratio: a
difference is only told apart from seed noise when ``|diff| > 2 se``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.sspfusion_evidence import CONVENTION, REAL, REPO, TABLE_METRICS, fuse_reproducibly

VARIANTS = ("sspfusion", "sspfusion_no_sfe", "sspfusion_no_spf")


def train_command(variant: str, seed: int, structure_epochs: int, epochs: int, out: Path) -> list[str]:
    """The shipped weights' command, with this run's method, seed and budget."""
    cmd = [sys.executable, "-m", "pipelines.cli", "train-fusion", "configs/sspfusion-pretrain.yaml",
           "--out", str(out), "--no-progress", f"method={variant}", f"seed={seed}",
           f"structure_epochs={structure_epochs}", f"epochs={epochs}"]
    return cmd + (["--resume"] if (out / "last.pt").is_file() else [])


def train_all(runs: dict[tuple[str, int], Path], structure_epochs: int, epochs: int, jobs: int) -> None:
    """Train every (variant, seed) whose ``final.pt`` is missing, ``jobs`` processes at a time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    todo = [(k, out) for k, out in runs.items() if not (out / "final.pt").is_file()]
    running: list[tuple[tuple[str, int], subprocess.Popen, Path]] = []
    while todo or running:
        while todo and len(running) < jobs:
            (variant, seed), out = todo.pop(0)
            out.mkdir(parents=True, exist_ok=True)
            log = open(out.parent / f"{out.name}.log", "a")   # noqa: SIM115 (closed when the job ends)
            proc = subprocess.Popen(train_command(variant, seed, structure_epochs, epochs, out), cwd=REPO,
                                    env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append(((variant, seed), proc, out))
            print(f"training {variant} seed {seed} -> {out}", flush=True)
        time.sleep(2)
        for item in list(running):
            key, proc, out = item
            if proc.poll() is not None:
                running.remove(item)
                if proc.returncode != 0:
                    raise SystemExit(f"training {key} failed (exit {proc.returncode}); see {out.parent / out.name}.log")
                print(f"done {key[0]} seed {key[1]}", flush=True)


def summarise(scores: dict[str, dict[str, list[dict[str, float]]]]) -> dict:
    """{set: {"stats": {variant: {metric: [mean, sd]}}, "vs_full": {variant: {metric: {diff, se, ratio}}}}}."""
    out = {}
    for set_name, per_variant in scores.items():
        stats = {v: {m: [statistics.fmean(r[m] for r in rs),
                         statistics.stdev([r[m] for r in rs]) if len(rs) > 1 else float("nan")]
                     for m in TABLE_METRICS} for v, rs in per_variant.items()}
        n = len(per_variant["sspfusion"])
        vs = {}
        for v in VARIANTS[1:]:
            vs[v] = {}
            for m in TABLE_METRICS:
                diff = stats[v][m][0] - stats["sspfusion"][m][0]
                se = ((stats["sspfusion"][m][1] ** 2 + stats[v][m][1] ** 2) / n) ** 0.5
                vs[v][m] = {"diff": diff, "se": se, "ratio": diff / se if se > 0 else float("inf")}
        out[set_name] = {"stats": stats, "vs_full": vs}
    return out


def main(argv=None) -> dict:
    from rich.table import Table

    from fusion.fuse import load_fusion_method
    from fusion.scoring import score_folders
    from pipelines.console import console

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--structure-epochs", type=int, default=4)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", type=Path, default=REPO / "results" / "ablation-sspfusion")
    args = ap.parse_args(argv)
    if not (REAL / "msrs").is_dir():
        raise SystemExit(f"{REAL} is absent: the ablation needs ../shared/data/real")
    seeds = [int(s) for s in args.seeds.split(",")]
    runs = {(v, s): args.out / v / f"seed{s}" for v in VARIANTS for s in seeds}
    t0 = time.perf_counter()
    train_all(runs, args.structure_epochs, args.epochs, args.jobs)
    train_s = time.perf_counter() - t0
    scores: dict[str, dict[str, list[dict[str, float]]]] = {}
    for set_name in ("msrs", "tno"):
        ts = REAL / set_name
        fused = {}
        for (v, s), run in runs.items():
            fused[f"{v}/seed{s}"] = args.out / "fused" / set_name / v / f"seed{s}"
            fuse_reproducibly(load_fusion_method(checkpoint=run / "final.pt", device="cpu"), ts / "ir",
                              ts / "vi", fused[f"{v}/seed{s}"])
        res = score_folders(ts / "ir", ts / "vi", fused, workers=1, conventions=CONVENTION).to_dict()
        scores[set_name] = {v: [dict(res["methods"][f"{v}/seed{s}"]["mean"]) for s in seeds] for v in VARIANTS}
    summary = summarise(scores)
    for set_name, d in summary.items():
        t = Table(title=f"Ablation on {set_name} ({len(seeds)} seeds, {args.structure_epochs} structure + "
                        f"{args.epochs} fusion epochs, pretrain recipe): mean ± sd; diff vs full / se")
        t.add_column("variant")
        for m in TABLE_METRICS:
            t.add_column(m, justify="right")
        for v in VARIANTS:
            t.add_row(v, *[f"{d['stats'][v][m][0]:.3f} ± {d['stats'][v][m][1]:.3f}" for m in TABLE_METRICS])
        for v in VARIANTS[1:]:
            t.add_row(f"{v} - full", *[f"{d['vs_full'][v][m]['diff']:+.3f} ({d['vs_full'][v][m]['ratio']:+.1f} se)"
                                       for m in TABLE_METRICS])
        console.print(t)
    record = {"seeds": seeds, "structure_epochs": args.structure_epochs, "epochs": args.epochs,
              "recipe": "configs/sspfusion-pretrain.yaml", "convention": CONVENTION,
              "train_seconds": round(train_s, 1), "scores": scores, "summary": summary}
    args.out.mkdir(parents=True, exist_ok=True)
    tmp = args.out / "ablation.json.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    tmp.replace(args.out / "ablation.json")
    return record


if __name__ == "__main__":
    main()
