"""Training DeepLabV3+ under the paper's protocol (flat loop).

Protocol (spec, "Downstream segmentation protocol"): Dice + CE (255 ignored), SGD (momentum 0.9,
weight decay 1e-4), lr 7e-3 with cosine decay over the whole run (per optimiser step, down to
``min_lr``), a first phase of ``frozen_epochs`` with the encoder frozen at ``frozen_batch_size``,
then everything trainable at ``batch_size``.

Frozen means: encoder parameters ``requires_grad=False`` **and** the encoder (BatchNorm) in eval
mode, so neither its weights nor its running statistics change; the optimiser then holds only
the decoder and head. At the switch the optimiser is rebuilt over all parameters, the decoder's
momentum buffers carried over, and the lr continues on the same cosine curve.

Outputs in ``out_dir``: ``config.yaml`` (resolved settings), ``log.csv`` (one row per epoch),
``last.pt`` (after every epoch, atomic) and ``final.pt``. A checkpoint is self-describing:
``{kind: "segmentation", arch, kwargs, config, epoch, step_in_epoch, phase, global_step,
state_dict, optimizer, scheduler, scaler, rng, sampler, epoch_acc, normalisation, class_names,
data, val_confusion}`` (``epoch``: completed epochs; ``step_in_epoch`` > 0 only after Ctrl-C).
``resume=True`` continues from ``last.pt``; on CPU the result equals an uninterrupted run
(sampling and augmentation are pure functions of (seed, epoch, index); RNG states are restored).

Ctrl-C (SIGINT) stops at the next training step: before that step's forward pass (so neither
BatchNorm running statistics nor the dropout RNG have moved) ``last.pt`` is written for the exact
position -- ``epoch`` (completed epochs), ``step_in_epoch``, optimiser, scheduler, RNG states,
``sampler`` position and the epoch's partial loss sums -- the resume command is printed, and
KeyboardInterrupt is re-raised. A second Ctrl-C stops at once (the previous ``last.pt`` is
kept). Loader workers ignore SIGINT, so Ctrl-C in a terminal reaches only the training loop.

Distributed (``torchrun --nproc_per_node=K``, WORLD_SIZE > 1): the model is wrapped in
DistributedDataParallel (gradients averaged over processes), the data are sharded by
DistributedSampler, ``batch_size`` / ``frozen_batch_size`` are the **global** batch, as for the
fusion trainer (each process takes batch_size / K of it, so K must divide it; steps per epoch =
floor(floor(N / K) / (batch_size / K))), and only rank 0 writes
files and prints. BatchNorm: on CUDA every BatchNorm layer (timm's BatchNormAct2d included) is
converted to a synchronised one (:func:`to_sync_batchnorm`, NCCL), so the batch statistics are
those of the global batch, as in one process. On CPU (gloo) PyTorch's SyncBatchNorm is
unsupported, so there the statistics -- and the running statistics each rank keeps -- are per
process; parameters stay identical on every rank, and checkpoints hold rank 0's buffers. Even with
synchronised BatchNorm, K processes equal one process on the global batch only up to the loss:
the Dice term is a ratio of sums over each process's batch, the CE term a mean over each
process's non-ignored pixels, and the ASPP dropout masks are drawn per process. With BatchNorm and
dropout in eval mode, CE only and crops without ignored pixels, they are equal up to float
rounding (tests/test_segmentation_ddp.py).
"""
from __future__ import annotations

import csv
import io
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, TextColumn
from torch.utils.data import DataLoader, DistributedSampler

from fuseseg.data.io import atomic_write_text
from fuseseg.errors import CheckpointError, ConfigError, DataError, FusesegError
from fuseseg.progress import epoch_line, make_progress
from fuseseg.runtime import (
    OOMGuard,
    StopRequest,
    autocast,
    get_rng_state,
    init_distributed,
    load_checkpoint,
    load_state_dict_checked,
    needs_grad_scaler,
    precision_record,
    resolve_device,
    save_checkpoint,
    seed_everything,
    set_rng_state,
    to_memory_format,
    unwrap,
)
from fuseseg.tblog import TrainingLog
from fuseseg.threads import EpochPace
from segmentation.config import SegConfig
from segmentation.data import LabelledFolder, build_train_transform, sample_seed
from segmentation.evaluate import class_names, distributed_confusion
from segmentation.losses import DiceCELoss
from segmentation.metrics import miou
from segmentation.model import ARCH, build_model, set_phase, train_mode, trainable_parameters

LOG_FIELDS = ["epoch", "phase", "steps", "lr", "loss", "ce", "dice", "val_miou", "images_per_s",
              "seconds"]
# Settings that may differ between a run and its resumption (they do not change the result).
RUNTIME_KEYS = {"device", "workers", "val_every"}


def cosine_lr(step: int, total_steps: int, lr: float, min_lr: float = 0.0) -> float:
    """``min_lr + (lr - min_lr) * (1 + cos(pi * step / total_steps)) / 2`` (step 0 -> lr,
    step total_steps -> min_lr)."""
    t = min(max(step, 0), total_steps) / max(total_steps, 1)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * t))


def phase_of(epoch: int, cfg: SegConfig) -> str:
    """``'frozen'`` for the first ``cfg.frozen_epochs`` epochs (0-based ``epoch``), else ``'full'``."""
    return "frozen" if epoch < cfg.frozen_epochs else "full"


def batch_size_of(phase: str, cfg: SegConfig) -> int:
    """The global batch of ``phase`` (the config's value)."""
    return cfg.frozen_batch_size if phase == "frozen" else cfg.batch_size


def per_process_batch(phase: str, cfg: SegConfig, world: int, device: torch.device) -> int:
    """Each of ``world`` processes' share of the global batch of ``phase``; ConfigError when the
    processes cannot split it evenly (or, off CUDA, into at least 2 samples each: the ASPP
    image-pooling BatchNorm needs 2 and is synchronised only on CUDA)."""
    key = "frozen_batch_size" if phase == "frozen" else "batch_size"
    total = batch_size_of(phase, cfg)
    need = 1 if device.type == "cuda" else 2
    if total % world or total // world < need:
        raise ConfigError(f"segmentation.{key}={total} is the global batch; {world} processes need a multiple "
                          f"of {world} of at least {need * world} (e.g. {key}={max(need, -(-total // world)) * world}).")
    return total // world


def steps_per_epoch(n_images: int, batch_size: int, world: int, cap: int | None) -> int:
    """Optimiser steps per epoch: ``floor(floor(n / world) / batch)`` (incomplete batches are
    dropped: BatchNorm in the ASPP pooling branch needs >= 2 samples), capped at ``cap``."""
    steps = (n_images // world) // batch_size
    if steps == 0:
        raise DataError(f"{n_images} training image(s) are too few for a batch of {batch_size} "
                        f"on {world} process(es). Add images or lower batch_size / "
                        "frozen_batch_size (minimum 2).")
    return min(steps, cap) if cap else steps


def fused_sgd_supported(params: list[torch.nn.Parameter]) -> bool:
    """True when every parameter is a floating-point tensor on a CPU or CUDA device, where torch's
    fused SGD kernel exists (one pass over each parameter instead of 3-4 elementwise ops: measured
    #13, 5.4M parameters on 1 CPU thread: 13.3 ms -> 4.2 ms per step, about 7 % of a training step)."""
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_optimizer(model: torch.nn.Module, cfg: SegConfig,
                    previous: torch.optim.Optimizer | None = None) -> torch.optim.SGD:
    """SGD (momentum, weight decay; the fused kernel where :func:`fused_sgd_supported`) over the
    parameters that currently require grad; the momentum buffers of parameters also held by
    ``previous`` are carried over (phase switch)."""
    params = trainable_parameters(model)
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                          fused=fused_sgd_supported(params) or None)
    if previous is not None:
        carried = [p for p in params if p in previous.state]
        for p in carried:
            opt.state[p] = previous.state[p]
        if carried and opt.param_groups[0].get("fused"):
            # the fused kernel takes every buffer or none; a zero buffer gives the same first step
            # as a missing one (buf = momentum*0 + grad = grad, no dampening)
            for p in params:
                if p not in previous.state:
                    opt.state[p] = {"momentum_buffer": torch.zeros_like(p, memory_format=torch.preserve_format)}
    return opt


def restore_optimizer(model: torch.nn.Module, cfg: SegConfig, state: dict) -> torch.optim.SGD:
    """:func:`build_optimizer` with a checkpoint's optimizer ``state`` loaded (momentum buffers,
    lr); the kernel choice stays this machine's (a checkpoint written unfused resumes fused)."""
    optimizer = build_optimizer(model, cfg)
    fused = [g.get("fused") for g in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for g, f in zip(optimizer.param_groups, fused, strict=True):
        g["fused"] = f
    return optimizer


def _write_log(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LOG_FIELDS)
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _read_log(path: Path, upto_epoch: int) -> list[dict]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("epoch") and int(r["epoch"]) <= upto_epoch]


def _progress(enabled: bool) -> Progress:
    return make_progress(TextColumn("loss {task.fields[loss]:.4f}  lr {task.fields[lr]:.2e}"),
                         disable=not enabled)


def _check_resume_config(cfg: SegConfig, saved: dict, path: Path) -> None:
    now = {k: v for k, v in cfg.to_dict().items() if k not in RUNTIME_KEYS}
    old = {k: v for k, v in SegConfig.from_saved(saved).to_dict().items() if k not in RUNTIME_KEYS}
    diff = [f"{k}: {old[k]!r} -> {now[k]!r}" for k in now if now[k] != old.get(k)]
    if diff:
        raise CheckpointError(f"cannot resume {path}: the settings differ from the run's "
                              f"({'; '.join(diff)}). Resume with the original settings (see "
                              f"{path.parent / 'config.yaml'}) or start a new run in another folder.")


def to_sync_batchnorm(model: torch.nn.Module) -> torch.nn.Module:
    """Replace every BatchNorm layer of ``model`` by its synchronised variant (in place where
    possible; use the return value). timm's ``BatchNormAct2d`` (BatchNorm + activation in one
    module, used by the ``tu-`` encoders) becomes ``SyncBatchNormAct`` with the same activation:
    ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` would turn it into a plain SyncBatchNorm and
    silently drop the activation. Parameters and buffers are the same tensors, so state-dict keys
    and values are unchanged. In eval mode, or without an initialised process group, the layers
    compute exactly what the originals do; synchronisation (train mode, WORLD_SIZE > 1) needs
    CUDA tensors."""
    from timm.layers import convert_sync_batchnorm

    return convert_sync_batchnorm(model)


def _loader_worker_init(worker_id: int) -> None:
    """DataLoader workers ignore SIGINT: Ctrl-C in a terminal signals the whole process group,
    and only the training loop should react (it stops at the next step)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _resume_hint(images_dir, labels_dir, out_dir: Path, val_images_dir, val_labels_dir) -> str:
    cmd = f"fuseseg segment train --images {images_dir} --labels {labels_dir} --out {out_dir}"
    if val_images_dir is not None:
        cmd += f" --val-images {val_images_dir} --val-labels {val_labels_dir}"
    return cmd + " --resume"


@dataclass
class _Run:
    """What the steps of one training share: the data, the model and its optimiser, where the
    training stands (``global_step``, ``phase``), and the last checkpoint's contents."""

    cfg: SegConfig
    device: torch.device
    rank: int
    world: int
    images_dir: Path | str
    labels_dir: Path | str
    train_ds: LabelledFolder
    val_ds: LabelledFolder | None
    per_batch: dict[str, int]              # this process's share of each phase's global batch
    n_steps: dict[str, int]                # optimiser steps per epoch of each phase
    total_steps: int
    model: torch.nn.Module
    precision: dict
    criterion: DiceCELoss
    scaler: torch.amp.GradScaler
    optimizer: torch.optim.SGD | None = None
    phase: str | None = None
    net: torch.nn.Module | None = None     # the model, wrapped in DDP when world > 1
    start_epoch: int = 0
    start_step: int = 0                    # steps of start_epoch already done (a run resumed after Ctrl-C)
    global_step: int = 0
    rows: list[dict] = field(default_factory=list)   # log.csv
    epoch_acc: dict | None = None          # the interrupted epoch's partial loss sums
    payload: dict | None = None            # the last checkpoint written (or resumed from)
    position: str = "before the first step"
    pace: EpochPace = field(default_factory=lambda: EpochPace("segmentation training"))   # threads, collapse warning

    @property
    def main(self) -> bool:
        return self.rank == 0


def train_segmenter(images_dir: Path | str, labels_dir: Path | str, cfg: SegConfig,
                    out_dir: Path | str, resume: bool = False, progress: bool = True,
                    val_images_dir: Path | str | None = None,
                    val_labels_dir: Path | str | None = None, tensorboard: bool = False) -> Path:
    """Train DeepLabV3+ on a labelled folder; returns the path of ``out_dir/final.pt``.

    ``images_dir``/``labels_dir``: images (grey or RGB) and class-id labels paired by stem.
    ``val_*_dir``: an optional labelled folder validated every ``cfg.val_every`` epochs (and
    after the last), mIoU under ``cfg.miou_convention`` logged. Under torchrun, data are
    sharded with DistributedSampler, ``batch_size`` is the global batch, BatchNorm is synchronised on
    CUDA, validation confusion matrices are summed over ranks, and only rank 0 writes files (see
    the module docstring). Ctrl-C saves the exact position and raises KeyboardInterrupt.
    ``tensorboard``: also log each epoch's losses, lr, images/s and validation mIoU to
    ``out_dir/tensorboard/`` (:mod:`fuseseg.tblog`)."""
    out_dir = Path(out_dir)
    device = resolve_device(cfg.device)
    rank, world = init_distributed(device)
    main = rank == 0
    console = Console(stderr=True, quiet=not main)
    last_path, final_path, log_path = out_dir / "last.pt", out_dir / "final.pt", out_dir / "log.csv"
    if not resume and last_path.exists():
        raise ConfigError(f"{out_dir} already holds a segmentation run ({last_path.name}). Pass "
                          "--resume to continue it, or choose another output folder.")
    if resume and not last_path.exists():
        raise CheckpointError(f"nothing to resume: {last_path} does not exist. Run without "
                              "--resume to start training.")

    seed_everything(cfg.seed)
    run = _setup(cfg, device, rank, world, images_dir, labels_dir, val_images_dir, val_labels_dir)
    if resume:
        _restore(run, last_path, log_path)
    elif main:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out_dir / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))

    oom = OOMGuard("training the segmenter", "segmentation.batch_size", cfg.batch_size)
    stop = StopRequest()
    tb = TrainingLog(out_dir, tensorboard and main, purge_step=run.start_epoch + 1)
    try:
        with _progress(progress and main) as bar, oom, stop:
            task = bar.add_task("segmentation", total=run.total_steps, completed=run.global_step,
                                loss=float("nan"),
                                lr=cosine_lr(run.global_step, run.total_steps, cfg.lr, cfg.min_lr))
            for epoch in range(run.start_epoch, cfg.epochs):
                sums, seconds = _train_epoch(run, epoch, oom, stop, bar, task, last_path)
                _end_epoch(run, epoch, sums, seconds, progress, bar, task, tb, log_path, last_path)
    except KeyboardInterrupt as exc:
        if main:
            what = (f"saved {last_path} at {run.position}" if str(exc) == "saved" else
                    f"{last_path} holds the last completed epoch" if last_path.exists()
                    else "no checkpoint was written yet")
            hint = _resume_hint(images_dir, labels_dir, out_dir, val_images_dir, val_labels_dir)
            console.print(f"[yellow]interrupted:[/] {escape(what)}. Resume with: {escape(hint)}",
                          highlight=False, soft_wrap=True)
        raise
    finally:
        tb.close()
    if main and run.payload is not None and (not final_path.exists() or run.start_epoch < cfg.epochs):
        save_checkpoint(final_path, run.payload)
    if world > 1:
        torch.distributed.barrier()
    return final_path


def _setup(cfg: SegConfig, device: torch.device, rank: int, world: int, images_dir, labels_dir,
           val_images_dir, val_labels_dir) -> _Run:
    """The data sets, the schedule (steps per epoch of each phase) and the model, loss and scaler."""
    train_ds = LabelledFolder(images_dir, labels_dir, cfg.num_classes,
                              build_train_transform(cfg.crop_size, cfg.scale_range, cfg.hflip),
                              cfg.normalisation, cfg.in_channels, cfg.seed)
    train_ds.check_all()
    val_ds = None
    if (val_images_dir is None) != (val_labels_dir is None):
        raise ConfigError("validation needs both val_images_dir and val_labels_dir (or neither).")
    if val_images_dir is not None:
        val_ds = LabelledFolder(val_images_dir, val_labels_dir, cfg.num_classes, None,
                                cfg.normalisation, cfg.in_channels)
    phases = ("frozen", "full") if cfg.frozen_epochs else ("full",)
    per_batch = {ph: per_process_batch(ph, cfg, world, device) for ph in phases}
    n_steps = {ph: steps_per_epoch(len(train_ds), per_batch[ph], world, cfg.max_steps_per_epoch)
               for ph in phases}
    total_steps = sum(n_steps[phase_of(e, cfg)] for e in range(cfg.epochs))

    model = build_model(cfg.model_kwargs(), cfg.encoder_weights)
    if world > 1 and device.type == "cuda":
        model = to_sync_batchnorm(model)  # statistics over the global batch (module docstring)
    model = model.to(device)
    precision = precision_record(device, cfg.amp)
    if precision["channels_last"]:
        model = model.to(memory_format=torch.channels_last)
    criterion = DiceCELoss(cfg.ce_weight, cfg.dice_weight)
    scaler = torch.amp.GradScaler(device.type, enabled=needs_grad_scaler(device, cfg.amp))
    return _Run(cfg, device, rank, world, images_dir, labels_dir, train_ds, val_ds, per_batch, n_steps,
                total_steps, model, precision, criterion, scaler)


def _restore(run: _Run, last_path: Path, log_path: Path) -> None:
    """Continue from ``last.pt``: weights, phase, optimiser, scaler, position, RNG states, log rows."""
    cfg, world = run.cfg, run.world
    ckpt = load_checkpoint(last_path, expect={"kind": "segmentation", "arch": ARCH})
    _check_resume_config(cfg, ckpt["config"], last_path)
    load_state_dict_checked(run.model, ckpt["state_dict"], last_path)
    run.phase = ckpt["phase"]
    set_phase(run.model, run.phase)
    run.optimizer = restore_optimizer(run.model, cfg, ckpt["optimizer"])
    if ckpt.get("scaler"):
        run.scaler.load_state_dict(ckpt["scaler"])
    run.start_epoch, run.global_step = int(ckpt["epoch"]), int(ckpt["global_step"])
    run.start_step, run.epoch_acc = int(ckpt.get("step_in_epoch", 0)), ckpt.get("epoch_acc")
    saved_world = int(ckpt.get("sampler", {}).get("world", world))
    if run.start_step and saved_world != world:
        raise CheckpointError(f"cannot resume {last_path}: it was interrupted inside epoch "
                              f"{run.start_epoch + 1} of a run on {saved_world} process(es), and the "
                              f"data order within an epoch depends on that number (now {world}). "
                              f"Resume with {saved_world} process(es).")
    set_rng_state(ckpt["rng"])
    run.rows = _read_log(log_path, run.start_epoch)
    run.payload = ckpt


def _payload(run: _Run, epoch_done: int, step_in_epoch: int, phase: str, bs: int, acc: dict | None,
             val_cm: torch.Tensor | None) -> dict:
    """Checkpoint of the position "``epoch_done`` epochs and ``step_in_epoch`` steps of the
    next one are done" (``step_in_epoch`` 0: an epoch boundary)."""
    cfg = run.cfg
    return {
        "kind": "segmentation", "arch": ARCH, "kwargs": cfg.model_kwargs(),
        "config": cfg.to_dict(), "epoch": epoch_done, "step_in_epoch": step_in_epoch,
        "phase": phase, "global_step": run.global_step, "state_dict": unwrap(run.model).state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": {"type": "cosine", "lr": cfg.lr, "min_lr": cfg.min_lr,
                      "total_steps": run.total_steps, "step": run.global_step},
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
        "rng": get_rng_state(),
        "sampler": {"type": "DistributedSampler", "seed": cfg.seed, "epoch": epoch_done,
                    "start_batch": step_in_epoch, "batch_size": bs, "world": run.world},
        "epoch_acc": acc, "normalisation": cfg.normalisation,
        "class_names": class_names(cfg.num_classes),
        "data": {"images": str(run.images_dir), "labels": str(run.labels_dir)},
        "val_confusion": None if val_cm is None else val_cm.cpu().numpy().astype(np.int64),
        "precision": run.precision,
    }


def _epoch_loader(run: _Run, epoch: int, phase: str, step0: int) -> DataLoader:
    """This process's batches of the epoch's remaining steps (a resumed epoch skips the first
    ``step0`` batches; the order itself depends only on (seed, epoch))."""
    cfg, bs = run.cfg, run.per_batch[phase]
    run.train_ds.set_epoch(epoch)
    sampler = DistributedSampler(run.train_ds, num_replicas=run.world, rank=run.rank, shuffle=True,
                                 seed=cfg.seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = list(sampler)[step0 * bs:run.n_steps[phase] * bs]
    gen = torch.Generator().manual_seed(sample_seed(cfg.seed, epoch, 1))
    return DataLoader(run.train_ds, batch_size=bs, sampler=order, num_workers=cfg.workers,
                      drop_last=True, pin_memory=run.device.type == "cuda", generator=gen,
                      worker_init_fn=_loader_worker_init)


def _train_epoch(run: _Run, epoch: int, oom: OOMGuard, stop: StopRequest, bar: Progress, task,
                 last_path: Path) -> tuple[torch.Tensor, float]:
    """One epoch of optimiser steps; returns the all-ranks sums (loss, ce, dice, steps) and its seconds.
    Ctrl-C (``stop``) saves the exact position before a step's forward pass and raises KeyboardInterrupt."""
    cfg, model, device, world = run.cfg, run.model, run.device, run.world
    phase = phase_of(epoch, cfg)
    if phase != run.phase:
        set_phase(model, phase)
        run.optimizer = build_optimizer(model, cfg, run.optimizer)
        run.phase = phase
        run.net = model
    if run.net is None:
        run.net = model
    if world > 1 and run.net is model:  # (re)wrap: DDP registers the trainable parameters
        run.net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    bs = run.per_batch[phase]   # this process's share of the global batch
    oom.where = (f"training the segmenter (epoch {epoch + 1}, phase {phase}, crop "
                 f"{cfg.crop_size}, on {device})")
    oom.key, oom.value = ("segmentation.frozen_batch_size" if phase == "frozen" else
                          "segmentation.batch_size"), batch_size_of(phase, cfg)
    step0 = run.start_step if epoch == run.start_epoch else 0
    loader = _epoch_loader(run, epoch, phase, step0)
    bar.update(task, description=f"seg {phase} {epoch + 1}/{cfg.epochs}")
    train_mode(model)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, ce, dice, steps
    done_before = 0.0
    if step0 and run.epoch_acc is not None:
        done_before = float(run.epoch_acc["seconds"])
        if run.main:  # rank 0 carries the all-ranks sums of the interrupted part
            sums += torch.tensor(run.epoch_acc["sums"], dtype=torch.float64, device=device)
    run.epoch_acc = None
    t0 = time.perf_counter() - done_before
    for step, (x, y) in enumerate(loader, start=step0):
        run.position = f"epoch {epoch + 1}/{cfg.epochs}, step {step}/{run.n_steps[phase]} done"
        if stop.agreed(device, world):  # before the forward: BN stats, RNG untouched
            if world > 1:
                torch.distributed.all_reduce(sums)
            acc = {"sums": sums.tolist(), "seconds": time.perf_counter() - t0}
            if run.main:
                save_checkpoint(last_path, _payload(run, epoch, step, phase, bs, acc, None))
            raise KeyboardInterrupt("saved")
        lr = cosine_lr(run.global_step, run.total_steps, cfg.lr, cfg.min_lr)
        loss, ce, dice = _step(run, x, y, lr, epoch, step, phase, last_path)
        sums += torch.stack([loss.detach().double(), ce.double(), dice.double(),
                             torch.ones((), dtype=torch.float64, device=device)])
        bar.update(task, advance=1, loss=float(loss.detach()), lr=lr)
    seconds = time.perf_counter() - t0
    if world > 1:
        torch.distributed.all_reduce(sums)
    return sums, seconds


def _step(run: _Run, x: torch.Tensor, y: torch.Tensor, lr: float, epoch: int, step: int, phase: str,
          last_path: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimiser step at learning rate ``lr``; a non-finite loss (on any rank) stops the run."""
    cfg, device = run.cfg, run.device
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    x = to_memory_format(x.to(device, non_blocking=True), run.precision["channels_last"])
    y = y.to(device, non_blocking=True)
    with autocast(device, cfg.amp):
        logits = run.net(x)
    loss, ce, dice = run.criterion(logits, y)
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if run.world > 1:  # every rank stops together (no rank left waiting in backward)
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if bad.item():
        shown = (loss.item() if not torch.isfinite(loss.detach())
                 else "non-finite on another process")
        raise FusesegError(
            f"segmentation loss is {shown} at epoch {epoch + 1}, step {step + 1} "
            f"(global step {run.global_step + 1}, lr {lr:.3g}, phase {phase}; loss "
            f"components: ce {float(ce):.4g}, dice {float(dice):.4g}). Lower lr, "
            "set amp=off, or check this data's images and labels; "
            f"`--resume` restarts from the last good checkpoint {last_path}.")
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.global_step += 1
    return loss, ce, dice


def _end_epoch(run: _Run, epoch: int, sums: torch.Tensor, seconds: float, progress: bool, bar: Progress,
               task, tb: TrainingLog, log_path: Path, last_path: Path) -> None:
    """Validate when due; rank 0 logs the epoch (log.csv, TensorBoard, one line) and writes last.pt."""
    cfg, world, phase = run.cfg, run.world, run.phase
    bs = run.per_batch[phase]
    mean = (sums[:3] / sums[3].clamp_min(1)).tolist()
    images_per_s = float(sums[3].item()) * bs / max(seconds, 1e-9)  # all ranks' images
    lr = cosine_lr(run.global_step - 1, run.total_steps, cfg.lr, cfg.min_lr)  # the epoch's last step

    val_cm, val_miou = None, None
    last_epoch = epoch + 1 == cfg.epochs
    if run.val_ds is not None and cfg.val_every and ((epoch + 1) % cfg.val_every == 0 or last_epoch):
        val_cm = distributed_confusion(run.model, run.val_ds, run.device, cfg.amp, progress=progress)
        val_miou = miou(val_cm, cfg.miou_convention)

    run.position = f"the end of epoch {epoch + 1}/{cfg.epochs}"
    run.pace.epoch_done(images_per_s, epoch + 1)   # between epochs: threads for the load; warn on a collapse
    if run.main:
        run.rows.append({"epoch": epoch + 1, "phase": phase, "steps": int(sums[3].item()) // world,
                         "lr": f"{lr:.6g}", "loss": f"{mean[0]:.6f}", "ce": f"{mean[1]:.6f}",
                         "dice": f"{mean[2]:.6f}",
                         "val_miou": "" if val_miou is None else f"{val_miou:.6f}",
                         "images_per_s": f"{images_per_s:.3f}", "seconds": f"{seconds:.3f}"})
        _write_log(log_path, run.rows)
        tb.scalars(epoch + 1, {"loss/total": mean[0], "loss/ce": mean[1], "loss/dice": mean[2],
                               "lr": lr, "images_per_s": images_per_s, "val_miou": val_miou})
        epoch_line(bar, task, f"segment epoch {epoch + 1}/{cfg.epochs} ({phase}): loss {mean[0]:.4g} "
                   f"ce {mean[1]:.4g} dice {mean[2]:.4g} lr {lr:.3g} {images_per_s:.1f} img/s"
                   + ("" if val_miou is None else f" val_miou {val_miou:.4f}"),
                   eta_s=seconds * (cfg.epochs - epoch - 1))
        run.payload = _payload(run, epoch + 1, 0, phase, bs, None, val_cm)
        save_checkpoint(last_path, run.payload)
