"""Speed of the segmentation stage (DeepLabV3+) on this machine's CPU, in fp32 and in bf16.

Measures, in one run (median of a few timed iterations after one warm-up), for ``amp=off``
(float32, contiguous: "before") and ``amp=auto`` (bf16 autocast + channels-last on a CPU with
native bf16, as ``segmentation.train`` and ``evaluate_segmenter`` run it: "after"):

* training throughput in images/s: one optimiser step = forward, Dice+CE (float32), backward, SGD
  step, with the encoder trainable ("full" phase) and frozen ("frozen" phase, encoder in eval
  mode), on square crops: the crop and batch sizes of ``configs/default.yaml`` for its (CPU)
  encoder, issue #13's reference case (192 crops, batch 8, decoder 128: 20.8 img/s in fp32), and
  ``configs/msrs.yaml`` (480, 4 / 8) for the paper-like encoder (SegConfig's defaults and the
  paper's numbers when those files are absent); the FLOPs of a training step
  (``FlopCounterMode``: forward + backward convolutions and matrix products) give the achieved
  GFLOP/s, shown next to 2048x2048 float32 and bfloat16 matmul rates measured in the same run;
* inference throughput in images/s at the paper's image size (480x640, batch 1,
  ``inference_mode``, the same padding/argmax path as ``evaluate_segmenter``);

without ``--quick`` also for the other light candidates (resnet18, mobilenet_v2; bf16 only),
which is how the default encoder is chosen.

Usage: ``python -m benchmarks.bench_segmentation [--quick]``. Prints a rich table and writes
``results/benchmarks/segmentation-<date>.json``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
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
    seg_train_step,
    timed,
)
from fuseseg import runtime
from segmentation.config import DEFAULT_ENCODER, PAPER_ENCODER, SegConfig
from segmentation.evaluate import predict
from segmentation.losses import DiceCELoss
from segmentation.model import build_model, set_phase, train_mode
from segmentation.train import build_optimizer

H, W = 480, 640
REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
#: issue #13's reference: default encoder, decoder 128, 192 crops, batch 8, fp32, 2-core machine
REFERENCE_CROP, BASELINE_IMAGES_PER_S = 192, 20.8


def _median_time(fn, reps: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after ``warmup`` (see benchmarks.common.timed)."""
    return timed(fn, repeats=reps, warmup=warmup).median


def _train_step(encoder: str, crop: int, batch: int, phase: str, amp: str, decoder_channels: int,
                aspp_separable: bool = True):
    """A function doing one optimiser step (Dice+CE, SGD) on random (batch, 3, crop, crop) inputs
    the way segmentation.train runs it under ``amp`` (autocast, channels-last with bf16 on CPU)."""
    cfg = SegConfig(encoder=encoder, crop_size=crop, batch_size=batch, frozen_batch_size=batch,
                    decoder_channels=decoder_channels, aspp_separable=aspp_separable, amp=amp)
    torch.manual_seed(0)
    cl = precision_of(amp)["channels_last"]
    model = build_model(cfg.model_kwargs())
    if cl:
        model = model.to(memory_format=torch.channels_last)
    set_phase(model, phase)
    train_mode(model)
    opt = build_optimizer(model, cfg)
    loss_fn = DiceCELoss()
    x = runtime.to_memory_format(torch.randn(batch, 3, crop, crop), cl)
    y = torch.randint(0, cfg.num_classes, (batch, crop, crop))

    return lambda: seg_train_step(model, opt, loss_fn, x, y, CPU, amp)


def train_flops(encoder: str, crop: int, batch: int, phase: str, decoder_channels: int,
                aspp_separable: bool = True) -> int:
    """FLOPs of one training step (forward + backward; FlopCounterMode: convolutions and matrix
    products, 2 per multiply-add)."""
    step = _train_step(encoder, crop, batch, phase, "off", decoder_channels, aspp_separable)
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return int(counter.get_total_flops())


def train_images_per_s(encoder: str, crop: int, batch: int, phase: str, reps: int, amp: str = "off",
                       decoder_channels: int = 256, aspp_separable: bool = True) -> float:
    """Images/s of full optimiser steps (Dice+CE, SGD) on random (batch, 3, crop, crop) inputs."""
    return batch / _median_time(_train_step(encoder, crop, batch, phase, amp, decoder_channels, aspp_separable),
                                reps)


def infer_images_per_s(encoder: str, reps: int, amp: str = "off", decoder_channels: int = 256,
                       aspp_separable: bool = True) -> float:
    """Images/s of full-size (480x640) inference, batch 1, padding + argmax included (the path of
    ``evaluate_segmenter``: predict() under ``amp``)."""
    cfg = SegConfig(encoder=encoder, decoder_channels=decoder_channels, aspp_separable=aspp_separable)
    torch.manual_seed(0)
    model = build_model(cfg.model_kwargs()).eval()
    if precision_of(amp)["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, H, W)
    return 1.0 / _median_time(lambda: predict(model, x, amp), reps)


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
                                          "frozen_batch_size": d0.frozen_batch_size,
                                          "decoder_channels": d0.decoder_channels,
                                          "aspp_separable": d0.aspp_separable})
    paper_cfg = config_settings("msrs", {"encoder": PAPER_ENCODER, "crop_size": 480, "batch_size": 4,
                                         "frozen_batch_size": 8, "decoder_channels": d0.decoder_channels,
                                         "aspp_separable": d0.aspp_separable})
    reps = 2 if quick else 4
    # (encoder, role, crop, batch, frozen batch, decoder channels, amps): the default config and
    # the issue #13 reference (192 crops, batch 8) at both precisions, the paper-like config at its
    # own crop/batch, and (full run) the other light candidates at the default crop/batch
    dc, sep = default["decoder_channels"], default["aspp_separable"]
    cases = [(default["encoder"], "default (CPU)", default["crop_size"], default["batch_size"],
              default["frozen_batch_size"], dc, sep, AMPS),
             (default["encoder"], "reference 192^2 b8", REFERENCE_CROP, 8, 16, 128, sep, AMPS),
             (paper_cfg["encoder"], "paper-like (msrs)", paper_cfg["crop_size"],
              paper_cfg["batch_size"], paper_cfg["frozen_batch_size"], paper_cfg["decoder_channels"],
              paper_cfg["aspp_separable"],
              ("auto",) if quick else AMPS)]
    if not quick:
        cases += [(e, "candidate", default["crop_size"], default["batch_size"],
                   default["frozen_batch_size"], dc, sep, ("auto",)) for e in ("resnet18", "mobilenet_v2")]
    rows = []
    rates_before = matmul_rates(repeats=3)
    for enc, role, crop, batch, fbatch, dch, asep, amps in cases:
        paper = role.startswith("paper")
        n_params = sum(p.numel() for p in build_model(
            SegConfig(encoder=enc, decoder_channels=dch, aspp_separable=asep).model_kwargs()).parameters())
        flops = train_flops(enc, crop, batch, "full", dch, asep)
        for amp in amps:
            full = train_images_per_s(enc, crop, batch, "full", 1 if paper else reps, amp, dch, asep)
            row = {"encoder": enc, "role": role, "amp": amp, **precision_of(amp), "parameters": n_params,
                   "decoder_channels": dch, "aspp_separable": asep, "train_crop": crop, "train_batch": batch, "frozen_batch": fbatch,
                   "train_full_images_per_s": full,
                   "train_flops_per_image": flops / batch,
                   "train_gflops_per_s": flops / batch * full / 1e9,
                   "train_frozen_images_per_s": None if paper or role.startswith("reference") else
                   train_images_per_s(enc, crop, fbatch, "frozen", reps, amp, dch, asep),
                   "infer_480x640_images_per_s": None if role.startswith("reference") else
                   infer_images_per_s(enc, 2 if paper else reps, amp, dch, asep)}
            rows.append(row)
    rates_after = matmul_rates(repeats=3)
    rates = {p: (rates_before[p] + rates_after[p]) / 2 for p in rates_before}
    for r in rows:
        r["train_over_fp32_matmul"] = r["train_gflops_per_s"] / rates["fp32"]
        r["train_over_bf16_matmul"] = r["train_gflops_per_s"] / rates["bf16"]

    def pick(role, amp):
        return next(r for r in rows if r["role"] == role and r["amp"] == amp)

    d = pick("default (CPU)", "auto")
    ref_off, ref_auto = pick("reference 192^2 b8", "off"), pick("reference 192^2 b8", "auto")
    paper_auto = pick("paper-like (msrs)", "auto")
    result = {
        "benchmark": "segmentation",
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "quick": quick,
        "machine": {**machine_info(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "device": "cpu"},
        "matmul_2048_gflops_per_s": rates,
        "matmul_2048_gflops_per_s_before_after": {"before": rates_before, "after": rates_after},
        "default_config": default,
        "inference_size": [H, W],
        "encoders": rows,
        "default_train_images_per_s": d["train_full_images_per_s"],
        "default_infer_images_per_s": d["infer_480x640_images_per_s"],
        "reference_speedup": ref_auto["train_full_images_per_s"] / ref_off["train_full_images_per_s"],
        "reference_vs_baseline": ref_auto["train_full_images_per_s"] / BASELINE_IMAGES_PER_S,
        "baseline_images_per_s": BASELINE_IMAGES_PER_S,
        "paper_config": paper_cfg,
        "paper_train_images_per_s": paper_auto["train_full_images_per_s"],
        "paper_infer_images_per_s": paper_auto["infer_480x640_images_per_s"],
        "msrs_test_set_eval_minutes_default": 361 / d["infer_480x640_images_per_s"] / 60,
        "msrs_train_epoch_minutes_default": 1083 / d["train_full_images_per_s"] / 60,
    }
    out_dir = REPO / "results" / "benchmarks"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"segmentation-{dt.date.today().isoformat()}.json"
    from fuseseg.data.io import atomic_write_text

    atomic_write_text(path, json.dumps(result, indent=2))
    result["json_path"] = str(path)
    return result


def figures(r: dict) -> list[dict]:
    """The rows of ``python -m benchmarks``: per encoder/config and precision, with the matmul rates."""
    sec = "segmentation"
    rates = r["matmul_2048_gflops_per_s"]
    out = rate_figures(sec, rates)
    for e in r["encoders"]:
        tag = f"{e['encoder']} ({e['role']}) amp={e['amp']} ({e['precision']})"
        out.append(figure(sec, f"{tag} train {e['train_crop']}^2 b{e['train_batch']}",
                          e["train_full_images_per_s"], "img/s", "full phase"))
        out += gflops_figures(sec, f"{tag} train achieved", e["train_gflops_per_s"], rates)
        if e.get("train_frozen_images_per_s") is not None:
            out.append(figure(sec, f"{tag} train frozen b{e['frozen_batch']}", e["train_frozen_images_per_s"],
                              "img/s"))
        if e.get("infer_480x640_images_per_s") is not None:
            out.append(figure(sec, f"{tag} inference 480x640", e["infer_480x640_images_per_s"], "img/s"))
    out += [figure(sec, "reference 192^2 b8 training speed-up auto / off", r["reference_speedup"], "x"),
            figure(sec, f"reference vs issue #13 baseline ({r['baseline_images_per_s']:g} img/s)",
                   r["reference_vs_baseline"], "x", "target >= 2.5")]
    return out


def _print(result: dict) -> None:
    from rich.console import Console

    from benchmarks.common import figures_table

    c = Console(width=max(Console().width, 120))
    c.print(figures_table(figures(result), f"DeepLabV3+ on CPU ({result['machine']['torch_threads']} threads)"))
    c.print(f"default encoder: one MSRS epoch "
            f"(1083 images) ~{result['msrs_train_epoch_minutes_default']:.1f} min, the 361-image test "
            f"set ~{result['msrs_test_set_eval_minutes_default']:.1f} min")
    c.print(f"written: {result['json_path']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions and encoders")
    _print(run(quick=parser.parse_args().quick))
