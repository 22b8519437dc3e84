"""Turn a finished ``fuseseg train-fusion`` run of any learned method into its shipped weights
(maintainers only).

    python -m benchmarks.ship_fusion RUN_DIR [--method NAME] [--preset P] [--no-metrics]
                                             [--weights-dir DIR]

Copies ``RUN_DIR/final.pt`` to ``fusion/weights/<method>.pt`` (checked to load with
``torch.load(weights_only=True)``) and writes ``fusion/weights/<method>.json`` beside it: the
command that made it, the recipe (the run's config) and its phase schedule, the data, steps and
training time, a summary of the loss curve per phase, the trainer's verdict (fus against fus_max,
where the method has a fusion loss), the convergence of its own training loss
(:func:`fusion.train_log.loss_convergence`), the commit, the test-set metrics (20 MSRS pairs and
TNO, by :func:`benchmarks.sspfusion_evidence.score_method`, in ``--preset``: ``sspfusion`` for
SSPFusion, ``reference`` for the others by default) with the metrics on which it beats ``mean``,
and the file's SHA-256 (checked whenever the weights are used). ``--method`` (optional) must name
the run's method. ``--no-metrics`` skips the scoring (tests; the record then says so).
``python -m benchmarks.ship_sspfusion RUN_DIR`` is this with ``--method sspfusion``.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections import OrderedDict
from pathlib import Path

import torch

from benchmarks.sspfusion_evidence import REAL, REPO, TABLE_METRICS, fuse_reproducibly, score_method
from fuseseg import runtime
from fuseseg.data.io import atomic_write_text
from fusion.pretrained import sha256, shipped_files
from fusion.train_log import loss_convergence

TIMING = ("images_per_s", "seconds")
#: The metric preset of each method's record (others: "reference").
PRESETS = {"sspfusion": "sspfusion"}


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


def command_of(method: str) -> str:
    """The reproducing command: the method's ``configs/<method>-pretrain.yaml`` run."""
    return f"fuseseg train-fusion configs/{method}-pretrain.yaml --out runs/{method}-pretrain"


def curve_summary(rows: list[dict]) -> dict:
    """Per phase: epochs, first and last row, lowest epoch loss; for a fusion phase with ``fus``
    (SSPFusion's record) also the first/last fusion rows, best fus and fus - fus_max per epoch."""
    def row(r):
        return {k: r[k] for k in r if k != "phase" and r[k] != ""}

    out: dict = {"phases": {}}
    for r in rows:
        p = out["phases"].setdefault(r["phase"], {"epochs": 0, "first": row(r), "best_loss": float(r["loss"])})
        p["epochs"] += 1
        p["last"] = row(r)
        p["best_loss"] = min(p["best_loss"], float(r["loss"]))
    fus = [r for r in rows if r.get("phase") == "fusion" and r.get("fus") not in (None, "")]
    if fus:
        out.update({"fusion_epochs": len(fus), "first": row(fus[0]), "last": row(fus[-1]),
                    "best_fus": min(float(r["fus"]) for r in fus)})
        if all(r.get("fus_max") not in (None, "") for r in fus):
            out["fus_minus_fus_max_per_epoch"] = [round(float(r["fus"]) - float(r["fus_max"]), 6) for r in fus]
    if any(r.get("phase") == "structure" for r in rows):
        out["structure"] = [row(r) for r in rows if r.get("phase") == "structure"]
    return out


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


def data_record(run: Path, cfg: dict) -> tuple[dict, str]:
    """(data, one-line summary) of the run: its real training folder and synthetic scenes."""
    syn_json = run / "synthetic" / "synthetic.json"
    syn = json.loads(syn_json.read_text()) if syn_json.is_file() else None
    real = None
    if cfg.get("data_root"):
        root = Path(cfg["data_root"])
        root = root if root.is_absolute() else REPO / root
        ir = root / "ir" if (root / "ir").is_dir() else root / cfg.get("split", "train") / "ir"
        real = {"root": cfg["data_root"], "pairs": len(list(ir.iterdir())) if ir.is_dir() else None}
    data = {"real": real, "synthetic": None if syn is None else
            {k: syn.get(k) for k in ("train", "size", "seed", "night_fraction")}}
    name = {"roadscene": "RoadScene"}.get(Path(cfg["data_root"]).name.lower(), Path(cfg["data_root"]).name) \
        if real else None
    summary = " + ".join(([f"{real['pairs']} {name} pairs"] if real else [])
                         + [f"{syn['train'] if syn else 0} synthetic day/night scenes"])
    return data, summary


def score_test_sets(pt: Path, method: str, preset: str) -> dict:
    """Mean metrics of the shipped weights and of ``mean`` on MSRS and TNO, and where it wins."""
    from fusion.fuse import load_fusion_method
    from fusion.scoring import score_folders

    out: dict = {}
    with tempfile.TemporaryDirectory() as d:
        for name in ("msrs", "tno"):
            ts = REAL / name
            print(f"fusing and scoring {method} and mean on {ts} ...", flush=True)
            got = score_method(pt, ts, Path(d) / name, name=method, conventions=preset)
            fuse_reproducibly(load_fusion_method("mean", device="cpu"), ts / "ir", ts / "vi", Path(d) / name / "mean")
            res = score_folders(ts / "ir", ts / "vi", {"mean": Path(d) / name / "mean"}, workers=1,
                                conventions=preset)
            mean = dict(res.to_dict()["methods"]["mean"]["mean"])
            wins = [k for k in TABLE_METRICS if got.get(k) is not None and mean.get(k) is not None and got[k] > mean[k]]
            out[name] = {"method": got, "mean": mean, "better_than_mean": wins,
                         "better_than_mean_on_4_of_6": len(wins) >= 4}
    return out


def rounds_record(rounds: dict, rows: list[dict]) -> dict:
    """The record's part for a run trained in semantic rounds: the semantic loss's state (from the
    rounds' own record), per round its beta, steps, last fus / fus_max / semantic and verdict; the
    steps of all rounds together (each round's trainer counts from 0), and the convergence of the
    last round's loss (beta changes between rounds, so losses of different rounds differ in kind)."""
    by_round: dict[str, list[dict]] = {}
    for x in rows:
        by_round.setdefault(str(x.get("round")), []).append(x)
    per = []
    for r in rounds.get("rounds", []):
        f = r.get("fusion") or {}
        per.append({"round": r["round"], "beta": r["beta"],
                    "steps": max((int(x["global_step"]) for x in by_round.get(str(r["round"]), [])), default=0),
                    **{k: f[k] for k in ("fus", "fus_max", "semantic", "labelled", "total", "verdict") if k in f},
                    "segmenter_trained_after": r.get("segmenter") is not None})
    last = by_round.get(str(per[-1]["round"]), []) if per else []
    return {"semantic_loss": rounds.get("semantic_loss"), "semantic_rounds": per,
            "semantic_gamma": rounds.get("semantic_gamma"), "steps": sum(r["steps"] for r in per),
            "convergence": loss_convergence(last) if last else None,
            "convergence_scope": f"round {per[-1]['round']} of {len(per)} (its loss has a fixed beta)" if per else None}


def record(run: Path, ckpt: dict, pt: Path, preset: str, metrics: dict | None) -> dict:
    """The JSON record beside the shipped weights (see the module doc)."""
    rows, cfg, kwargs, method = ckpt["log"], ckpt["config"], ckpt["kwargs"], ckpt["method"]
    data, summary = data_record(run, cfg)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip() \
        or ((REPO / "COMMIT").read_text().strip() if (REPO / "COMMIT").is_file() else "unknown")
    info = {
        "method": method, "kwargs": kwargs, "command": command_of(method), "commit": commit,
        "recipe": cfg, "schedule": ckpt.get("schedule"), "data": data, "data_summary": summary,
        "steps": int(ckpt["global_step"]),  # optimiser steps of all phases
        "batch_size": cfg["batch_size"], "crop_size": cfg["crop_size"],
        "train_seconds": round(sum(float(r["seconds"]) for r in rows), 1),
        "loss_curve": curve_summary(rows), "verdict": ckpt.get("verdict"),
        "convergence": loss_convergence(rows),
        "metrics_convention": preset + (" preset (reference conventions, MI in bits; MI and SSIM summed over both "
                                        "sources)" if preset == "sspfusion" else " preset"),
        "metrics_fusing": "fp32, one torch thread, batch 1 (bit-reproducible PNGs)",
        "metrics": None if metrics is None else {k: v["method"] for k, v in metrics.items()},
        "metrics_vs_mean": None if metrics is None else
        {k: {kk: v[kk] for kk in ("mean", "better_than_mean", "better_than_mean_on_4_of_6")} for k, v in metrics.items()},
        "sha256": sha256(pt), "versions": ckpt.get("versions"), "precision": ckpt.get("precision"),
    }
    if metrics is None:
        info["metrics_note"] = "not scored (--no-metrics)"
    if ckpt.get("rounds"):   # SeAFusion's semantic rounds (pipelines/semantic_rounds.py)
        info.update(rounds_record(ckpt["rounds"], rows))
    elif "semantic_weight" in kwargs:
        info["semantic_loss"] = ("on" if kwargs["semantic_weight"] > 0 else
                                 "off: semantic_weight 0 (the training data have no labels; content loss only)")
    if any(r.get("phase") == "structure" for r in rows):   # SSPFusion's structure branch and head
        info["structure_steps"] = max(int(r["global_step"]) for r in rows if r.get("phase") == "structure")
        info["structure_iou"] = structure_iou(rows)
    if "output" in kwargs:
        info.update(head=kwargs.get("output"), rec_reduction=kwargs.get("rec_reduction", "mean"),
                    grad_gain=kwargs.get("grad_gain", 1.0), rec_vs_fus=rec_vs_fus(rows, kwargs))
    return info


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path, help="a finished train-fusion run folder (holding final.pt)")
    ap.add_argument("--method", help="the run's method (checked against final.pt)")
    ap.add_argument("--preset", help="metric preset of the record (default: sspfusion for sspfusion, else reference)")
    ap.add_argument("--no-metrics", action="store_true", help="do not score MSRS and TNO")
    ap.add_argument("--weights-dir", type=Path, help="write here instead of fusion/weights/")
    args = ap.parse_args(argv)
    final = args.run / "final.pt"
    if not final.is_file():
        sys.exit(f"error: {final} does not exist: pass the --out folder of a finished `fuseseg train-fusion` run.")
    ckpt = plain(torch.load(final, map_location="cpu", weights_only=False))
    method = ckpt["method"]
    if args.method is not None and args.method != method:
        sys.exit(f"error: {final} holds fusion method {method!r}, not {args.method!r}; pass --method {method} "
                 f"or the run folder of a {args.method!r} training.")
    pt, js = shipped_files(method)
    if args.weights_dir is not None:
        pt, js = args.weights_dir / pt.name, args.weights_dir / js.name
    pt.parent.mkdir(parents=True, exist_ok=True)
    runtime.save_checkpoint(pt, ckpt)
    torch.load(pt, map_location="cpu", weights_only=True)  # tensors and plain types only
    preset = args.preset or PRESETS.get(method, "reference")
    metrics = None if args.no_metrics else score_test_sets(pt, method, preset)
    atomic_write_text(js, json.dumps(record(args.run, ckpt, pt, preset, metrics), indent=1) + "\n")
    print(f"shipped {pt} ({pt.stat().st_size / 2**20:.1f} MiB) and {js}")
    return pt


if __name__ == "__main__":
    main()
