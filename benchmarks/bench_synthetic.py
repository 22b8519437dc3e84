"""Speed of the synthetic MSRS-like data generator, and the modalities' measured complementarity.

Measures, in one run:

* ``make_synthetic`` end to end (render, PNG-encode, atomic write) at 240x320 with every CPU
  core: pairs/s and the seconds for the whole set (target: 1000 pairs in under 60 s on the
  project's 2-core CI machine); 200 pairs with ``--quick``, 1000 otherwise;
* the same with one worker, so the parallel speed-up is visible;
* the CPU milliseconds per pair (this process and its workers), which other processes on the
  machine disturb less than wall-clock time;
* ``render_scene`` alone (no files): median milliseconds per scene in this process;
* the median object/ring contrast (``fuseseg.data.synthetic.object_contrast``) per class in
  infrared and visible, at night and by day, and the ratios the tests assert (night people
  IR/VI; cones and bumps VI/IR).

Usage: ``python -m benchmarks.bench_synthetic [--quick]``. Prints rich tables and writes
``results/benchmarks/synthetic-<date>.json``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

from fuseseg.data.synthetic import make_synthetic, measure_contrast, render_scene, scene_rng

REPO = Path(__file__).resolve().parents[1]
SIZE = (240, 320)


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process and its finished children (the workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run(quick: bool = False) -> dict:
    n = 200 if quick else 1000
    n_test = n // 5
    cores = os.cpu_count() or 1
    result: dict = {"size": list(SIZE), "pairs": n, "quick": quick,
                    "machine": {"platform": platform.platform(), "processor": platform.processor(),
                                "cpu_count": cores}}
    with tempfile.TemporaryDirectory(prefix="bench-synthetic-") as tmp:
        runs = {}
        for workers in sorted({cores, 1}, reverse=True):
            count = n if workers == cores else max(50, n // 5)
            cpu0 = _cpu_seconds()
            s = make_synthetic(Path(tmp) / f"w{workers}", count - count // 5, count // 5, size=SIZE,
                               seed=0, workers=workers, progress=False)
            runs[workers] = {"pairs": count, "seconds": s["seconds"], "pairs_per_s": s["pairs_per_s"],
                             "cpu_ms_per_pair": 1000 * (_cpu_seconds() - cpu0) / count,
                             "night_fraction": s["night_fraction"]}
        result["make_synthetic"] = runs
        result["seconds_for_1000"] = 1000 / runs[cores]["pairs_per_s"]
        result["night_fraction"] = runs[cores]["night_fraction"]
        result["n_test"] = n_test
    times = []
    for i in range(20 if quick else 50):
        t0 = time.perf_counter()
        render_scene(scene_rng(1, i), SIZE)
        times.append(time.perf_counter() - t0)
    result["render_ms_median"] = 1000 * statistics.median(times)
    result["load_average_1min"] = os.getloadavg()[0]
    k = 12 if quick else 32
    night = measure_contrast(k, SIZE, seed=1, night=True)
    day = measure_contrast(k, SIZE, seed=2, night=False)
    result["contrast"] = {"night": night, "day": day}
    result["ratios"] = {
        "person night ir/vi": night["person"]["ir"] / night["person"]["vi"],
        "person day ir/vi": day["person"]["ir"] / day["person"]["vi"],
        "color_cone night vi/ir": night["color_cone"]["vi"] / night["color_cone"]["ir"],
        "color_cone day vi/ir": day["color_cone"]["vi"] / day["color_cone"]["ir"],
        "bump night vi/ir": night["bump"]["vi"] / night["bump"]["ir"],
        "bump day vi/ir": day["bump"]["vi"] / day["bump"]["ir"],
    }
    out_dir = REPO / "results" / "benchmarks"
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"synthetic-{dt.date.today().isoformat()}.json"
    path.write_text(json.dumps(result, indent=2))
    result["json_path"] = str(path)
    return result


def _print(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    con = Console()
    t = Table(title=f"synthetic generator, {result['size'][0]}x{result['size'][1]}, "
              f"{result['machine']['cpu_count']} CPU cores")
    for col in ("workers", "pairs", "seconds", "pairs/s", "CPU ms/pair"):
        t.add_column(col, justify="right")
    for w, r in result["make_synthetic"].items():
        t.add_row(str(w), str(r["pairs"]), f"{r['seconds']:.1f}", f"{r['pairs_per_s']:.1f}",
                  f"{r['cpu_ms_per_pair']:.1f}")
    con.print(t)
    con.print(f"1000 pairs with all cores: {result['seconds_for_1000']:.1f} s (target < 60 s); "
              f"render_scene alone: {result['render_ms_median']:.1f} ms/scene; "
              f"night fraction {result['night_fraction']:.2f}; load average (1 min) "
              f"{result['load_average_1min']:.1f} (other processes slow the wall-clock numbers)")
    c = Table(title="median object/ring contrast (object_contrast)")
    for col in ("class", "night IR", "night VI", "day IR", "day VI", "n night/day"):
        c.add_column(col, justify="right")
    night, day = result["contrast"]["night"], result["contrast"]["day"]
    for k in night:
        d = day.get(k, {"ir": float("nan"), "vi": float("nan"), "n": 0})
        c.add_row(k, f"{night[k]['ir']:.2f}", f"{night[k]['vi']:.2f}", f"{d['ir']:.2f}", f"{d['vi']:.2f}",
                  f"{night[k]['n']}/{d['n']}")
    con.print(c)
    con.print(", ".join(f"{k} = {v:.1f}" for k, v in result["ratios"].items()))
    con.print(f"written: {result['json_path']}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 pairs instead of 1000")
    _print(run(quick=ap.parse_args().quick))
