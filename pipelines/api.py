"""fuseseg from Python (notebooks, scripts): run an experiment, load a finished run, fuse arrays.

    from pipelines import api as fs

    run_dir = fs.run("default", ["segmentation.epochs=2", "name=quick"])   # same as `fuseseg run`
    fs.dry_run("default", ["name=quick", "segmentation.epochs=3"])   # [{stage, run, why}], writes nothing
    r = fs.load_run(run_dir)
    r["miou"]["sspfusion"]["miou"]                 # mean mIoU of a variant
    r["metrics"]["per_image"]["gff"]["00001D"]     # {metric: value} of one fused test image
    fused = fs.fuse(ir, vi, "laplacian")           # numpy in, numpy out

Everything returned is plain Python data (dicts, lists, floats, strings; numpy arrays only for
images and confusion matrices), so it needs no pandas; ``pandas.DataFrame(r["miou_rows"])`` or
``pandas.DataFrame.from_dict(r["metrics"]["means"], orient="index")`` make tables where pandas
is installed.
"""
from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fuseseg.errors import FusesegError


def load_config(config: str | Path | None = None, overrides: Sequence[str] = ()):
    """The resolved :class:`pipelines.experiment.ExperimentConfig` of a config (a YAML file or a
    shipped name such as ``"default"``, ``"msrs"``) with ``key=value`` overrides."""
    from pipelines.config import load_config as _load
    from pipelines.experiment import ExperimentConfig, resolve_config

    return _load(ExperimentConfig, resolve_config(config), list(overrides))


def run(config: str | Path | None = None, overrides: Sequence[str] = (), *, only: Sequence[str] | None = None,
        variants: Sequence[str] | None = None) -> Path:
    """Run (or resume) an experiment exactly as ``fuseseg run CONFIG key=value ...`` does, and
    return its run folder. ``only``: stage names; ``variants``: the variants to segment."""
    from pipelines.run import check_config_is_no_output, run_experiment
    from pipelines.stages.base import Plan

    cfg = load_config(config, overrides)
    check_config_is_no_output(config, cfg)
    return run_experiment(cfg, Plan(only=set(only) if only else None, variants=list(variants) if variants else None))


def dry_run(config: str | Path | None = None, overrides: Sequence[str] = (), *,
            only: Sequence[str] | None = None, variants: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """What :func:`run` would do, writing nothing (``fuseseg run --dry-run``): one
    ``{"stage", "run" (bool), "why"}`` per stage, e.g. ``why = "changed: fusion_train.lr"``."""
    from pipelines.run import run_experiment
    from pipelines.stages.base import Plan

    plan = Plan(only=set(only) if only else None, variants=list(variants) if variants else None, dry_run=True)
    run_experiment(load_config(config, overrides), plan)
    return plan.decisions


def _read_csv(path: Path) -> list[dict[str, Any]]:
    def value(text: str):
        try:
            return int(text)
        except ValueError:
            try:
                return float(text)
            except ValueError:
                return text
    with path.open(newline="") as f:
        return [{k: value(v) for k, v in row.items()} for row in csv.DictReader(f)]


def load_run(path: str | Path) -> dict[str, Any]:
    """A finished (or partly finished) run folder as plain data:

    * ``config``: the resolved config (dict); ``protocol``: the segmentation protocol (dict and
      ``protocol_text``);
    * ``miou``: ``{variant: {"miou", "miou_std", "pixel_accuracy", "seeds", "per_class": {class:
      IoU or None}}}``; ``miou_rows``: the same as a list of flat rows (one per variant);
      ``gains``: the bootstrap gains over the better single modality; ``analysis``: the report's
      pairwise tests, headline, day/night mIoU and metric-vs-mIoU correlations
      (:func:`pipelines.analysis.analyse`; None for a run folder written before them);
    * ``metrics``: ``{"means": {method: {metric: v}}, "per_image": {method: {image: {metric: v}}},
      "convention": text}`` (None when the metrics stage did not run);
    * ``segmentation``: ``{variant: {seed: {"miou", "per_class_iou", "confusion" (ndarray),
      "images"}}}`` from every ``eval.json``;
    * ``training``: ``{"train_fusion/<method>" or "segment/<variant>/seed<k>": log.csv rows}``;
    * ``stages``: ``{stage key: its record}`` (seconds, peak memory, fingerprint).
    """
    import yaml

    run_dir = Path(path)
    if not (run_dir / "config.yaml").is_file():
        raise FusesegError(f"{run_dir} is not a fuseseg run folder (no config.yaml); give the folder "
                           "`fuseseg run` wrote, e.g. results/default.")
    out: dict[str, Any] = {"path": run_dir, "config": yaml.safe_load((run_dir / "config.yaml").read_text())}
    table = run_dir / "tables" / "miou.json"
    out["miou"], out["miou_rows"], out["gains"], out["protocol"], out["protocol_text"] = {}, [], [], None, None
    out["analysis"] = None
    if table.is_file():
        t = json.loads(table.read_text())
        out["protocol"], out["protocol_text"], out["gains"] = t["protocol"], t["protocol_text"], t["gains"]
        out["analysis"] = t.get("analysis")
        for r in t["rows"]:
            per_class = {c: v[0] for c, v in r["per_class"].items()}
            out["miou"][r["variant"]] = {"miou": r["miou"][0], "miou_std": r["miou"][1],
                                         "pixel_accuracy": r["pixel_accuracy"][0], "seeds": r["seeds"],
                                         "per_class": per_class}
            out["miou_rows"].append({"variant": r["variant"], "miou": r["miou"][0], "miou_std": r["miou"][1],
                                     "pixel_accuracy": r["pixel_accuracy"][0], **per_class})
    mjson = run_dir / "metrics" / "metrics.json"
    out["metrics"] = None
    if mjson.is_file():
        m = json.loads(mjson.read_text())
        out["metrics"] = {"means": {k: v["mean"] for k, v in m["methods"].items()},
                          "per_image": {k: v["per_image"] for k, v in m["methods"].items()},
                          "convention": m.get("convention_text"), "lower_is_better": m.get("lower_is_better", [])}
    out["segmentation"] = {}
    for ev_path in sorted((run_dir / "segment").glob("*/seed*/eval.json")):
        ev = json.loads(ev_path.read_text())
        out["segmentation"].setdefault(ev["variant"], {})[ev["seed"]] = {
            "miou": ev["miou"], "per_class_iou": ev["per_class_iou"], "pixel_accuracy": ev["pixel_accuracy"],
            "confusion": np.asarray(ev["confusion"], dtype=np.int64), "images": ev["images"]}
    out["training"] = {}
    for log in sorted(run_dir.glob("train_fusion/*/log.csv")) + sorted(run_dir.glob("segment/*/seed*/log.csv")):
        out["training"][str(log.parent.relative_to(run_dir))] = _read_csv(log)
    out["stages"] = {json.loads(p.read_text())["key"]: json.loads(p.read_text())
                     for p in sorted((run_dir / "stages").glob("*.json"))}
    return out


def fuse(ir: np.ndarray, vi: np.ndarray, method: str = "laplacian", *, checkpoint: str | Path | None = None,
         device: str = "cpu", amp: str = "off", plugins: Sequence[str] = (), **kwargs: Any) -> np.ndarray:
    """Fuse one infrared/visible pair held in memory with a registered method.

    ``ir``: (H, W) uint8; ``vi``: (H, W, 3) RGB or (H, W) grey uint8 (float arrays in [0, 1]
    are accepted and scaled). Returns the fused uint8 image, (H, W, 3) for a colour visible.
    ``checkpoint``: trained weights (a trainable method such as ``sspfusion`` without one uses its
    shipped weights); ``amp``: ``off`` (fp32, the default), ``bf16``, ``fp16`` or ``auto`` for a
    learned method; ``kwargs``: the method's settings; ``plugins``: modules registering methods of
    your own."""
    from fusion.fuse import fuse_arrays, load_fusion_method

    def as_uint8(a: np.ndarray) -> np.ndarray:
        a = np.asarray(a)
        if a.dtype == np.uint8:
            return a
        if np.issubdtype(a.dtype, np.floating):
            return np.clip(np.round(a * 255.0), 0, 255).astype(np.uint8)
        raise FusesegError(f"images must be uint8 or float in [0, 1], got {a.dtype}")

    m = load_fusion_method(method, checkpoint=checkpoint, kwargs=kwargs, device=device, plugins=plugins)
    return fuse_arrays(m, as_uint8(ir), as_uint8(vi), device=device, amp=amp)
