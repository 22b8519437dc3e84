"""``fuseseg segment train`` and ``fuseseg segment eval``.

    fuseseg segment train --images DIR --labels DIR --out DIR [--config YAML] [key=value ...]
                          [--val-images DIR --val-labels DIR] [--resume]
    fuseseg segment eval --checkpoint FILE --images DIR --labels DIR [--save-predictions DIR]
                         [--convention all|exclude_background] [--json FILE]

The YAML holds the SegConfig keys at the top level, or an experiment file with them under
``segmentation:``. Overrides are ``key=value`` (``segmentation.key=value`` works too). ``--resume``
without ``--config`` continues with the config.yaml saved in ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

from rich.table import Table

from fuseseg.data.paths import check_disjoint, check_not_an_input
from pipelines.commands.common import out_file, out_folder
from pipelines.config import load_section_config
from pipelines.console import console
from pipelines.runstate import folder_lock

SECTION = "segmentation"



def load_seg_config(path: str | Path | None, overrides: list[str]):
    """SegConfig from a YAML file (top-level keys or a ``segmentation:`` section) plus
    ``key=value`` overrides."""
    from segmentation.config import SegConfig

    return load_section_config(SegConfig, SECTION, path, overrides)


def _train(args) -> int:
    from segmentation.train import train_segmenter

    config = args.config
    out = out_folder(args.out)
    if config is None and args.resume and (out / "config.yaml").is_file():
        config = out / "config.yaml"
    cfg = load_seg_config(config, list(args.overrides))
    if args.config is not None and not args.resume:   # it writes OUT/config.yaml (not when resuming)
        import yaml

        from pipelines.config import check_config_kept

        check_config_kept(args.config, out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False),
                          "Copy it elsewhere and pass the copy, or give --out another folder.")
    warning = cfg.random_frozen_encoder_warning()
    if warning and os.environ.get("RANK", "0") == "0":
        from pipelines.console import err_console

        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    check_disjoint(out, {"--images": args.images, "--labels": args.labels, "--val-images": args.val_images,
                         "--val-labels": args.val_labels}, "--out")
    from fuseseg.threads import scoped

    with folder_lock(out, "fuseseg segment train --out"), scoped(args.threads) as threads:
        console.print(f"[dim]{threads.threads} torch thread(s): {threads.why}[/]", highlight=False)
        final = train_segmenter(args.images, args.labels, cfg, out, resume=args.resume,
                                progress=not args.no_progress, val_images_dir=args.val_images,
                                val_labels_dir=args.val_labels, tensorboard=args.tensorboard)
    console.print(f"trained segmenter: [bold]{final}[/]  (evaluate with: fuseseg segment eval "
                  f"--checkpoint {final} --images TEST_IMAGES --labels TEST_LABELS)", highlight=False)
    return 0


def _fmt(x: float | None) -> str:
    return "absent" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.2f}"


def result_table(res, title: str) -> Table:
    """A rich table: per-class IoU (%), pixel counts, then mIoU (both conventions) and accuracy."""
    table = Table(title=title)
    for col, just in (("class", "left"), ("IoU %", "right"), ("labelled px", "right"),
                      ("predicted px", "right")):
        table.add_column(col, justify=just)
    for k, row in enumerate(res.per_class()):
        table.add_row(f"{k} {row['class']}", _fmt(row["iou"]), str(row["gt_pixels"]),
                      str(row["pred_pixels"]))
    table.add_section()
    mark = {"all": "", "exclude_background": ""}
    mark[res.convention] = " *"
    table.add_row(f"mIoU, all classes{mark['all']}", _fmt(res.miou_all), "", "")
    table.add_row(f"mIoU, excl. class 0{mark['exclude_background']}",
                  _fmt(res.miou_exclude_background), "", "")
    table.add_row("pixel accuracy", _fmt(res.pixel_accuracy), "", "")
    return table


def _eval(args) -> int:
    from fuseseg.data.io import atomic_write_text
    from segmentation.evaluate import evaluate_segmenter

    out_file(args.json, "--json")
    out_folder(args.save_predictions, "--save-predictions")
    inputs = {"--images": args.images, "--labels": args.labels}
    check_disjoint(args.json, inputs, "--json")
    check_not_an_input(args.json, {"--checkpoint": args.checkpoint}, "--json")
    check_disjoint(args.save_predictions, inputs, "--save-predictions")  # before its lock file
    with folder_lock(args.save_predictions, "fuseseg segment eval --save-predictions"):
        res = evaluate_segmenter(args.checkpoint, args.images, args.labels, device=args.device,
                                 save_predictions=args.save_predictions, convention=args.convention,
                                 progress=not args.no_progress)
    console.print(result_table(res, f"{args.checkpoint} on {args.images} ({res.num_images} images; "
                                    f"* = convention '{res.convention}')"))
    console.print(f"mIoU ({res.convention}): [bold]{_fmt(res.miou)}[/]", highlight=False)
    if args.json:
        atomic_write_text(args.json, json.dumps(res.to_dict(), indent=2))
        console.print(f"wrote {args.json}", highlight=False)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("segment", help="train / evaluate a DeepLabV3+ segmenter",
                              description="DeepLabV3+ under the paper's protocol: `segment train`, "
                              "`segment eval`.")
    sub = p.add_subparsers(dest="segment_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    t = sub.add_parser("train", help="train a segmenter on an image folder + label folder",
                       description="Train DeepLabV3+ (Dice+CE, SGD, cosine lr, frozen-encoder "
                       "warm-up). Images (grey or colour) and labels pair by file name.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    t.add_argument("--images", required=True, help="training images (ir, vi or fused)")
    t.add_argument("--labels", required=True, help="label maps (class ids, 255 = ignore)")
    t.add_argument("--out", required=True, help="run folder (last.pt, final.pt, log.csv, config.yaml)")
    t.add_argument("--config", help="YAML with SegConfig keys (top level or under segmentation:)")
    t.add_argument("overrides", nargs="*", help="key=value settings, e.g. epochs=10 encoder=resnet18")
    t.add_argument("--val-images", help="validation images (optional)")
    t.add_argument("--val-labels", help="validation labels (with --val-images)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--tensorboard", action="store_true", help="also log to OUT/tensorboard/ (needs tensorboard)")
    t.add_argument("--threads", type=int, default=0, metavar="N",
                   help="torch threads (default 0: from the usable CPUs, fewer while the machine is loaded)")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="mIoU of a trained segmenter on a labelled folder",
                       description="One confusion matrix over the whole folder at full image size; "
                       "per-class IoU, mIoU and pixel accuracy.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    e.add_argument("--checkpoint", required=True, help="final.pt of `segment train`")
    e.add_argument("--images", required=True, help="test images")
    e.add_argument("--labels", required=True, help="test labels")
    e.add_argument("--save-predictions", help="folder for colour PNG predictions")
    e.add_argument("--convention", choices=["all", "exclude_background"], default="all",
                   help="mIoU over all classes (field convention) or without class 0")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    e.add_argument("--json", help="also write the result as JSON here")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=_eval)
