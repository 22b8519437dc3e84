"""Settings of the segmentation stage (DeepLabV3+ under the paper's protocol).

Loaded from YAML by ``pipelines.config.load_config(SegConfig, path, overrides)``; every field is
typed, unknown keys are rejected there. The defaults are a CPU-sized run; the paper's protocol
(Sec. 3.3) is ``encoder: resnet50, epochs: 340, frozen_epochs: 100, batch_size: 4,
frozen_batch_size: 8`` with the same optimiser settings.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

from fuseseg.errors import ConfigError

# Measured on 2 CPU cores (benchmarks/bench_segmentation.py): timm's MobileNetV3-small trains
# ~2.5x faster than resnet18 / mobilenet_v2 at 256x256 and infers ~2-3x faster at 480x640.
DEFAULT_ENCODER = "tu-mobilenetv3_small_100"
PAPER_ENCODER = "resnet50"


@dataclass
class SegConfig:
    """DeepLabV3+ training and evaluation settings.

    encoder: a segmentation-models-pytorch encoder name (``resnet18``, ``resnet50``,
        ``mobilenet_v2``, ``tu-<timm name>`` ...).
    encoder_weights: ``None`` (random init), ``"imagenet"`` (downloaded by smp/timm; needs the
        network) or a path to a local ``.pth`` file holding the encoder's state dict.
    normalisation: input scaling: ``"imagenet"`` (x/255 then ImageNet mean/std, fixed; never
        computed from the data) or ``"unit"`` (x/255 only).
    miou_convention: ``"all"`` (9 classes incl. unlabelled, the field's number) or
        ``"exclude_background"``.
    frozen_epochs: the first epochs train with the encoder frozen (weights fixed, its BatchNorm
        in eval mode) at ``frozen_batch_size``; the rest train everything at ``batch_size``.
    lr / min_lr: cosine decay per optimiser step from ``lr`` to ``min_lr`` over the whole run.
    crop_size: square training crop (multiple of the output stride); ``scale_range``: random
        rescale factors applied before padding/cropping.
    aspp_separable: the ASPP's three atrous 3x3 branches as depthwise + pointwise convolutions
        (True, as in smp and the DeepLabV3+ paper) or as plain convolutions (False). On small
        feature maps (a 128 crop at output stride 16 gives 8x8; rates 12/24/36 then reach only
        the padding beyond the centre tap) both compute a 1x1 projection, and on CPU the plain
        form trains faster (bf16 depthwise backward is slow; measured #13).
    val_every: validate every N epochs when a validation folder is given (0 = never).
    max_steps_per_epoch: cap on optimiser steps per epoch (tiny runs); None = full epochs.
    batch_size / frozen_batch_size: the **global** batch, as for the fusion trainer. Under
        ``torchrun --nproc_per_node=K`` each process takes ``batch_size / K`` images (K must divide
        it), so an epoch has ``floor(floor(N / K) / (batch_size / K))`` steps and the optimisation
        does not depend on K (up to BatchNorm statistics, see below). The paper's values are for
        one GPU.
    BatchNorm under DDP: on CUDA all BatchNorm layers are converted to SyncBatchNorm, so the
        batch statistics are those of the global batch, as in one process; on CPU (gloo) PyTorch
        does not support SyncBatchNorm, so statistics stay per process there (see
        ``segmentation.train``).
    """

    encoder: str = DEFAULT_ENCODER
    encoder_weights: str | None = None
    num_classes: int = 9   # label classes (MSRS: 9)
    in_channels: int = 3   # input channels: 3 (grey images repeated) or 1
    output_stride: Literal[8, 16] = 16   # DeepLabV3+ output stride
    decoder_channels: int = 256   # DeepLabV3+ decoder width
    aspp_separable: bool = True   # ASPP atrous branches depthwise-separable (smp's and DeepLabV3+'s); false: plain 3x3
    epochs: int = 30   # total epochs, frozen ones included
    frozen_epochs: int = 10
    batch_size: int = 4
    frozen_batch_size: int = 8
    lr: float = 7e-3
    min_lr: float = 7e-5
    momentum: float = 0.9   # SGD momentum
    weight_decay: float = 1e-4   # SGD weight decay
    dice_weight: float = 1.0   # weight of the Dice loss
    ce_weight: float = 1.0   # weight of the cross-entropy loss
    crop_size: int = 256
    scale_range: tuple[float, float] = (0.5, 2.0)   # random rescale factors before cropping
    hflip: bool = True   # random horizontal flips
    normalisation: Literal["imagenet", "unit"] = "imagenet"
    miou_convention: Literal["all", "exclude_background"] = "all"
    seed: int = 0   # seeds initialisation, augmentation and batch order
    device: str = "auto"   # auto | cpu | cuda | cuda:1 ...
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"   # mixed precision: auto | off (fp32) | bf16 | fp16
    workers: int = 2   # DataLoader worker processes
    val_every: int = 0
    max_steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"segmentation setting {key}={getattr(self, key)!r}: {why}")

        if self.num_classes < 2:
            raise bad("num_classes", "need at least 2 classes")
        if self.in_channels not in (1, 3):
            raise bad("in_channels", "must be 3 (grey images are fed as 3 equal channels) or 1")
        if self.epochs < 1:
            raise bad("epochs", "must be >= 1")
        if not 0 <= self.frozen_epochs <= self.epochs:
            raise bad("frozen_epochs", f"must lie in 0..epochs ({self.epochs})")
        for key in ("batch_size", "frozen_batch_size"):
            if getattr(self, key) < 2:
                raise bad(key, "must be >= 2 (the ASPP image-pooling BatchNorm needs 2 samples)")
        if self.crop_size < self.output_stride or self.crop_size % self.output_stride:
            raise bad("crop_size", f"must be a positive multiple of output_stride ({self.output_stride})")
        lo, hi = self.scale_range
        if not 0 < lo <= hi:
            raise bad("scale_range", "needs 0 < low <= high, e.g. [0.5, 2.0]")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise bad("lr", "must be a positive number, e.g. 7e-3")
        if not (math.isfinite(self.min_lr) and 0 <= self.min_lr <= self.lr):
            raise bad("min_lr", f"must lie in 0..lr ({self.lr})")
        if self.val_every < 0:
            raise bad("val_every", "must be >= 0 (0 = no validation)")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise bad("max_steps_per_epoch", "must be >= 1 or null")
        if self.workers < 0:
            raise bad("workers", "must be >= 0")

    def random_frozen_encoder_warning(self) -> str | None:
        """A one-line warning when the frozen phase would freeze a randomly initialised encoder
        (the decoder then trains on features of random weights), else None."""
        if self.frozen_epochs and self.encoder_weights in (None, "", "none", "null"):
            return (f"segmentation: the first {self.frozen_epochs} epoch(s) freeze a randomly initialised "
                    f"encoder ({self.encoder}, encoder_weights: null), so the decoder trains on random "
                    "features; set encoder_weights: imagenet (or a local weights file), or frozen_epochs: 0.")
        return None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["scale_range"] = list(self.scale_range)
        return d

    @classmethod
    def from_saved(cls, data: dict) -> SegConfig:
        """Rebuild from :meth:`to_dict` output (a checkpoint's ``config``), ignoring unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in data.items() if k in names}
        if "scale_range" in kw:
            kw["scale_range"] = tuple(kw["scale_range"])
        return cls(**kw)

    def model_kwargs(self) -> dict:
        """The arguments that fix the network's shape (stored in checkpoints as ``kwargs``)."""
        return {"encoder_name": self.encoder, "classes": self.num_classes,
                "in_channels": self.in_channels, "encoder_output_stride": self.output_stride,
                "decoder_channels": self.decoder_channels, "decoder_aspp_separable": self.aspp_separable}
