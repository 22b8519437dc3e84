"""Evaluation of a trained segmenter: full-size inference, one confusion matrix, mIoU.

Inference runs at each image's full size: the input is padded on the right/bottom by reflection
to a multiple of the output stride (16), and the logits are cropped back, so every labelled pixel
is scored. One confusion matrix is accumulated over the whole set (255 ignored); IoU per class,
mIoU and pixel accuracy follow from it (:mod:`segmentation.metrics`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress

from fuseseg.data.io import write_image
from fuseseg.data.pairs import IGNORE_INDEX, MSRS_CLASSES
from fuseseg.data.paths import check_disjoint
from fuseseg.errors import ConfigError
from fuseseg.progress import make_progress
from fuseseg.runtime import (
    OOMGuard,
    autocast,
    dist_info,
    precision_record,
    resolve_device,
    to_memory_format,
)
from segmentation.data import LabelledFolder, normalise
from segmentation.metrics import CONVENTIONS, confusion_matrix, iou_from_confusion, miou, pixel_accuracy
from segmentation.model import model_from_checkpoint, output_stride
from segmentation.palette import colorize


def class_names(num_classes: int) -> list[str]:
    """MSRS class names for 9 classes, ``class_<k>`` otherwise."""
    if num_classes == len(MSRS_CLASSES):
        return list(MSRS_CLASSES)
    return [f"class_{k}" for k in range(num_classes)]


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


@dataclass
class SegResult:
    """Outcome of an evaluation. ``confusion``: (C, C) int64, rows ground truth, columns
    prediction; ``iou``: (C,) float64, NaN = class absent from labels and predictions;
    ``miou`` under ``convention``; both conventions also as ``miou_all`` and
    ``miou_exclude_background``."""

    confusion: np.ndarray
    class_names: list[str]
    convention: str = "all"
    num_images: int = 0
    image_names: list[str] = field(default_factory=list)
    per_image_confusion: np.ndarray | None = None  # (N, C, C) int64, summing to ``confusion``
    precision: dict | None = None  # fuseseg.runtime.precision_record of the evaluation
    iou: np.ndarray = field(init=False)
    miou: float = field(init=False)
    miou_all: float = field(init=False)
    miou_exclude_background: float = field(init=False)
    pixel_accuracy: float = field(init=False)

    def __post_init__(self) -> None:
        if self.convention not in CONVENTIONS:
            raise ConfigError(f"unknown mIoU convention {self.convention!r}; valid: "
                              f"{', '.join(CONVENTIONS)}")
        self.confusion = np.asarray(self.confusion, dtype=np.int64)
        self.iou = iou_from_confusion(self.confusion)
        self.miou_all = miou(self.confusion, "all")
        self.miou_exclude_background = miou(self.confusion, "exclude_background")
        self.miou = self.miou_all if self.convention == "all" else self.miou_exclude_background
        self.pixel_accuracy = pixel_accuracy(self.confusion)

    def per_class(self) -> list[dict[str, Any]]:
        """One row per class: name, IoU (None when absent), labelled and predicted pixel counts."""
        gt, pred = self.confusion.sum(axis=1), self.confusion.sum(axis=0)
        return [{"class": name, "iou": _nan_to_none(float(self.iou[k])),
                 "gt_pixels": int(gt[k]), "pred_pixels": int(pred[k])}
                for k, name in enumerate(self.class_names)]

    def per_class_iou_list(self) -> list[float | None]:
        """Per-class IoU as a JSON-able list (None = class absent)."""
        return [_nan_to_none(float(v)) for v in self.iou]

    def to_dict(self) -> dict[str, Any]:
        """JSON-able summary (absent classes' IoU as None)."""
        return {"convention": self.convention, "miou": _nan_to_none(self.miou),
                "miou_all": _nan_to_none(self.miou_all),
                "miou_exclude_background": _nan_to_none(self.miou_exclude_background),
                "pixel_accuracy": _nan_to_none(self.pixel_accuracy),
                "num_images": self.num_images, "images": list(self.image_names),
                "per_class": self.per_class(), "precision": self.precision,
                "confusion": self.confusion.tolist()}


def pad_to_multiple(x: torch.Tensor, multiple: int) -> torch.Tensor:
    """Pad (B, C, H, W) on the right/bottom to sides divisible by ``multiple``: by reflection,
    or by edge replication where the image is too small to reflect."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode)


@torch.inference_mode()
def predict(model: torch.nn.Module, x: torch.Tensor, amp: str = "auto") -> torch.Tensor:
    """Class map (B, H, W) int64 for a normalised batch (B, C, H, W) of any size (padded to the
    output stride, logits cropped back). ``model`` must be in eval mode on ``x``'s device."""
    h, w = x.shape[-2:]
    x = to_memory_format(pad_to_multiple(x, output_stride(model)),
                         precision_record(x.device, amp)["channels_last"])
    with autocast(x.device, amp):
        logits = model(x)
    return logits[..., :h, :w].argmax(dim=1)


def _progress(enabled: bool) -> Progress:
    return make_progress(disable=not enabled, transient=True)


def confusion_over(model: torch.nn.Module, dataset: LabelledFolder, device: torch.device,
                   amp: str = "auto", indices: list[int] | None = None,
                   save_predictions: Path | None = None, progress: bool = False,
                   description: str = "evaluating", per_image: list | None = None) -> torch.Tensor:
    """(C, C) int64 confusion matrix (on ``device``) of ``model`` over ``dataset[indices]`` at full
    image size, batch 1. Optionally writes prediction PNGs named by stem (colour, and the class ids
    as 8-bit grey in ``class_ids/``, readable like the labels), and appends each image's (C, C)
    numpy matrix to ``per_image``."""
    model.eval()
    if precision_record(device, amp)["channels_last"]:
        model.to(memory_format=torch.channels_last)
    c = dataset.num_classes
    cm = torch.zeros(c, c, dtype=torch.int64, device=device)
    idx = list(range(len(dataset))) if indices is None else list(indices)
    with _progress(progress) as bar:
        task = bar.add_task(description, total=len(idx))
        for i in idx:
            img, label, stem = dataset.load(i)
            x = normalise(img, dataset.normalisation)[None].to(device)
            with OOMGuard(f"evaluating {stem} at its full size {img.shape[1]}x{img.shape[0]} (batch 1) on "
                          f"{device}", "segmentation.amp", amp,
                          advice=f"inference already runs one image at a time: evaluate on the CPU "
                          f"(device=cpu), or set segmentation.amp (now {amp!r}) to bf16/fp16"):
                pred = predict(model, x, amp)[0]
            gt = torch.from_numpy(label).to(device)
            one = confusion_matrix(gt, pred, c, IGNORE_INDEX)
            cm += one
            if per_image is not None:
                per_image.append(one.cpu().numpy())
            if save_predictions is not None:  # colour to look at, class ids to re-score
                ids = pred.to("cpu", torch.uint8).numpy()
                write_image(Path(save_predictions) / f"{stem}.png", colorize(ids, c))
                write_image(Path(save_predictions) / "class_ids" / f"{stem}.png", ids)
            bar.advance(task)
    return cm


def distributed_confusion(model: torch.nn.Module, dataset: LabelledFolder, device: torch.device,
                          amp: str = "auto", progress: bool = False) -> torch.Tensor:
    """:func:`confusion_over` with the images split over the ranks (rank r takes r, r+W, ...;
    no duplicates) and the matrices summed with ``all_reduce``; the plain one without DDP."""
    rank, world = dist_info()
    cm = confusion_over(model, dataset, device, amp, list(range(rank, len(dataset), world)),
                        progress=progress and rank == 0, description="validating")
    if world > 1:
        torch.distributed.all_reduce(cm, op=torch.distributed.ReduceOp.SUM)
    return cm


def evaluate_segmenter(checkpoint: Path | str, images_dir: Path | str, labels_dir: Path | str,
                       device: str | torch.device = "auto", save_predictions: Path | str | None = None,
                       convention: str = "all", amp: str = "auto", progress: bool = False) -> SegResult:
    """Evaluate a segmentation checkpoint on a labelled folder (images + labels paired by stem).

    Uses the checkpoint's normalisation, channel count and class count; one confusion matrix
    over every image at full size; ``save_predictions``: a folder for colour PNG predictions and
    their class ids (8-bit grey PNGs, in its ``class_ids/``); never the images' or labels' folder,
    nor inside or around them."""
    if convention not in CONVENTIONS:
        raise ConfigError(f"unknown mIoU convention {convention!r}; valid: {', '.join(CONVENTIONS)}")
    check_disjoint(save_predictions, {"--images": images_dir, "--labels": labels_dir}, "--save-predictions")
    dev = resolve_device(device) if isinstance(device, str) else device
    model, ckpt = model_from_checkpoint(checkpoint, dev)
    kwargs = ckpt["kwargs"]
    ds = LabelledFolder(images_dir, labels_dir, num_classes=kwargs["classes"],
                        normalisation=ckpt.get("normalisation", "imagenet"),
                        in_channels=kwargs.get("in_channels", 3), cache_mib=0)   # each pair read once
    per_image: list[np.ndarray] = []
    cm = confusion_over(model, ds, dev, amp, save_predictions=Path(save_predictions)
                        if save_predictions is not None else None, progress=progress,
                        per_image=per_image)
    return SegResult(cm.cpu().numpy(), class_names(kwargs["classes"]), convention, len(ds),
                     list(ds.stems), np.stack(per_image).astype(np.int64),
                     precision=precision_record(dev, amp))
