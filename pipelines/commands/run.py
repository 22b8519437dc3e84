"""``fuseseg run [CONFIG] [key=value ...]`` and ``fuseseg compare RUN_DIR ...``."""
from __future__ import annotations

from pathlib import Path

from fuseseg.data.paths import check_disjoint
from fuseseg.errors import ConfigError
from pipelines.console import console
from pipelines.runstate import folder_lock


def _split_list(text: str | None) -> list[str] | None:
    return [x.strip() for x in text.split(",") if x.strip()] if text else None


def register(sub) -> None:
    p = sub.add_parser("run", help="run the whole fuse-then-segment experiment (default: configs/default.yaml)",
                       description="Run or resume the experiment: data -> train_fusion -> fuse -> metrics -> "
                       "segment -> report. Finished stages whose configuration is unchanged are skipped.")
    p.add_argument("config", nargs="?", help="experiment YAML (default: configs/default.yaml)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. segmentation.epochs=2")
    p.add_argument("--only", help="comma-separated stages to run (data,train_fusion,fuse,metrics,segment,report)")
    p.add_argument("--from", dest="from_stage", help="redo this stage and every later one, even if up to date")
    p.add_argument("--variants", help="comma-separated input variants to segment (e.g. ir,vi,sspfusion); "
                   "use it to spread segmentation runs over machines, then merge with --only report")
    p.add_argument("--launcher", choices=["none", "torchrun"], default=None,
                   help="torchrun: run every training stage under torchrun with --gpus processes (DDP); "
                   "same as the config keys launcher/gpus")
    p.add_argument("--gpus", type=int, default=None, help="processes (GPUs) per training stage with --launcher torchrun")
    p.add_argument("--executor", choices=["inprocess", "local", "slurm"], default=None,
                   help="where the trainings run: here one after the other (default), as local subprocesses "
                   "(--jobs at once), or each as its own SLURM job; same as the config key executor.kind")
    p.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                   help="executor setting (partition, gpus_per_job, cpus_per_job, mem_gb, time_min, ...); "
                   "other keys are passed to sbatch (e.g. account=lab, qos=high); repeatable")
    p.add_argument("--jobs", type=int, default=None, help="--executor local: most trainings at once")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch threads (0: choose from the usable CPUs and the load; the config's threads:)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and, per stage, whether "
                   "it would run or be skipped and why (which input changed); writes nothing")
    p.set_defaults(func=run)

    c = sub.add_parser("compare", help="merge the mIoU tables of several runs (refuses differing protocols)")
    c.add_argument("runs", nargs="+", type=Path, help="run folders (results/<name>)")
    c.add_argument("--force", action="store_true", help="merge even when the protocols differ (marked)")
    c.add_argument("--out", type=Path, help="write the merged table as Markdown/CSV/JSON into this folder")
    c.set_defaults(func=compare)


def executor_overrides(kind: str | None, settings: list[str], jobs: int | None) -> list[str]:
    """``--executor``, ``--slurm KEY=VALUE`` and ``--jobs`` as ``executor.*`` overrides; a key that
    is not an executor setting goes to ``executor.extra`` (an sbatch option)."""
    import dataclasses

    from pipelines.executor import ExecutorConfig

    fields = {f.name for f in dataclasses.fields(ExecutorConfig)}
    out = [f"executor.kind={kind}"] if kind else []
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--slurm {item!r} is not of the form KEY=VALUE (e.g. --slurm partition=gpu)")
        key = key.strip()
        out.append(f"executor.{key}={value}" if key in fields else f"executor.extra.{key}={value}")
    if jobs is not None:
        out.append(f"executor.jobs={jobs}")
    return out


def load_experiment(config: str | None, overrides: list[str]):
    from pipelines.config import load_config
    from pipelines.experiment import ExperimentConfig, resolve_config

    if config and "=" in config and not Path(config).exists():
        overrides = [config, *overrides]
        config = None
    return load_config(ExperimentConfig, resolve_config(config), overrides)


def run(args) -> int:
    from pipelines.run import check_config_is_no_output, run_experiment
    from pipelines.runstate import STAGES
    from pipelines.stages.base import Plan

    overrides = list(args.overrides)
    if args.launcher:
        overrides.append(f"launcher={args.launcher}")
    if args.gpus is not None:
        overrides.append(f"gpus={args.gpus}")
    overrides += executor_overrides(args.executor, args.slurm, args.jobs)
    if args.threads is not None:
        overrides.append(f"threads={args.threads}")
    cfg = load_experiment(args.config, overrides)
    if not args.dry_run:
        check_config_is_no_output(args.config, cfg)
    only = set(_split_list(args.only) or []) or None
    forced: set[str] = set()
    if args.from_stage:
        if args.from_stage not in STAGES:
            raise ConfigError(f"--from {args.from_stage!r}: unknown stage; stages: {', '.join(STAGES)}")
        forced = set(STAGES[STAGES.index(args.from_stage):])
        only = (only or set(STAGES)) & (forced | set(STAGES[:STAGES.index(args.from_stage)]))
    plan = Plan(only=only, forced=forced, variants=_split_list(args.variants), dry_run=args.dry_run)
    run_experiment(cfg, plan)
    if args.dry_run:
        print_dry_run(cfg, plan)
    return 0


def print_dry_run(cfg, plan) -> None:
    """The resolved config, then one line per stage: would run / skip, and why."""
    import yaml
    from rich.markup import escape

    from pipelines.config import to_dict

    console.print(f"[bold]fuseseg run --dry-run[/] {cfg.name}: run folder {cfg.run_dir} (nothing is written)",
                  highlight=False)
    console.print("resolved config:", style="bold")
    print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="", flush=True)  # byte for byte: no wrapping
    console.print("stages:", style="bold")
    width = max(len(d["stage"]) for d in plan.decisions)
    for d in plan.decisions:
        verb = "[bold cyan]run [/]" if d["run"] else "[dim]skip[/]"
        console.print(f"  {verb} {d['stage']:<{width}}  {escape(d['why'])}", highlight=False, soft_wrap=True)
    n = sum(d["run"] for d in plan.decisions)
    console.print(f"{n} of {len(plan.decisions)} stages would run.")


def compare(args) -> int:
    from pipelines import report as rep
    from pipelines.commands.common import out_folder

    out_folder(args.out)
    check_disjoint(args.out, {f"run folder {i + 1}": r for i, r in enumerate(args.runs)}, "--out")
    rows, proto, warnings = rep.compare_runs(args.runs, force=args.force)
    for w in warnings:
        console.print(f"[yellow]warning:[/] {w}")
    classes = list(next(iter(rows))["per_class"]) if rows else []
    for r in rows:  # json round trip turned tuples into lists
        r["miou"] = tuple(r["miou"])
        r["pixel_accuracy"] = tuple(r["pixel_accuracy"])
        r["per_class"] = {k: tuple(v) for k, v in r["per_class"].items()}
    text = "merged runs: " + ", ".join(str(r) for r in args.runs)
    if warnings:
        text += " (PROTOCOLS DIFFER: not comparable)"
    console.print(rep.rich_miou_table(rows, classes, text, width=console.width))
    if args.out:
        with folder_lock(args.out, "fuseseg compare --out"):
            rep.write_miou_tables(args.out, rows, classes, text, proto, [])
        console.print(f"written: {args.out}/miou.md, miou.csv, miou.json")
    return 0
