"""``python -m benchmarks [--quick] [--only NAME,...] [--out FILE]`` (also ``fuseseg bench``).

Runs every benchmark module (``run(quick) -> dict``), turns each result into figures (section,
figure, value, unit, note), prints ONE table and writes ``results/benchmarks/<date>.json``: the
machine (CPU model, cores, memory, load average before and after), the device, library
versions, every figure and every module's raw result. A benchmark that fails is reported (its
error in the JSON and the table) and the others still run; the exit code is then 1.

Benchmarks (in this order): metrics, synthetic, sspfusion, segmentation, dataloading, memory
(the msrs.yaml GPU-memory estimate), e2e (the default ``fuseseg run``, the longest: run it alone
with ``--only e2e``). Develop with ``--quick``; the machine is shared, so read the load average
recorded next to the numbers.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable

from benchmarks.common import figure, figures_table, make_record, write_record

NAMES = ("metrics", "synthetic", "sspfusion", "segmentation", "dataloading", "memory", "e2e")


# ---------------------------------------------------------------- figures of the older modules
def _metrics_figures(r: dict) -> list[dict]:
    h, w = r["image_size"]
    note = f"median over {len(r['timed_triplets'])} triplets x {r['repeats']} repeats after 1 warm-up"
    out = [figure("fusion metrics", f"all 13 metrics, {h}x{w} triplet", r["per_metric"]["all"]["wall_ms_median"],
                  "ms", note + f"; target < {r['target_all_ms']:g} ms"),
           figure("fusion metrics", "all 13 metrics, CPU time", r["per_metric"]["all"]["cpu_ms_median"], "ms",
                  "thread CPU time, less disturbed by other processes")]
    slow = max((k for k in r["per_metric"] if k != "all"), key=lambda k: r["per_metric"][k]["wall_ms_median"])
    out.append(figure("fusion metrics", f"slowest metric ({slow})", r["per_metric"][slow]["wall_ms_median"], "ms"))
    for wk, d in r["dataset"].items():
        out.append(figure("fusion metrics", f"score_folders, {wk} worker(s)", d["triplets_per_s"], "triplets/s",
                          "PNG reading and pool start-up included; best of the repeats"))
    return out


def _synthetic_figures(r: dict) -> list[dict]:
    sec = "synthetic data"
    out = [figure(sec, "1000 pairs with all cores", r["seconds_for_1000"], "s",
                  f"{r['size'][0]}x{r['size'][1]}; target < 60 s"),
           figure(sec, "render_scene alone", r["render_ms_median"], "ms/scene", "median")]
    for wk, d in r["make_synthetic"].items():
        out.append(figure(sec, f"make_synthetic, {wk} worker(s)", d["pairs_per_s"], "pairs/s",
                          f"{d['pairs']} pairs"))
    return out


ADAPTERS: dict[str, Callable[[dict], list[dict]]] = {
    "metrics": _metrics_figures, "synthetic": _synthetic_figures,
}


def figures_of(name: str, module, result: dict) -> list[dict]:
    """A module's figures: its own ``figures(result)`` when it has one, else the adapter here."""
    fn = getattr(module, "figures", None) or ADAPTERS[name]
    return fn(result)


def run_all(names: list[str], quick: bool, console=None,
            quick_names: list[str] | None = None) -> tuple[list[dict], dict]:
    """Run the named benchmarks (quick mode for all with ``quick``, else for ``quick_names``)."""
    figures, raw = [], {}
    for name in names:
        if console is not None:
            console.print(f"[bold cyan]> {name}[/] (load average {os.getloadavg()[0]:.1f})")
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"benchmarks.bench_{name}")
            q = quick or name in (quick_names or [])
            result = module.run(quick=q)
            figs = figures_of(name, module, result)
            raw[name] = {"seconds": time.perf_counter() - t0, "quick": q, "result": result}
        except Exception as exc:  # noqa: BLE001 - report and go on with the other benchmarks
            figs = [figure(name, "FAILED", f"{type(exc).__name__}: {exc}"[:200])]
            raw[name] = {"seconds": time.perf_counter() - t0, "error": f"{type(exc).__name__}: {exc}"}
        figures.extend(figs)
        if console is not None:
            console.print(f"  done in {raw[name]['seconds']:.0f} s")
    return figures, raw


def parse_only(text: str | None) -> list[str]:
    if not text:
        return list(NAMES)
    names = [x.strip() for x in text.split(",") if x.strip()]
    bad = [n for n in names if n not in NAMES]
    if bad:
        raise SystemExit(f"--only: unknown benchmark(s) {', '.join(bad)}; valid: {', '.join(NAMES)}")
    return names


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller inputs (for development)")
    p.add_argument("--only", metavar="NAMES", help=f"comma-separated subset of: {', '.join(NAMES)}")
    p.add_argument("--quick-only", metavar="NAMES",
                   help="benchmarks to run in quick mode in a full run (e.g. e2e: the default run takes long)")
    p.add_argument("--out", metavar="FILE", help="JSON path (default results/benchmarks/<date>.json)")


def main_args(args: argparse.Namespace, argv: list[str] | None = None) -> int:
    from rich.console import Console

    from benchmarks.common import machine_info

    names = parse_only(args.only)
    console = Console(width=max(Console().width, 118))
    machine = machine_info()
    quick_names = parse_only(args.quick_only) if getattr(args, "quick_only", None) else []
    figures, raw = run_all(names, args.quick, console, quick_names)
    machine["load_average_end"] = list(os.getloadavg())
    record = make_record(figures, raw, args.quick, argv if argv is not None else sys.argv, machine=machine)
    console.print(figures_table(figures, f"fuseseg benchmarks{' (quick)' if args.quick else ''} on "
                                         f"{record['device']['name']} ({machine['usable_cores']} cores)"))
    console.print(f"load average before {machine['load_average'][0]:.1f}, after "
                  f"{machine['load_average_end'][0]:.1f} on {machine['cores']} cores "
                  "(> cores: other processes share the CPU, timings are pessimistic)")
    path = write_record(record, args.out)
    console.print(f"written: {path}")
    return 1 if any("error" in v for v in raw.values()) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    add_arguments(p)
    return main_args(p.parse_args(argv), argv)


if __name__ == "__main__":
    raise SystemExit(main())
