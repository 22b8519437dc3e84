"""Training a learned fusion method (SSPFusion or a trainable plug-in): one flat loop.

A trainable method is an ``nn.Module`` registered with ``trainable=True`` that provides

* ``phases``: the names of its training phases, run in order, e.g. ``("structure", "fusion")``;
* ``training_losses(ir, vi_y, phase) -> (loss, {name: float})`` on (B, 1, H, W) tensors in [0, 1];
* ``parameters_for_phase(phase)`` (optional; default: all parameters);
* ``init_kwargs``: the keyword arguments that rebuild it (stored in checkpoints);
* ``batch_extras`` (optional; default ()): more batch items its ``training_losses`` takes as
  keyword arguments (``"labels"``, ``"visible"``: :class:`fusion.datasets.PairDataset`'s extras).

``init_checkpoint`` starts from the weights of a fusion checkpoint of the same method (only the
weights; ``pretrained``: the shipped ones); ``train_fusion(..., prepare=fn)`` calls
``fn(model, device)`` once the model is built (SeAFusion's rounds set its semantic loss so).

Schedule: phase ``"structure"`` runs ``structure_epochs`` epochs, every other phase ``epochs``
epochs, unless ``phase_epochs`` gives a phase its own count (e.g. ``{autoencoder: 4, fusion: 6}``;
a name the method does not have is a ConfigError listing its phases); the schedule is stored in
every checkpoint (``schedule``). Each phase has its own Adam optimiser over ``parameters_for_phase(phase)`` (the other
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

import importlib.metadata
import math
import platform
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fuseseg import runtime
from fuseseg.data.io import atomic_write_text
from fuseseg.errors import ConfigError, FusesegError
from fuseseg.tblog import TrainingLog
from fuseseg.threads import EpochPace
from fusion.datasets import EpochBatchSampler, PairDataset, worker_init
from fusion.registry import create_method, get_entry, list_methods, load_plugins
from fusion.train_config import (  # FusionTrainConfig: job pickles of 0.1.0 name it fusion.train
    RUNTIME_KEYS,
    FusionTrainConfig,
    config_to_dict,
    render_synthetic,
    resolve_pairs,
)
from fusion.train_log import (
    EpochAcc,
    format_components,
    log_epoch,
    progress_bar,
    report_verdict,
    save_snapshots,
    trivial_fusion_losses,
    verdict,
    write_log,
)


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

    def forward(self, ir, vi_y, phase: str, *extras):
        names = batch_extras(self.model)
        return self.model.training_losses(ir, vi_y, phase, **dict(zip(names, extras, strict=True)))


def batch_extras(model: nn.Module) -> tuple[str, ...]:
    """The extra batch items (:data:`fusion.datasets.EXTRAS`) the method's ``training_losses``
    takes as keyword arguments: its ``batch_extras`` attribute, () when it has none."""
    return tuple(getattr(runtime.unwrap(model), "batch_extras", ()))


def _check_resumable(saved: dict, cfg: FusionTrainConfig, path: Path) -> None:
    now = config_to_dict(cfg)
    # a key the saved config lacks was added to fuseseg later: that run used its default
    saved = {**config_to_dict(FusionTrainConfig()), **saved}
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
                 progress: bool = True, tensorboard: bool = False, prepare=None) -> Path:
    """Train ``cfg.method`` and return the path of ``out_dir/final.pt`` (see the module doc).
    ``tensorboard``: also log to ``out_dir/tensorboard/`` (:mod:`fuseseg.tblog`). ``prepare``:
    ``prepare(model, device)`` is called once the model is built and on its device (e.g. to set
    SeAFusion's semantic loss, which :mod:`pipelines.semantic_rounds` does)."""
    if cfg.semantic_rounds:
        raise ConfigError(
            f"fusion_train.semantic_rounds={cfg.semantic_rounds}: the joint fusion/segmentation rounds "
            "need the segmentation trainer, which fusion.train does not run. Use `fuseseg train-fusion` "
            "or an experiment (they run pipelines.semantic_rounds), or set semantic_rounds: 0.")
    device = runtime.resolve_device(cfg.device)
    was_initialised = torch.distributed.is_available() and torch.distributed.is_initialized()
    if device.type == "cuda" and device.index is None:
        import os
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    rank, world = runtime.init_distributed(device)
    try:
        return _train(cfg, Path(out_dir), resume, progress, device, rank, world, tensorboard, prepare)
    finally:
        if world > 1 and not was_initialised:
            torch.distributed.destroy_process_group()


def _train(cfg: FusionTrainConfig, out_dir: Path, resume: bool, progress: bool,
           device: torch.device, rank: int, world: int, tensorboard: bool = False, prepare=None) -> Path:
    """The training run: open the run folder, build model and data, then the flat loop (phase set-up,
    each epoch's steps, its log row and checkpoint), then the final checkpoint and the verdict."""
    from rich.console import Console

    main = rank == 0
    console = Console(stderr=True, quiet=not main)
    last_path, final_path = out_dir / "last.pt", out_dir / "final.pt"
    ckpt = _open_run(cfg, out_dir, resume, console)
    if _already_complete(ckpt, final_path, main, console):
        return final_path
    model, init_kwargs = _build_model(cfg, ckpt, device, last_path, prepare)
    if main:
        render_synthetic(cfg, out_dir)
    if world > 1:
        torch.distributed.barrier()
    extras = batch_extras(model)   # e.g. labels, for a method trained with a segmentation loss
    dataset, sampler, loader, steps_per_epoch = _build_data(cfg, out_dir, device, rank, world, extras)
    phases = cfg.schedule(tuple(model.phases))
    st = _State.resume_from(ckpt, cfg, last_path)
    precision = runtime.precision_record(device, cfg.amp, cfg.channels_last)
    if main:
        _announce(cfg, out_dir, console, len(dataset), world, device, precision, steps_per_epoch, phases)

    def save(path: Path, pi: int, ep: int, step: int, opt=None, sched=None, scaler=None, acc=None) -> None:
        if main:
            runtime.save_checkpoint(path, _payload(cfg, model, init_kwargs, phases, st, pi, ep, step,
                                                   opt, sched, scaler, acc))

    torch.backends.cudnn.benchmark = device.type == "cuda"
    stop = runtime.StopRequest()  # first Ctrl-C: stop at the next step; second: at once
    bar = progress_bar(console) if progress and main else None
    tb = TrainingLog(out_dir, tensorboard and main, purge_step=st.global_step)
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
                    sampler.set_epoch(epoch_offset + ep, start_batch=step0)
                    acc, ir, vi_y = _run_epoch(cfg, model, (opt, sched, scaler, loss_fn), loader, st, stop, save,
                                               bar, task, pi, phase, ep, n_epochs, step0, steps_per_epoch,
                                               device, world, precision["channels_last"], last_path)
                    # ------------------------------------------------------ epoch end
                    st.end_epoch(acc.row(phase, ep + 1, st.global_step, opt, steps_per_epoch, cfg.batch_size))
                    save(last_path, pi, ep + 1, 0, opt, sched, scaler)
                    if cfg.keep_every and (ep + 1) % cfg.keep_every == 0 and main:
                        keep_epoch(out_dir, _payload(cfg, model, init_kwargs, phases, st, pi, ep + 1, 0), phase, ep + 1)
                    if main:
                        write_log(out_dir / "log.csv", st.rows)
                        log_epoch(bar, task, tb, st.rows[-1], phases, pi, n_epochs, cfg.method, model, ir, vi_y)
                    st.position = f"the end of phase {phase!r} epoch {ep + 1}/{n_epochs}"
                    if stop.requested:
                        raise KeyboardInterrupt("saved")
                epoch_offset += n_epochs
                save_snapshots(runtime.unwrap(model), ir, vi_y, phase, out_dir, enabled=main)
    except KeyboardInterrupt as exc:
        if main:
            _say_interrupted(console, str(exc) == "saved", st.position, out_dir)
        raise
    except torch.cuda.OutOfMemoryError as exc:
        raise runtime.oom_error(
            exc, f"training {cfg.method} in {st.position} on {device} (crop {cfg.crop_size}, {world} "
            f"process(es); {last_path} keeps the last completed epoch)", "fusion_train.batch_size",
            cfg.batch_size) from exc
    finally:
        tb.close()
        if bar is not None:
            bar.stop()
        for p in model.parameters():
            p.requires_grad_(True)

    if main:
        _finish(cfg, model, init_kwargs, phases, st, out_dir, console)
    if world > 1:
        torch.distributed.barrier()
    return final_path


def _already_complete(ckpt, final_path: Path, main: bool, console) -> bool:
    """A resumed run whose checkpoint is marked complete has nothing left to train: (re)write
    ``final.pt`` if it is missing, say so, and return True."""
    if ckpt is None or not ckpt.get("complete"):
        return False
    if main and not final_path.exists():
        runtime.save_checkpoint(final_path, _final_payload(ckpt))
    console.print(f"training in {final_path.parent} is already complete: {final_path}")
    return True


def _announce(cfg: FusionTrainConfig, out_dir: Path, console, n_pairs: int, world: int, device: torch.device,
              precision: dict, steps_per_epoch: int, phases) -> None:
    """Write the resolved ``config.yaml`` and say in one line what is trained, on what, how."""
    out_dir.mkdir(parents=True, exist_ok=True)
    import yaml
    atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    console.print(f"training {cfg.method} on {n_pairs} pairs, {world} process(es) on {device}, "
                  f"global batch {cfg.batch_size}, {precision['precision']}, {steps_per_epoch} steps/epoch, phases "
                  + ", ".join(f"{p} x{n}" for p, n in phases) + f" -> {out_dir}")


def _run_epoch(cfg: FusionTrainConfig, model: nn.Module, tools, loader, st: _State, stop: runtime.StopRequest,
               save, bar, task, pi: int, phase: str, ep: int, n_epochs: int, step0: int, steps_per_epoch: int,
               device: torch.device, world: int, channels_last: bool, last_path: Path):
    """The optimiser steps of epoch ``ep`` of phase ``pi`` from ``step0`` on (forward, check, backward,
    schedule); a stop request saves the exact position and raises KeyboardInterrupt. ``tools``:
    (opt, sched, scaler, loss_fn) of :func:`_setup_phase`. Returns (the epoch's sums, the last batch)."""
    opt, sched, scaler, loss_fn = tools
    acc = EpochAcc.resume(st.epoch_acc if step0 > 0 else None)
    st.epoch_acc = None
    if bar is not None:
        bar.update(task, description=f"{phase} {ep + 1}/{n_epochs}")
        if step0:
            bar.advance(task, step0)
    ir = vi_y = None
    batches = iter(loader)
    for step in range(step0, steps_per_epoch):
        st.position = (f"phase {phase!r}, epoch {ep + 1}/{n_epochs}, "
                       f"step {step + 1}/{steps_per_epoch}")
        ir, vi_y, *extras = _to_device(next(batches), device, channels_last)
        opt.zero_grad(set_to_none=True)
        with runtime.autocast(device, cfg.amp):
            loss, comps = loss_fn(ir, vi_y, phase, *extras)
        comps = {k: float(v) for k, v in comps.items()}
        if _check_step(loss, comps, stop, world, st.position, st.global_step, cfg, last_path):
            acc.pause()
            save(last_path, pi, ep, step, opt, sched, scaler, acc.state())
            st.position = (f"phase {phase!r}, epoch {ep + 1}/{n_epochs}, "
                           f"step {step}/{steps_per_epoch}")
            raise KeyboardInterrupt("saved")
        scaler.scale(loss).backward()
        if cfg.grad_clip is not None:
            norm = _clip_gradients(opt, scaler, cfg.grad_clip)
            if math.isfinite(norm):   # not: an fp16 overflow, whose step the scaler skips
                comps["grad_norm"] = norm
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
                bar.update(task, info=f"{format_components(comps)} | loss {float(loss.detach()):.4g} | "
                                      f"{acc.rate(step + 1 - step0, cfg.batch_size):.1f} img/s")
    return acc, ir, vi_y


def _say_interrupted(console, saved: bool, position: str, out_dir: Path) -> None:
    """Ctrl-C: what the last checkpoint holds, and the command that resumes."""
    last_path = out_dir / "last.pt"
    what = (f"saved {last_path} at {position}" if saved else
            f"{last_path} holds the last completed epoch" if last_path.exists()
            else "no checkpoint was written yet")
    console.print(f"[yellow]interrupted:[/] {what}. Resume with: fuseseg train-fusion "
                  f"{out_dir / 'config.yaml'} --out {out_dir} --resume")


def _finish(cfg: FusionTrainConfig, model: nn.Module, init_kwargs, phases, st: _State, out_dir: Path,
            console) -> None:
    """The complete run's checkpoints (``last.pt`` marked complete, ``final.pt``) and its verdict."""
    last_path, final_path = out_dir / "last.pt", out_dir / "final.pt"
    final = _payload(cfg, model, init_kwargs, phases, st, len(phases) - 1,
                     phases[-1][1] if phases else 0, 0)
    final["complete"] = True
    final["verdict"] = verdict(st.rows)
    runtime.save_checkpoint(last_path, final)
    runtime.save_checkpoint(final_path, _final_payload(final))
    report_verdict(final["verdict"], out_dir, console)
    console.print(f"done: {final_path}")


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
                 last_path: Path, prepare=None) -> tuple[nn.Module, dict]:
    """The seeded model on ``device`` (weights from ``ckpt`` when resuming, else from
    ``init_checkpoint`` when given), ``prepare(model, device)`` applied, and its init kwargs."""
    runtime.seed_everything(cfg.seed)
    model = create_method(cfg.method, **cfg.method_kwargs)
    _check_trainable(model, cfg.method)
    model.to(device)
    if runtime.precision_record(device, cfg.amp, cfg.channels_last)["channels_last"]:
        model.to(memory_format=torch.channels_last)
    if ckpt is not None:
        runtime.load_state_dict_checked(model, ckpt["state_dict"], last_path)
    elif cfg.init_checkpoint:
        _load_init(model, cfg)
    if prepare is not None:
        prepare(model, device)
    return model, dict(getattr(model, "init_kwargs", cfg.method_kwargs))


def _load_init(model: nn.Module, cfg: FusionTrainConfig) -> None:
    """Start from the weights of ``cfg.init_checkpoint`` (a fusion checkpoint of the same method;
    ``pretrained``: the shipped ones). Only the weights are taken, not the optimiser or position."""
    from fusion.pretrained import resolve_checkpoint

    path = resolve_checkpoint(cfg.init_checkpoint, cfg.method)
    ck = runtime.load_checkpoint(path, expect={"kind": "fusion", "method": cfg.method})
    runtime.load_state_dict_checked(model, ck["state_dict"], path)


def _build_data(cfg: FusionTrainConfig, out_dir: Path, device: torch.device, rank: int, world: int,
                extras: tuple[str, ...] = ()):
    """(dataset, sampler, loader, steps_per_epoch) of the training pairs (with the method's
    ``extras``, e.g. labels)."""
    dataset = PairDataset(resolve_pairs(cfg, out_dir), crop=cfg.crop_size, train=True, ir16=cfg.ir16,
                          cache=cfg.cache_images, seed=cfg.seed, vflip=cfg.vflip,
                          photometric=cfg.photometric_range(), extras=extras)
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
    position: str = "before the first epoch"   # for messages only (not checkpointed)
    pace: EpochPace = field(default_factory=lambda: EpochPace("fusion training"))   # not checkpointed

    def end_epoch(self, row: dict) -> None:
        """Log the epoch's row; between epochs, re-decide the torch threads for the machine's load
        and warn once if the epoch's images/s collapsed (fuseseg.threads.EpochPace)."""
        self.rows.append(row)
        self.pace.epoch_done(float(row["images_per_s"]), f"{row['phase']} {row['epoch']}")

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
            "config": config_to_dict(cfg), "schedule": [[p, n] for p, n in phases],
            "phase": phases[pi][0] if pi < len(phases) else None,
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


def _to_device(batch, device: torch.device, channels_last: bool) -> list[torch.Tensor]:
    """The batch's tensors on ``device``; the 4-D ones (images) channels-last when asked."""
    out = [x.to(device, non_blocking=True) for x in batch]
    if channels_last:
        out = [x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in out]
    return out


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
            f"step {global_step + 1}); loss components: {format_components(comps) or '(none)'}. The last good "
            f"checkpoint is kept: {last_path} ({'none yet' if not last_path.exists() else 'end of the last completed epoch'}). "
            f"Lower lr (now {cfg.lr:g}) or set amp=off, then retrain or resume with --resume.")
    return stop_now


def _clip_gradients(opt: torch.optim.Optimizer, scaler, max_norm: float) -> float:
    """Clip the (unscaled) gradients of ``opt``'s parameters to global L2 norm ``max_norm``; the
    norm before clipping (inf / nan when a gradient is not finite: the scaler then skips the step)."""
    scaler.unscale_(opt)
    params = [p for group in opt.param_groups for p in group["params"] if p.grad is not None]
    return float(torch.nn.utils.clip_grad_norm_(params, max_norm))


def keep_epoch(out_dir: Path, payload: dict, phase: str, epoch: int) -> Path:
    """Keep the weights at the end of ``phase`` epoch ``epoch`` as ``OUT/epochs/<phase>-<epoch>.pt``:
    a self-describing weights checkpoint (as final.pt, with the log so far), usable as a fusion
    ``checkpoint:`` or ``init_checkpoint``. Returns its path."""
    path = out_dir / "epochs" / f"{phase}-{epoch:04d}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    runtime.save_checkpoint(path, _final_payload(payload))
    return path


def _final_payload(ckpt: dict) -> dict:
    """The trained model's checkpoint: self-describing, without optimiser/scheduler state."""
    keep = ("kind", "method", "kwargs", "config", "schedule", "phase", "phase_index", "epoch", "global_step",
            "state_dict", "log", "versions", "verdict", "precision")
    out = {k: ckpt[k] for k in keep if k in ckpt}
    out["complete"] = True
    return out
