"""SeAFusion's joint ("in the loop") training: fusion rounds alternating with a segmenter.

The paper (Tang et al., Inf. Fusion 2022, Sec. 3.3) trains the fusion network and a segmentation
network in turn. Round m = 1..M:

1. **fusion**: train the fusion network (from round m-1's weights) with
   ``L_f = L_content + beta_m L_semantic``, ``beta_m = gamma (m - 1)`` (so round 1 is the content
   loss alone), where ``L_semantic`` is the loss of round m-1's segmenter, frozen, on the fused
   image of each labelled training pair;
2. **segmentation** (m < M): fuse the labelled training pairs with round m's network and train a
   segmenter on them; it gives round m+1 its semantic loss.

Departures (documented in ``fusion/README.md``): the segmenter is this project's DeepLabV3+ trained
by :func:`segmentation.train.train_segmenter` (Dice + CE, its own protocol) in place of BiSeNet's
main + auxiliary OHEM losses, and it is trained afresh each round (the paper keeps training one);
the fused Y enters it recoloured with the visible Cb/Cr, as ``fuseseg fuse`` writes it; each
fusion round restarts the cosine learning-rate schedule.

Labels: the segmenter trains on the first labelled source of the training data (``data_root``'s
split, then ``extra_data``, then the synthetic scenes). Pairs without labels (RoadScene) stay in
the fusion rounds with the content loss only; with no labelled source at all the semantic loss
is **off**, the rounds are skipped (one plain training) and the record says so.

Files in ``out_dir``: ``round<m>/fusion/`` (a fusion training run), ``round<m>/fused/`` and
``round<m>/segment/`` (the segmenter), ``rounds.json`` (the record, rewritten after each step),
``config.yaml``, ``log.csv`` (every round's rows with a ``round`` column) and ``final.pt`` (the
last round's network; its ``config`` is the whole rounds config and ``rounds`` the record). Each
step is skipped when its result exists and resumed from its ``last.pt`` when interrupted, so
running the same command again continues where it stopped.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fuseseg import runtime
from fuseseg.data.colour import recolour
from fuseseg.data.io import atomic_write_text
from fuseseg.errors import ConfigError
from fusion.train_config import FusionTrainConfig, config_to_dict, labelled_sources, render_synthetic

# the rounds' segmenter, unless semantic_segment (or the experiment's segment section) says otherwise:
# the default experiment's light DeepLabV3+ (random init, no download), a few epochs per round
ROUND_SEGMENTER = {"encoder": "tu-resnet10t", "encoder_weights": None, "decoder_channels": 128,
                   "aspp_separable": False, "epochs": 4, "frozen_epochs": 0, "batch_size": 4,
                   "crop_size": 96, "scale_range": [0.75, 1.5], "lr": 2e-2, "workers": 0}


class SegmenterLoss(nn.Module):
    """The semantic loss of a frozen segmenter: ``DiceCE(seg(normalise(recolour(fused_y,
    visible))), labels)``, differentiable in ``fused_y`` only.

    ``forward(fused_y (B, 1, H, W), visible (B, 3, H, W) in [0, 1], labels (B, H, W) int64, 255 =
    ignore) -> scalar``. The input is padded to the segmenter's output stride by reflection and
    the logits cropped back."""

    def __init__(self, checkpoint: Path | str, device: torch.device | str = "cpu"):
        super().__init__()
        from segmentation.data import IMAGENET_MEAN, IMAGENET_STD
        from segmentation.losses import DiceCELoss
        from segmentation.model import model_from_checkpoint, output_stride

        model, ck = model_from_checkpoint(checkpoint, device)
        for p in model.parameters():
            p.requires_grad_(False)
        self.segmenter = model.eval()
        cfg = ck.get("config") or {}
        self.in_channels = int(ck["kwargs"].get("in_channels", 3))
        self.normalisation = ck.get("normalisation", cfg.get("normalisation", "imagenet"))
        self.stride = output_stride(model)
        self.loss = DiceCELoss(float(cfg.get("ce_weight", 1.0)), float(cfg.get("dice_weight", 1.0)))
        c = self.in_channels   # ImageNet statistics (their channel mean for 1 channel), as segmentation.data
        mean = IMAGENET_MEAN if c == 3 else [sum(IMAGENET_MEAN) / 3]
        std = IMAGENET_STD if c == 3 else [sum(IMAGENET_STD) / 3]
        self.register_buffer("mean", torch.tensor(mean, device=device)[:, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(std, device=device)[:, None, None], persistent=False)

    def train(self, mode: bool = True) -> SegmenterLoss:   # the segmenter stays in eval mode
        super().train(mode)
        self.segmenter.eval()
        return self

    def forward(self, fused_y: torch.Tensor, visible: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        from segmentation.evaluate import pad_to_multiple

        x = recolour(fused_y.float(), visible.float()) if self.in_channels == 3 else fused_y.float()
        if self.normalisation == "imagenet":
            x = (x - self.mean) / self.std
        h, w = x.shape[-2:]
        logits = self.segmenter(pad_to_multiple(x, self.stride))[..., :h, :w]
        return self.loss(logits, labels)[0]


def round_segment_config(cfg: FusionTrainConfig, base: dict[str, Any] | None = None):
    """The rounds' :class:`segmentation.config.SegConfig`: ``base`` (an experiment's segment
    settings) or :data:`ROUND_SEGMENTER`, then ``cfg.semantic_segment``, on ``cfg.device``."""
    from pipelines.config import from_dict
    from segmentation.config import SegConfig

    keys = {**(base if base is not None else ROUND_SEGMENTER), **cfg.semantic_segment}
    keys.setdefault("device", cfg.device)
    return from_dict(SegConfig, keys, "fusion_train.semantic_segment")


def train_semantic_rounds(cfg: FusionTrainConfig, out_dir: Path | str, resume: bool = False, *,
                          progress: bool = True, tensorboard: bool = False,
                          segment_base: dict[str, Any] | None = None) -> Path:
    """Run ``cfg.semantic_rounds`` joint rounds (see the module doc) into ``out_dir``; returns
    ``out_dir/final.pt``. ``resume``: continue the rounds already in ``out_dir`` (same config).
    ``segment_base``: the segmenter's settings before ``cfg.semantic_segment`` (an experiment passes
    its ``segment:`` section)."""
    from fusion.registry import create_method, load_plugins

    out_dir = Path(out_dir)
    _check_folder(cfg, out_dir, resume)
    if cfg.plugins:
        load_plugins(cfg.plugins)
    probe = create_method(cfg.method, **cfg.method_kwargs)
    if not hasattr(probe, "set_semantic_loss"):
        raise ConfigError(f"fusion_train.semantic_rounds={cfg.semantic_rounds}: method {cfg.method!r} has "
                          "no semantic loss (no set_semantic_loss); the rounds are SeAFusion's "
                          "(method: seafusion). Set semantic_rounds: 0 for this method.")
    seg_cfg = round_segment_config(cfg, segment_base)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.yaml", _yaml(config_to_dict(cfg)))
    render_synthetic(cfg, out_dir)
    sources = labelled_sources(cfg, out_dir)
    record = _new_record(cfg, sources, seg_cfg)
    rounds = cfg.semantic_rounds if sources else 1
    if not sources:
        from rich.console import Console
        Console(stderr=True).print("[yellow]note:[/] semantic_rounds: the training data hold no labelled pairs, "
                                   "so the semantic loss is off; training one round with the content loss only.")
    prev_seg: Path | None = None
    prev_fusion: str | None = cfg.init_checkpoint
    for m in range(1, rounds + 1):
        beta = cfg.semantic_gamma * (m - 1) if sources else 0.0
        fusion_ck = _fusion_round(cfg, out_dir / f"round{m}" / "fusion", beta, prev_fusion, prev_seg,
                                  progress, tensorboard)
        record["rounds"].append({"round": m, "beta": beta, "fusion": _fusion_summary(fusion_ck),
                                 "segmenter": None})
        _write_record(out_dir, record)
        prev_fusion = str(fusion_ck)
        if m < rounds:
            prev_seg = _segment_round(cfg, seg_cfg, out_dir / f"round{m}", fusion_ck, sources[0], progress)
            record["rounds"][-1]["segmenter"] = _segment_summary(prev_seg)
            _write_record(out_dir, record)
    return _finish(cfg, out_dir, record, Path(prev_fusion))


def _check_folder(cfg: FusionTrainConfig, out_dir: Path, resume: bool) -> None:
    """A folder holding rounds is continued only with ``resume`` and the same config."""
    import yaml

    saved_path = out_dir / "config.yaml"
    if not (out_dir / "rounds.json").is_file():
        return
    if not resume:
        raise ConfigError(f"{out_dir} already holds SeAFusion rounds (rounds.json). Pass --resume to "
                          "continue them, or choose another --out folder.")
    try:
        saved = yaml.safe_load(saved_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot resume the rounds in {out_dir}: {saved_path} is unreadable ({exc}); "
                          "start a new run in another --out folder.") from exc
    from fusion.train import _check_resumable  # the trainer's rule: every non-runtime key equal

    _check_resumable(saved or {}, cfg, saved_path)


def _fusion_round(cfg: FusionTrainConfig, out: Path, beta: float, init: str | None, seg_ck: Path | None,
                  progress: bool, tensorboard: bool) -> Path:
    """Round ``m``'s fusion training (skipped when its final.pt exists, resumed from last.pt)."""
    from fusion.train import train_fusion

    if (out / "final.pt").is_file():
        return out / "final.pt"
    kwargs = {**cfg.method_kwargs, "semantic_weight": beta}
    rcfg = dataclasses.replace(cfg, method_kwargs=kwargs, init_checkpoint=init, semantic_rounds=0,
                               semantic_segment={}, semantic_gamma=1.0,
                               synthetic_pairs=0, extra_data=list(cfg.extra_data) + _synthetic_dir(cfg, out))

    def prepare(model: nn.Module, device: torch.device) -> None:
        if beta > 0:
            model.set_semantic_loss(SegmenterLoss(seg_ck, device))

    return train_fusion(rcfg, out, resume=(out / "last.pt").is_file(), progress=progress,
                        tensorboard=tensorboard, prepare=prepare)


def _synthetic_dir(cfg: FusionTrainConfig, round_out: Path) -> list[str]:
    """The rounds' synthetic scenes (rendered once into the rounds folder) as an extra data root."""
    return [str(round_out.parents[1] / "synthetic")] if cfg.synthetic_pairs else []


def _segment_round(cfg: FusionTrainConfig, seg_cfg, round_dir: Path, fusion_ck: Path, source,
                   progress: bool) -> Path:
    """Fuse the labelled pairs with this round's network, then train the next round's segmenter."""
    from fusion.fuse import fuse_folder, load_fusion_method
    from segmentation.train import train_segmenter

    seg_out = round_dir / "segment"
    if (seg_out / "final.pt").is_file():
        return seg_out / "final.pt"
    method = load_fusion_method(cfg.method, checkpoint=fusion_ck, device=cfg.device, plugins=cfg.plugins)
    fuse_folder(method, source.ir_dir, source.vi_dir, round_dir / "fused", device=cfg.device,
                progress=progress, ir16=cfg.ir16, name=f"{cfg.method} ({round_dir.name})")
    return train_segmenter(round_dir / "fused", source.labels_dir, seg_cfg, seg_out,
                           resume=(seg_out / "last.pt").is_file(), progress=progress)


def _new_record(cfg: FusionTrainConfig, sources, seg_cfg) -> dict[str, Any]:
    if sources:
        src = sources[0]
        state = (f"on: rounds 2..{cfg.semantic_rounds} add beta = {cfg.semantic_gamma:g} x (round - 1) times "
                 f"the loss of a DeepLabV3+ trained on the {len(src.labels)} labelled pairs of {src.ir_dir.parent}; "
                 "unlabelled pairs get the content loss only")
    else:
        state = "off: no labelled pairs in the training data (the content loss only, one round)"
    return {"semantic_loss": state, "semantic_rounds": cfg.semantic_rounds, "semantic_gamma": cfg.semantic_gamma,
            "labelled_source": str(sources[0].ir_dir.parent) if sources else None,
            "segmenter_config": seg_cfg.to_dict(), "rounds": []}


def _fusion_summary(ck_path: Path) -> dict[str, Any]:
    ck = runtime.load_checkpoint(ck_path, expect={"kind": "fusion"})
    last = (ck.get("log") or [{}])[-1]
    keep = ("global_step", "fus", "fus_max", "semantic", "labelled", "total")
    v = ck.get("verdict") if isinstance(ck.get("verdict"), dict) else {}
    return {"checkpoint": str(ck_path), **{k: last[k] for k in keep if k in last}, "verdict": v.get("status")}


def _segment_summary(ck_path: Path) -> dict[str, Any]:
    ck = runtime.load_checkpoint(ck_path, expect={"kind": "segmentation"})
    return {"checkpoint": str(ck_path), "epochs": ck.get("epoch"), "global_step": ck.get("global_step")}


def _write_record(out_dir: Path, record: dict) -> None:
    atomic_write_text(out_dir / "rounds.json", json.dumps(record, indent=2, default=str) + "\n")


def _finish(cfg: FusionTrainConfig, out_dir: Path, record: dict, last_ck: Path) -> Path:
    """``final.pt`` (the last round's network, with the rounds config and record) and ``log.csv``."""
    from fusion.train_log import write_log

    rows = []
    for r in record["rounds"]:
        ck = runtime.load_checkpoint(r["fusion"]["checkpoint"], expect={"kind": "fusion"})
        rows += [{"round": r["round"], "beta": r["beta"], **row} for row in ck.get("log") or []]
    final = runtime.load_checkpoint(last_ck, expect={"kind": "fusion", "method": cfg.method})
    final.update({"config": config_to_dict(cfg), "rounds": record, "log": rows})
    final["kwargs"] = {**final["kwargs"], "semantic_weight": 0.0}   # inference never needs the loss
    write_log(out_dir / "log.csv", rows)
    atomic_write_text(out_dir / "verdict.json", json.dumps(final.get("verdict"), indent=2) + "\n")
    runtime.save_checkpoint(out_dir / "final.pt", final)
    return out_dir / "final.pt"


def _yaml(data: dict) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
