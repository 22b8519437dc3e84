"""Speed of the fusion quality metrics (``fusion.metrics``) and of the data-set scorer.

Measures, on the real MSRS pairs in ``../shared/data/real/msrs`` (480x640; fused = round of the
mean of the infrared image and the visible image's grey, as a stand-in fusion method):

* each metric alone (``compute_all(..., [name])``) and all 13 together, float64, one process,
  OpenCV limited to one thread: median milliseconds over repeats after a warm-up, per triplet,
  reported as the median over the triplets and the worst triplet; wall-clock and CPU time of
  this thread (CPU time is less disturbed by other processes on a shared machine);
  target: all 13 < 50 ms per 480x640 triplet;
* data-set throughput of ``fusion.scoring.score_folders`` (reading PNGs included) with 1 and 2
  worker threads: triplets per second, wall-clock (pool start-up included).

Falls back to synthetic 480x640 images (stated in the output) when ../shared is absent.
Usage: ``python -m benchmarks.bench_metrics [--quick] [--out PATH]``. Prints rich tables and
writes ``results/benchmarks/metrics-<date>.json`` unless ``--out`` names another file.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np

from fusion import metrics as M
from fusion.scoring import score_folders

REPO = Path(__file__).resolve().parents[1]
MSRS = REPO.parent / "shared" / "data" / "real" / "msrs"


def _triplets(limit: int | None) -> tuple[list[tuple[str, np.ndarray, np.ndarray, np.ndarray]], str]:
    """(stem, fused, ir, vi) triplets and a note on where they come from."""
    if (MSRS / "ir").is_dir():
        stems = sorted(p.stem for p in (MSRS / "ir").glob("*.png"))[:limit]
        out = []
        for s in stems:
            ir = M.read_gray_reference(MSRS / "ir" / f"{s}.png")
            vi = M.read_gray_reference(MSRS / "vi" / f"{s}.png")
            out.append((s, np.round((ir + vi) / 2.0), ir, vi))
        return out, f"MSRS real pairs ({MSRS})"
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    out = []
    for i in range(limit or 4):
        ir = np.clip(np.round(90 + 60 * np.sin(xx / (9.0 + i)) + rng.normal(0, 5, (480, 640))), 0, 255)
        vi = np.clip(np.round(60 + yy / 4 + rng.normal(0, 12, (480, 640))), 0, 255)
        out.append((f"syn{i}", np.round((ir + vi) / 2.0), ir, vi))
    return out, "synthetic 480x640 images (../shared/data/real/msrs absent)"


def _time(fn, repeats: int) -> tuple[float, float]:
    """Median wall and thread-CPU milliseconds of ``fn()`` over ``repeats`` after one warm-up."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.thread_time()
        fn()
        cpu.append(time.thread_time() - c0)
        wall.append(time.perf_counter() - w0)
    return 1000 * statistics.median(wall), 1000 * statistics.median(cpu)


def _dataset_throughput(triplets, workers_list, repeats: int) -> dict:
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as tmp:
        tmp = Path(tmp)
        fused_dir = tmp / "mean"
        fused_dir.mkdir()
        if (MSRS / "ir").is_dir():
            ir_dir, vi_dir = MSRS / "ir", MSRS / "vi"
        else:
            ir_dir, vi_dir = tmp / "ir", tmp / "vi"
            ir_dir.mkdir()
            vi_dir.mkdir()
            for s, _, ir, vi in triplets:
                cv2.imwrite(str(ir_dir / f"{s}.png"), ir.astype(np.uint8))
                cv2.imwrite(str(vi_dir / f"{s}.png"), vi.astype(np.uint8))
        for s, f, _, _ in triplets:
            cv2.imwrite(str(fused_dir / f"{s}.png"), f.astype(np.uint8))
        # score exactly the benchmarked stems: link the sources of those stems only
        src = {"ir": tmp / "ir_sel", "vi": tmp / "vi_sel"}
        for key, d in (("ir", ir_dir), ("vi", vi_dir)):
            src[key].mkdir()
            for s, *_ in triplets:
                os.symlink(d / f"{s}.png", src[key] / f"{s}.png")
        for workers in workers_list:
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                score_folders(src["ir"], src["vi"], {"mean": fused_dir}, workers=workers)
                times.append(time.perf_counter() - t0)
            best = min(times)
            out[str(workers)] = {"triplets": len(triplets), "seconds_best": best,
                                 "seconds_all": times, "triplets_per_s": len(triplets) / best}
    return out


def run(quick: bool = False) -> dict:
    """Run the benchmark; returns the result dict (also written by :func:`main`)."""
    n_pairs = 3 if quick else 6
    repeats = 5 if quick else 11
    threads_before = cv2.getNumThreads()
    cv2.setNumThreads(1)
    try:
        triplets, source = _triplets(None if not quick else 4)
        timed = triplets[:n_pairs]
        per_metric = {}
        for name in (*M.METRICS, "all"):
            metrics = None if name == "all" else [name]
            walls, cpus = [], []
            for _, f, a, b in timed:
                w, c = _time(lambda f=f, a=a, b=b, metrics=metrics: M.compute_all(f, a, b, metrics),
                             repeats)
                walls.append(w)
                cpus.append(c)
            per_metric[name] = {"wall_ms_median": statistics.median(walls), "wall_ms_worst": max(walls),
                                "cpu_ms_median": statistics.median(cpus), "cpu_ms_worst": max(cpus)}
    finally:
        cv2.setNumThreads(threads_before)
    dataset = _dataset_throughput(triplets, [1, 2], 1 if quick else 2)
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "quick": quick,
        "source": source,
        "image_size": list(timed[0][1].shape),
        "timed_triplets": [t[0] for t in timed],
        "repeats": repeats,
        "target_all_ms": 50.0,
        "per_metric": per_metric,
        "dataset": dataset,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                    "loadavg_at_end": list(os.getloadavg()), "numpy": np.__version__,
                    "opencv": cv2.__version__},
        "convention": M.Convention().describe(),
    }


def print_report(result: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    con = console or Console()
    t = Table(title=f"Fusion metrics, ms per {result['image_size'][0]}x{result['image_size'][1]} triplet "
                    f"(float64, 1 process, 1 OpenCV thread; {len(result['timed_triplets'])} triplets x "
                    f"{result['repeats']} repeats)")
    for col in ("metric", "wall median", "wall worst", "CPU median", "CPU worst"):
        t.add_column(col, justify="left" if col == "metric" else "right")
    for name, r in result["per_metric"].items():
        style = "bold" if name == "all" else None
        t.add_row(name, f"{r['wall_ms_median']:.2f}", f"{r['wall_ms_worst']:.2f}",
                  f"{r['cpu_ms_median']:.2f}", f"{r['cpu_ms_worst']:.2f}", style=style)
    con.print(t)
    d = Table(title="Data-set scoring (score_folders, PNG reading included)")
    for col in ("workers", "triplets", "seconds", "triplets/s"):
        d.add_column(col, justify="right")
    for w, r in result["dataset"].items():
        d.add_row(w, str(r["triplets"]), f"{r['seconds_best']:.2f}", f"{r['triplets_per_s']:.1f}")
    con.print(d)
    con.print(f"source: {result['source']}; load average at end: "
              f"{', '.join(f'{x:.2f}' for x in result['machine']['loadavg_at_end'])} "
              f"on {result['machine']['cpu_count']} CPUs")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer triplets and repeats")
    ap.add_argument("--out", type=Path, help="JSON path (default results/benchmarks/metrics-<date>.json)")
    args = ap.parse_args(argv)
    result = run(quick=args.quick)
    print_report(result)
    path = args.out or REPO / "results" / "benchmarks" / f"metrics-{dt.date.today().isoformat()}.json"
    from fuseseg.data.io import atomic_write_text
    atomic_write_text(path, json.dumps(result, indent=2) + "\n")
    print(f"written: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
