"""Speed of the segmentation stage (DeepLabV3+) on this machine's CPU.

Measures, in one run (median of a few timed iterations after one warm-up):

* training throughput in images/s: one optimiser step = forward, Dice+CE, backward, SGD step,
  with the encoder trainable ("full" phase) and frozen ("frozen" phase, encoder in eval mode),
  on square crops: the crop and batch sizes of ``configs/default.yaml`` for its (CPU) encoder and
  of ``configs/msrs.yaml`` (480, 4 / 8) for the paper-like encoder (SegConfig's defaults and the
  paper's numbers when those files are absent);
* inference throughput in images/s at the paper's image size (480x640, batch 1,
  ``inference_mode``, the same padding/argmax path as ``evaluate_segmenter``);

for the default (CPU) encoder and the paper-like encoder (resnet50); without ``--quick`` also for
the other light candidates (resnet18, mobilenet_v2), which is how the default was chosen. A
2048x2048 float32 matmul GFLOP/s is measured in the same run: the machine is shared, and this
number tells how much of it the benchmark got.

Usage: ``python -m benchmarks.bench_segmentation [--quick]``. Prints a rich table and writes
``results/benchmarks/segmentation-<date>.json``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
from pathlib import Path

import torch

from segmentation.config import DEFAULT_ENCODER, PAPER_ENCODER, SegConfig
from segmentation.evaluate import predict
from segmentation.losses import DiceCELoss
from segmentation.model import build_model, set_phase, train_mode
from segmentation.train import build_optimizer

H, W = 480, 640
REPO = Path(__file__).resolve().parents[1]


def _median_time(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after ``warmup`` (see benchmarks.common.timed)."""
    from benchmarks.common import timed

    return timed(fn, repeats=reps, warmup=warmup).median


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n x n float32 matmul (2 n^3 FLOPs), median time."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n ** 3 / _median_time(lambda: a @ b, reps, 2) / 1e9


def train_images_per_s(encoder: str, crop: int, batch: int, phase: str, reps: int) -> float:
    """Images/s of full optimiser steps (Dice+CE, SGD) on random (batch, 3, crop, crop) inputs."""
    cfg = SegConfig(encoder=encoder, crop_size=crop, batch_size=batch, frozen_batch_size=batch)
    torch.manual_seed(0)
    model = build_model(cfg.model_kwargs())
    set_phase(model, phase)
    train_mode(model)
    opt = build_optimizer(model, cfg)
    loss_fn = DiceCELoss()
    x = torch.randn(batch, 3, crop, crop)
    y = torch.randint(0, cfg.num_classes, (batch, crop, crop))

    def step():
        loss, _, _ = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return batch / _median_time(step, reps)


def infer_images_per_s(encoder: str, reps: int) -> float:
    """Images/s of full-size (480x640) inference, batch 1, padding + argmax included."""
    cfg = SegConfig(encoder=encoder)
    torch.manual_seed(0)
    model = build_model(cfg.model_kwargs()).eval()
    x = torch.randn(1, 3, H, W)
    return 1.0 / _median_time(lambda: predict(model, x, "off"), reps)


def config_settings(name: str, fallback: dict) -> dict:
    """Encoder, crop and batch sizes from ``configs/<name>.yaml``'s segmentation section, each
    key falling back to ``fallback`` when the file or key is absent."""
    out = dict(fallback)
    path = REPO / "configs" / f"{name}.yaml"
    if path.is_file():
        import yaml

        seg = (yaml.safe_load(path.read_text()) or {}).get("segmentation") or {}
        out.update({k: seg[k] for k in out if k in seg})
    return out


def run(quick: bool = False) -> dict:
    """Run the benchmark; returns the result dict (also written as JSON)."""
    d0 = SegConfig()
    default = config_settings("default", {"encoder": DEFAULT_ENCODER, "crop_size": d0.crop_size,
                                          "batch_size": d0.batch_size,
                                          "frozen_batch_size": d0.frozen_batch_size})
    paper_cfg = config_settings("msrs", {"encoder": PAPER_ENCODER, "crop_size": 480, "batch_size": 4,
                                         "frozen_batch_size": 8})
    reps = 2 if quick else 4
    # (encoder, role, crop, batch, frozen batch): the default config, the paper-like config at
    # its own crop/batch, and (full run) the other light candidates at the default crop/batch
    cases = [(default["encoder"], "default (CPU)", default["crop_size"], default["batch_size"],
              default["frozen_batch_size"]),
             (paper_cfg["encoder"], "paper-like (msrs)", paper_cfg["crop_size"],
              paper_cfg["batch_size"], paper_cfg["frozen_batch_size"])]
    if not quick:
        cases += [(e, "candidate", default["crop_size"], default["batch_size"],
                   default["frozen_batch_size"]) for e in ("resnet18", "mobilenet_v2")]
    rows = []
    mm_before = matmul_gflops(reps=3)
    for enc, role, crop, batch, fbatch in cases:
        paper = role.startswith("paper")
        n_params = sum(p.numel() for p in build_model(SegConfig(encoder=enc).model_kwargs()).parameters())
        row = {"encoder": enc, "role": role, "parameters": n_params, "train_crop": crop,
               "train_batch": batch, "frozen_batch": fbatch,
               "train_full_images_per_s": train_images_per_s(enc, crop, batch, "full",
                                                             1 if paper else reps),
               "train_frozen_images_per_s": None if (paper and quick) else
               train_images_per_s(enc, crop, fbatch, "frozen", 1 if paper else reps),
               "infer_480x640_images_per_s": infer_images_per_s(enc, 2 if paper else reps)}
        rows.append(row)
    mm_after = matmul_gflops(reps=3)
    by_enc = {r["encoder"]: r for r in rows}
    d = by_enc[default["encoder"]]
    result = {
        "benchmark": "segmentation",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "quick": quick,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "device": "cpu", "dtype": "float32",
                    "matmul_2048_gflops_per_s_before": mm_before,
                    "matmul_2048_gflops_per_s_after": mm_after},
        "default_config": default,
        "inference_size": [H, W],
        "encoders": rows,
        "default_train_images_per_s": d["train_full_images_per_s"],
        "default_infer_images_per_s": d["infer_480x640_images_per_s"],
        "paper_config": paper_cfg,
        "paper_train_images_per_s": by_enc[paper_cfg["encoder"]]["train_full_images_per_s"],
        "paper_infer_images_per_s": by_enc[paper_cfg["encoder"]]["infer_480x640_images_per_s"],
        "msrs_test_set_eval_minutes_default": 361 / d["infer_480x640_images_per_s"] / 60,
        "msrs_train_epoch_minutes_default": 1083 / d["train_full_images_per_s"] / 60,
    }
    out_dir = REPO / "results" / "benchmarks"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"segmentation-{dt.date.today().isoformat()}.json"
    from fusion.data.io import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=2))
    result["json_path"] = str(path)
    return result


def _print(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    m = result["machine"]
    t = Table(title=f"DeepLabV3+ on CPU ({m['torch_threads']} threads; matmul "
                    f"{m['matmul_2048_gflops_per_s_before']:.0f}/{m['matmul_2048_gflops_per_s_after']:.0f} "
                    "GFLOP/s before/after)")
    for col in ("encoder", "role", "params (M)", "crop / batch / frozen batch", "train img/s (full)",
                "train img/s (frozen)", "infer img/s 480x640"):
        t.add_column(col, justify="left" if col in ("encoder", "role") else "right",
                     no_wrap=col == "encoder")
    for r in result["encoders"]:
        fz = r["train_frozen_images_per_s"]
        t.add_row(r["encoder"], r["role"], f"{r['parameters'] / 1e6:.1f}",
                  f"{r['train_crop']} / {r['train_batch']} / {r['frozen_batch']}",
                  f"{r['train_full_images_per_s']:.2f}", "-" if fz is None else f"{fz:.2f}",
                  f"{r['infer_480x640_images_per_s']:.2f}")
    c = Console(width=max(Console().width, 112))
    c.print(t)
    c.print(f"default encoder: one MSRS epoch "
            f"(1083 images) ~{result['msrs_train_epoch_minutes_default']:.1f} min, the 361-image test "
            f"set ~{result['msrs_test_set_eval_minutes_default']:.1f} min")
    c.print(f"written: {result['json_path']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and encoders")
    _print(run(quick=parser.parse_args().quick))
