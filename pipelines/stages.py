"""The experiment's stages, as plain functions, and ``run_experiment`` which chains them.

    data -> train_fusion[m] -> fuse[m] -> metrics -> segment[variant, seed] -> report

The training stages (train_fusion, segment) hand their body (a picklable ``StageJob``) to the
run's executor (``pipelines.executor``): in process by default, or each as its own local or
SLURM job, submitted as soon as what it needs is done.

Each stage records a fingerprint of its configuration and of the stages it reads
(``pipelines.runstate``); a rerun skips a stage whose fingerprint is unchanged and redoes the
ones that changed and everything downstream of them. Everything is written inside the run
folder ``<results_dir>/<name>/``; every file appears under its final name only when complete.
"""
from __future__ import annotations

import dataclasses
import io
import json
import resource
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from fuseseg.data.io import atomic_write_bytes, atomic_write_text
from fuseseg.data.pairs import MSRS_CLASSES, list_images, load_split, match_stems
from fuseseg.data.paths import ensure_inside
from fuseseg.errors import CheckpointError, ConfigError, DataError, FusesegError
from fusion.pretrained import resolve_checkpoint
from pipelines.config import dump_config, to_dict
from pipelines.console import console
from pipelines.executor import Executor, StageJob, make_executor, ref_of_record
from pipelines.experiment import ExperimentConfig, FusionMethodConfig
from pipelines.runstate import (
    RunLock,
    clear_stage,
    environment_record,
    explain_stage,
    fingerprint,
    folder_manifest,
    fuseseg_version,
    mark_stage_done,
    named_fingerprint,
    source_digest,
    stage_record,
)

STAGES = ("data", "train_fusion", "fuse", "metrics", "segment", "report")


def _fusion_amp(cfg: ExperimentConfig, m: FusionMethodConfig) -> str:
    """The ``amp`` setting of method ``m``: ``fusion_train.amp`` (or its own ``train: {amp: ...}``)
    for a learned method, ``'off'`` for a classical one or a folder (see fusion.fuse.method_amp)."""
    from fusion.registry import get_entry

    if m.type != "registered" or not (m.checkpoint or get_entry(m.method).trainable):
        return "off"
    return {**to_dict(cfg.fusion_train), **m.train}.get("amp", "auto")


def _precision(device, amp: str) -> str:
    """What ``amp`` resolves to on ``device`` (``'fp32'``, ``'bf16'``, ``'fp16'``)."""
    from fuseseg.runtime import resolve_device, resolve_precision

    return resolve_precision(resolve_device(device) if isinstance(device, str) else device, amp)


def precision_summary(cfg: ExperimentConfig, device) -> dict:
    """The arithmetic of each computing stage on ``device``, for environment.json."""
    from fuseseg.runtime import cpu_bf16_supported, precision_record, resolve_device

    dev = resolve_device(device) if isinstance(device, str) else device
    out = {m.name: precision_record(dev, _fusion_amp(cfg, m), bool({**to_dict(cfg.fusion_train),
                                                                     **m.train}.get("channels_last")))
           for m in cfg.fusion}
    out = {"fusion": out, "segmentation": precision_record(dev, cfg.segmentation.amp)}
    if dev.type == "cpu":
        native, what = cpu_bf16_supported()
        out["cpu_bf16"] = {"native": native, "instructions": what}
    return out


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


def _gpu_peak_mib() -> float | None:
    """``torch.cuda.max_memory_allocated`` (MiB) since the last reset, or None when this process
    has not used CUDA (torch is not imported here just to ask)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def _reset_gpu_peak() -> None:
    if _gpu_peak_mib() is not None:
        import torch

        torch.cuda.reset_peak_memory_stats()


_PROCESS_PEAK_MIB = 0.0   # this process's peak RSS over every stage so far (resets lower the kernel's)
_ACTIVE_STAGES: set = set()   # the _Stage blocks running in this process now (job executors: several)
_ACTIVE_LOCK = threading.Lock()


def _reset_peak_rss() -> bool:
    """Reset this process's peak resident set size so that the next reading is the peak of what
    follows (Linux >= 4.0: write 5 to /proc/self/clear_refs). False where that is not possible.
    The peak before the reset is kept in :data:`_PROCESS_PEAK_MIB`."""
    global _PROCESS_PEAK_MIB
    _PROCESS_PEAK_MIB = max(_PROCESS_PEAK_MIB, _own_peak_rss_mib())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _own_peak_rss_mib() -> float:
    """Peak RSS of this process since the last :func:`_reset_peak_rss` (VmHWM), else since start."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _children_peak_rss_mib() -> float:
    """Largest peak RSS of any finished child process (torchrun workers, DataLoader workers)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def _prepare_dir(path: Path, fp: str, run_dir: Path | None = None, key: str | None = None,
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


def _check_run_folder(run_dir: Path) -> None:
    """The fixed folders and files of a run folder must not lead out of it (a symbolic link to
    elsewhere would make a stage write, or clear, someone else's files): checked once per run."""
    for sub in ("data", "train_fusion", "fused", "metrics", "segment", "tables", "figures", "stages",
                "config.yaml", "environment.json", "report.md", "report.html"):
        p = run_dir / sub
        if p.exists() or p.is_symlink():
            ensure_inside(p, run_dir, f"the run's {sub}")


class _Stage:
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
        _reset_gpu_peak()
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
            gpu = _gpu_peak_mib()
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
            self.rss_reset = False if self.rss_shared else _reset_peak_rss()
            _ACTIVE_STAGES.add(self)
        self.children_rss0 = _children_peak_rss_mib()

    def _rss_info(self) -> dict:
        """The stage's peak RSS for its record, with what it covers (``peak_rss_scope``): ``stage``
        (this stage alone), ``concurrent stages`` (the process's peak while this stage and others
        ran in it), ``process so far`` (since the process started: the peak could not be reset)."""
        own = _own_peak_rss_mib()
        scope = "concurrent stages" if self.rss_shared else "stage" if self.rss_reset else "process so far"
        info = {"peak_rss_mib": round(own, 1), "peak_rss_scope": scope,
                "process_peak_rss_mib": round(max(_PROCESS_PEAK_MIB, own), 1)}
        kids = _children_peak_rss_mib()
        if kids > self.children_rss0:  # a child process that ended in this stage set a new peak
            info["child_peak_rss_mib"] = round(kids, 1)
        return info


def _world_size(cfg: ExperimentConfig) -> int:
    """Processes per training (batch sizes are global; BatchNorm statistics are not): the GPUs of
    each job under a job executor (``executor.gpus_per_job`` > 1 runs torchrun in the job), else
    ``gpus`` under ``launcher: torchrun``, else 1."""
    if cfg.executor.kind != "inprocess":
        return max(1, cfg.executor.gpus_per_job or 1)
    return cfg.gpus if cfg.launcher == "torchrun" and cfg.gpus > 1 else 1


def _torchrun(nproc: int, args: list[str]) -> None:
    """Run one training command under ``torchrun --nproc_per_node=nproc`` (DDP; rank 0 writes)."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "pipelines.cli", *args]
    console.print(f"[dim]  $ {' '.join(cmd)}[/]")
    rc = subprocess.call(cmd)
    if rc != 0:
        raise FusesegError(f"the distributed training command failed (exit code {rc}): {' '.join(cmd)}. "
                           "Its output is above; rerun `fuseseg run` with the same config to resume.")


# ---------------------------------------------------------------- stage 1: data
def stage_data(cfg: ExperimentConfig, run_dir: Path, plan: Plan) -> tuple[Path, str]:
    """Locate (or generate) the data set; validate it once. Returns (root, fingerprint)."""
    d = cfg.data
    if d.root is None:
        root = run_dir / "data"
        fp = named_fingerprint("synthetic", **{"data.synthetic": to_dict(d.synthetic), "data.num_classes": d.num_classes,
                                               "fuseseg_version": fuseseg_version()})
    else:
        root = Path(d.root)
        # the manifest (names, sizes, mtimes): an edited, added or removed file redoes every stage
        fp = named_fingerprint("folder", **{"data.root": str(root.resolve()), "data files": folder_manifest(root),
                                            "data.layout": to_dict(d.layout), "data.ir16": d.ir16,
                                            "data.num_classes": d.num_classes, "fuseseg_version": fuseseg_version()})
    with _Stage(run_dir, "data", fp, plan, "data") as st:
        if not st.skip:
            if d.root is None:
                from fuseseg.data.synthetic import make_synthetic

                _prepare_dir(root, fp, run_dir, "data", fresh=st.forced)
                s = d.synthetic
                make_synthetic(root, s.train, s.test, size=tuple(s.size), seed=s.seed, zoom=s.zoom)
            if d.validate:
                from fuseseg.data.validate import validate_pairset

                for split in ("train", "test"):
                    pairs = load_split(root, split, d.layout, require_labels=True)
                    summ = validate_pairset(pairs, d.num_classes, d.ir16)
                    st.info[split] = {"pairs": summ.pairs, "day": summ.day, "night": summ.night,
                                      "min_side": min((min(hw) for hw in summ.sizes), default=None)}
    return root, fp


def split_paths(cfg: ExperimentConfig, root: Path, split: str) -> dict[str, Path]:
    lay = cfg.data.layout
    base = root / getattr(lay, split)
    return {"ir": base / lay.ir, "vi": base / lay.vi, "labels": base / lay.labels}


# ---------------------------------------------------------------- stage 2: train fusion
def _method_train_cfg(cfg: ExperimentConfig, m: FusionMethodConfig, data_root: Path, device: str):
    from pipelines.config import from_dict

    base = to_dict(cfg.fusion_train)
    base.update(m.train)
    base.update({"method": m.method, "method_kwargs": dict(m.kwargs), "device": device,
                 "plugins": list(cfg.plugins)})
    base["data_root"] = str(data_root)
    from fusion.train import FusionTrainConfig

    return from_dict(FusionTrainConfig, base, f"fusion[{m.name}].train")


@dataclasses.dataclass
class TrainFusionJob(StageJob):
    """The body of stage train_fusion/<method>: train into ``out`` (resuming from its last.pt)."""

    tcfg: object            # fusion.train.FusionTrainConfig
    out: Path
    nproc: int = 1          # >1: under torchrun (DDP)
    tensorboard: bool = False   # also log to out/tensorboard/

    def run(self) -> dict:
        from fusion.train import train_fusion

        out = Path(self.out)
        resume = (out / "last.pt").is_file()
        if self.nproc > 1:
            dump_config(self.tcfg, out / "requested.yaml")
            _torchrun(self.nproc, ["train-fusion", str(out / "requested.yaml"), "--out", str(out)]
                      + (["--resume"] if resume else []) + (["--tensorboard"] if self.tensorboard else []))
            final = out / "final.pt"
        else:
            final = train_fusion(self.tcfg, out, resume=resume, tensorboard=self.tensorboard)
        return {"checkpoint": str(final)}


def stage_train_fusion(cfg: ExperimentConfig, run_dir: Path, plan: Plan, m: FusionMethodConfig,
                       data_root: Path, data_fp: str, ex: Executor | None = None) -> tuple[Path | None, str]:
    """Train a trainable registered method (or take its given checkpoint). Returns (checkpoint, fp)."""
    from fusion.registry import get_entry

    if m.type == "folder":
        return None, fingerprint("folder", data_fp, m.name, str(m.folder), folder_manifest(Path(m.folder)))
    entry = get_entry(m.method)
    # a plug-in's own source is part of what it computes (built-ins: the fuseseg version, in data_fp)
    source = None if entry.module.startswith("fusion.") else source_digest(entry.module)
    if m.checkpoint is not None:
        ck = resolve_checkpoint(m.checkpoint, m.method)
        if not ck.is_file():
            raise ConfigError(f"fusion[{m.name}].checkpoint: {ck} does not exist; give an existing "
                              "checkpoint, or remove the key to train the method here.")
        return ck, fingerprint("checkpoint", data_fp, source, str(ck.resolve()), ck.stat().st_mtime_ns)
    if not entry.trainable:
        return None, fingerprint("static", data_fp, source, m.method, m.kwargs)
    tcfg = _method_train_cfg(cfg, m, data_root, cfg.device)
    fp = named_fingerprint("train", **{"data": data_fp, "plugin source": source, "fusion_train": to_dict(tcfg),
                                       "precision": _precision(cfg.device, tcfg.amp)})
    out = run_dir / "train_fusion" / m.name
    ex = ex or Executor()
    with _Stage(run_dir, f"train_fusion/{m.name}", fp, plan, "train_fusion") as st:
        if not st.skip:
            job = TrainFusionJob(tcfg, out, ex.nproc(cfg.launcher, cfg.gpus), cfg.tensorboard)
            prepare = lambda: _prepare_dir(out, fp, run_dir, st.key, fresh=st.forced)  # noqa: E731
            st.info.update(ex.run(run_dir, st.key, fp, out, job, prepare))
    ck = out / "final.pt"
    if not ck.is_file() and plan.runs("fuse") and not plan.dry_run:
        raise FusesegError(f"fusion method {m.name!r} has no trained checkpoint ({ck}); run the "
                           "train_fusion stage (drop --only/--from) first.")
    return ck, fp


# ---------------------------------------------------------------- stage 3: fuse
def _check_folder_method(cfg: ExperimentConfig, m: FusionMethodConfig, data_root: Path, split: str) -> Path:
    """Validate a folder of already fused images against the data set's names and sizes."""
    from fuseseg.data.io import read_visible

    folder = Path(m.folder) / split
    paths = split_paths(cfg, data_root, split)
    ref = list_images(paths["ir"], "infrared")
    fused = list_images(folder, f"fused images of {m.name!r}")
    match_stems({"data set": ref, m.name: fused}, {"data set": paths["ir"], m.name: folder})
    import cv2

    for stem, p in fused.items():
        hdr = cv2.imread(str(ref[stem]), cv2.IMREAD_UNCHANGED)
        img = read_visible(p)
        if img.shape[:2] != hdr.shape[:2]:
            raise DataError(f"fused image {p} is {img.shape[1]}x{img.shape[0]} but the data set's image "
                            f"{ref[stem]} is {hdr.shape[1]}x{hdr.shape[0]} (WxH). Fused images must keep "
                            f"the source size; re-export method {m.name!r} at full size.")
    return folder


def stage_fuse(cfg: ExperimentConfig, run_dir: Path, plan: Plan, m: FusionMethodConfig, data_root: Path,
               ckpt: Path | None, train_fp: str, device) -> tuple[dict[str, Path], str]:
    """Fuse the train and test splits with method ``m``. Returns ({split: folder}, fp)."""
    # what the method's images come from: its training, its given checkpoint, the data (classical)
    upstream = ("folder files" if m.type == "folder" else f"fusion[{m.name}].checkpoint" if m.checkpoint
                else f"train_fusion/{m.name}" if ckpt is not None else "data")
    fp = named_fingerprint("fuse", **{upstream: train_fp, f"fusion[{m.name}].type": m.type,
                                      f"fusion[{m.name}].method": m.method, f"fusion[{m.name}].kwargs": m.kwargs,
                                      f"fusion[{m.name}].folder": str(m.folder), "data.ir16": cfg.data.ir16,
                                      "precision": _precision(device, _fusion_amp(cfg, m)),
                                      # compiled graphs round a little differently (an input only when on,
                                      # so earlier run folders stay current)
                                      **({"fuse_compile": True} if cfg.fuse_compile and ckpt is not None
                                         else {})})
    if m.type == "folder":
        out = {}
        with _Stage(run_dir, f"fuse/{m.name}", fp, plan, "fuse") as st:
            for split in ("train", "test"):
                if (Path(m.folder) / split).is_dir() or split == "test":
                    out[split] = Path(m.folder) / split
                    if not st.skip:
                        _check_folder_method(cfg, m, data_root, split)
        return out, fp
    out_root = run_dir / "fused" / m.name
    dirs = {s: out_root / s for s in ("train", "test")}
    with _Stage(run_dir, f"fuse/{m.name}", fp, plan, "fuse") as st:
        if not st.skip:
            from fusion.fuse import fuse_folder, load_fusion_method

            # build the method first: a bad checkpoint must not clear the earlier fused images;
            # the method name is checked against the checkpoint's (another method's file is an error)
            method = load_fusion_method(m.method, checkpoint=ckpt, kwargs=m.kwargs, device=device)
            _prepare_dir(out_root, fp, run_dir, st.key, fresh=st.forced)
            for split, out in dirs.items():
                p = split_paths(cfg, data_root, split)
                fuse_folder(method, p["ir"], p["vi"], out, device, batch_size=cfg.fuse_batch_size,
                            skip_existing=True, ir16=cfg.data.ir16, amp=_fusion_amp(cfg, m),
                            name=f"{m.name}, {split}", compile=cfg.fuse_compile)
    return dirs, fp


# ---------------------------------------------------------------- stage 4: metrics
def stage_metrics(cfg: ExperimentConfig, run_dir: Path, plan: Plan, data_root: Path,
                  fused: dict[str, tuple[Path, str]]) -> str | None:
    """Score the test split of every fused variant with the fusion quality metrics."""
    if not cfg.metrics.enabled or not fused:
        return None
    fp = named_fingerprint("metrics", metrics=to_dict(cfg.metrics), fuse={k: v[1] for k, v in fused.items()})
    with _Stage(run_dir, "metrics", fp, plan, "metrics") as st:
        if not st.skip:
            from fusion.scoring import score_folders
            from pipelines.console import make_progress

            p = split_paths(cfg, data_root, "test")
            with make_progress(transient=True) as bar:
                task = bar.add_task("scoring the fused test images", total=None)
                res = score_folders(p["ir"], p["vi"], {k: v[0] for k, v in fused.items()},
                                    out_dir=run_dir / "metrics", workers=cfg.metrics.workers,
                                    conventions=cfg.metrics.convention, metrics=cfg.metrics.names,
                                    progress=lambda done, total: bar.update(task, completed=done, total=total))
            from fuseseg.data.io import atomic_write_text
            from pipelines.report import metrics_markdown

            atomic_write_text(run_dir / "metrics" / "metrics.md",
                              metrics_markdown(json.loads((run_dir / "metrics" / "metrics.json").read_text())))
            st.info["images"] = getattr(res, "n_images", None)
    return fp


# ---------------------------------------------------------------- stage 5: segment
def variant_images(cfg: ExperimentConfig, data_root: Path, variant: str, fused: dict) -> dict[str, Path]:
    if variant in ("ir", "vi"):
        return {s: split_paths(cfg, data_root, s)[variant] for s in ("train", "test")}
    dirs = fused[variant][0]
    if "train" not in dirs:
        raise DataError(f"variant {variant!r} has no fused training images ({cfg.fusion}); a folder "
                        "method needs a train/ folder to be segmented. Remove it from `variants`.")
    return dirs


@dataclasses.dataclass
class SegmentJob(StageJob):
    """The body of stage segment/<variant>/seed<k>: train (resuming from its last.pt), evaluate on
    the test split, write eval.json and the per-image confusion matrices into ``out``."""

    seg_cfg: object         # segmentation.config.SegConfig
    out: Path
    images: dict            # {"train": Path, "test": Path}
    labels: dict            # {"train": Path, "test": Path}
    variant: str
    seed: int
    protocol: str
    nproc: int = 1
    tensorboard: bool = False   # also log to out/tensorboard/

    def run(self) -> dict:
        from fuseseg.data.io import atomic_write_text
        from segmentation.evaluate import evaluate_segmenter
        from segmentation.train import train_segmenter

        out, cfg = Path(self.out), self.seg_cfg
        resume = (out / "last.pt").is_file()
        if self.nproc > 1:
            dump_config(cfg, out / "requested.yaml")
            _torchrun(self.nproc, ["segment", "train", "--images", str(self.images["train"]), "--labels",
                                   str(self.labels["train"]), "--out", str(out), "--config",
                                   str(out / "requested.yaml")] + (["--resume"] if resume else [])
                      + (["--tensorboard"] if self.tensorboard else []))
            ck = out / "final.pt"
        else:
            ck = train_segmenter(self.images["train"], self.labels["train"], cfg, out, resume=resume,
                                 tensorboard=self.tensorboard)
        res = evaluate_segmenter(ck, self.images["test"], self.labels["test"], device=cfg.device,
                                 save_predictions=out / "predictions", convention=cfg.miou_convention,
                                 amp=cfg.amp)
        buf = io.BytesIO()
        np.save(buf, res.per_image_confusion)
        atomic_write_bytes(out / "per_image_confusion.npy", buf.getvalue())
        ev = {"variant": self.variant, "seed": self.seed, "per_class_iou": res.per_class_iou_list(),
              "miou": res.miou, "pixel_accuracy": res.pixel_accuracy,
              "confusion": np.asarray(res.confusion).tolist(), "images": res.image_names,
              "precision": res.precision, "protocol": self.protocol}
        atomic_write_text(out / "eval.json", json.dumps(ev, indent=2))
        return {"miou": res.miou}


def stage_segment(cfg: ExperimentConfig, run_dir: Path, plan: Plan, data_root: Path, variant: str,
                  seed: int, images: dict[str, Path], upstream_fp: str, device: str,
                  ex: Executor | None = None) -> tuple[Path, str]:
    """Train one segmenter on ``variant``'s images and evaluate it on the test split."""
    from pipelines.config import from_dict

    ex = ex or Executor()
    seg_cfg = from_dict(type(cfg.segmentation), {**to_dict(cfg.segmentation), "seed": seed,
                                                 "device": ex.job_device(cfg.device, device)}, "segmentation")
    source = "data" if variant in ("ir", "vi") else f"fuse/{variant}"   # where its images come from
    fp = named_fingerprint("segment", **{source: upstream_fp, "segmentation": to_dict(seg_cfg),
                                         "precision": _precision(device, seg_cfg.amp), "world_size": _world_size(cfg)})
    out = run_dir / "segment" / variant / f"seed{seed}"
    with _Stage(run_dir, f"segment/{variant}/seed{seed}", fp, plan, "segment") as st:
        if not st.skip:
            tr, te = split_paths(cfg, data_root, "train"), split_paths(cfg, data_root, "test")
            job = SegmentJob(seg_cfg, out, dict(images), {"train": tr["labels"], "test": te["labels"]}, variant,
                             seed, fingerprint(protocol_of(cfg, device)[0]), ex.nproc(cfg.launcher, cfg.gpus),
                             cfg.tensorboard)
            prepare = lambda: _prepare_dir(out, fp, run_dir, st.key, fresh=st.forced)  # noqa: E731
            st.info.update(ex.run(run_dir, st.key, fp, out, job, prepare))
    return out, fp


# ---------------------------------------------------------------- stage 6: report
def protocol_of(cfg: ExperimentConfig, device=None) -> tuple[dict, str]:
    """The segmentation protocol that makes two mIoU tables comparable, as a dict and a line.

    It includes the precision the segmenters compute in (``segmentation.amp`` resolved on
    ``device``, default ``cfg.device``): bf16 and fp32 runs are different protocols."""
    s = cfg.segmentation
    keys = {f.name: to_dict(getattr(s, f.name)) for f in dataclasses.fields(s)
            if f.name not in ("device", "workers", "seed", "amp")}
    keys["precision"] = _precision(cfg.device if device is None else device, s.amp)
    keys["data"] = str(cfg.data.root) if cfg.data.root else f"synthetic {to_dict(cfg.data.synthetic)}"
    keys["seg_seeds"] = list(cfg.seg_seeds)
    keys["world_size"] = world = _world_size(cfg)
    text = (f"DeepLabV3+ ({s.encoder}, weights={s.encoder_weights}"
            f"{'' if s.aspp_separable else ', plain ASPP convs'}), Dice+CE, SGD lr {s.lr} cosine, "
            f"{s.frozen_epochs} frozen-encoder epochs at batch {s.frozen_batch_size} + "
            f"{s.epochs - s.frozen_epochs} at batch {s.batch_size} (global batches, {world} "
            f"process{'es' if world > 1 else ''}), crop {s.crop_size}, "
            f"{keys['precision']}, mIoU convention '{s.miou_convention}' (one confusion matrix over the test set), "
            f"seeds {list(cfg.seg_seeds)}, data {keys['data']}")
    fusion_text = _fusion_protocol(cfg)
    if fusion_text:
        text += f"; {fusion_text}"
    return keys, text


def _fusion_protocol(cfg: ExperimentConfig) -> str:
    """How each learned fusion variant got its weights (for the protocol line; not part of the
    segmentation protocol's fingerprint)."""
    from fusion.registry import get_entry

    parts = []
    for m in cfg.fusion:
        if m.type != "registered" or not get_entry(m.method).trainable:
            continue
        if m.checkpoint is not None:
            what = ("the shipped pretrained weights" if str(m.checkpoint) == "pretrained"
                    else f"checkpoint {m.checkpoint}")
            parts.append(f"{m.name} from {what} (not trained here)")
        else:
            t = {**to_dict(cfg.fusion_train), **m.train}
            parts.append(f"{m.name} trained from scratch here ({t['structure_epochs']} structure + "
                         f"{t['epochs']} fusion epochs, crop {t['crop_size']}, batch {t['batch_size']}, "
                         f"lr {t['lr']}, kwargs {dict(m.kwargs) or 'default'})")
    return ", ".join(parts)


def stage_report(cfg: ExperimentConfig, run_dir: Path, plan: Plan, data_root: Path, variants: list[str],
                 seg_fps: dict[str, str], metrics_fp: str | None, fused: dict) -> str:
    from pipelines import report as rep

    fp = named_fingerprint("report", segment=seg_fps, metrics=metrics_fp, report=to_dict(cfg.report))
    with _Stage(run_dir, "report", fp, plan, "report") as st:
        if st.skip:
            return fp
        class_names = list(MSRS_CLASSES[:cfg.data.num_classes])
        seg, per_image, stale = {}, {}, []
        proto, proto_text = protocol_of(cfg)
        proto_fp = fingerprint(proto)
        for v in variants:
            evs = []
            for seed in cfg.seg_seeds:
                p = run_dir / "segment" / v / f"seed{seed}" / "eval.json"
                if p.is_file():
                    ev = json.loads(p.read_text())
                    if ev.get("protocol") != proto_fp:  # measured under other settings: never mixed in
                        stale.append(f"{v}/seed{seed}")
                        continue
                    evs.append(ev)
                    cm = np.load(p.parent / "per_image_confusion.npy")
                    per_image[v] = per_image.get(v, 0) + cm
            if evs:
                seg[v] = evs
        missing = [v for v in variants if v not in seg]
        if stale:
            console.print(f"[yellow]left out of the table, measured under another protocol:[/] {', '.join(stale)} "
                          "(rerun them with this config, e.g. `fuseseg run CONFIG --only segment,report`)")
        rows = rep.miou_rows(seg, class_names)
        gains = []
        if "ir" in per_image and "vi" in per_image:
            for v in per_image:
                if v not in ("ir", "vi"):
                    gains.append(rep.bootstrap_gain(per_image, v, n_boot=cfg.report.bootstrap, seed=cfg.seed,
                                                    convention=cfg.segmentation.miou_convention))
        tables = run_dir / "tables"
        rep.write_miou_tables(tables, rows, class_names, proto_text, proto, gains)
        console.print(rep.rich_miou_table(rows, class_names, proto_text, width=console.width))
        if missing:
            console.print(f"[yellow]no segmentation results yet for: {', '.join(missing)}[/] "
                          "(run them, e.g. on another machine with --variants, and copy their "
                          "segment/<variant>/ folders here)")
        te = split_paths(cfg, data_root, "test")
        scenes = rep.scene_rows(run_dir, te, {k: v[0].get("test") for k, v in fused.items()}, list(seg),
                                cfg.seg_seeds[0], cfg.report.figure_scenes, cfg.data.ir16)
        rep.build_report(run_dir, rows, seg, class_names, list(cfg.seg_seeds), scenes)
        console.print(f"report: {run_dir / 'report.md'} and {run_dir / 'report.html'}")
    return fp


# ---------------------------------------------------------------- the whole experiment
def _remove_stray_temporaries(run_dir: Path) -> None:
    """Delete the temporary files (``.NAME.*.tmp``) that a killed run left behind: every file is
    written to one and renamed, so under the run lock any such file is an unfinished write --
    except in the folders of submitted jobs, which may still be running (a job cleans its own)."""
    from pipelines.runstate import stage_record

    jobs = []
    for rec_path in (run_dir / "stages").glob("*.json"):
        rec = stage_record(run_dir, rec_path.stem.replace("__", "/")) or {}
        ref = ref_of_record(rec) if rec.get("status") == "submitted" else None
        if ref is not None:
            jobs.append(ref.folder.parent)
    for tmp in run_dir.rglob(".*.tmp"):
        if tmp.is_file() and not any(tmp.is_relative_to(j) for j in jobs):
            tmp.unlink(missing_ok=True)


def _check_metric_sizes(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Test images under VIF's minimum size fail now, before training, not in the metrics stage."""
    from fusion.metrics import METRICS, VIF_MIN_SIDE, resolve_metrics

    if not cfg.metrics.enabled or "VIF" not in resolve_metrics(cfg.metrics.names):
        return
    side = ((stage_record(run_dir, "data") or {}).get("test") or {}).get("min_side")
    if side is not None and side < VIF_MIN_SIDE:
        others = ",".join(m for m in METRICS if m != "VIF")
        raise ConfigError(f"metrics: the test images of {cfg.data.root or 'the synthetic data set'} have a side "
                          f"of {side} px, under VIF's minimum of {VIF_MIN_SIDE} px; leave VIF out "
                          f"(metrics.names=[{others}]) or turn the metrics off (metrics.enabled=false).")


def _check_fusion_methods(methods: list[FusionMethodConfig]) -> None:
    """Build every registered method with its ``kwargs`` (on the CPU), loading the ``checkpoint:``
    where one is given, so that unknown settings, a corrupt file, another method's file or another
    shape fail before any stage rewrites the run folder."""
    from fusion.fuse import load_fusion_method
    from fusion.registry import create_method

    for m in methods:
        if m.type != "registered":
            continue
        if m.checkpoint is None:
            try:
                create_method(m.method, **m.kwargs)
            except ConfigError as exc:
                raise ConfigError(f"fusion[{m.name}].kwargs: {exc}") from exc
            continue
        try:
            ck = resolve_checkpoint(m.checkpoint, m.method)
        except CheckpointError as exc:
            raise CheckpointError(f"fusion[{m.name}].checkpoint: {exc}") from exc
        if not ck.is_file():
            raise ConfigError(f"fusion[{m.name}].checkpoint: {ck} does not exist; give an existing "
                              "checkpoint, or remove the key to train the method here.")
        try:
            load_fusion_method(m.method, checkpoint=ck, kwargs=m.kwargs, device="cpu")
        except CheckpointError as exc:
            raise CheckpointError(f"fusion[{m.name}].checkpoint: {exc}") from exc


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
    run_dir.mkdir(parents=True, exist_ok=True)
    _check_run_folder(run_dir)
    with RunLock(run_dir / ".lock"):
        _run_stages(cfg, plan, run_dir)
    return run_dir


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


def _run_stages(cfg: ExperimentConfig, plan: Plan, run_dir: Path) -> None:
    """Every stage in order: under the run lock, or, in a dry run, only deciding."""
    from fuseseg.runtime import resolve_device, seed_everything
    from fusion.registry import get_entry, load_plugins

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
        console.print(f"[bold]fuseseg run[/] {cfg.name}: run folder {run_dir}, device {device}, "
                      f"variants {', '.join(variants)}")
        if plan.runs("segment") and cfg.segmentation.random_frozen_encoder_warning():
            from pipelines.console import err_console

            err_console.print(f"[yellow]warning:[/] {cfg.segmentation.random_frozen_encoder_warning()}",
                              highlight=False, soft_wrap=True)
        _remove_stray_temporaries(run_dir)
        plan.environment = environment_record(str(device), cfg.seed)
        plan.environment["precision"] = precision_summary(cfg, device)
    if cfg.tensorboard:   # a missing package fails now, not in the first training
        from fuseseg.tblog import require_tensorboard

        require_tensorboard()

    # bad inputs fail here, before anything in the run folder is rewritten
    data_root, data_fp = stage_data(cfg, run_dir, plan)
    _check_metric_sizes(cfg, run_dir)
    needed = [m for m in cfg.fusion if m.name in variants or plan.variants is None]
    _check_fusion_methods(needed)
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
