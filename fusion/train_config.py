"""The settings of a fusion training (:class:`FusionTrainConfig`, YAML keys of the same names) and
the training pairs they name: a data root, explicit ``ir_dir``/``vi_dir``, extra folders and the
synthetic scenes rendered into the run folder. Read by :mod:`fusion.train`; light to import (no
torch), so that loading an experiment config does not load the trainer."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fuseseg.data.pairs import PairSet, detect_splits, find_pairs, load_split
from fuseseg.errors import ConfigError

# settings that may differ between a run and its resumption (they do not change the maths on CPU)
RUNTIME_KEYS = ("workers", "device", "amp", "compile", "channels_last", "log_every", "cache_images", "keep_every")

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
    epochs: int = 300   # epochs of the fusion phase (and of every phase other than "structure")
    phase_epochs: dict[str, int] = field(default_factory=dict)   # epochs per phase name, overriding structure_epochs/epochs for it, e.g. {autoencoder: 4, fusion: 6}
    batch_size: int = 8   # global batch (split across DDP processes)
    crop_size: int | None = 256   # random square training crop; null = whole images
    vflip: bool = False   # random vertical flips too (horizontal ones always)
    aug_gain: tuple[float, float] = (1.0, 1.0)   # joint photometric gain range [low, high]; [1, 1] = off
    aug_gamma: tuple[float, float] = (1.0, 1.0)   # joint photometric gamma range [low, high]; [1, 1] = off
    lr: float = 2e-4   # Adam learning rate at the start of each phase (cosine decay)
    min_lr: float = 0.0   # learning rate at the end of each phase
    betas: tuple[float, float] = (0.9, 0.999)   # Adam betas
    weight_decay: float = 0.0   # Adam weight decay
    grad_clip: float | None = None   # clip the gradients' global L2 norm to this before each step (logged as `grad_norm`, before clipping); null = off
    keep_every: int = 0   # > 0: also keep the weights every that many epochs of each phase, as OUT/epochs/<phase>-<epoch>.pt; 0 = off
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
    init_checkpoint: str | None = None   # start from these weights (a fusion checkpoint of the same method; `pretrained` = the shipped ones); null = random init
    semantic_rounds: int = 0   # > 0: SeAFusion's joint rounds (fusion, then a segmenter on its fused labelled pairs, whose loss joins the next round's); 0 = off
    semantic_gamma: float = 1.0   # beta of round m = semantic_gamma x (m - 1) (the paper's schedule)
    semantic_segment: dict[str, Any] = field(default_factory=dict)   # segmenter settings of the rounds (SegConfig keys, e.g. {epochs: 4})

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
        bad = {k: v for k, v in self.phase_epochs.items()
               if not isinstance(k, str) or isinstance(v, bool) or not isinstance(v, int) or v < 0}
        if bad:
            raise ValueError(f"phase_epochs must map phase names to integers >= 0, got {bad}")
        if not self.phase_epochs and self.structure_epochs + self.epochs == 0:
            raise ValueError("structure_epochs=0 and epochs=0 train nothing (final.pt would hold an untrained "
                             "model); give at least one epoch")
        if self.semantic_rounds < 0 or not self.semantic_gamma >= 0:
            raise ValueError(f"semantic_rounds must be >= 0 and semantic_gamma >= 0, got "
                             f"{self.semantic_rounds} and {self.semantic_gamma}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or null (off), got {self.grad_clip}")
        if self.keep_every < 0:
            raise ValueError(f"keep_every must be >= 0 (0: off), got {self.keep_every}")
        if not self.lr > 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ValueError(f"need lr > 0 and 0 <= min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")


    def schedule(self, phases: tuple[str, ...] | list[str]) -> list[tuple[str, int]]:
        """``[(phase, epochs), ...]`` of a method with training ``phases``: see :func:`phase_schedule`."""
        return phase_schedule(self.method, phases, self.structure_epochs, self.epochs, self.phase_epochs)

    def photometric_range(self) -> tuple[tuple[float, float], tuple[float, float]] | None:
        """The joint photometric augmentation of :class:`fusion.datasets.PairDataset` (None: off)."""
        rng = (tuple(self.aug_gain), tuple(self.aug_gamma))
        return None if rng == ((1.0, 1.0), (1.0, 1.0)) else rng

def phase_schedule(method: str, phases, structure_epochs: int, epochs: int,
                   phase_epochs: dict[str, int] | None = None) -> list[tuple[str, int]]:
    """``[(phase, epochs), ...]`` in the method's phase order: ``phase_epochs[phase]`` where given,
    else ``structure_epochs`` for phase ``"structure"`` and ``epochs`` for every other phase.
    ConfigError when ``phase_epochs`` names a phase the method does not have (listing its phases)
    or when the schedule trains nothing."""
    phase_epochs = dict(phase_epochs or {})
    unknown = [k for k in phase_epochs if k not in phases]
    if unknown:
        raise ConfigError(f"fusion_train.phase_epochs names phase(s) {', '.join(map(repr, unknown))} that "
                          f"method {method!r} does not have; its phases are: {', '.join(phases)}. "
                          "Use those names as the keys of phase_epochs.")
    out = [(p, phase_epochs.get(p, structure_epochs if p == "structure" else epochs)) for p in phases]
    if sum(n for _, n in out) == 0:
        raise ConfigError(f"fusion_train: the schedule of {method!r} trains nothing ("
                          + ", ".join(f"{p} x{n}" for p, n in out) + "); give at least one phase an epoch "
                          "(structure_epochs, epochs or phase_epochs).")
    return out


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

def labelled_sources(cfg: FusionTrainConfig, out_dir: Path | None = None) -> list[PairSet]:
    """The training sources that hold labels (every pair of the source labelled or not), in the
    order of :func:`resolve_pairs`: ``data_root`` (or ``ir_dir``/``vi_dir``: never labelled), each of
    ``extra_data``, then the synthetic scenes in ``out_dir/synthetic`` (labelled)."""
    sets: list[PairSet] = []
    if cfg.data_root and not (cfg.ir_dir or cfg.vi_dir):
        sets.append(_root_pairs(cfg.data_root, cfg.split, "data_root"))
    sets += [_root_pairs(r, cfg.split, "extra_data") for r in cfg.extra_data]
    if cfg.synthetic_pairs and out_dir is not None:
        sets.append(load_split(out_dir / "synthetic", "train"))
    return [s for s in sets if s.labels_dir is not None and s.labels]

def merge_pairsets(sets: list[PairSet]) -> PairSet:
    """One PairSet of several; stems become ``"<j>/<stem>"`` (j = the set's index), so equal file
    names in different folders stay distinct."""
    out = PairSet(sets[0].ir_dir, sets[0].vi_dir)
    for j, ps in enumerate(sets):
        for stem in ps.stems:
            key = f"{j}/{stem}"
            out.stems.append(key)
            out.ir[key], out.vi[key] = ps.ir[stem], ps.vi[stem]
            if stem in ps.labels:
                out.labels[key] = ps.labels[stem]
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
