"""``fuseseg train-fusion`` and ``fuseseg fuse``.

    fuseseg train-fusion [CONFIG] [key=value ...] [--out DIR] [--resume]
    fuseseg fuse (--method NAME | --checkpoint FILE) --ir DIR --vi DIR --out DIR [--batch-size N]

CONFIG is a YAML file holding the FusionTrainConfig keys at the top level, or an experiment file
with those keys under ``fusion_train:`` (top-level ``plugins:`` are then loaded too). Overrides
are ``key=value`` (``fusion_train.key=value`` is accepted as well). ``--resume`` alone continues
the run in ``--out`` with the config.yaml saved there.
"""
from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from fuseseg.data.paths import check_disjoint
from fuseseg.errors import ConfigError
from pipelines.commands.common import count, out_folder
from pipelines.config import load_section_config, parse_overrides
from pipelines.console import console
from pipelines.runstate import folder_lock

SECTION = "fusion_train"



def load_train_config(path: str | Path | None, overrides: list[str]):
    """FusionTrainConfig from a YAML file (top-level keys or a ``fusion_train:`` section) plus
    ``key=value`` overrides."""
    from fusion.train_config import FusionTrainConfig

    return load_section_config(FusionTrainConfig, SECTION, path, overrides, inherit=("plugins",))


def _train(args) -> int:
    from fuseseg.limits import check_image_shape
    from fusion.train import resolve_pairs, train_fusion

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).is_file():
        overrides.insert(0, config)  # `fuseseg train-fusion key=value` without a config file
        config = None
    out = out_folder(args.out)
    given = config                       # the user's file (not the config.yaml --resume found in OUT)
    if config is None and args.resume and (out / "config.yaml").is_file():
        config = out / "config.yaml"
    if config is None and not overrides:
        raise ConfigError("train-fusion needs a config file or key=value settings (at least "
                          "data_root=...), e.g. `fuseseg train-fusion configs/fusion.yaml`.")
    cfg = load_train_config(config, overrides)
    _check_config_is_no_output(given, cfg, out)
    check_image_shape(cfg.synthetic_size, "synthetic_size")
    # the folders read (synthetic scenes are rendered into OUT later, so they are not inputs here)
    real = dataclasses.replace(cfg, synthetic_pairs=0)
    if real.data_root or real.ir_dir or real.vi_dir or real.extra_data:
        pairs = resolve_pairs(real)
        check_disjoint(out, {"ir": pairs.ir_dir, "vi": pairs.vi_dir}, "--out")
    from fuseseg.threads import scoped

    with folder_lock(out, "fuseseg train-fusion --out"), scoped(args.threads) as threads:
        console.print(f"[dim]{threads.threads} torch thread(s): {threads.why}[/]", highlight=False)
        if cfg.semantic_rounds:
            from pipelines.semantic_rounds import train_semantic_rounds
            final = train_semantic_rounds(cfg, out, resume=args.resume, progress=not args.no_progress,
                                          tensorboard=args.tensorboard)
        else:
            final = train_fusion(cfg, out, resume=args.resume, progress=not args.no_progress,
                                 tensorboard=args.tensorboard)
    console.print(f"trained fusion model: [bold]{final}[/]  (fuse with: fuseseg fuse "
                  f"--checkpoint {final} --ir IR_DIR --vi VI_DIR --out OUT_DIR)", highlight=False)
    return 0


def _check_config_is_no_output(config: str | Path | None, cfg, out: Path) -> None:
    """CONFIG must not be a file train-fusion writes into OUT (its config.yaml: unless unchanged)."""
    if config is None:
        return
    import yaml

    from fuseseg.data.paths import check_not_an_input
    from fusion.train_config import config_to_dict
    from pipelines.config import check_config_kept

    check_config_kept(config, out / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False),
                      "Copy it elsewhere and pass the copy, give --out another folder, or continue the "
                      "run in --out with `--resume` and no CONFIG.")
    for name in ("last.pt", "final.pt", "log.csv", "verdict.json"):
        check_not_an_input(out / name, {"CONFIG": config}, f"--out's {name}")


def _fuse(args) -> int:
    from fusion.fuse import fuse_folder, load_fusion_method
    from fusion.pretrained import describe, has_shipped

    out_folder(args.out)
    kwargs = parse_overrides(args.kwargs) if args.kwargs else None
    if args.checkpoint is None and has_shipped(args.method):
        console.print(describe(args.method) + "; --checkpoint FILE uses other weights", highlight=False)
    method = load_fusion_method(args.method, args.checkpoint, kwargs, args.device,
                                plugins=args.plugins or ())
    name = args.method or Path(args.checkpoint).stem
    check_disjoint(args.out, {"--ir": args.ir, "--vi": args.vi}, "--out")  # before its lock file
    with folder_lock(args.out, "fuseseg fuse --out"):
        summary = fuse_folder(method, args.ir, args.vi, args.out, device=args.device,
                              batch_size=args.batch_size, skip_existing=not args.overwrite,
                              progress=not args.no_progress, ir16=args.ir16, workers=args.workers,
                              name=name, compile=args.compile)
    console.print(f"fused {summary.written} pair(s) into {summary.out_dir} "
                  f"({summary.skipped} already there, skipped) in {summary.seconds:.1f} s"
                  + (f", {summary.images_per_s:.1f} img/s" if summary.written else ""),
                  highlight=False)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train-fusion", help="train a learned fusion method (SSPFusion by default)",
        description="Train a trainable fusion method. CONFIG: YAML with the training keys (top "
        "level or under fusion_train:); then key=value overrides.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("config", nargs="?", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="key=value settings, e.g. epochs=10 batch_size=4")
    p.add_argument("--out", default="runs/fusion", help="run folder (checkpoints, log.csv, config.yaml)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard/ (needs tensorboard)")
    p.add_argument("--threads", type=int, default=0, metavar="N",
                   help="torch threads (default 0: from the usable CPUs, fewer while the machine is loaded)")
    p.set_defaults(func=_train)

    f = subparsers.add_parser(
        "fuse", help="fuse a folder of infrared/visible pairs",
        description="Fuse every IR/VI pair (paired by file name) into OUT/NAME.png.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    f.add_argument("--method", help="registered method name (optional with --checkpoint)")
    f.add_argument("--checkpoint", help="trained fusion checkpoint (final.pt of train-fusion); "
                   "default for a method with shipped weights (sspfusion, and any in fusion/weights/): those ('pretrained')")
    f.add_argument("--ir", required=True, help="infrared folder")
    f.add_argument("--vi", required=True, help="visible folder")
    f.add_argument("--out", required=True, help="output folder")
    f.add_argument("--batch-size", type=count(1), default=4)
    f.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    f.add_argument("--workers", type=count(0), default=0, help="image-decoding worker processes")
    f.add_argument("--ir16", default="minmax", choices=["minmax", "scale"],
                   help="mapping of 16-bit infrared to 8 bits")
    f.add_argument("--kwargs", nargs="*", metavar="KEY=VALUE", help="method settings")
    f.add_argument("--plugins", nargs="*", metavar="MODULE", help="plug-in modules to import")
    f.add_argument("--overwrite", action="store_true", help="redo outputs that already exist")
    f.add_argument("--compile", action="store_true",
                   help="torch.compile the network (faster on many same-size pairs; ~15 s per new size)")
    f.add_argument("--no-progress", action="store_true", help="no progress bar")
    f.set_defaults(func=_fuse)
