"""Stage ``report``: the mIoU table (``<run>/tables/miou.{md,csv,json}``, with bootstrap
confidence intervals of each fused variant's gain) from every ``segment/*/seed*/eval.json`` measured
under this run's protocol, and the report (``report.md``, ``report.html``, ``figures/``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fuseseg.data.pairs import MSRS_CLASSES
from pipelines.config import to_dict
from pipelines.console import console
from pipelines.experiment import ExperimentConfig
from pipelines.runstate import fingerprint, named_fingerprint
from pipelines.stages.base import Plan, Stage, split_paths
from pipelines.stages.segment import protocol_of


def stage_report(cfg: ExperimentConfig, run_dir: Path, plan: Plan, data_root: Path, variants: list[str],
                 seg_fps: dict[str, str], metrics_fp: str | None, fused: dict) -> str:
    from pipelines import report as rep

    fp = named_fingerprint("report", segment=seg_fps, metrics=metrics_fp, report=to_dict(cfg.report))
    with Stage(run_dir, "report", fp, plan, "report") as st:
        if st.skip:
            return fp
        class_names = list(MSRS_CLASSES[:cfg.data.num_classes])
        seg, per_image, stale = {}, {}, []
        proto, proto_text = protocol_of(cfg)
        proto_fp = fingerprint(proto)
        for v in variants:
            evs = []
            for seed in cfg.seg_seeds:
                p = run_dir / "segment" / v / f"seed{seed}" / "eval.json"
                if p.is_file():
                    ev = json.loads(p.read_text())
                    if ev.get("protocol") != proto_fp:  # measured under other settings: never mixed in
                        stale.append(f"{v}/seed{seed}")
                        continue
                    evs.append(ev)
                    cm = np.load(p.parent / "per_image_confusion.npy")
                    per_image[v] = per_image.get(v, 0) + cm
            if evs:
                seg[v] = evs
        missing = [v for v in variants if v not in seg]
        if stale:
            console.print(f"[yellow]left out of the table, measured under another protocol:[/] {', '.join(stale)} "
                          "(rerun them with this config, e.g. `fuseseg run CONFIG --only segment,report`)")
        rows = rep.miou_rows(seg, class_names)
        gains = []
        if "ir" in per_image and "vi" in per_image:
            for v in per_image:
                if v not in ("ir", "vi"):
                    gains.append(rep.bootstrap_gain(per_image, v, n_boot=cfg.report.bootstrap, seed=cfg.seed,
                                                    convention=cfg.segmentation.miou_convention))
        tables = run_dir / "tables"
        rep.write_miou_tables(tables, rows, class_names, proto_text, proto, gains)
        console.print(rep.rich_miou_table(rows, class_names, proto_text, width=console.width))
        if missing:
            console.print(f"[yellow]no segmentation results yet for: {', '.join(missing)}[/] "
                          "(run them, e.g. on another machine with --variants, and copy their "
                          "segment/<variant>/ folders here)")
        te = split_paths(cfg, data_root, "test")
        scenes = rep.scene_rows(run_dir, te, {k: v[0].get("test") for k, v in fused.items()}, list(seg),
                                cfg.seg_seeds[0], cfg.report.figure_scenes, cfg.data.ir16)
        rep.build_report(run_dir, rows, seg, class_names, list(cfg.seg_seeds), scenes)
        console.print(f"report: {run_dir / 'report.md'} and {run_dir / 'report.html'}")
    return fp
