"""Throughput of DeepLabV3+ training loops sharing this machine: torch's default threads against
fuseseg's thread policy (``fuseseg.threads``).

One loop: DeepLabV3+ (``tu-resnet10t``, decoder 128), random 96x96 crops, batch 4, float32, SGD +
Dice/CE, ``--steps`` optimiser steps after ``--warmup`` (split into ``--epochs`` "epochs"). Each
loop runs in its own process (``--worker``). For each of the two thread settings, one loop alone,
then two loops started together:

* ``default``: torch's default thread count (one per core of the machine; OMP_NUM_THREADS unset);
* ``policy``: the count ``fuseseg run`` uses (:func:`fuseseg.threads.configure`: the CPUs this
  process may use, fewer while the load average says other work keeps them busy), re-decided
  between the loop's epochs as the trainers do (:class:`fuseseg.threads.EpochPace`).

Reported: each loop's images/s (its last epoch and all timed steps), the sum, the 2-loop sum over
the 1-loop rate, the threads each loop ran with per epoch, fp32/bf16 2048^2 matmul GFLOP/s of the same
run and the load average before and after. The 1-minute load average reacts over about a minute,
so the policy's benefit shows in loops that run longer than that (the default ``--steps``).

Usage: ``python -m benchmarks.bench_contention [--steps N] [--out FILE]``; prints a table and
writes ``results/benchmarks/contention-<date>.json``. Time it only on an otherwise idle machine.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.common import (
    RESULTS,
    figure,
    figures_table,
    make_record,
    matmul_rates,
    write_record,
)

ENCODER, CROP, BATCH, DECODER = "tu-resnet10t", 96, 4, 128
MODES = ("default", "policy")


# ---------------------------------------------------------------- one loop (a child process)
def worker(mode: str, steps: int, warmup: int, epochs: int) -> dict:
    """Run one training loop; returns its figures (printed as JSON by ``--worker``)."""
    import torch

    from benchmarks.common import seg_train_step
    from fuseseg import threads
    from segmentation.config import SegConfig
    from segmentation.losses import DiceCELoss
    from segmentation.model import build_model, set_phase, train_mode
    from segmentation.train import build_optimizer

    policy = threads.configure(None) if mode == "policy" else None
    cfg = SegConfig(encoder=ENCODER, crop_size=CROP, batch_size=BATCH, decoder_channels=DECODER, amp="off")
    torch.manual_seed(0)
    model = build_model(cfg.model_kwargs())
    set_phase(model, "full")
    train_mode(model)
    opt, loss_fn = build_optimizer(model, cfg), DiceCELoss()
    x, y = torch.randn(BATCH, 3, CROP, CROP), torch.randint(0, cfg.num_classes, (BATCH, CROP, CROP))
    cpu = torch.device("cpu")
    for _ in range(warmup):
        seg_train_step(model, opt, loss_fn, x, y, cpu, "off")
    pace = threads.EpochPace("benchmark loop", say=lambda text: print(text, file=sys.stderr))
    per_epoch = split_steps(steps, epochs)
    rates, total_s, threads_used = [], 0.0, []
    for n in per_epoch:
        threads_used.append(torch.get_num_threads())
        t0 = time.perf_counter()
        for _ in range(n):
            seg_train_step(model, opt, loss_fn, x, y, cpu, "off")
        sec = time.perf_counter() - t0
        total_s += sec
        rates.append(n * BATCH / sec)
        if policy is not None:
            pace.epoch_done(rates[-1], len(rates))
    return {"mode": mode, "threads_per_epoch": threads_used, "images_per_s_per_epoch": rates,
            "images_per_s": steps * BATCH / total_s, "last_epoch_images_per_s": rates[-1],
            "policy_why": policy.why if policy else "torch default"}


def split_steps(steps: int, epochs: int) -> list[int]:
    """``steps`` split into ``epochs`` near-equal positive parts (fewer parts when steps < epochs)."""
    epochs = max(1, min(epochs, steps))
    base, extra = divmod(steps, epochs)
    return [base + (1 if i < extra else 0) for i in range(epochs)]


# ---------------------------------------------------------------- the scenarios
def child_env() -> dict[str, str]:
    """The environment of a loop: the caller's, without thread settings (each mode chooses)."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "") if env.get("PYTHONPATH") else root
    return env


def concurrent(mode: str, n: int, steps: int, warmup: int, epochs: int) -> list[dict]:
    """``n`` loops of ``mode`` started together; their results."""
    cmd = [sys.executable, "-m", "benchmarks.bench_contention", "--worker", mode, "--steps", str(steps),
           "--warmup", str(warmup), "--epochs", str(epochs)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
             for _ in range(n)]
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"a {mode} loop failed (exit {p.returncode}): {stderr.strip()[-500:]}")
        res = json.loads(stdout.strip().splitlines()[-1])
        res["warnings"] = [ln for ln in stderr.splitlines() if ln.startswith("warning:")]
        out.append(res)
    return out


def run(steps: int = 300, warmup: int = 5, epochs: int = 5, out: Path | None = None, matmul_n: int = 2048) -> dict:
    load_before = os.getloadavg()
    rates = matmul_rates(matmul_n)
    scenarios = {}
    for mode in MODES:
        for n in (1, 2):
            scenarios[f"{mode} x{n}"] = concurrent(mode, n, steps, warmup, epochs)
    result = {"encoder": ENCODER, "crop": CROP, "batch": BATCH, "decoder_channels": DECODER, "precision": "fp32",
              "steps": steps, "warmup": warmup, "epochs": epochs, "scenarios": scenarios,
              "matmul_n": matmul_n, "matmul_gflops_per_s": rates, "load_average_before": load_before,
              "load_average_after": os.getloadavg()}
    record = make_record(figures(result), {"contention": result}, quick=steps < 50,
                         command=[sys.executable, "-m", "benchmarks.bench_contention", "--steps", str(steps)])
    path = out or RESULTS / f"contention-{dt.date.today().isoformat()}.json"
    result["json_path"] = str(write_record(record, path))
    return result


def figures(r: dict) -> list[dict]:
    sec = "contention"
    n = r["matmul_n"]
    out = [figure(sec, f"{p} matmul {n}x{n} (this run)", r["matmul_gflops_per_s"][p], "GFLOP/s")
           for p in ("fp32", "bf16") if p in r["matmul_gflops_per_s"]]
    for mode in MODES:
        alone = r["scenarios"][f"{mode} x1"][0]["images_per_s"]
        out.append(figure(sec, f"{mode}: 1 loop", alone, "img/s",
                          f"threads {r['scenarios'][f'{mode} x1'][0]['threads_per_epoch']}"))
        pair = r["scenarios"][f"{mode} x2"]
        for i, res in enumerate(pair):
            out.append(figure(sec, f"{mode}: 2 loops, loop {i + 1}", res["images_per_s"], "img/s",
                              f"last epoch {res['last_epoch_images_per_s']:.1f}; threads {res['threads_per_epoch']}"))
        both = sum(res["images_per_s"] for res in pair)
        out.append(figure(sec, f"{mode}: 2 loops together / 1 alone", both / alone, "x", "2.0 = no loss"))
    la, lb = r["load_average_before"], r["load_average_after"]
    out.append(figure(sec, "load average before / after", f"{la[0]:.2f} / {lb[0]:.2f}", "", "1 min"))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300, help="timed optimiser steps per loop (default 300)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (default 5)")
    parser.add_argument("--epochs", type=int, default=5, help="parts the steps are split into (default 5)")
    parser.add_argument("--out", type=Path, help="the JSON record (default results/benchmarks/contention-<date>.json)")
    parser.add_argument("--matmul-size", type=int, default=2048, help="side of the reference matmuls (default 2048)")
    parser.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup, args.epochs)))
        return 0
    result = run(args.steps, args.warmup, args.epochs, args.out, args.matmul_size)
    from rich.console import Console

    c = Console(width=max(Console().width, 120))
    c.print(figures_table(figures(result), f"{ENCODER} training loops, {CROP} crops, batch {BATCH}, fp32"))
    c.print(f"written: {result['json_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
