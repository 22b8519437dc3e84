"""Speed of SSPFusion (default kwargs) on this machine's CPU, in fp32 and in bf16.

Measures, in one run, for ``amp=off`` (float32, contiguous tensors: "before") and ``amp=auto``
(bf16 autocast + channels-last on a CPU with native bf16, as the fuse stage and the trainer run
it: "after"; fp32 again on a CPU without native bf16):

* inference latency per 480x640 pair (RGB visible, ``torch.inference_mode``), median of several
  timed calls after warm-up, and the speed-up of ``auto`` over ``off``;
* throughput in pairs/s for a few batch sizes, and the best of them;
* training throughput in images/s on 256x256 crops (fusion phase: forward, all losses (float32
  in both cases), backward, Adam step);
* the model's FLOPs per 480x640 pair (``torch.utils.flop_counter.FlopCounterMode``: convolutions
  and matrix products, 2 FLOPs per multiply-add; element-wise ops not counted), the achieved
  GFLOP/s, and the GFLOP/s of 2048x2048 float32 and bfloat16 matmuls measured in the same run
  (the ratios say how close the network runs to the machine's dense-compute speed);
* how far the bf16 output is from the fp32 output (mean and max absolute difference, in grey
  levels of 255) on the benchmark's input.

Usage: ``python -m benchmarks.bench_sspfusion [--quick]``. Prints a rich table and writes
``results/benchmarks/sspfusion-<date>.json``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    AMPS,
    figure,
    gflops_figures,
    machine_info,
    matmul_rates,
    precision_of,
    rate_figures,
    timed,
)
from fuseseg import runtime
from fusion.models.sspfusion import SSPFusion

H, W = 480, 640
CROP = 256
REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
#: issue #13's baseline, measured on the 2-core development machine before bf16 autocast
BASELINE_MS = 257.0


def count_flops(model: torch.nn.Module, ir: torch.Tensor, vi: torch.Tensor) -> int:
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model(ir, vi)
    return int(counter.get_total_flops())


def _scene(b: int = 1, h: int = H, w: int = W) -> tuple[torch.Tensor, torch.Tensor]:
    """A smooth synthetic pair (structure, so the edge maps are not noise), batch ``b``."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    ir = (0.5 + 0.3 * torch.sin(20 * xx) * torch.cos(15 * yy) + 0.05 * torch.rand(h, w, generator=g))
    vi = torch.stack([0.3 + 0.5 * xx * yy, 0.4 * yy + 0.2, 0.6 - 0.3 * xx]) + 0.05 * torch.rand(3, h, w, generator=g)
    return (ir.clamp(0, 1).expand(b, 1, h, w).contiguous(), vi.clamp(0, 1).expand(b, 3, h, w).contiguous())


def _prepare(model: torch.nn.Module, amp: str):
    """(model in ``amp``'s memory format, input converter, autocast factory) as fuse.py runs it."""
    cl = precision_of(amp)["channels_last"]
    model = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)

    def conv(*xs):
        return [runtime.to_memory_format(x, cl) for x in xs]

    return model, conv, (lambda: runtime.autocast(CPU, amp)) if amp != "off" else nullcontext


def measure(amp: str, quick: bool, flops: int) -> dict:
    """Inference latency, batch throughput and training speed under ``amp``."""
    reps, warm = (3, 1) if quick else (7, 2)
    torch.manual_seed(0)
    model, conv, ctx = _prepare(SSPFusion().eval(), amp)
    ir, vi = conv(*_scene())
    with torch.inference_mode():
        def infer(a=ir, b=vi):
            with ctx():
                return model(a, b)

        lat = timed(infer, repeats=reps, warmup=warm).median
        out = infer().float()
        per_batch = {}
        for bs in ((1, 2) if quick else (1, 2, 4)):
            irb, vib = conv(*_scene(bs))
            sec = timed(lambda a=irb, b=vib: infer(a, b), repeats=max(2, reps // 2), warmup=1).median
            per_batch[bs] = bs / sec
    best = max(per_batch, key=per_batch.get)

    torch.manual_seed(0)
    train_model, conv, ctx = _prepare(SSPFusion().train(), amp)
    opt = torch.optim.Adam(train_model.parameters(), lr=2e-4)
    tb = 2 if quick else 4
    g = torch.Generator().manual_seed(0)
    cir, cvi = conv(torch.rand(tb, 1, CROP, CROP, generator=g), torch.rand(tb, 1, CROP, CROP, generator=g))

    def step():
        with ctx():
            loss, _ = train_model.training_losses(cir, cvi, "fusion")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    train_sec = timed(step, repeats=max(2, reps // 2), warmup=1).median
    return {"amp": amp, **precision_of(amp), "inference_ms_per_pair": lat * 1e3,
            "achieved_gflops_per_s": flops / lat / 1e9,
            "pairs_per_s_by_batch": {str(k): v for k, v in per_batch.items()}, "best_batch": best,
            "best_pairs_per_s": per_batch[best], "train_batch": tb, "train_images_per_s": tb / train_sec,
            "_output": out}


def measure_compiled(amp: str, quick: bool, flops: int) -> dict:
    """Batch-1 480x640 inference through :class:`fusion.fuse.CompiledMethod` (``fuse_compile:
    true``, ``fuseseg fuse --compile``) under ``amp``: the first call's seconds (compiling) and
    the median latency after it; its output for the agreement with eager."""
    from fusion.fuse import CompiledMethod

    reps, warm = (3, 1) if quick else (7, 2)
    torch.manual_seed(0)
    model, conv, ctx = _prepare(SSPFusion().eval(), amp)
    fn = CompiledMethod(model, "sspfusion")
    ir, vi = conv(*_scene())
    with torch.inference_mode():
        def infer(a=ir, b=vi):
            with ctx():
                return fn(a, b)

        t0 = time.perf_counter()
        out = infer().float()
        compile_s = time.perf_counter() - t0
        lat = timed(infer, repeats=reps, warmup=warm).median
    return {"amp": amp, **precision_of(amp), "compile_seconds": compile_s, "fell_back": fn.failed,
            "inference_ms_per_pair": lat * 1e3, "achieved_gflops_per_s": flops / lat / 1e9, "_output": out}


def run(quick: bool = False) -> dict:
    """Run the benchmark; returns the result dict (also written as JSON)."""
    torch.manual_seed(0)
    model = SSPFusion().eval()
    n_params = sum(p.numel() for p in model.parameters())
    flops = count_flops(model, *_scene())
    rates_before = matmul_rates(repeats=3 if quick else 5)
    by_amp = {amp: measure(amp, quick, flops) for amp in AMPS}
    compiled = measure_compiled("auto", quick, flops)
    rates_after = matmul_rates(repeats=3 if quick else 5)
    rates = {p: (rates_before[p] + rates_after[p]) / 2 for p in rates_before}
    off, auto = by_amp["off"], by_amp["auto"]
    auto_out = auto.pop("_output")
    diff = (auto_out - off.pop("_output")).abs() * 255
    cdiff = (compiled.pop("_output") - auto_out).abs() * 255
    compiled["vs_eager_grey_levels"] = {"mean": float(cdiff.mean()), "max": float(cdiff.max())}
    for r in by_amp.values():
        r["achieved_over_fp32_matmul"] = r["achieved_gflops_per_s"] / rates["fp32"]
        r["achieved_over_bf16_matmul"] = r["achieved_gflops_per_s"] / rates["bf16"]
    result = {
        "benchmark": "sspfusion",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "quick": quick,
        "machine": {**machine_info(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
        "model": {"kwargs": SSPFusion().init_kwargs, "parameters": n_params},
        "input": {"height": H, "width": W, "visible": "RGB", "device": "cpu"},
        "flops_per_pair": flops,
        "gflops_per_pair": flops / 1e9,
        "train_crop": CROP,
        "matmul_2048_gflops_per_s": rates,
        "matmul_2048_gflops_per_s_before_after": {"before": rates_before, "after": rates_after},
        "by_amp": by_amp,
        "speedup_inference": off["inference_ms_per_pair"] / auto["inference_ms_per_pair"],
        "speedup_training": auto["train_images_per_s"] / off["train_images_per_s"],
        "bf16_vs_fp32_grey_levels": {"mean": float(diff.mean()), "max": float(diff.max())},
        "baseline_ms_per_pair": BASELINE_MS,
        "inference_vs_baseline": BASELINE_MS / auto["inference_ms_per_pair"],
        "compiled": compiled,
        "compiled_vs_baseline": BASELINE_MS / compiled["inference_ms_per_pair"],
    }
    compiled["achieved_over_fp32_matmul"] = compiled["achieved_gflops_per_s"] / rates["fp32"]
    compiled["achieved_over_bf16_matmul"] = compiled["achieved_gflops_per_s"] / rates["bf16"]
    out_dir = REPO / "results" / "benchmarks"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"sspfusion-{dt.date.today().isoformat()}.json"
    from fuseseg.data.io import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=2))
    result["json_path"] = str(path)
    return result


def figures(r: dict) -> list[dict]:
    """The rows of ``python -m benchmarks`` (both precisions, the matmul rates next to them)."""
    sec = "SSPFusion"
    rates = r["matmul_2048_gflops_per_s"]
    out = [figure(sec, "GFLOP per 480x640 pair", r["gflops_per_pair"], "GFLOP")] + rate_figures(sec, rates)
    for amp, m in r["by_amp"].items():
        tag = f"amp={amp} ({m['precision']}{', channels-last' if m['channels_last'] else ''})"
        out += [figure(sec, f"{tag} inference 480x640, batch 1", m["inference_ms_per_pair"], "ms/pair", "median"),
                figure(sec, f"{tag} inference best batch ({m['best_batch']})", m["best_pairs_per_s"], "pairs/s"),
                figure(sec, f"{tag} training {r['train_crop']}^2 crops, batch {m['train_batch']}",
                       m["train_images_per_s"], "img/s", "fusion phase: forward, losses, backward, Adam")]
        out += gflops_figures(sec, f"{tag} achieved (batch 1 inference)", m["achieved_gflops_per_s"], rates)
    c = r.get("compiled")
    if c:
        tag = f"amp={c['amp']} compiled (fuse_compile: true)"
        out += [figure(sec, f"{tag} inference 480x640, batch 1", c["inference_ms_per_pair"], "ms/pair",
                       "median after compiling" + (f"; FELL BACK to eager: {c['fell_back']}" if c["fell_back"] else "")),
                figure(sec, f"{tag} compiling (first call)", c["compile_seconds"], "s", "once per input shape"),
                figure(sec, f"{tag} vs eager bf16, max |diff|", c["vs_eager_grey_levels"]["max"], "grey levels")]
        out += gflops_figures(sec, f"{tag} achieved", c["achieved_gflops_per_s"], rates)
        out.append(figure(sec, f"compiled inference vs issue #13 baseline ({r['baseline_ms_per_pair']:g} ms)",
                          r["compiled_vs_baseline"], "x", "target >= 2.5"))
    out += [figure(sec, "inference speed-up auto / off", r["speedup_inference"], "x"),
            figure(sec, "training speed-up auto / off", r["speedup_training"], "x"),
            figure(sec, f"inference vs issue #13 baseline ({r['baseline_ms_per_pair']:g} ms)",
                   r["inference_vs_baseline"], "x", "target >= 2.5"),
            figure(sec, "bf16 - fp32 output, mean |diff|", r["bf16_vs_fp32_grey_levels"]["mean"], "grey levels"),
            figure(sec, "bf16 - fp32 output, max |diff|", r["bf16_vs_fp32_grey_levels"]["max"], "grey levels")]
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and batch sizes")
    from rich.console import Console

    from benchmarks.common import figures_table

    res = run(quick=parser.parse_args().quick)
    Console(width=120).print(figures_table(figures(res), f"SSPFusion on CPU ({res['machine']['torch_threads']} "
                                                         "threads)"))
    Console().print(f"written: {res['json_path']}")
