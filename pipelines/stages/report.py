"""Stage ``report``: the mIoU table (``<run>/tables/miou.{md,csv,json}``, with bootstrap
confidence intervals of each fused variant's gain) from every ``segment/*/seed*/eval.json`` measured
under this run's protocol, the analysis (pairwise tests, day/night, metric-vs-mIoU correlations:
:mod:`pipelines.analysis`) with its tables (``tables/*.tex``, ``*.csv``), and the report
(``report.md``, ``report.html``, ``figures/``), assembled by :mod:`pipelines.report_page`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fuseseg.data.pairs import MSRS_CLASSES
from fuseseg.errors import FusesegError
from pipelines.analysis import analyse
from pipelines.config import to_dict
from pipelines.console import console
from pipelines.experiment import ExperimentConfig
from pipelines.report_tables import write_analysis_tables
from pipelines.report_text import protocol_markdown
from pipelines.runstate import fingerprint, named_fingerprint
from pipelines.stages.base import Plan, Stage, split_paths
from pipelines.stages.segment import data_text, fusion_protocol_parts, protocol_of


def stage_report(cfg: ExperimentConfig, run_dir: Path, plan: Plan, data_root: Path, variants: list[str],
                 seg_fps: dict[str, str], metrics_fp: str | None, fused: dict) -> str:
    from pipelines import report as rep

    fp = named_fingerprint("report", segment=seg_fps, metrics=metrics_fp, report=to_dict(cfg.report))
    with Stage(run_dir, "report", fp, plan, "report") as st:
        if st.skip:
            return fp
        class_names = list(MSRS_CLASSES[:cfg.data.num_classes])
        proto, proto_text = protocol_of(cfg)
        seg, per_seed, images = collect_results(run_dir, variants, cfg.seg_seeds, fingerprint(proto))
        per_image = {v: np.sum(c, axis=0) for v, c in per_seed.items()}       # seeds pooled
        missing = [v for v in variants if v not in seg]
        rows = rep.miou_rows(seg, class_names)
        conv = cfg.segmentation.miou_convention
        gains = []
        if "ir" in per_image and "vi" in per_image:
            gains = [rep.bootstrap_gain(per_image, v, n_boot=cfg.report.bootstrap, seed=cfg.seed, convention=conv)
                     for v in per_image if v not in ("ir", "vi")]
        mjson = run_dir / "metrics" / "metrics.json"
        a = analyse(per_seed, images, rows, gains, json.loads(mjson.read_text()) if mjson.is_file() else None,
                    convention=conv, n_resamples=cfg.report.permutations, seed=cfg.seed)
        tables = run_dir / "tables"
        rep.write_miou_tables(tables, rows, class_names, proto_text, proto, gains, a)
        write_analysis_tables(tables, rows, class_names, gains, a)
        console.print(rep.rich_miou_table(rows, class_names, proto_text, width=console.width))
        if missing:
            console.print(f"[yellow]no segmentation results yet for: {', '.join(missing)}[/] "
                          "(run them, e.g. on another machine with --variants, and copy their "
                          "segment/<variant>/ folders here)")
        te = split_paths(cfg, data_root, "test")
        scenes = rep.scene_rows(run_dir, te, {k: v[0].get("test") for k, v in fused.items()}, list(seg),
                                cfg.seg_seeds[0], cfg.report.figure_scenes, cfg.data.ir16)
        dn = a["day_night"]
        protocol_md = protocol_markdown(proto, data_text(cfg), fusion_protocol_parts(cfg), variants, len(images),
                                        dn["n_day"], dn["n_night"])
        rep.build_report(run_dir, rows, seg, class_names, list(cfg.seg_seeds), scenes, a, protocol_md)
        console.print(f"report: {run_dir / 'report.md'} and {run_dir / 'report.html'}")
    return fp


def collect_results(run_dir: Path, variants: list[str], seeds: list[int], proto_fp: str
                    ) -> tuple[dict[str, list[dict]], dict[str, list[np.ndarray]], list[str]]:
    """Every ``segment/<v>/seed<k>/eval.json`` measured under this protocol (``proto_fp``) and its
    per-image confusion matrices: (variant -> eval dicts, variant -> [(n, C, C) per seed], the
    test image names). Results of another protocol are left out, with a notice; a variant whose
    test images differ from the first one's is an error naming its folder."""
    seg, per_seed, stale, images = {}, {}, [], None
    for v in variants:
        for seed in seeds:
            p = run_dir / "segment" / v / f"seed{seed}" / "eval.json"
            if not p.is_file():
                continue
            ev = json.loads(p.read_text())
            if ev.get("protocol") != proto_fp:  # measured under other settings: never mixed in
                stale.append(f"{v}/seed{seed}")
                continue
            names = list(ev.get("images", []))
            if images is None:
                images = names
            elif names != images:
                raise FusesegError(f"{p} was evaluated on other test images than the other variants "
                                   "(a different data set?); rerun it with `fuseseg run CONFIG --only "
                                   f"segment,report --force segment --variants {v}`.")
            seg.setdefault(v, []).append(ev)
            per_seed.setdefault(v, []).append(np.load(p.parent / "per_image_confusion.npy"))
    if stale:
        console.print(f"[yellow]left out of the table, measured under another protocol:[/] {', '.join(stale)} "
                      "(rerun them with this config, e.g. `fuseseg run CONFIG --only segment,report`)")
    return seg, per_seed, images or []
