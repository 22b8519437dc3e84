"""What every stage of ``fuseseg run`` shares: the :class:`Plan` of this invocation, the
:class:`Stage` block that decides run-or-skip, times the stage and records it, the stage folder
(:func:`prepare_dir`), the data set's folders (:func:`split_paths`) and the arithmetic a stage
computes in (:func:`precision_of`).

A stage is a plain function in its own module (``pipelines/stages/<stage>.py``); it computes its
fingerprint, opens a ``with Stage(...)`` block and does its work unless the block says skip.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import threading
import time
from pathlib import Path

from fuseseg.data.io import atomic_write_text
from fuseseg.data.paths import ensure_inside
from fuseseg.errors import FusesegError
from pipelines.console import console
from pipelines.experiment import ExperimentConfig, FusionMethodConfig
from pipelines.memory import (
    children_peak_rss_mib,
    gpu_peak_mib,
    own_peak_rss_mib,
    process_peak_rss_mib,
    reset_gpu_peak,
    reset_peak_rss,
)
from pipelines.runstate import clear_stage, explain_stage, mark_stage_done


@dataclasses.dataclass
class Plan:
    """What this invocation runs: stage selection, forced stages, variant selection; and the
    machine it runs on (``environment``, set by :func:`run_experiment`), recorded in the record of
    every stage it finishes and in ``environment.json`` once it finishes one."""

    only: set[str] | None = None
    forced: set[str] = dataclasses.field(default_factory=set)
    variants: list[str] | None = None
    environment: dict | None = None
    environment_written: bool = False
    dry_run: bool = False                  # say what would run and why; write nothing
    decisions: list[dict] = dataclasses.field(default_factory=list)   # filled in: one per stage

    def runs(self, stage: str) -> bool:
        return self.only is None or stage in self.only

    def record_environment(self, run_dir: Path) -> None:
        """Write ``environment.json`` when this invocation finishes its first stage: a rerun that
        skips every stage leaves the record of the machine that produced the results."""
        if self.environment is not None and not self.environment_written:
            atomic_write_text(run_dir / "environment.json", json.dumps(self.environment, indent=2))
            self.environment_written = True


_ACTIVE_STAGES: set = set()   # the Stage blocks running in this process now (job executors: several)


_ACTIVE_LOCK = threading.Lock()


def prepare_dir(path: Path, fp: str, run_dir: Path | None = None, key: str | None = None,
                fresh: bool = False) -> bool:
    """Make ``path`` the output folder of a stage with fingerprint ``fp``.

    Returns True when the folder holds partial work of the *same* configuration (resume it);
    a folder left by another configuration, or any folder when ``fresh`` (``--from``: redo the
    stage from scratch), is cleared, and so is the record of stage ``key`` in ``run_dir``, which
    described the cleared files: a later run of the old configuration then redoes the stage
    instead of trusting files that are gone.

    Safety: ``path`` must resolve inside ``run_dir`` (no link leads out), and only a folder this
    tool made (it holds a ``.fingerprint``) is ever deleted; a non-empty folder without one is
    refused, naming it."""
    if run_dir is not None:
        ensure_inside(path, run_dir, f"stage {key or path.name}")
    marker = path / ".fingerprint"
    if path.exists() or path.is_symlink():
        if not path.is_dir() or path.is_symlink():
            raise FusesegError(f"{path} is in the way of stage {key or path.name} (it is a file or a link, "
                               "not a folder fuseseg made); move it away, or choose another run folder.")
        if marker.is_file():
            if not fresh and marker.read_text().strip() == fp:
                return True
            if run_dir is not None and key is not None:
                clear_stage(run_dir, key)
            shutil.rmtree(path)
        elif any(path.iterdir()):
            raise FusesegError(f"{path} exists but fuseseg did not make it (no .fingerprint file in it), so "
                               f"it is not deleted to make room for stage {key or path.name}. Move it away, "
                               "or choose another run folder (results_dir=... / name=...).")
    path.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, fp)
    return False


class Stage:
    """Context helper that times a stage and records it done (a plain with-block, not a framework)."""

    def __init__(self, run_dir: Path, key: str, fp: str, plan: Plan, stage: str):
        self.run_dir, self.key, self.fp, self.stage = run_dir, key, fp, stage
        self.selected = plan.runs(stage)
        self.forced = self.selected and stage in plan.forced   # --from: redo from scratch, no resume
        self.plan = plan
        current, why = explain_stage(run_dir, key, fp)
        if not self.selected:
            current, why = True, "not selected (--only/--from)"
        elif self.forced:
            current, why = False, "forced by --from"
        self.why, self.dry_run = why, plan.dry_run
        plan.decisions.append({"stage": key, "run": not current, "why": why})
        self.skip = current or plan.dry_run   # a dry run only decides
        self.info: dict = {}

    def __enter__(self):
        self.t0 = time.perf_counter()
        if self.dry_run:
            return self
        reset_gpu_peak()
        self._start_rss()
        if self.skip:
            console.print(f"[dim]- {self.key}: skipped ({self.why})[/]")
        else:
            console.print(f"[bold cyan]> {self.key}[/] [dim]({self.why})[/]")
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.dry_run:
            return False
        if exc_type is None and not self.skip:
            secs = time.perf_counter() - self.t0
            gpu = gpu_peak_mib()
            if gpu is not None:
                self.info.setdefault("gpu_peak_mib", round(gpu, 1))
            if self.plan.environment is not None:
                self.info.setdefault("environment", self.plan.environment)
            info = {**self._rss_info(), **self.info}
            if "job_seconds" in self.info:   # a job's own figures (its process's peak RSS) take precedence
                info["peak_rss_scope"] = "job"
            mark_stage_done(self.run_dir, self.key, self.fp, secs, **info)
            self.plan.record_environment(self.run_dir)
            console.print(f"[green]  done[/] {self.key} in {secs:.1f} s")
        with _ACTIVE_LOCK:
            _ACTIVE_STAGES.discard(self)
        return False

    def _start_rss(self) -> None:
        """Start measuring the stage's own peak RSS: reset the process's peak unless another stage
        runs in this process now (job executors run chains in threads), which would lose its peak."""
        with _ACTIVE_LOCK:
            self.rss_shared = bool(_ACTIVE_STAGES)
            for other in _ACTIVE_STAGES:
                other.rss_shared = True
            self.rss_reset = False if self.rss_shared else reset_peak_rss()
            _ACTIVE_STAGES.add(self)
        self.children_rss0 = children_peak_rss_mib()

    def _rss_info(self) -> dict:
        """The stage's peak RSS for its record, with what it covers (``peak_rss_scope``): ``stage``
        (this stage alone), ``concurrent stages`` (the process's peak while this stage and others
        ran in it), ``process so far`` (since the process started: the peak could not be reset)."""
        own = own_peak_rss_mib()
        scope = "concurrent stages" if self.rss_shared else "stage" if self.rss_reset else "process so far"
        info = {"peak_rss_mib": round(own, 1), "peak_rss_scope": scope,
                "process_peak_rss_mib": round(process_peak_rss_mib(own), 1)}
        kids = children_peak_rss_mib()
        if kids > self.children_rss0:  # a child process that ended in this stage set a new peak
            info["child_peak_rss_mib"] = round(kids, 1)
        return info


def split_paths(cfg: ExperimentConfig, root: Path, split: str) -> dict[str, Path]:
    lay = cfg.data.layout
    base = root / getattr(lay, split)
    return {"ir": base / lay.ir, "vi": base / lay.vi, "labels": base / lay.labels}


def fusion_amp(cfg: ExperimentConfig, m: FusionMethodConfig) -> str:
    """The ``amp`` setting of method ``m``: ``fusion_train.amp`` (or its own ``train: {amp: ...}``)
    for a learned method, ``'off'`` for a classical one or a folder (see fusion.fuse.method_amp)."""
    from fusion.registry import get_entry

    if m.type != "registered" or not (m.checkpoint or get_entry(m.method).trainable):
        return "off"
    return m.train.get("amp", cfg.fusion_train.amp)


def precision_of(device, amp: str) -> str:
    """What ``amp`` resolves to on ``device`` (``'fp32'``, ``'bf16'``, ``'fp16'``)."""
    from fuseseg.runtime import resolve_device, resolve_precision

    return resolve_precision(resolve_device(device) if isinstance(device, str) else device, amp)


def precision_summary(cfg: ExperimentConfig, device) -> dict:
    """The arithmetic of each computing stage on ``device``, for environment.json."""
    from fuseseg.runtime import cpu_bf16_supported, precision_record, resolve_device

    dev = resolve_device(device) if isinstance(device, str) else device
    out = {m.name: precision_record(dev, fusion_amp(cfg, m),
                                    bool(m.train.get("channels_last", cfg.fusion_train.channels_last)))
           for m in cfg.fusion}
    out = {"fusion": out, "segmentation": precision_record(dev, cfg.segmentation.amp)}
    if dev.type == "cpu":
        native, what = cpu_bf16_supported()
        out["cpu_bf16"] = {"native": native, "instructions": what}
    return out


def world_size(cfg: ExperimentConfig) -> int:
    """Processes per training (batch sizes are global; BatchNorm statistics are not): the GPUs of
    each job under a job executor (``executor.gpus_per_job`` > 1 runs torchrun in the job), else
    ``gpus`` under ``launcher: torchrun``, else 1."""
    if cfg.executor.kind != "inprocess":
        return max(1, cfg.executor.gpus_per_job or 1)
    return cfg.gpus if cfg.launcher == "torchrun" and cfg.gpus > 1 else 1
