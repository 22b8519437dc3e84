"""Stage ``fuse/<method>``: fuse the train and test splits with one method into
``<run>/fused/<method>/{train,test}/`` (one PNG per pair, the data set's names and sizes), or check
a folder of already fused images against the data set."""
from __future__ import annotations

from pathlib import Path

from fuseseg.data.pairs import list_images, match_stems
from fuseseg.errors import DataError
from pipelines.experiment import ExperimentConfig, FusionMethodConfig
from pipelines.runstate import named_fingerprint
from pipelines.stages.base import Plan, Stage, fusion_amp, precision_of, prepare_dir, split_paths


def _check_folder_method(cfg: ExperimentConfig, m: FusionMethodConfig, data_root: Path, split: str) -> Path:
    """Validate a folder of already fused images against the data set's names and sizes."""
    from fuseseg.data.header import check_image_size
    from fuseseg.data.io import read_visible

    folder = Path(m.folder) / split
    paths = split_paths(cfg, data_root, split)
    ref = list_images(paths["ir"], "infrared")
    fused = list_images(folder, f"fused images of {m.name!r}")
    match_stems({"data set": ref, m.name: fused}, {"data set": paths["ir"], m.name: folder})
    import cv2

    for stem, p in fused.items():
        check_image_size(ref[stem])
        hdr = cv2.imread(str(ref[stem]), cv2.IMREAD_UNCHANGED)
        img = read_visible(p)
        if img.shape[:2] != hdr.shape[:2]:
            raise DataError(f"fused image {p} is {img.shape[1]}x{img.shape[0]} but the data set's image "
                            f"{ref[stem]} is {hdr.shape[1]}x{hdr.shape[0]} (WxH). Fused images must keep "
                            f"the source size; re-export method {m.name!r} at full size.")
    return folder


def stage_fuse(cfg: ExperimentConfig, run_dir: Path, plan: Plan, m: FusionMethodConfig, data_root: Path,
               ckpt: Path | None, train_fp: str, device) -> tuple[dict[str, Path], str]:
    """Fuse the train and test splits with method ``m``. Returns ({split: folder}, fp)."""
    # what the method's images come from: its training, its given checkpoint, the data (classical)
    upstream = ("folder files" if m.type == "folder" else f"fusion[{m.name}].checkpoint" if m.checkpoint
                else f"train_fusion/{m.name}" if ckpt is not None else "data")
    fp = named_fingerprint("fuse", **{upstream: train_fp, f"fusion[{m.name}].type": m.type,
                                      f"fusion[{m.name}].method": m.method, f"fusion[{m.name}].kwargs": m.kwargs,
                                      f"fusion[{m.name}].folder": str(m.folder), "data.ir16": cfg.data.ir16,
                                      "precision": precision_of(device, fusion_amp(cfg, m)),
                                      # compiled graphs round a little differently (an input only when on,
                                      # so earlier run folders stay current)
                                      **({"fuse_compile": True} if cfg.fuse_compile and ckpt is not None
                                         else {})})
    if m.type == "folder":
        out = {}
        with Stage(run_dir, f"fuse/{m.name}", fp, plan, "fuse") as st:
            for split in ("train", "test"):
                if (Path(m.folder) / split).is_dir() or split == "test":
                    out[split] = Path(m.folder) / split
                    if not st.skip:
                        _check_folder_method(cfg, m, data_root, split)
        return out, fp
    out_root = run_dir / "fused" / m.name
    dirs = {s: out_root / s for s in ("train", "test")}
    with Stage(run_dir, f"fuse/{m.name}", fp, plan, "fuse") as st:
        if not st.skip:
            from fuseseg.runtime import release_memory
            from fusion.fuse import fuse_folder, load_fusion_method

            # build the method first: a bad checkpoint must not clear the earlier fused images;
            # the method name is checked against the checkpoint's (another method's file is an error)
            method = load_fusion_method(m.method, checkpoint=ckpt, kwargs=m.kwargs, device=device)
            prepare_dir(out_root, fp, run_dir, st.key, fresh=st.forced)
            for split, out in dirs.items():
                p = split_paths(cfg, data_root, split)
                fuse_folder(method, p["ir"], p["vi"], out, device, batch_size=cfg.fuse_batch_size,
                            skip_existing=True, ir16=cfg.data.ir16, amp=fusion_amp(cfg, m),
                            name=f"{m.name}, {split}", compile=cfg.fuse_compile)
            del method
            release_memory()   # the fusing's temporaries: freed, and given back to the OS
    return dirs, fp
