"""Speed of SSPFusion (default kwargs) on this machine's CPU.

Measures, in one run:

* inference latency per 480x640 pair (RGB visible, ``torch.inference_mode``), median of several
  timed calls after warm-up;
* throughput in pairs/s for a few batch sizes, and the best of them;
* training throughput in images/s on 256x256 crops (fusion phase: forward, all losses,
  backward, Adam step);
* the model's FLOPs per 480x640 pair (``torch.utils.flop_counter.FlopCounterMode``: convolutions
  and matrix products, 2 FLOPs per multiply-add; element-wise ops not counted), the achieved
  GFLOP/s, and the GFLOP/s of a 2048x2048 float32 matmul measured in the same run (the ratio says
  how close the network runs to the machine's dense-compute speed).

Usage: ``python -m benchmarks.bench_sspfusion [--quick]``. Prints a rich table and writes
``results/benchmarks/sspfusion-<date>.json``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from fusion.sspfusion import SSPFusion

H, W = 480, 640
CROP = 256
REPO = Path(__file__).resolve().parents[1]


def _median_time(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after ``warmup`` (see benchmarks.common.timed)."""
    from benchmarks.common import timed

    return timed(fn, repeats=reps, warmup=warmup).median


def matmul_gflops(n: int = 2048, reps: int = 5) -> float:
    """GFLOP/s of an n x n float32 matmul (2 n^3 FLOPs), median time."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    sec = _median_time(lambda: a @ b, reps, 2)
    return 2 * n ** 3 / sec / 1e9


def count_flops(model: torch.nn.Module, ir: torch.Tensor, vi: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(ir, vi)
    return int(counter.get_total_flops())


def run(quick: bool = False) -> dict:
    """Run the benchmark; returns the result dict (also written as JSON)."""
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    model = SSPFusion().eval()
    n_params = sum(p.numel() for p in model.parameters())
    ir, vi = torch.rand(1, 1, H, W), torch.rand(1, 3, H, W)
    reps, warm = (3, 1) if quick else (7, 2)

    flops = count_flops(model, ir, vi)
    mm = matmul_gflops(reps=3 if quick else 7)

    with torch.inference_mode():
        lat = _median_time(lambda: model(ir, vi), reps, warm)
        per_batch = {}
        for bs in ((1, 2) if quick else (1, 2, 4, 8)):
            irb, vib = ir.expand(bs, -1, -1, -1).contiguous(), vi.expand(bs, -1, -1, -1).contiguous()
            sec = _median_time(lambda irb=irb, vib=vib: model(irb, vib), max(2, reps // 2), 1)
            per_batch[bs] = bs / sec
    best_bs = max(per_batch, key=per_batch.get)

    train_model = SSPFusion().train()
    opt = torch.optim.Adam(train_model.parameters(), lr=2e-4)
    tb = 2 if quick else 4
    g = torch.Generator().manual_seed(0)
    cir, cvi = torch.rand(tb, 1, CROP, CROP, generator=g), torch.rand(tb, 1, CROP, CROP, generator=g)

    def step():
        loss, _ = train_model.training_losses(cir, cvi, "fusion")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train_sec = _median_time(step, max(2, reps // 2), 1)

    achieved = flops / lat / 1e9
    result = {
        "benchmark": "sspfusion",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "quick": quick,
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "cpu_count": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__},
        "model": {"kwargs": SSPFusion().init_kwargs, "parameters": n_params},
        "input": {"height": H, "width": W, "visible": "RGB", "device": "cpu", "dtype": "float32"},
        "flops_per_pair": flops,
        "gflops_per_pair": flops / 1e9,
        "inference_ms_per_pair": lat * 1e3,
        "pairs_per_s_by_batch": {str(k): v for k, v in per_batch.items()},
        "best_batch": best_bs,
        "best_pairs_per_s": per_batch[best_bs],
        "train_crop": CROP,
        "train_batch": tb,
        "train_images_per_s": tb / train_sec,
        "achieved_gflops_per_s": achieved,
        "matmul_2048_gflops_per_s": mm,
        "achieved_over_matmul": achieved / mm,
    }
    out_dir = REPO / "results" / "benchmarks"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"sspfusion-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=2))
    result["json_path"] = str(path)
    return result


def _print(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SSPFusion on CPU ({result['machine']['torch_threads']} threads), "
                        f"{H}x{W} pairs, default kwargs")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("parameters", f"{result['model']['parameters']:,}")
    table.add_row("GFLOP per pair", f"{result['gflops_per_pair']:.2f}")
    table.add_row("inference ms per pair (batch 1, median)", f"{result['inference_ms_per_pair']:.1f}")
    for bs, v in result["pairs_per_s_by_batch"].items():
        table.add_row(f"pairs/s at batch {bs}", f"{v:.2f}")
    table.add_row("best batch", str(result["best_batch"]))
    table.add_row(f"training images/s ({CROP}x{CROP}, batch {result['train_batch']})",
                  f"{result['train_images_per_s']:.2f}")
    table.add_row("achieved GFLOP/s (batch 1)", f"{result['achieved_gflops_per_s']:.1f}")
    table.add_row("2048x2048 fp32 matmul GFLOP/s", f"{result['matmul_2048_gflops_per_s']:.1f}")
    table.add_row("achieved / matmul", f"{result['achieved_over_matmul']:.2f}")
    Console().print(table)
    Console().print(f"written: {result['json_path']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and batch sizes")
    _print(run(quick=parser.parse_args().quick))
