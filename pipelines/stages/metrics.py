"""Stage ``metrics``: the fusion quality metrics of every fused variant's test images, into
``<run>/metrics/metrics.{csv,json,md}`` (per image and mean)."""
from __future__ import annotations

import json
from pathlib import Path

from fuseseg.errors import ConfigError
from pipelines.config import to_dict
from pipelines.experiment import ExperimentConfig
from pipelines.runstate import named_fingerprint, stage_record
from pipelines.stages.base import Plan, Stage, split_paths


def stage_metrics(cfg: ExperimentConfig, run_dir: Path, plan: Plan, data_root: Path,
                  fused: dict[str, tuple[Path, str]]) -> str | None:
    """Score the test split of every fused variant with the fusion quality metrics."""
    if not cfg.metrics.enabled or not fused:
        return None
    fp = named_fingerprint("metrics", metrics=to_dict(cfg.metrics), fuse={k: v[1] for k, v in fused.items()})
    with Stage(run_dir, "metrics", fp, plan, "metrics") as st:
        if not st.skip:
            from fusion.scoring import score_folders
            from pipelines.console import make_progress

            p = split_paths(cfg, data_root, "test")
            with make_progress(transient=True) as bar:
                task = bar.add_task("scoring the fused test images", total=None)
                res = score_folders(p["ir"], p["vi"], {k: v[0] for k, v in fused.items()},
                                    out_dir=run_dir / "metrics", workers=cfg.metrics.workers,
                                    conventions=cfg.metrics.convention, metrics=cfg.metrics.names,
                                    progress=lambda done, total: bar.update(task, completed=done, total=total))
            from fuseseg.data.io import atomic_write_text
            from pipelines.report import metrics_markdown

            atomic_write_text(run_dir / "metrics" / "metrics.md",
                              metrics_markdown(json.loads((run_dir / "metrics" / "metrics.json").read_text())))
            st.info["images"] = getattr(res, "n_images", None)
    return fp


def check_metric_sizes(cfg: ExperimentConfig, run_dir: Path) -> None:
    """Test images under VIF's minimum size fail now, before training, not in the metrics stage."""
    from fusion.metrics import METRICS, VIF_MIN_SIDE, resolve_metrics

    if not cfg.metrics.enabled or "VIF" not in resolve_metrics(cfg.metrics.names):
        return
    side = ((stage_record(run_dir, "data") or {}).get("test") or {}).get("min_side")
    if side is not None and side < VIF_MIN_SIDE:
        others = ",".join(m for m in METRICS if m != "VIF")
        raise ConfigError(f"metrics: the test images of {cfg.data.root or 'the synthetic data set'} have a side "
                          f"of {side} px, under VIF's minimum of {VIF_MIN_SIDE} px; leave VIF out "
                          f"(metrics.names=[{others}]) or turn the metrics off (metrics.enabled=false).")
