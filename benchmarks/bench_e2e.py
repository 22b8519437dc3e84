"""End to end: wall time and peak memory of the default ``fuseseg run``, per stage.

Runs ``python -m pipelines.cli run configs/default.yaml name=bench-e2e results_dir=<tmp>`` in a
subprocess (``--quick``: with a tiny override set, :data:`QUICK_OVERRIDES`: 16 + 8 scenes, one
epoch per phase) three times -- the config as it is, every stage at ``amp=off`` (fp32) and at
``amp=auto`` (:data:`PRECISION_RUNS`) -- and reports, for the first:

* each stage's ``seconds`` and ``peak_rss_mib`` from the run's ``stages/*.json`` records (the
  pipeline process's own peak RSS during that stage: the peak is reset when a stage starts, see
  ``peak_rss_scope``; ``child_peak_rss_mib`` when a finished child process set a new peak); ``gpu_peak_mib``
  (``torch.cuda.max_memory_allocated`` during the stage) where CUDA is used;
* the stage seconds summed per stage kind (data, train_fusion, fuse, metrics, segment, report);
* the command's wall time (imports and start-up included), next to 2048x2048 fp32 and bf16
  matmul rates measured before and after the runs (a shared VM's speed differs from day to day,
  by a quarter on the development machine: these rates say how fast it was during the run);
* the peak RSS of the largest single process of the tree (``getrusage(RUSAGE_CHILDREN)
  .ru_maxrss`` of a small wrapper process whose only child is the pipeline, or the pipeline's
  own ``process_peak_rss_mib`` record when larger: the per-stage resets lower the kernel's
  figure), and the peak of the
  summed RSS of all processes of the tree (pipeline + DataLoader / pool workers + local jobs),
  sampled from ``/proc`` every 0.25 s (a short spike between samples can be missed), and the peak of
  their summed PSS (shared pages split between the processes that map them: with several processes
  the summed RSS counts the torch libraries once per process, the PSS once in all).

Usage: ``python -m benchmarks.bench_e2e [--quick] [--keep DIR] [--default-only | --precisions default,fp32]
[--config NAME_OR_PATH] [--run-args "--executor local --jobs 2"]``; prints the table and writes
``results/benchmarks/e2e-<date>.json`` (``e2e-<config>-<date>.json`` for another config).
``--config table4 --default-only`` times issue #23's comparison experiment (target: 40 min, 3 GiB);
``--run-args`` are passed to ``fuseseg run`` as they are (e.g. the local executor).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import REPO, figure, matmul_rates, rate_figures

QUICK_OVERRIDES = ["data.synthetic.train=16", "data.synthetic.test=8", "fusion_train.structure_epochs=1",
                   "fusion_train.epochs=1", "segmentation.epochs=1", "segmentation.frozen_epochs=0",
                   "report.bootstrap=100", "report.figure_scenes=2"]
# the wrapper: run the command given as argv[2:], then write its RUSAGE_CHILDREN to argv[1]
_WRAPPER = ("import json, resource, subprocess, sys\n"
            "rc = subprocess.call(sys.argv[2:])\n"
            "r = resource.getrusage(resource.RUSAGE_CHILDREN)\n"
            "open(sys.argv[1], 'w').write(json.dumps({'rc': rc, 'maxrss_kib': r.ru_maxrss, "
            "'user_s': r.ru_utime, 'sys_s': r.ru_stime}))\n"
            "sys.exit(rc)\n")


def _children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d.name))
    return kids


def _tree_pids(pid: int) -> list[int]:
    kids, todo, out = _children_map(), [pid], []
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(kids.get(p, []))
    return out


def tree_rss_mib(pid: int) -> float:
    """Summed resident memory (MiB) of ``pid`` and all its descendants, from ``/proc`` (0 when
    ``/proc`` is unavailable or the process is gone). Pages shared between the processes (the
    torch libraries: ~320 MiB of each process) are counted once per process."""
    if not Path("/proc/self/statm").is_file():
        return 0.0
    total, page = 0, os.sysconf("SC_PAGE_SIZE")
    for p in _tree_pids(pid):
        try:
            total += int(Path(f"/proc/{p}/statm").read_text().split()[1]) * page
        except (OSError, IndexError, ValueError):
            pass
    return total / 2**20


def tree_pss_mib(pid: int) -> float:
    """Summed proportional set size (MiB) of ``pid`` and its descendants: each page shared by n
    processes counts 1/n in each (``Pss`` of ``/proc/PID/smaps_rollup``), so the sum is the
    memory the tree takes from the machine; 0 where smaps_rollup is unavailable."""
    if not Path("/proc/self/smaps_rollup").is_file():
        return 0.0
    total = 0
    for p in _tree_pids(pid):
        try:
            for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1])
                    break
        except (OSError, IndexError, ValueError):
            pass
    return total / 1024


def stage_summary(run_dir: Path) -> tuple[list[dict], dict[str, float]]:
    """The run's stage records (key, seconds, peak_rss_mib, gpu_peak_mib), in finishing order, and
    the seconds summed per stage kind (the key's part before the first '/')."""
    recs = []
    for p in (run_dir / "stages").glob("*.json"):
        r = json.loads(p.read_text())
        recs.append({"key": r["key"], "seconds": r["seconds"], "peak_rss_mib": r.get("peak_rss_mib"),
                     "process_peak_rss_mib": r.get("process_peak_rss_mib"), "gpu_peak_mib": r.get("gpu_peak_mib"), "finished": r.get("finished", ""),
                     "_order": (r.get("finished", ""), p.stat().st_mtime_ns)})
    recs.sort(key=lambda r: r["_order"])
    for r in recs:
        del r["_order"]
    kinds: dict[str, float] = {}
    for r in recs:
        k = r["key"].split("/")[0]
        kinds[k] = kinds.get(k, 0.0) + r["seconds"]
    return recs, kinds


def config_path(config: str) -> Path:
    """``"table4"`` -> ``configs/table4.yaml`` of the repository; a path is taken as it is."""
    p = Path(config)
    named = REPO / "configs" / f"{config}.yaml"
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p.resolve()
    if named.is_file():
        return named
    raise FileNotFoundError(f"--config {config}: neither a YAML file nor one of "
                            f"{sorted(q.stem for q in (REPO / 'configs').glob('*.yaml'))}")


def run_pipeline(overrides: list[str], results_dir: Path, timeout: float | None = None,
                 poll_s: float = 0.25, config: str = "default", run_args: tuple[str, ...] = ()) -> dict:
    """Run an experiment (default: ``configs/default.yaml``) in a subprocess; returns wall time,
    rusage and the RSS peaks."""
    stats = results_dir / "rusage.json"
    cmd = [sys.executable, "-m", "pipelines.cli", "run", str(config_path(config)), *run_args,
           "name=bench-e2e", f"results_dir={results_dir}", *overrides]
    log = results_dir / "run.log"
    results_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen([sys.executable, "-c", _WRAPPER, str(stats), *cmd], cwd=REPO,
                                stdout=out, stderr=subprocess.STDOUT)
        peak_tree = peak_pss = 0.0
        while proc.poll() is None:
            peak_tree = max(peak_tree, tree_rss_mib(proc.pid))
            peak_pss = max(peak_pss, tree_pss_mib(proc.pid))
            if timeout is not None and time.perf_counter() - t0 > timeout:
                proc.kill()
                proc.wait()
                raise TimeoutError(f"fuseseg run exceeded {timeout:.0f} s; see {log}")
            time.sleep(poll_s)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}); its output ends:\n{tail}")
    r = json.loads(stats.read_text())
    return {"command": cmd, "wall_s": wall, "max_process_rss_mib": r["maxrss_kib"] / 1024,
            "peak_tree_rss_mib": peak_tree, "peak_tree_pss_mib": peak_pss, "cpu_user_s": r["user_s"], "cpu_sys_s": r["sys_s"]}


#: the precision variants of the run: the config as it is, then every stage in fp32 and in the
#: precision ``amp=auto`` picks (bf16 on a CPU with native bf16): per-stage time at both
PRECISION_RUNS = {"default": [], "fp32": ["fusion_train.amp=off", "segmentation.amp=off"],
                  "auto": ["fusion_train.amp=auto", "segmentation.amp=auto"]}


def parse_precisions(text: str) -> tuple[str, ...]:
    """``"default,fp32"`` -> ``("default", "fp32")``: names of :data:`PRECISION_RUNS`, in the given
    order, each once; ValueError naming the unknown ones."""
    names = tuple(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
    bad = [x for x in names if x not in PRECISION_RUNS]
    if bad or not names:
        raise ValueError(f"--precisions: {'unknown ' + ', '.join(bad) if bad else 'nothing given'}; "
                         f"choose from {', '.join(PRECISION_RUNS)}")
    return names


def run_one(quick: bool, extra: list[str], keep: Path | None = None, config: str = "default",
            run_args: tuple[str, ...] = ()) -> dict:
    overrides = (list(QUICK_OVERRIDES) if quick else []) + list(extra)
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        results_dir = keep or Path(tmp)
        res = run_pipeline(overrides, results_dir, timeout=None, config=config, run_args=run_args)
        stages, kinds = stage_summary(results_dir / "bench-e2e")
        env = json.loads((results_dir / "bench-e2e" / "environment.json").read_text())
    res["max_process_rss_mib"] = max([res["max_process_rss_mib"]] +
                                     [r["process_peak_rss_mib"] or 0 for r in stages])
    res.update({"config": config, "run_args": list(run_args),
                "quick": quick, "overrides": overrides, "stages": stages, "seconds_by_kind": kinds,
                "stage_seconds_total": sum(kinds.values()), "precision": env.get("precision")})
    return res


def run(quick: bool = False, keep: Path | None = None,
        precisions: tuple[str, ...] = ("default", "fp32", "auto"), config: str = "default",
        run_args: tuple[str, ...] = ()) -> dict:
    """The default run, then (unless only "default" is asked for) the same with every stage at
    ``amp=off`` and at ``amp=auto`` (separate run folders)."""
    before = matmul_rates()   # the machine's speed today (shared VMs differ from day to day)
    runs = {name: run_one(quick, PRECISION_RUNS[name], keep / name if keep else None, config, run_args)
            for name in precisions}
    res = dict(runs[precisions[0]])
    res["by_precision"] = runs
    res["matmul_2048_gflops_per_s"] = {"before": before, "after": matmul_rates()}
    return res


def _precision_figures(result: dict) -> list[dict]:
    runs = result.get("by_precision") or {}
    if len(runs) < 2:
        return []
    sec = "e2e per stage at both precisions"
    out = []
    keys = [r["key"] for r in next(iter(runs.values()))["stages"]]
    for name, r in runs.items():
        out.append(figure(sec, f"[{name}] wall time", r["wall_s"], "s", " ".join(r["overrides"]) or "config as is"))
    for key in keys:
        for name, r in runs.items():
            sec_s = next((s["seconds"] for s in r["stages"] if s["key"] == key), None)
            out.append(figure(sec, f"{key} [{name}]", sec_s, "s"))
    return out


def figures(result: dict) -> list[dict]:
    return _single_figures(result) + _precision_figures(result)


def _single_figures(result: dict) -> list[dict]:
    what = " ".join([result.get("config", "default"), *result.get("run_args", [])])
    sec = f"e2e fuseseg run {what}" + (" (quick overrides)" if result["quick"] else "")
    out = [figure(sec, "wall time (whole command)", result["wall_s"], "s", "start-up and imports included"),
           figure(sec, "CPU time (user + sys, whole tree)", result["cpu_user_s"] + result["cpu_sys_s"], "s"),
           figure(sec, "peak RSS, largest process", result["max_process_rss_mib"], "MiB",
                  "getrusage(RUSAGE_CHILDREN).ru_maxrss"),
           figure(sec, "peak RSS, process tree summed", result["peak_tree_rss_mib"], "MiB",
                  "sampled from /proc every 0.25 s; shared library pages counted once per process"),
           figure(sec, "peak PSS, process tree summed", result.get("peak_tree_pss_mib"), "MiB",
                  "sampled with the RSS; shared pages split between their processes: the tree's memory")]
    rates = result.get("matmul_2048_gflops_per_s")
    if rates:
        for when in ("before", "after"):
            out += [dict(f, figure=f"{f['figure']}, {when} the runs") for f in rate_figures(sec, rates[when])]
    for kind, s in result["seconds_by_kind"].items():
        out.append(figure(sec, f"stage {kind} (all of its runs)", s, "s"))
    for r in result["stages"]:
        out.append(figure(sec, f"  {r['key']}", r["seconds"], "s"))
        out.append(figure(sec, f"  {r['key']} peak RSS", r["peak_rss_mib"], "MiB",
                          "running max of the pipeline process and its finished children"))
        if r.get("gpu_peak_mib") is not None:
            out.append(figure(sec, f"  {r['key']} GPU peak", r["gpu_peak_mib"], "MiB",
                              "torch.cuda.max_memory_allocated during the stage"))
    gpu = [r["gpu_peak_mib"] for r in result["stages"] if r.get("gpu_peak_mib") is not None]
    if gpu:
        out.append(figure(sec, "GPU peak memory allocated (max over stages)", max(gpu), "MiB"))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny override set (16+8 scenes, 1 epoch)")
    ap.add_argument("--keep", type=Path, help="keep the run folders here instead of temporary ones")
    ap.add_argument("--default-only", action="store_true", help="only the config as it is (no fp32/auto runs)")
    ap.add_argument("--precisions", default="default,fp32,auto",
                    help="comma-separated runs, a subset of default,fp32,auto in any order (e.g. default,fp32 "
                         "when the config already runs at amp=auto)")
    ap.add_argument("--config", default="default", help="a config of configs/ by name (e.g. table4) or a YAML path")
    ap.add_argument("--run-args", default="", help='arguments for `fuseseg run`, e.g. "--executor local --jobs 2"')
    a = ap.parse_args()
    try:
        chosen = ("default",) if a.default_only else parse_precisions(a.precisions)
    except ValueError as e:
        ap.error(str(e))
    from rich.console import Console

    from benchmarks.common import figures_table, make_record, write_record

    try:
        config_path(a.config)
    except FileNotFoundError as e:
        ap.error(str(e))
    result = run(quick=a.quick, keep=a.keep, precisions=chosen, config=a.config, run_args=tuple(shlex.split(a.run_args)))
    figs = figures(result)
    Console().print(figures_table(figs, "end to end"))
    path = write_record(make_record(figs, {"e2e": result}, a.quick, command=sys.argv),
                        REPO / "results" / "benchmarks" /
                        f"e2e-{'' if a.config == 'default' else Path(a.config).stem + '-'}{time.strftime('%Y-%m-%d')}.json")
    Console().print(f"written: {path}")
