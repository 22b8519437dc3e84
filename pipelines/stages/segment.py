"""Stage ``segment/<variant>/seed<k>``: train one DeepLabV3+ on a variant's training images
(infrared, visible or fused) and evaluate it on the test split, into
``<run>/segment/<variant>/seed<k>/`` (checkpoints, ``log.csv``, ``eval.json``,
``per_image_confusion.npy``, ``predictions/``). The work is a :class:`SegmentJob` handed to the
executor. :func:`protocol_of` is the segmentation protocol that makes two mIoU tables comparable."""
from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np

from fuseseg.data.io import atomic_write_bytes, atomic_write_text
from fuseseg.errors import DataError
from pipelines.config import dump_config, to_dict
from pipelines.executor import Executor
from pipelines.experiment import ExperimentConfig
from pipelines.runstate import fingerprint, named_fingerprint
from pipelines.stage_job import StageJob
from pipelines.stages.base import Plan, Stage, precision_of, prepare_dir, split_paths, world_size


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
        from segmentation.evaluate import evaluate_segmenter
        from segmentation.train import train_segmenter

        out, cfg = Path(self.out), self.seg_cfg
        resume = (out / "last.pt").is_file()
        if self.nproc > 1:
            dump_config(cfg, out / "requested.yaml")
            self.launch(["segment", "train", "--images", str(self.images["train"]), "--labels",
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
    ex = ex or Executor()
    seg_cfg = dataclasses.replace(cfg.segmentation, seed=seed, device=ex.job_device(cfg.device, device))
    source = "data" if variant in ("ir", "vi") else f"fuse/{variant}"   # where its images come from
    fp = named_fingerprint("segment", **{source: upstream_fp, "segmentation": to_dict(seg_cfg),
                                         "precision": precision_of(device, seg_cfg.amp), "world_size": world_size(cfg)})
    out = run_dir / "segment" / variant / f"seed{seed}"
    with Stage(run_dir, f"segment/{variant}/seed{seed}", fp, plan, "segment") as st:
        if not st.skip:
            tr, te = split_paths(cfg, data_root, "train"), split_paths(cfg, data_root, "test")
            job = SegmentJob(seg_cfg, out, dict(images), {"train": tr["labels"], "test": te["labels"]}, variant,
                             seed, fingerprint(protocol_of(cfg, device)[0]), ex.nproc(cfg.launcher, cfg.gpus),
                             cfg.tensorboard)
            prepare = lambda: prepare_dir(out, fp, run_dir, st.key, fresh=st.forced)  # noqa: E731
            st.info.update(ex.run(run_dir, st.key, fp, out, job, prepare))
    return out, fp


def protocol_of(cfg: ExperimentConfig, device=None) -> tuple[dict, str]:
    """The segmentation protocol that makes two mIoU tables comparable, as a dict and a line.

    It includes the precision the segmenters compute in (``segmentation.amp`` resolved on
    ``device``, default ``cfg.device``): bf16 and fp32 runs are different protocols."""
    s = cfg.segmentation
    keys = {f.name: to_dict(getattr(s, f.name)) for f in dataclasses.fields(s)
            if f.name not in ("device", "workers", "seed", "amp")}
    keys["precision"] = precision_of(cfg.device if device is None else device, s.amp)
    keys["data"] = str(cfg.data.root) if cfg.data.root else f"synthetic {to_dict(cfg.data.synthetic)}"
    keys["seg_seeds"] = list(cfg.seg_seeds)
    keys["world_size"] = world = world_size(cfg)
    text = (f"DeepLabV3+ ({s.encoder}, weights={s.encoder_weights}"
            f"{'' if s.aspp_separable else ', plain ASPP convs'}), Dice+CE, SGD lr {s.lr} cosine, "
            f"{s.frozen_epochs} frozen-encoder epochs at batch {s.frozen_batch_size} + "
            f"{s.epochs - s.frozen_epochs} at batch {s.batch_size} (global batches, {world} "
            f"process{'es' if world > 1 else ''}), crop {s.crop_size}, "
            f"{keys['precision']}, mIoU convention '{s.miou_convention}' (one confusion matrix over the test set), "
            f"seeds {list(cfg.seg_seeds)}, data {data_text(cfg)}")
    fusion_text = _fusion_protocol(cfg)
    if fusion_text:
        text += f"; {fusion_text}"
    return keys, text


def data_text(cfg: ExperimentConfig) -> str:
    """The data set in words: ``MSRS-layout folder /data/MSRS`` or ``synthetic MSRS-like set: 160
    training / 48 test scenes of 144x192 px, zoom 2.0, generator seed 0``."""
    if cfg.data.root:
        return f"MSRS-layout folder {cfg.data.root}"
    sy = cfg.data.synthetic
    return (f"synthetic MSRS-like set generated in the run folder: {sy.train} training / {sy.test} test scenes "
            f"of {sy.size[0]}x{sy.size[1]} px, zoom {sy.zoom}, generator seed {sy.seed}")


def _kwargs_text(kwargs: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in kwargs.items()) if kwargs else "default"


def _fusion_protocol(cfg: ExperimentConfig) -> str:
    """How each learned fusion variant got its weights (for the protocol line; not part of the
    segmentation protocol's fingerprint)."""
    return ", ".join(fusion_protocol_parts(cfg))


def fusion_protocol_parts(cfg: ExperimentConfig) -> list[str]:
    """One phrase per learned fusion variant, ``NAME how its weights were made``."""
    from fusion.registry import get_entry
    from fusion.train_config import phase_schedule

    parts = []
    for m in cfg.fusion:
        if m.type != "registered" or not get_entry(m.method).trainable:
            continue
        if m.checkpoint is not None:
            shipped = str(m.checkpoint) == "pretrained"
            what = "the shipped pretrained weights" if shipped else f"checkpoint {m.checkpoint}"
            parts.append(f"{m.name} from {what} (not trained here{_recipe_text(m.method, None, shipped)})")
        else:
            t = {**to_dict(cfg.fusion_train), **m.train}
            sched = phase_schedule(m.method, getattr(get_entry(m.method).factory, "phases", ("structure", "fusion")),
                                   t["structure_epochs"], t["epochs"], t.get("phase_epochs"))
            parts.append(f"{m.name} trained from scratch here ("
                         + " + ".join(f"{n} {p}" for p, n in sched)
                         + f" epochs, crop {t['crop_size']}, batch {t['batch_size']}, "
                         f"lr {t['lr']}, kwargs {_kwargs_text(dict(m.kwargs))}"
                         f"{_recipe_text(m.method, dict(m.kwargs), False)}{_rounds_text(t)})")
    return parts


def _rounds_text(t: dict) -> str:
    """``, in M semantic rounds ...`` when SeAFusion's joint rounds train the method, else ""."""
    m = t.get("semantic_rounds") or 0
    if not m:
        return ""
    return (f", in {m} semantic rounds (beta = {t.get('semantic_gamma', 1.0):g} x (round - 1) times the loss "
            "of a DeepLabV3+ trained on the previous round's fused labelled training pairs; "
            "rounds.json in its train_fusion folder says whether labels were found)")


def _recipe_text(method: str, kwargs: dict | None, shipped: bool) -> str:
    """``, head H, L_rec R`` for a method with those settings (SSPFusion's ``output`` and
    ``rec_reduction``): resolved from ``kwargs`` (the model's defaults filled in), or from the
    shipped weights' record; "" when the method has neither."""
    if shipped:
        from fusion.pretrained import has_shipped, shipped_info

        resolved = (shipped_info(method) or {}).get("kwargs", {}) if has_shipped(method) else {}
    else:
        from fusion.registry import create_method

        resolved = getattr(create_method(method, **kwargs), "init_kwargs", {})
    names = (("output", "head"), ("rec_reduction", "L_rec"))
    text = "".join(f", {label} {resolved[k]}" for k, label in names if k in resolved)
    if resolved.get("grad_gain", 1.0) != 1.0:   # a departure from the paper's L_grad: say it
        text += f", L_grad target x{resolved['grad_gain']:g}"
    if shipped and has_shipped(method) and (shipped_info(method) or {}).get("semantic_loss"):
        text += f", semantic loss {shipped_info(method)['semantic_loss'].split(':')[0]}"
    return text
