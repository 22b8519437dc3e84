"""DeepLabV3+ (segmentation-models-pytorch), encoder weights, and encoder freezing.

``build_model(kwargs, encoder_weights)`` -> ``smp.DeepLabV3Plus(**kwargs)``; ``kwargs`` come from
``SegConfig.model_kwargs()`` and are stored in every checkpoint so the network can be rebuilt from
the file alone (:func:`model_from_checkpoint`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

from fuseseg.errors import CheckpointError, ConfigError
from fuseseg.runtime import build_from_checkpoint, load_checkpoint

ARCH = "DeepLabV3Plus"
PHASES = ("frozen", "full")


def build_model(kwargs: dict[str, Any], encoder_weights: str | None = None) -> nn.Module:
    """A DeepLabV3+ with ``kwargs`` (encoder_name, classes, in_channels, ...).

    ``encoder_weights``: None (random init), ``"imagenet"`` (downloaded by smp/timm; a failure is
    a ConfigError with the fix) or a path to a local file with the encoder's state dict."""
    kwargs = dict(kwargs)
    name = kwargs.get("encoder_name")
    if encoder_weights in (None, "", "none", "null"):
        try:
            return smp.DeepLabV3Plus(encoder_weights=None, **kwargs)
        except (KeyError, ValueError) as exc:
            raise ConfigError(f"segmentation encoder {name!r} cannot build a DeepLabV3+ ({exc}). "
                              "Use an encoder name of segmentation-models-pytorch, e.g. resnet18, "
                              "resnet50, mobilenet_v2 or tu-mobilenetv3_small_100.") from exc
    if encoder_weights == "imagenet":
        try:
            return smp.DeepLabV3Plus(encoder_weights="imagenet", **kwargs)
        except Exception as exc:  # network, missing weights for this encoder, hub errors ...
            raise ConfigError(f"could not get ImageNet weights for encoder {name!r} "
                              f"({type(exc).__name__}: {str(exc)[:200]}). Set "
                              "segmentation encoder_weights: null (random init), or give the path "
                              "of a local weights file (encoder_weights: /path/to/encoder.pth).") from exc
    model = build_model(kwargs, None)
    load_encoder_weights(model, encoder_weights)
    return model


_PREFIXES_TO_STRIP = ("module.", "encoder.", "model.")


def load_encoder_weights(model: nn.Module, path: Path | str) -> None:
    """Load a local state dict into ``model.encoder``.

    Accepts a bare state dict, or a dict holding one under ``state_dict``/``model``; keys may
    carry ``module.``/``encoder.`` prefixes, and timm-style keys are matched to smp's ``tu-``
    encoders (``model.`` prefix). Extra keys (a classifier head, e.g. ``fc.*``) are ignored; a
    missing encoder key or a shape mismatch is a ConfigError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"encoder_weights: {path} is not a file. Give a local weights file, "
                          "'imagenet' (needs the network) or null.")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"encoder_weights: {path} is not a readable torch state dict "
                          f"({type(exc).__name__}: {exc}).") from exc
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict) or not sd:
        raise ConfigError(f"encoder_weights: {path} holds no state dict of tensors.")
    target = model.encoder.state_dict()

    def variants(d: dict):
        yield d
        stripped = d
        for p in _PREFIXES_TO_STRIP:
            stripped = {k[len(p):] if k.startswith(p) else k: v for k, v in stripped.items()}
            yield stripped
            yield {"model." + k: v for k, v in stripped.items()}

    best = max(variants(sd), key=lambda d: len(set(d) & set(target)))
    missing = sorted(set(target) - set(best))
    if missing:
        raise ConfigError(f"encoder_weights: {path} does not fit encoder "
                          f"{getattr(model, 'name', '?')}: {len(missing)} encoder key(s) missing, "
                          f"e.g. {', '.join(missing[:3])}. Give weights of the same encoder "
                          "architecture, or set encoder_weights: null.")
    shapes = [k for k in target if tuple(best[k].shape) != tuple(target[k].shape)]
    if shapes:
        k = shapes[0]
        raise ConfigError(f"encoder_weights: {path} does not fit: {k} has shape "
                          f"{tuple(best[k].shape)} in the file but {tuple(target[k].shape)} in the "
                          "encoder (other encoder or in_channels?). Use matching weights or null.")
    model.encoder.load_state_dict({k: best[k] for k in target})


def set_phase(model: nn.Module, phase: str) -> None:
    """``'frozen'``: encoder parameters ``requires_grad=False``; ``'full'``: everything trainable.

    The encoder's BatchNorm must also stay in eval mode during the frozen phase (running stats
    not updated): call :func:`train_mode` rather than ``model.train()``."""
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r}; valid: {PHASES}")
    for p in model.encoder.parameters():
        p.requires_grad_(phase == "full")
    for p in list(model.decoder.parameters()) + list(model.segmentation_head.parameters()):
        p.requires_grad_(True)


def is_frozen(model: nn.Module) -> bool:
    return not any(p.requires_grad for p in model.encoder.parameters())


def train_mode(model: nn.Module) -> None:
    """``model.train()``, but a frozen encoder stays in eval mode (BatchNorm uses and keeps its
    running statistics)."""
    model.train()
    if is_frozen(model):
        model.encoder.eval()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def output_stride(model: nn.Module) -> int:
    """Input sides must be multiples of this (16 for the default DeepLabV3+)."""
    return int(getattr(model.encoder, "output_stride", 16) or 16)


def model_from_checkpoint(path: Path | str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode on ``device``, checkpoint dict) from a segmentation checkpoint."""
    ckpt = load_checkpoint(path, expect={"kind": "segmentation", "arch": ARCH})
    kwargs = ckpt.get("kwargs")
    classes = kwargs.get("classes") if isinstance(kwargs, dict) else None
    if not isinstance(classes, int) or isinstance(classes, bool) or not 2 <= classes <= 255:
        raise CheckpointError(f"checkpoint {path}: its kwargs lack a class count `classes` of 2..255 "
                              f"(got {classes!r}); the file is damaged or not written by `fuseseg segment train`.")
    # widths checked on the meta device before the model is allocated (fuseseg.limits)
    model = build_from_checkpoint(lambda **kw: build_model(kw, None), ckpt, path, "DeepLabV3+ segmenter")
    return model.to(device).eval(), ckpt
