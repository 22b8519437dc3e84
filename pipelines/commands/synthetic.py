"""``fuseseg make-synthetic OUT``: render a labelled MSRS-like infrared/visible data set."""
from __future__ import annotations

from pathlib import Path

from rich.table import Table

from fuseseg.errors import ConfigError
from pipelines.console import console
from pipelines.runstate import folder_lock


def register(sub) -> None:
    p = sub.add_parser(
        "make-synthetic", help="render a labelled synthetic MSRS-like infrared/visible data set",
        description="Render street scenes (road, cars, people, bikes, curbs, car stops, guardrails, "
        "cones, bumps; about half at night) as aligned infrared/visible pairs with MSRS's 9-class "
        "labels, in the MSRS layout OUT/{train,test}/{ir,vi,Segmentation_labels}/00001D.png. "
        "The same seed gives byte-identical files for any number of workers.")
    p.add_argument("out", type=Path, help="output folder (created; files of the same name are replaced)")
    p.add_argument("--train", type=int, default=1083, metavar="N", help="training pairs (default: 1083, as MSRS)")
    p.add_argument("--test", type=int, default=361, metavar="M", help="test pairs (default: 361, as MSRS)")
    p.add_argument("--size", type=int, nargs=2, default=(240, 320), metavar=("H", "W"),
                   help="image height and width in pixels (default: 240 320; MSRS is 480 640)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--zoom", type=float, default=1.0, metavar="F",
                   help="cameras' focal-length factor: objects appear F times larger (default: 1.0)")
    p.add_argument("--workers", type=int, default=None, metavar="K",
                   help="worker processes (default: all CPU cores)")
    p.set_defaults(func=run)


def run(args) -> int:
    from fuseseg.data.synthetic import CLASS_NAMES, make_synthetic, valid_zoom
    from fuseseg.limits import check_image_shape

    if args.train < 0 or args.test < 0 or args.train + args.test == 0:
        raise ConfigError(f"make-synthetic: --train {args.train} --test {args.test}: give counts >= 0 "
                          "with at least one pair in total, e.g. --train 100 --test 20")
    if min(args.size) < 16:
        raise ConfigError(f"make-synthetic: --size {args.size[0]} {args.size[1]} is too small; "
                          "use at least --size 16 16 (e.g. --size 240 320)")
    check_image_shape(args.size, "make-synthetic --size")
    if args.workers is not None and args.workers < 1:
        raise ConfigError(f"make-synthetic: --workers {args.workers}: give at least 1, or omit it "
                          "to use every CPU core")
    if not valid_zoom(args.zoom):
        raise ConfigError(f"make-synthetic: --zoom {args.zoom}: give a focal-length factor > 0, e.g. --zoom 1.5")
    with folder_lock(args.out, "fuseseg make-synthetic OUT"):
        s = make_synthetic(args.out, args.train, args.test, size=tuple(args.size), seed=args.seed,
                           workers=args.workers, progress=True, zoom=args.zoom)
    table = Table(title=f"synthetic data set {s['out']}")
    table.add_column("class")
    table.add_column("pixel share (%)", justify="right")
    table.add_column("images", justify="right")
    for k, name in enumerate(CLASS_NAMES):
        table.add_row(f"{k} {name}", f"{100 * s['class_pixel_fraction'][name]:.2f}",
                      str(s["class_image_count"][name]))
    console.print(table)
    console.print(f"[green]wrote[/] {s['train']} train + {s['test']} test pairs "
                  f"({s['size'][0]}x{s['size'][1]}, {100 * s['night_fraction']:.0f}% night) in "
                  f"{s['seconds']:.1f} s ({s['pairs_per_s']:.1f} pairs/s, {s['workers']} workers)")
    return 0
