"""Stage ``data``: locate the labelled data set, or generate the synthetic one in the run folder
(``<run>/data/``, MSRS layout), and validate every file once. Writes ``stages/data.json`` with the
pairs, day/night counts and the smallest image side of each split."""
from __future__ import annotations

from pathlib import Path

from fuseseg.data.pairs import load_split
from pipelines.config import to_dict
from pipelines.experiment import ExperimentConfig
from pipelines.runstate import folder_manifest, fuseseg_version, named_fingerprint
from pipelines.stages.base import Plan, Stage, prepare_dir


def stage_data(cfg: ExperimentConfig, run_dir: Path, plan: Plan) -> tuple[Path, str]:
    """Locate (or generate) the data set; validate it once. Returns (root, fingerprint)."""
    d = cfg.data
    if d.root is None:
        root = run_dir / "data"
        fp = named_fingerprint("synthetic", **{"data.synthetic": to_dict(d.synthetic), "data.num_classes": d.num_classes,
                                               "fuseseg_version": fuseseg_version()})
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
            if d.validate:
                from fuseseg.data.validate import validate_pairset

                for split in ("train", "test"):
                    pairs = load_split(root, split, d.layout, require_labels=True)
                    summ = validate_pairset(pairs, d.num_classes, d.ir16)
                    st.info[split] = {"pairs": summ.pairs, "day": summ.day, "night": summ.night,
                                      "min_side": min((min(hw) for hw in summ.sizes), default=None)}
    return root, fp
