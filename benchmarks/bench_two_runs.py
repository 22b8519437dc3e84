"""Two whole experiments sharing the machine: wall time of two ``fuseseg run`` started together
against one alone (issue #24's target: both within 2.4x of one alone on an idle 2-core machine).

Runs ``python -m pipelines.cli run CONFIG name=... results_dir=<tmp>`` once alone, then twice
at once (two processes started together, each in its own results folder), with fuseseg's thread
policy (no ``--threads``, ``OMP_NUM_THREADS`` unset: what a user gets). Reported: each run's wall
time, the ratio of each concurrent run to the one alone, the threads each run's stages chose
(from their ``stages/*.json`` records where written), 2048^2 fp32/bf16 matmul GFLOP/s before and
after, and the load average before each part.

Usage: ``python -m benchmarks.bench_two_runs [--config default] [--quick] [--out FILE]``; prints a
table and writes ``results/benchmarks/two-runs-<date>.json``. Time it only on an otherwise idle
machine (it measures contention between its own runs).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.bench_e2e import QUICK_OVERRIDES
from benchmarks.common import REPO, RESULTS, figure, make_record, matmul_rates, write_record


def _start(config: str, name: str, results: Path, extra: list[str]) -> tuple[subprocess.Popen, float, Path]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(REPO)
    log = results / f"{name}.log"
    results.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pipelines.cli", "run", config, f"name={name}",
           f"results_dir={results}", *extra]
    fh = open(log, "w")   # noqa: SIM115 (closed when the process is reaped)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=fh, stderr=subprocess.STDOUT), time.perf_counter(), log


def _wait(procs) -> list[dict]:
    out = []
    for p, t0, log in procs:
        rc = p.wait()
        out.append({"rc": rc, "wall_s": round(time.perf_counter() - t0, 1), "log": str(log)})
    return out


def _stage_threads(run_dir: Path) -> dict[str, object]:
    """The thread count each stage record states (where one does)."""
    found = {}
    for rec in sorted((run_dir / "stages").glob("*.json")) if (run_dir / "stages").is_dir() else []:
        try:
            data = json.loads(rec.read_text())
        except (OSError, ValueError):
            continue
        t = data.get("threads") or (data.get("info") or {}).get("threads")
        if t is not None:
            found[rec.stem] = t
    return found


def _figures(r: dict) -> list[dict]:
    sec = f"two `fuseseg run {r['config']}` at once"
    out = [figure(sec, "one run alone", r["alone"]["wall_s"], "s")]
    for i, p in enumerate(r["pair"], 1):
        out.append(figure(sec, f"run {i} of two together", p["wall_s"], "s", f"{p['ratio_to_alone']:.2f}x alone"))
    out.append(figure(sec, "worst run together / alone", r["worst_ratio"], "x", "target <= 2.4"))
    for when, rates in r["matmul_gflops"].items():
        for prec, v in rates.items():
            out.append(figure(sec, f"{prec} matmul 2048^2 ({when})", v, "GFLOP/s"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="default", help="experiment config (default: default)")
    ap.add_argument("--quick", action="store_true", help="tiny override set (benchmarks.bench_e2e's)")
    ap.add_argument("--keep", type=Path, help="keep the run folders here instead of a temporary folder")
    ap.add_argument("--out", type=Path, help="JSON record (default results/benchmarks/two-runs-<date>.json)")
    args = ap.parse_args(argv)
    extra = QUICK_OVERRIDES if args.quick else []
    with tempfile.TemporaryDirectory(prefix="two-runs-") as tmp:
        base = args.keep or Path(tmp)
        rates = {"before": matmul_rates()}
        load = {"alone": os.getloadavg()}
        print(f"one run alone ({args.config}) ...", flush=True)
        alone = _wait([_start(args.config, "alone", base / "alone", extra)])[0]
        alone["threads"] = _stage_threads(base / "alone" / "alone")
        print(f"  {alone['wall_s']:.0f} s; now two together ...", flush=True)
        time.sleep(60)   # let the load average settle towards idle before the pair starts
        load["pair"] = os.getloadavg()
        pair = _wait([_start(args.config, f"pair{i}", base / f"pair{i}", extra) for i in (1, 2)])
        for i, r in enumerate(pair, 1):
            r["threads"] = _stage_threads(base / f"pair{i}" / f"pair{i}")
            r["ratio_to_alone"] = round(r["wall_s"] / alone["wall_s"], 3)
        rates["after"] = matmul_rates()
    ok = all(r["rc"] == 0 for r in [alone, *pair])
    worst = max(r["ratio_to_alone"] for r in pair)
    result = {"config": args.config, "alone": alone, "pair": pair, "worst_ratio": worst, "target_ratio": 2.4,
              "target_met": ok and worst <= 2.4, "loadavg_before": load, "matmul_gflops": rates,
              "cpus": os.cpu_count()}
    record = make_record(_figures(result), {"two_runs": result}, quick=args.quick,
                         command=[sys.executable, "-m", "benchmarks.bench_two_runs", *(argv or sys.argv[1:])])
    print(f"\n{'run':<8} {'wall s':>8} {'x alone':>8}")
    print(f"{'alone':<8} {alone['wall_s']:>8.0f} {1.0:>8.2f}")
    for i, r in enumerate(pair, 1):
        print(f"{'pair' + str(i):<8} {r['wall_s']:>8.0f} {r['ratio_to_alone']:>8.2f}")
    print(f"worst ratio {worst:.2f} (target <= 2.4: {'met' if result['target_met'] else 'NOT met'}); "
          f"matmul fp32/bf16 GFLOP/s before {rates['before']}, after {rates['after']}; load {load}")
    out = args.out or RESULTS / f"two-runs-{dt.date.today().isoformat()}.json"
    write_record(record, out)
    print(f"wrote {out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
