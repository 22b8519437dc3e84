"""Training a learned fusion method (SSPFusion or a trainable plug-in): one flat loop.

A trainable method is an ``nn.Module`` registered with ``trainable=True`` that provides

* ``phases``: the names of its training phases, run in order, e.g. ``("structure", "fusion")``;
* ``training_losses(ir, vi_y, phase) -> (loss, {name: float})`` on (B, 1, H, W) tensors in [0, 1];
* ``parameters_for_phase(phase)`` (optional; default: all parameters);
* ``init_kwargs``: the keyword arguments that rebuild it (stored in checkpoints).

Schedule: phase ``"structure"`` runs ``structure_epochs`` epochs, every other phase ``epochs``
epochs. Each phase has its own Adam optimiser over ``parameters_for_phase(phase)`` (the other
parameters are frozen meanwhile) and its own cosine annealing of the learning rate over that
phase's steps: ``lr_t = min_lr + (lr - min_lr) * (1 + cos(pi * t / T)) / 2``, ``T = epochs x
steps_per_epoch``, stepped once per optimiser step.

Files in ``out_dir``: ``config.yaml`` (the resolved config), ``log.csv`` (one row per epoch:
phase, epoch, global step, the mean of each loss component, lr, images/s, seconds; rewritten
atomically), ``last.pt`` (written atomically after every epoch, so a SIGKILL loses at most one
epoch), ``final.pt`` (the trained model). Checkpoints are self-describing (``kind``, ``method``,
``kwargs``, ``state_dict``) and hold everything needed to resume: optimiser, scheduler, grad
scaler, RNG states, the sampler position and the log rows. ``resume=True`` continues from
``last.pt``; on CPU the result is bit-identical to an uninterrupted run (all randomness of the
data pipeline is keyed by ``(seed, epoch, index)``, see :mod:`fusion.datasets`).

Ctrl-C (SIGINT) stops at the next step boundary and writes ``last.pt`` for that exact position
(a second Ctrl-C stops at once and keeps the previous ``last.pt``); then KeyboardInterrupt is
re-raised after printing how to resume. A non-finite loss stops the run with a FusesegError
naming phase, epoch, step and the loss components; ``last.pt`` keeps the last good epoch.

Devices: CUDA when present (``device='auto'``), autocast (``amp``, :func:`fuseseg.runtime.resolve_precision`:
bf16, or fp16 with a GradScaler, on CUDA; bf16 on a CPU with native bf16; losses stay float32),
channels_last (always with bf16 on a CPU) and optional ``torch.compile``; the precision used is
stored in every checkpoint (``precision``). Multi-GPU / multi-process with ``torchrun
--nproc_per_node=K``: each process trains on ``batch_size / K`` samples of every global batch of
``batch_size`` (so results do not depend on K, up to float rounding and batch-norm statistics,
which stay per process), gradients are averaged by DistributedDataParallel, and only rank 0
writes files and prints.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib.metadata
import io
import json
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from fuseseg import runtime
from fuseseg.data.io import atomic_write_text
from fuseseg.data.pairs import PairSet, detect_splits, find_pairs, load_split
from fuseseg.errors import ConfigError, FusesegError
from fuseseg.progress import epoch_line, format_fields
from fuseseg.tblog import TrainingLog
from fusion.datasets import EpochBatchSampler, PairDataset, worker_init
from fusion.registry import create_method, get_entry, list_methods, load_plugins

# settings that may differ between a run and its resumption (they do not change the maths on CPU)
RUNTIME_KEYS = ("workers", "device", "amp", "compile", "channels_last", "log_every", "cache_images")


@dataclass
class FusionTrainConfig:
    """Settings of ``fuseseg train-fusion`` (YAML keys of the same names).

    Data: ``data_root`` (an MSRS-layout root, whose ``split`` folder is used, or a bare pair folder
    holding ``ir/`` and ``vi/``), or ``ir_dir`` + ``vi_dir`` explicitly. ``batch_size`` is the
    global batch (split across DDP processes). Paper values (Sec. 3.1): 256 crops, Adam (0.9,
    0.999), lr 2e-4 with cosine annealing, 50 structure epochs then 300 epochs; the paper gives no
    batch size (8 is this project's choice).

    More data: ``extra_data`` (more folders, each read like ``data_root``) and
    ``synthetic_pairs`` > 0 synthetic day/night street scenes (:mod:`fuseseg.data.synthetic`, size
    ``synthetic_size``, seed ``synthetic_seed``) rendered into ``OUT/synthetic`` on the first start
    (same seed: byte-identical files), all trained on together.

    ``aug_gain`` / ``aug_gamma`` ([low, high], default [1, 1] = off, the paper's choice): the joint
    photometric augmentation ``x -> clip(g x^gamma, 0, 1)``, one (g, gamma) per sample applied to
    both modalities (see :class:`fusion.datasets.PairDataset`)."""

    method: str = "sspfusion"   # registered trainable fusion method to train
    method_kwargs: dict[str, Any] = field(default_factory=dict)   # keyword arguments of the method (e.g. channels)
    plugins: list[str] = field(default_factory=list)   # modules that register fusion methods
    data_root: str | None = None   # MSRS-layout root (its `split` folder) or a folder holding ir/ and vi/
    split: str = "train"   # split folder of data_root to train on
    ir_dir: str | None = None   # infrared folder (instead of data_root)
    vi_dir: str | None = None   # visible folder (instead of data_root)
    extra_data: list[str] = field(default_factory=list)   # more training folders, each read like data_root
    synthetic_pairs: int = 0   # > 0: also train on that many synthetic scenes (rendered into OUT/synthetic)
    synthetic_size: tuple[int, int] = (240, 320)   # H, W of the synthetic scenes
    synthetic_seed: int = 0   # seed of the synthetic scenes (same seed: same files)
    structure_epochs: int = 50   # epochs of the structure (SFE) phase
    epochs: int = 300   # epochs of the fusion phase
    batch_size: int = 8   # global batch (split across DDP processes)
    crop_size: int | None = 256   # random square training crop; null = whole images
    vflip: bool = False   # random vertical flips too (horizontal ones always)
    aug_gain: tuple[float, float] = (1.0, 1.0)   # joint photometric gain range [low, high]; [1, 1] = off
    aug_gamma: tuple[float, float] = (1.0, 1.0)   # joint photometric gamma range [low, high]; [1, 1] = off
    lr: float = 2e-4   # Adam learning rate at the start of each phase (cosine decay)
    min_lr: float = 0.0   # learning rate at the end of each phase
    betas: tuple[float, float] = (0.9, 0.999)   # Adam betas
    weight_decay: float = 0.0   # Adam weight decay
    workers: int = 4   # DataLoader worker processes (0: load in the training process)
    seed: int = 0   # seeds initialisation, crops and batch order
    device: str = "auto"   # auto | cpu | cuda | cuda:1 ...
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"   # mixed precision: auto | off (fp32) | bf16 | fp16
    channels_last: bool = False   # channels-last memory format
    compile: bool = False   # torch.compile the training step
    ddp_find_unused: bool = False   # DDP find_unused_parameters (a method with parameters unused in a phase)
    max_steps_per_epoch: int | None = None   # cap on optimiser steps per epoch (tiny runs); null = full epochs
    log_every: int = 10   # steps between two progress-bar updates of the loss
    cache_images: bool = False   # keep the decoded training images in memory
    ir16: Literal["minmax", "scale"] = "minmax"   # 16-bit infrared -> 8-bit mapping: minmax (per image) or scale (/257)

    def __post_init__(self):
        for key in ("structure_epochs", "epochs", "workers"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")
        if self.synthetic_pairs < 0 or min(self.synthetic_size) < 16:
            raise ValueError(f"synthetic_pairs must be >= 0 and synthetic_size at least [16, 16], got "
                             f"{self.synthetic_pairs} and {list(self.synthetic_size)}")
        for key in ("batch_size", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ValueError(f"max_steps_per_epoch must be >= 1 or null, got {self.max_steps_per_epoch}")
        if self.crop_size is not None and self.crop_size < 8:
            raise ValueError(f"crop_size must be >= 8 pixels or null, got {self.crop_size}")
        for key in ("aug_gain", "aug_gamma"):
            lo, hi = getattr(self, key)
            if not 0 < lo <= hi:
                raise ValueError(f"{key} must be [low, high] with 0 < low <= high, got {[lo, hi]}")
        if self.structure_epochs + self.epochs == 0:
            raise ValueError("structure_epochs=0 and epochs=0 train nothing (final.pt would hold an untrained "
                             "model); give at least one epoch")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")


    def photometric_range(self) -> tuple[tuple[float, float], tuple[float, float]] | None:
        """The joint photometric augmentation of :class:`fusion.datasets.PairDataset` (None: off)."""
        rng = (tuple(self.aug_gain), tuple(self.aug_gamma))
        return None if rng == ((1.0, 1.0), (1.0, 1.0)) else rng


def config_to_dict(cfg: FusionTrainConfig) -> dict[str, Any]:
    """The config as plain YAML-able data (tuples as lists)."""
    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        if isinstance(v, Path):
            return str(v)
        return v
    return {f.name: plain(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _root_pairs(root: str | Path, split: str, key: str) -> PairSet:
    splits = detect_splits(root)
    if splits == [None]:
        return load_split(root, None)
    if split not in splits:
        raise ConfigError(f"fusion_train.split={split!r}, but {key} {root} only has the "
                          f"split(s) {', '.join(s for s in splits if s)}. Set split accordingly.")
    return load_split(root, split)


def resolve_pairs(cfg: FusionTrainConfig, out_dir: Path | None = None) -> PairSet:
    """The training pairs named by the config (see :class:`FusionTrainConfig`): ``data_root`` (or
    ``ir_dir`` + ``vi_dir``), then each of ``extra_data``, then the synthetic scenes in
    ``out_dir/synthetic`` (rendered by :func:`render_synthetic`)."""
    sets: list[PairSet] = []
    if cfg.ir_dir or cfg.vi_dir:
        if not (cfg.ir_dir and cfg.vi_dir):
            raise ConfigError("fusion_train: set both ir_dir and vi_dir (or data_root instead).")
        sets.append(find_pairs(cfg.ir_dir, cfg.vi_dir))
    elif cfg.data_root:
        sets.append(_root_pairs(cfg.data_root, cfg.split, "data_root"))
    sets += [_root_pairs(r, cfg.split, "extra_data") for r in cfg.extra_data]
    if cfg.synthetic_pairs:
        if out_dir is None:
            raise ConfigError("fusion_train.synthetic_pairs needs a run folder to render into")
        sets.append(load_split(out_dir / "synthetic", "train"))
    if not sets:
        raise ConfigError("fusion_train: no training data. Set data_root (an MSRS-layout root or a "
                          "folder with ir/ and vi/), or ir_dir and vi_dir, or synthetic_pairs.")
    return sets[0] if len(sets) == 1 else merge_pairsets(sets)


def merge_pairsets(sets: list[PairSet]) -> PairSet:
    """One PairSet of several; stems become ``"<j>/<stem>"`` (j = the set's index), so equal file
    names in different folders stay distinct."""
    out = PairSet(sets[0].ir_dir, sets[0].vi_dir)
    for j, ps in enumerate(sets):
        for stem in ps.stems:
            key = f"{j}/{stem}"
            out.stems.append(key)
            out.ir[key], out.vi[key] = ps.ir[stem], ps.vi[stem]
    return out


def render_synthetic(cfg: FusionTrainConfig, out_dir: Path) -> None:
    """Render ``cfg.synthetic_pairs`` synthetic training scenes into ``out_dir/synthetic`` unless
    the same set (count, size, seed, per ``synthetic.json``) is already there."""
    if not cfg.synthetic_pairs:
        return
    from fuseseg.data.synthetic import make_synthetic

    dest = out_dir / "synthetic"
    want = {"train": cfg.synthetic_pairs, "size": list(cfg.synthetic_size), "seed": cfg.synthetic_seed}
    try:
        have = json.loads((dest / "synthetic.json").read_text())
        if all(have.get(k) == v for k, v in want.items()) and have.get("test") == 0:
            return
    except (OSError, ValueError):
        pass
    make_synthetic(dest, cfg.synthetic_pairs, 0, tuple(cfg.synthetic_size), cfg.synthetic_seed,
                   workers=1, progress=False)


def _versions() -> dict[str, str]:
    try:
        own = importlib.metadata.version("fuseseg")
    except importlib.metadata.PackageNotFoundError:
        own = "unknown"
    return {"fuseseg": own, "torch": str(torch.__version__), "numpy": str(np.__version__),
            "python": platform.python_version()}


class _Losses(nn.Module):
    """Routes ``training_losses`` through ``forward`` so DDP / torch.compile see the call."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, ir, vi_y, phase: str):
        return self.model.training_losses(ir, vi_y, phase)


def _log_columns(rows: list[dict]) -> list[str]:
    head, tail = ["phase", "epoch", "global_step"], ["loss", "lr", "images_per_s", "seconds"]
    comps: list[str] = []
    for r in rows:
        for k in r:
            if k not in head and k not in tail and k not in comps:
                comps.append(k)
    return head + comps + tail


def write_log(path: Path, rows: list[dict]) -> None:
    """Write the per-epoch rows as CSV atomically (columns: the union over rows)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=_log_columns(rows), restval="", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(path, buf.getvalue())


def _fmt(comps: dict[str, float]) -> str:
    return " ".join(f"{k} {v:.4g}" for k, v in comps.items())


def _check_resumable(saved: dict, cfg: FusionTrainConfig, path: Path) -> None:
    now = config_to_dict(cfg)
    diff = [k for k in now if k not in RUNTIME_KEYS and saved.get(k) != now[k]]
    if diff:
        shown = "; ".join(f"{k}: {saved.get(k)!r} -> {now[k]!r}" for k in diff)
        raise ConfigError(f"cannot resume {path}: the config differs from the one it was trained "
                          f"with ({shown}). Resume with the same settings (they are in config.yaml "
                          "next to it), or start a new run in another --out folder.")


def _check_trainable(model, name: str) -> None:
    missing = [a for a in ("phases", "training_losses") if not hasattr(model, a)]
    if not isinstance(model, nn.Module) or missing:
        raise ConfigError(f"fusion method {name!r} cannot be trained: a trainable method must be an "
                          f"nn.Module with `phases` and `training_losses` (missing: "
                          f"{', '.join(missing) or 'nn.Module'}). See fusion/train.py.")


def _phase_params(model: nn.Module, phase: str) -> list[nn.Parameter]:
    fn = getattr(model, "parameters_for_phase", None)
    params = list(fn(phase)) if fn is not None else list(model.parameters())
    if not params:
        raise ConfigError(f"fusion method has no parameters to train in phase {phase!r}.")
    return params


def train_fusion(cfg: FusionTrainConfig, out_dir: Path | str, resume: bool = False,
                 progress: bool = True, tensorboard: bool = False) -> Path:
    """Train ``cfg.method`` and return the path of ``out_dir/final.pt`` (see the module doc).
    ``tensorboard``: also log to ``out_dir/tensorboard/`` (:mod:`fuseseg.tblog`)."""
    device = runtime.resolve_device(cfg.device)
    was_initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if device.type == "cuda" and device.index is None:
        import os
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    rank, world = runtime.init_distributed(device)
    try:
        return _train(cfg, Path(out_dir), resume, progress, device, rank, world, tensorboard)
    finally:
        if world > 1 and not was_initialised:
            torch.distributed.destroy_process_group()


def _train(cfg: FusionTrainConfig, out_dir: Path, resume: bool, progress: bool,
           device: torch.device, rank: int, world: int, tensorboard: bool = False) -> Path:
    """The training run, as a few named steps: open the run folder, build model and data, then
    the flat loop (phase set-up, per step forward/check/backward, per epoch log row and
    checkpoint), then the final checkpoint and the verdict."""
    from rich.console import Console

    main = rank == 0
    console = Console(stderr=True, quiet=not main)
    last_path, final_path = out_dir / "last.pt", out_dir / "final.pt"

    ckpt = _open_run(cfg, out_dir, resume, console)
    if ckpt is not None and ckpt.get("complete"):
        if main and not final_path.exists():
            runtime.save_checkpoint(final_path, _final_payload(ckpt))
        console.print(f"training in {out_dir} is already complete: {final_path}")
        return final_path
    model, init_kwargs = _build_model(cfg, ckpt, device, last_path)
    if main:
        render_synthetic(cfg, out_dir)
    if world > 1:
        torch.distributed.barrier()
    dataset, sampler, loader, steps_per_epoch = _build_data(cfg, out_dir, device, rank, world)
    phases = [(p, cfg.structure_epochs if p == "structure" else cfg.epochs) for p in model.phases]
    st = _State.resume_from(ckpt, cfg, last_path)
    precision = runtime.precision_record(device, cfg.amp, cfg.channels_last)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        import yaml
        atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
        console.print(f"training {cfg.method} on {len(dataset)} pairs, {world} process(es) on {device}, "
                      f"global batch {cfg.batch_size}, {precision['precision']}, {steps_per_epoch} steps/epoch, phases "
                      + ", ".join(f"{p} x{n}" for p, n in phases) + f" -> {out_dir}")

    def save(path: Path, pi: int, ep: int, step: int, opt=None, sched=None, scaler=None, acc=None) -> None:
        if main:
            runtime.save_checkpoint(path, _payload(cfg, model, init_kwargs, phases, st, pi, ep, step,
                                                   opt, sched, scaler, acc))

    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    stop = runtime.StopRequest()  # first Ctrl-C: stop at the next step; second: at once
    bar = _progress_bar(console) if progress and main else None
    tb = TrainingLog(out_dir, tensorboard and main, purge_step=st.global_step)
    position = "before the first epoch"
    ir = vi_y = None  # the last batch, shown in TensorBoard
    try:
        with stop:
            epoch_offset = sum(n for _, n in phases[:st.phase_index])
            for pi in range(st.phase_index, len(phases)):
                phase, n_epochs = phases[pi]
                first_epoch = st.epoch if pi == st.phase_index else 0
                if first_epoch >= n_epochs:
                    epoch_offset += n_epochs
                    continue
                opt, sched, scaler, loss_fn = _setup_phase(cfg, model, phase, n_epochs * steps_per_epoch,
                                                           device, world, ckpt, pi)
                model.train()
                task = bar.add_task(phase, total=(n_epochs - first_epoch) * steps_per_epoch,
                                    info="") if bar is not None else None
                for ep in range(first_epoch, n_epochs):
                    step0 = st.step if (pi == st.phase_index and ep == first_epoch) else 0
                    acc = _EpochAcc.resume(st.epoch_acc if step0 > 0 else None)
                    st.epoch_acc = None
                    sampler.set_epoch(epoch_offset + ep, start_batch=step0)
                    if bar is not None:
                        bar.update(task, description=f"{phase} {ep + 1}/{n_epochs}")
                        if step0:
                            bar.advance(task, step0)
                    batches = iter(loader)
                    for step in range(step0, steps_per_epoch):
                        position = (f"phase {phase!r}, epoch {ep + 1}/{n_epochs}, "
                                    f"step {step + 1}/{steps_per_epoch}")
                        ir, vi_y = _to_device(next(batches), device, precision["channels_last"])
                        opt.zero_grad(set_to_none=True)
                        with runtime.autocast(device, cfg.amp):
                            loss, comps = loss_fn(ir, vi_y, phase)
                        comps = {k: float(v) for k, v in comps.items()}
                        if _check_step(loss, comps, stop, world, position, st.global_step, cfg, last_path):
                            acc.pause()
                            save(last_path, pi, ep, step, opt, sched, scaler, acc.state())
                            position = (f"phase {phase!r}, epoch {ep + 1}/{n_epochs}, "
                                        f"step {step}/{steps_per_epoch}")
                            raise KeyboardInterrupt("saved")
                        scaler.scale(loss).backward()
                        scaler.step(opt)
                        scaler.update()
                        sched.step()
                        st.global_step += 1
                        if phase == "fusion":
                            comps.update(trivial_fusion_losses(runtime.unwrap(model), ir, vi_y))
                        acc.add(comps, float(loss.detach()))
                        if bar is not None:
                            bar.advance(task)
                            if (step + 1) % cfg.log_every == 0 or step + 1 == steps_per_epoch:
                                bar.update(task, info=f"{_fmt(comps)} | loss {float(loss.detach()):.4g} | "
                                                      f"{acc.rate(step + 1 - step0, cfg.batch_size):.1f} img/s")
                    # ------------------------------------------------------ epoch end
                    st.rows.append(acc.row(phase, ep + 1, st.global_step, opt, steps_per_epoch, cfg.batch_size))
                    save(last_path, pi, ep + 1, 0, opt, sched, scaler)
                    if main:
                        write_log(out_dir / "log.csv", st.rows)
                        _log_epoch(bar, task, tb, st.rows[-1], phases, pi, n_epochs, cfg.method, model, ir, vi_y)
                    position = f"the end of phase {phase!r} epoch {ep + 1}/{n_epochs}"
                    if stop.requested:
                        raise KeyboardInterrupt("saved")
                epoch_offset += n_epochs
    except KeyboardInterrupt as exc:
        if main:
            saved = str(exc) == "saved"
            what = (f"saved {last_path} at {position}" if saved else
                    f"{last_path} holds the last completed epoch" if last_path.exists()
                    else "no checkpoint was written yet")
            console.print(f"[yellow]interrupted:[/] {what}. Resume with: fuseseg train-fusion "
                          f"{out_dir / 'config.yaml'} --out {out_dir} --resume")
        raise
    except torch.cuda.OutOfMemoryError as exc:
        raise runtime.oom_error(
            exc, f"training {cfg.method} in {position} on {device} (crop {cfg.crop_size}, {world} "
            f"process(es); {last_path} keeps the last completed epoch)", "fusion_train.batch_size",
            cfg.batch_size) from exc
    finally:
        tb.close()
        if bar is not None:
            bar.stop()
        for p in model.parameters():
            p.requires_grad_(True)

    if main:
        final = _payload(cfg, model, init_kwargs, phases, st, len(phases) - 1,
                         phases[-1][1] if phases else 0, 0)
        final["complete"] = True
        final["verdict"] = verdict(st.rows)
        runtime.save_checkpoint(last_path, final)
        runtime.save_checkpoint(final_path, _final_payload(final))
        report_verdict(final["verdict"], out_dir, console)
        console.print(f"done: {final_path}")
    if world > 1:
        torch.distributed.barrier()
    return final_path


# ---------------------------------------------------------------------- steps of _train
def _open_run(cfg: FusionTrainConfig, out_dir: Path, resume: bool, console) -> dict | None:
    """Check the method is trainable and the run folder's state; the checkpoint to resume or None."""
    last_path, final_path = out_dir / "last.pt", out_dir / "final.pt"
    if cfg.plugins:
        load_plugins(cfg.plugins)
    entry = get_entry(cfg.method)
    if not entry.trainable:
        trainable = [m for m in list_methods() if get_entry(m).trainable]
        raise ConfigError(f"fusion_train.method={cfg.method!r} is not a trainable method. Trainable "
                          f"methods: {', '.join(trainable) or '(none)'}.")
    if resume and last_path.exists():
        ckpt = runtime.load_checkpoint(last_path, expect={"kind": "fusion", "method": cfg.method})
        _check_resumable(ckpt["config"], cfg, last_path)
        return ckpt
    if resume:
        console.print(f"[yellow]note:[/] {last_path} does not exist; starting from the beginning.")
    elif last_path.exists() or final_path.exists():
        raise ConfigError(f"{out_dir} already holds a fusion training run ({last_path.name}). Pass "
                          "--resume to continue it, or choose another --out folder.")
    return None


def _build_model(cfg: FusionTrainConfig, ckpt: dict | None, device: torch.device,
                 last_path: Path) -> tuple[nn.Module, dict]:
    """The seeded model on ``device`` (weights from ``ckpt`` when resuming) and its init kwargs."""
    runtime.seed_everything(cfg.seed)
    model = create_method(cfg.method, **cfg.method_kwargs)
    _check_trainable(model, cfg.method)
    model.to(device)
    if runtime.precision_record(device, cfg.amp, cfg.channels_last)["channels_last"]:
        model.to(memory_format=torch.channels_last)
    if ckpt is not None:
        runtime.load_state_dict_checked(model, ckpt["state_dict"], last_path)
    return model, dict(getattr(model, "init_kwargs", cfg.method_kwargs))


def _build_data(cfg: FusionTrainConfig, out_dir: Path, device: torch.device, rank: int, world: int):
    """(dataset, sampler, loader, steps_per_epoch) of the training pairs."""
    dataset = PairDataset(resolve_pairs(cfg, out_dir), crop=cfg.crop_size, train=True, ir16=cfg.ir16,
                          cache=cfg.cache_images, seed=cfg.seed, vflip=cfg.vflip,
                          photometric=cfg.photometric_range())
    sampler = EpochBatchSampler(len(dataset), cfg.batch_size, seed=cfg.seed, rank=rank, world=world)
    if cfg.cache_images and cfg.workers > 0:
        dataset.preload()  # decode once, shared with the forked workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=cfg.workers, pin_memory=device.type == "cuda",
        persistent_workers=cfg.workers > 0, worker_init_fn=worker_init,
        generator=torch.Generator().manual_seed(cfg.seed))  # keeps the global torch RNG untouched
    steps_per_epoch = sampler.batches_per_epoch
    if cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, cfg.max_steps_per_epoch)
    return dataset, sampler, loader, steps_per_epoch


@dataclass
class _State:
    """Where the run is: phase index, epoch and step within it, global step, log rows so far,
    and the running sums of a part-done epoch."""

    phase_index: int = 0
    epoch: int = 0
    step: int = 0
    global_step: int = 0
    rows: list[dict] = field(default_factory=list)
    epoch_acc: dict | None = None

    @classmethod
    def resume_from(cls, ckpt: dict | None, cfg: FusionTrainConfig, path: Path) -> _State:
        if ckpt is None:
            return cls()
        runtime.set_rng_state(ckpt["rng"]["runtime"])
        if ckpt["rng"]["sampler"]["seed"] != cfg.seed:
            raise ConfigError(f"{path}: sampler seed differs from fusion_train.seed={cfg.seed}")
        return cls(ckpt["phase_index"], ckpt["epoch"], ckpt["step_in_epoch"], ckpt["global_step"],
                   list(ckpt["log"]), ckpt.get("epoch_acc"))


def _payload(cfg, model, init_kwargs, phases, st: _State, pi, ep, step, opt=None, sched=None,
             scaler=None, acc=None) -> dict:
    """The checkpoint of position (phase ``pi``, epoch ``ep``, ``step``): tensors and plain types."""
    return {"kind": "fusion", "method": cfg.method, "kwargs": init_kwargs,
            "config": config_to_dict(cfg), "phase": phases[pi][0] if pi < len(phases) else None,
            "phase_index": pi, "epoch": ep, "step_in_epoch": step, "global_step": st.global_step,
            "state_dict": runtime.unwrap(model).state_dict(),
            "optimizer": opt.state_dict() if opt else None,
            "scheduler": sched.state_dict() if sched else None,
            "scaler": scaler.state_dict() if scaler else None,
            "rng": {"runtime": runtime.get_rng_state(),
                    "sampler": {"seed": cfg.seed, "phase_index": pi, "epoch": ep, "step": step}},
            "epoch_acc": acc, "log": st.rows, "complete": False, "versions": _versions(),
            "precision": runtime.precision_record(next(runtime.unwrap(model).parameters()).device,
                                                  cfg.amp, cfg.channels_last)}


def _progress_bar(console):
    from rich.progress import TextColumn

    from fuseseg.progress import make_progress

    bar = make_progress(TextColumn("{task.fields[info]}"), console=console)
    bar.start()
    return bar


def _log_epoch(bar, task, tb: TrainingLog, row: dict[str, Any], phases, pi: int, n_epochs: int, method: str,
               model: nn.Module, ir: torch.Tensor | None, vi_y: torch.Tensor | None, n_images: int = 3) -> None:
    """An epoch's log row as one plain line (where the console is not a terminal; ETA from this
    epoch's time x the epochs left in every phase) and, with TensorBoard, as scalars
    (``loss/<component>``, ``lr``, ``images_per_s``) and up to ``n_images`` pairs of the epoch's last
    batch as infrared | visible Y | fused rows."""
    skip = ("phase", "epoch", "global_step", "seconds")
    if bar is not None:
        left = n_epochs - int(row["epoch"]) + sum(n for _, n in phases[pi + 1:])
        epoch_line(bar, task, f"train {method} {row['phase']} epoch {row['epoch']}/{n_epochs}: "
                   + format_fields({k: v for k, v in row.items() if k not in skip}),
                   eta_s=left * float(row["seconds"]))
    if tb.writer is None:
        return
    step = int(row["global_step"])
    tb.scalars(step, {k: v for k, v in row.items() if k not in skip + ("lr", "images_per_s")}, "loss/")
    tb.scalars(step, {"lr": row["lr"], "images_per_s": row["images_per_s"], "epoch_seconds": row["seconds"]})
    if ir is None:
        return
    net = runtime.unwrap(model)
    was_training = net.training
    net.eval()
    with torch.no_grad():
        a, b = ir[:n_images].float(), vi_y[:n_images].float()
        fused = net(a, b).float().clamp(0, 1)
    net.train(was_training)
    tb.images(step, f"fused/{row['phase']}", [[x[0].cpu().numpy() for x in (a[i], b[i], fused[i])]
                                               for i in range(a.shape[0])])


def _setup_phase(cfg: FusionTrainConfig, model: nn.Module, phase: str, total_steps: int,
                 device: torch.device, world: int, ckpt: dict | None, pi: int):
    """Freeze all but the phase's parameters; a fresh Adam + cosine schedule over ``total_steps``
    (their state restored from ``ckpt`` when it was saved in this phase); the (DDP / compiled)
    loss module. Returns (opt, sched, scaler, loss_fn)."""
    params = _phase_params(runtime.unwrap(model), phase)
    chosen = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
    opt = torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps, eta_min=cfg.min_lr)
    scaler = torch.amp.GradScaler(device.type, enabled=runtime.needs_grad_scaler(device, cfg.amp))
    if ckpt is not None and pi == ckpt["phase_index"] and ckpt["optimizer"] is not None:
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    loss_fn: nn.Module = _Losses(model)
    if world > 1:
        loss_fn = nn.parallel.DistributedDataParallel(
            loss_fn, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=cfg.ddp_find_unused)
    if cfg.compile:
        loss_fn = torch.compile(loss_fn)
    return opt, sched, scaler, loss_fn


def _to_device(batch, device: torch.device, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    ir, vi_y = (x.to(device, non_blocking=True) for x in batch)
    if channels_last:
        ir = ir.contiguous(memory_format=torch.channels_last)
        vi_y = vi_y.contiguous(memory_format=torch.channels_last)
    return ir, vi_y


def _check_step(loss: torch.Tensor, comps: dict, stop: runtime.StopRequest, world: int, position: str,
                global_step: int, cfg: FusionTrainConfig, last_path: Path) -> bool:
    """Raise on a non-finite loss (on any rank); True when a stop was requested (on any rank)."""
    flags = torch.stack([(~torch.isfinite(loss.detach().float())).any().float(),
                         torch.tensor(float(stop.requested), device=loss.device)])
    if world > 1:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
    bad, stop_now = (bool(x) for x in flags.tolist())
    if bad:
        raise FusesegError(
            f"training diverged: non-finite loss ({float(loss.detach()):g}) in {position} (global "
            f"step {global_step + 1}); loss components: {_fmt(comps) or '(none)'}. The last good "
            f"checkpoint is kept: {last_path} ({'none yet' if not last_path.exists() else 'end of the last completed epoch'}). "
            f"Lower lr (now {cfg.lr:g}) or set amp=off, then retrain or resume with --resume.")
    return stop_now


class _EpochAcc:
    """Running sums of one epoch's loss components (resumable mid-epoch: :meth:`state`)."""

    def __init__(self, sums: dict, count: int, seconds: float):
        self.sums, self.count = dict(sums), count
        self.t_segment = time.perf_counter()
        self.t_start = self.t_segment - seconds

    @classmethod
    def resume(cls, state: dict | None) -> _EpochAcc:
        state = state or {"sums": {}, "count": 0, "seconds": 0.0}
        return cls(state["sums"], state["count"], state["seconds"])

    def add(self, comps: dict[str, float], loss: float) -> None:
        self.count += 1
        for k, v in comps.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.sums["loss"] = self.sums.get("loss", 0.0) + loss

    def pause(self) -> None:
        self.seconds = time.perf_counter() - self.t_start

    def state(self) -> dict:
        return {"sums": dict(self.sums), "count": self.count,
                "seconds": getattr(self, "seconds", time.perf_counter() - self.t_start)}

    def rate(self, steps: int, batch: int) -> float:
        return steps * batch / max(1e-9, time.perf_counter() - self.t_segment)

    def row(self, phase: str, epoch: int, global_step: int, opt, steps_per_epoch: int, batch: int) -> dict:
        seconds = time.perf_counter() - self.t_start
        n = max(1, self.count)
        row: dict[str, Any] = {"phase": phase, "epoch": epoch, "global_step": global_step}
        row.update({k: v / n for k, v in self.sums.items() if k != "loss"})
        row.update({"loss": self.sums.get("loss", math.nan) / n, "lr": float(opt.param_groups[0]["lr"]),
                    "images_per_s": steps_per_epoch * batch / max(seconds, 1e-9), "seconds": seconds})
        return row


# ---------------------------------------------------------------------- diagnostics
@torch.no_grad()
def trivial_fusion_losses(model: nn.Module, ir: torch.Tensor, vi_y: torch.Tensor) -> dict[str, float]:
    """``fus_max`` and ``fus_mean``: the model's fusion loss (``model.fusion_loss``) of the trivial
    answers ``max(IR, VI_Y)`` and ``(IR + VI_Y) / 2`` on the same batch; {} for a method without
    ``fusion_loss``. A trained model whose ``fus`` is not below ``fus_max`` has not learned what
    its own loss rewards."""
    fn = getattr(model, "fusion_loss", None)
    if fn is None:
        return {}
    ir, vi_y = ir.float(), vi_y.float()
    return {"fus_max": float(fn(torch.maximum(ir, vi_y), ir, vi_y)),
            "fus_mean": float(fn(0.5 * (ir + vi_y), ir, vi_y))}


def verdict(rows: list[dict]) -> dict[str, Any]:
    """Did the model beat ``max(IR, VI_Y)`` on its own fusion loss? Judged on the last fusion
    epoch's means (``fus`` against ``fus_max`` on the same batches). ``status``: "converged"
    (fus < fus_max), "undertrained" (not), or "unknown" (no such columns)."""
    last = next((r for r in reversed(rows) if r.get("phase") == "fusion"), None)
    if last is None or "fus" not in last or "fus_max" not in last:
        return {"status": "unknown", "reason": "no fusion epoch with fus / fus_max columns"}
    out = {k: float(last[k]) for k in ("fus", "fus_max", "fus_mean") if k in last}
    out.update(epoch=int(last["epoch"]), global_step=int(last["global_step"]))
    out["beat_max"] = out["fus"] < out["fus_max"]
    out["status"] = "converged" if out["beat_max"] else "undertrained"
    ious = {k: float(v) for k, v in last.items() if k.startswith("iou")}
    if ious:
        out["structure_iou"] = ious
    return out


def report_verdict(v: dict[str, Any], out_dir: Path, console) -> None:
    """Write ``verdict.json`` into the run folder and print the verdict (loudly when undertrained)."""
    atomic_write_text(out_dir / "verdict.json", json.dumps(v, indent=2) + "\n")
    if v["status"] == "unknown":
        console.print(f"verdict: not measured ({v['reason']})")
    elif v["beat_max"]:
        console.print(f"verdict: converged: fusion loss {v['fus']:.4f} < {v['fus_max']:.4f} of "
                      f"max(IR, VI_Y) (mean: {v.get('fus_mean', math.nan):.4f}) in the last epoch")
    else:
        console.print(f"[bold red]WARNING: UNDERTRAINED[/]: fusion loss {v['fus']:.4f} is not below "
                      f"{v['fus_max']:.4f}, the loss of the trivial max(IR, VI_Y), in the last epoch. "
                      "The model has not learned what its loss rewards: train longer (epochs), "
                      "or see fusion/README.md for a converging recipe.")


def _final_payload(ckpt: dict) -> dict:
    """The trained model's checkpoint: self-describing, without optimiser/scheduler state."""
    keep = ("kind", "method", "kwargs", "config", "phase", "phase_index", "epoch", "global_step",
            "state_dict", "log", "versions", "verdict", "precision")
    out = {k: ckpt[k] for k in keep if k in ckpt}
    out["complete"] = True
    return out
