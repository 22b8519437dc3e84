"""``fuseseg run``: the experiment, its stages in order.

    data -> train_fusion[m] -> fuse[m] -> metrics -> segment[variant, seed] -> report

Each stage is a plain function in its own module (``pipelines/stages/``). This module checks the
inputs before anything in the run folder is rewritten, wires the stages to the executor (the
training stages hand their bodies to it: in process by default, or each as its own local or
SLURM job, submitted as soon as what it needs is done) and implements ``--dry-run`` (every stage
decides, nothing is written).

Each stage records a fingerprint of its configuration and of the stages it reads
(``pipelines.runstate``); a rerun skips a stage whose fingerprint is unchanged and redoes the
ones that changed and everything downstream of them. Everything is written inside the run
folder ``<results_dir>/<name>/``; every file appears under its final name only when complete.
"""
from __future__ import annotations

from pathlib import Path

from fuseseg.data.paths import confine_writes, ensure_inside
from fuseseg.errors import ConfigError, FusesegError
from pipelines.config import dump_config, to_dict
from pipelines.console import console
from pipelines.executor import Executor, make_executor
from pipelines.experiment import ExperimentConfig, FusionMethodConfig
from pipelines.jobs import ref_of_record
from pipelines.runstate import (
    STAGES,
    RunLock,
    claim_run_folder,
    environment_record,
    fingerprint,
    stage_record,
)
from pipelines.stages.base import Plan, precision_summary
from pipelines.stages.data import stage_data
from pipelines.stages.fuse import stage_fuse
from pipelines.stages.metrics import check_metric_sizes, stage_metrics
from pipelines.stages.report import stage_report
from pipelines.stages.segment import stage_segment, variant_images
from pipelines.stages.train_fusion import check_fusion_methods, stage_train_fusion


def run_experiment(cfg: ExperimentConfig, plan: Plan | None = None) -> Path:
    """Run (or resume) the experiment of ``cfg``; returns the run folder. With ``plan.dry_run``
    nothing is written (no run folder, lock, record or job) and ``plan.decisions`` says, per
    stage, whether it would run and why."""
    plan = plan or Plan()
    for s in (plan.only or set()) | plan.forced:
        if s not in STAGES:
            raise ConfigError(f"unknown stage {s!r}; stages: {', '.join(STAGES)}")
    run_dir = cfg.run_dir
    if plan.dry_run:
        _run_stages(cfg, plan, run_dir)
        return run_dir
    claim_run_folder(run_dir)   # a folder fuseseg did not make is refused, untouched
    _check_run_folder(run_dir)
    from fuseseg.threads import scoped

    with RunLock(run_dir / ".lock"), confine_writes(run_dir), scoped(cfg.threads):   # writes: inside, no link out
        _run_stages(cfg, plan, run_dir)
    return run_dir


def check_config_is_no_output(config: str | Path | None, cfg: ExperimentConfig) -> None:
    """The experiment file read must not be a file the run writes: its ``config.yaml`` (unless
    unchanged: rerunning a run's own config.yaml rewrites it as it is), ``environment.json``, the
    reports, or a file in a folder a stage clears or fills."""
    import yaml

    from fuseseg.data.paths import check_not_an_input, is_within
    from pipelines.config import check_config_kept, to_dict
    from pipelines.experiment import resolve_config

    if config and "=" in str(config) and not Path(config).exists():
        return   # only overrides: the shipped default is read
    path, run_dir = resolve_config(config), cfg.run_dir
    how = (f"Copy it (cp {path} my.yaml) and run the copy, or choose another run folder "
           "(results_dir=... / name=...).")
    check_config_kept(path, run_dir / "config.yaml", yaml.safe_dump(to_dict(cfg), sort_keys=False), how)
    for name in ("environment.json", "report.md", "report.html"):
        check_not_an_input(run_dir / name, {"CONFIG": path}, f"the run's {name}")
    for sub in ("data", "train_fusion", "fused", "metrics", "segment", "tables", "figures", "stages"):
        if is_within(path, run_dir / sub):
            raise ConfigError(f"the config file {path} lies in {run_dir / sub}, a folder the run writes (and "
                              f"may clear); it could be overwritten or deleted. {how}")


def _run_stages(cfg: ExperimentConfig, plan: Plan, run_dir: Path) -> None:
    """Every stage in order: under the run lock, or, in a dry run, only deciding."""
    from fuseseg.limits import configure
    from fuseseg.runtime import resolve_device, seed_everything
    from fusion.registry import get_entry, load_plugins

    configure(**to_dict(cfg.limits))   # exported to the environment: job processes inherit them
    load_plugins(cfg.plugins)
    for m in cfg.fusion:
        if m.type == "registered":
            get_entry(m.method)  # unknown names fail now, listing the valid ones
    device = resolve_device(cfg.device)
    seed_everything(cfg.seed)
    variants = plan.variants or cfg.variants or cfg.all_variants()
    unknown = [v for v in variants if v not in cfg.all_variants()]
    if unknown:
        raise ConfigError(f"--variants: unknown variant(s) {unknown}; valid: {', '.join(cfg.all_variants())}")
    if not plan.dry_run:
        from fuseseg.threads import active

        console.print(f"[bold]fuseseg run[/] {cfg.name}: run folder {run_dir}, device {device}, "
                      f"variants {', '.join(variants)}, {active().threads} torch thread(s): {active().why}")
        if plan.runs("segment") and cfg.segmentation.random_frozen_encoder_warning():
            from pipelines.console import err_console

            err_console.print(f"[yellow]warning:[/] {cfg.segmentation.random_frozen_encoder_warning()}",
                              highlight=False, soft_wrap=True)
        _remove_stray_temporaries(run_dir)
        plan.environment = environment_record(str(device), cfg.seed)
        plan.environment["precision"] = precision_summary(cfg, device)
        plan.environment["threads"] = active().record()
    if cfg.tensorboard:   # a missing package fails now, not in the first training
        from fuseseg.tblog import require_tensorboard

        require_tensorboard()

    # bad inputs fail here, before anything in the run folder is rewritten
    data_root, data_fp = stage_data(cfg, run_dir, plan)
    check_metric_sizes(cfg, run_dir)
    needed = [m for m in cfg.fusion if m.name in variants or plan.variants is None]
    check_fusion_methods(needed, cfg.fusion_train)
    if not plan.dry_run:
        dump_config(cfg, run_dir / "config.yaml")
    real = make_executor(cfg.executor)
    with (_DecideOnly(real) if plan.dry_run else real) as ex:
        seg_fps, metrics_fp, fused = _train_fuse_segment(cfg, run_dir, plan, ex, needed, variants,
                                                         data_root, data_fp, device)
    stage_report(cfg, run_dir, plan, data_root, cfg.variants or cfg.all_variants(), seg_fps,
                 metrics_fp, fused)


def _train_fuse_segment(cfg: ExperimentConfig, run_dir: Path, plan: Plan, ex: Executor,
                        needed: list[FusionMethodConfig], variants: list[str], data_root: Path, data_fp: str,
                        device) -> tuple[dict[str, str], str | None, dict]:
    """train_fusion -> fuse per method, metrics, segment per variant and seed, as chains on the
    executor: in process they run in this order one after the other; with a job executor every
    chain runs at once and each training is submitted as soon as what it reads exists."""

    def train_and_fuse(m: FusionMethodConfig):
        ckpt, tfp = stage_train_fusion(cfg, run_dir, plan, m, data_root, data_fp, ex)
        with ex.local_work():   # the local executor: fusing holds a job slot
            return stage_fuse(cfg, run_dir, plan, m, data_root, ckpt, tfp, device)

    def segment(v: str, seed: int) -> str:
        fused_v = {} if v in ("ir", "vi") else {v: fusing[v].result()}
        images = variant_images(cfg, data_root, v, fused_v)
        upstream = data_fp if v in ("ir", "vi") else fused_v[v][1]
        return stage_segment(cfg, run_dir, plan, data_root, v, seed, images,
                             fingerprint(upstream, data_fp, v), str(device), ex)[1]

    fusing = {m.name: ex.spawn(train_and_fuse, m) for m in needed}
    segs = {f"{v}/{seed}": ex.spawn(segment, v, seed) for v in variants for seed in cfg.seg_seeds}
    fused, errors = ex.gather(fusing)
    metrics_fp = None
    if not errors:
        metrics_fp = stage_metrics(cfg, run_dir, plan, data_root,
                                   {k: (v[0]["test"], v[1]) for k, v in fused.items()})
    seg_fps, seg_errors = ex.gather(segs)
    errors += [e for e in seg_errors if e not in errors]
    if errors:
        raise FusesegError(f"{len(errors)} stage(s) failed:\n  " + "\n  ".join(errors))
    return seg_fps, metrics_fp, fused


class _DecideOnly(Executor):
    """The executor of a dry run: the stage chains one after the other (the decisions in a stable
    order), nothing submitted; devices and process counts as the configured executor gives them
    (they are part of the fingerprints)."""

    def __init__(self, real: Executor):
        super().__init__(real.cfg)
        self.real = real

    def job_device(self, configured: str, resolved: str) -> str:
        return self.real.job_device(configured, resolved)

    def nproc(self, launcher: str, gpus: int) -> int:
        return self.real.nproc(launcher, gpus)


def _check_run_folder(run_dir: Path) -> None:
    """The fixed folders and files of a run folder must not lead out of it (a symbolic link to
    elsewhere would make a stage write, or clear, someone else's files): checked once per run."""
    for sub in ("data", "train_fusion", "fused", "metrics", "segment", "tables", "figures", "stages",
                "config.yaml", "environment.json", "report.md", "report.html"):
        p = run_dir / sub
        if p.exists() or p.is_symlink():
            ensure_inside(p, run_dir, f"the run's {sub}")


def _remove_stray_temporaries(run_dir: Path) -> None:
    """Delete the temporary files (``.NAME.*.tmp``) that a killed run left behind: every file is
    written to one and renamed, so under the run lock any such file is an unfinished write --
    except in the folders of submitted jobs, which may still be running (a job cleans its own)."""
    jobs = []
    for rec_path in (run_dir / "stages").glob("*.json"):
        rec = stage_record(run_dir, rec_path.stem.replace("__", "/")) or {}
        ref = ref_of_record(rec) if rec.get("status") == "submitted" else None
        if ref is not None:
            jobs.append(ref.folder.parent)
    for tmp in run_dir.rglob(".*.tmp"):
        if tmp.is_file() and not any(tmp.is_relative_to(j) for j in jobs):
            tmp.unlink(missing_ok=True)
