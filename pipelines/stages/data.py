"""Stage ``data``: locate the labelled data set, or generate the synthetic one in the run folder
(``<run>/data/``, MSRS layout), and validate every file once. Writes ``stages/data.json`` with the
pairs, day/night counts and the smallest image side of each split, and, for the generated data
set, the manifest of its files (``files``): a generated file edited since then changes the data
fingerprint that every later stage includes, as an edited file of an external data set does."""
from __future__ import annotations

from pathlib import Path

from fuseseg.data.pairs import load_split
from pipelines.config import to_dict
from pipelines.experiment import ExperimentConfig
from pipelines.runstate import (
    folder_manifest,
    fuseseg_version,
    named_fingerprint,
    stage_record,
    update_stage_record,
)
from pipelines.stages.base import Plan, Stage, prepare_dir


def stage_data(cfg: ExperimentConfig, run_dir: Path, plan: Plan) -> tuple[Path, str]:
    """Locate (or generate) the data set; validate it once. Returns (root, fingerprint)."""
    d = cfg.data
    synthetic = {"data.synthetic": to_dict(d.synthetic), "data.num_classes": d.num_classes,
                 "fuseseg_version": fuseseg_version()}
    if d.root is None:
        root = run_dir / "data"
        fp = named_fingerprint("synthetic", **synthetic)
    else:
        root = Path(d.root)
        # the manifest (names, sizes, mtimes): an edited, added or removed file redoes every stage
        fp = named_fingerprint("folder", **{"data.root": str(root.resolve()), "data files": folder_manifest(root),
                                            "data.layout": to_dict(d.layout), "data.ir16": d.ir16,
                                            "data.num_classes": d.num_classes, "fuseseg_version": fuseseg_version()})
    with Stage(run_dir, "data", fp, plan, "data") as st:
        if not st.skip:
            if d.root is None:
                from fuseseg.data.synthetic import make_synthetic

                prepare_dir(root, fp, run_dir, "data", fresh=st.forced)
                s = d.synthetic
                make_synthetic(root, s.train, s.test, size=tuple(s.size), seed=s.seed, zoom=s.zoom)
                st.info["files"] = folder_manifest(root)
            if d.validate:
                from fuseseg.data.validate import validate_pairset

                for split in ("train", "test"):
                    pairs = load_split(root, split, d.layout, require_labels=True)
                    summ = validate_pairset(pairs, d.num_classes, d.ir16)
                    st.info[split] = {"pairs": summ.pairs, "day": summ.day, "night": summ.night,
                                      "min_side": min((min(hw) for hw in summ.sizes), default=None)}
    if d.root is None:
        fp = _generated_files_fp(run_dir, root, fp, synthetic, plan)
    return root, fp


def _generated_files_fp(run_dir: Path, root: Path, fp: str, synthetic: dict, plan: Plan) -> str:
    """The fingerprint later stages include for the generated data set: the data stage's own
    while its files are the ones it recorded, else one that includes their current manifest
    (names, sizes, mtimes). A record without a manifest (written by an older fuseseg) gets the
    current one (not in a dry run), so that only later edits count."""
    rec = stage_record(run_dir, "data") or {}
    if rec.get("status") != "done" or rec.get("fingerprint") != fp or not root.is_dir():
        return fp
    current = folder_manifest(root)
    if "files" not in rec:
        if not plan.dry_run:
            update_stage_record(run_dir, "data", files=current)
        return fp
    if rec["files"] == current:
        return fp
    return named_fingerprint("synthetic", **synthetic, **{"data files": current})
