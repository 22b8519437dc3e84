"""How far can any fusion sharpen the pixel-wise max before VIF and Qabf drop? (issue #22's target)

    python -m benchmarks.sharpen_oracle [--set msrs] [--amounts 0.05,0.1,0.2,0.4] [--out DIR]

Issue #22 asks SSPFusion for SF and AG at least 2 % above the pixel-wise max while VIF and Qabf
stay at least 0.95x the max's. This scores hand-made fusions that sharpen the max by known amounts
(luminance only, colour as every fusion here):

* ``unsharp k``: ``M + k (M - blur(M))``, M = max(IR, VI_Y): unsharp masking of the max itself;
* ``weak-hp k``: ``M + k (W - blur(W))``, W = the weaker source at each pixel: the detail the max
  drops, added back (the correction L_fus rewarded on RoadScene, fusion/README.md);

blur: Gaussian, sigma 1 (5x5), reflect padding; output clipped to [0, 1]. Each variant's SF, AG,
VIF and Qabf are printed as ratios to the max's (sspfusion preset, the target's), on the 20 MSRS
pairs of ``../shared/data/real`` by default. It shows where the target sits on the sharpness /
information trade-off that the metrics themselves define, independent of any training.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.common import RESULTS, make_record, write_record
from benchmarks.sspfusion_evidence import CONVENTION, REAL, fuse_reproducibly
from fusion.base import LuminanceFusion
from fusion.structure import gaussian_blur

RATIO_METRICS = ("SF", "AG", "VIF", "Qabf")


class SharpenedMax(LuminanceFusion):
    """The pixel-wise max of the luminances plus ``amount`` x a high-pass (``kind``: ``unsharp`` of
    the max, or ``weak-hp`` of the weaker source), clipped to [0, 1]. Not registered: a probe."""

    def __init__(self, kind: str, amount: float):
        super().__init__()
        if kind not in ("unsharp", "weak-hp"):
            raise ValueError(f"kind must be unsharp or weak-hp, got {kind!r}")
        self.kind, self.amount = kind, float(amount)

    def fuse_y(self, ir: torch.Tensor, vi_y: torch.Tensor) -> torch.Tensor:
        m = torch.maximum(ir, vi_y)
        src = m if self.kind == "unsharp" else torch.minimum(ir, vi_y)
        return (m + self.amount * (src - gaussian_blur(src))).clamp(0, 1)


def score_ratios(test_set: Path, methods: dict) -> dict:
    """Fuse ``test_set`` (ir/, vi/) with every method of ``methods`` (name -> fusion method; "max"
    among them) and return the mean SF, AG, VIF, Qabf (``means``), their ratios to the max's
    (``ratios_to_max``) and whether each meets issue #22's target (``meets_issue22_target``)."""
    from fusion.scoring import score_folders

    with tempfile.TemporaryDirectory() as d:
        folders = {}
        for name, method in methods.items():
            folders[name] = Path(d) / name.replace(" ", "_")
            fuse_reproducibly(method, test_set / "ir", test_set / "vi", folders[name])
        res = score_folders(test_set / "ir", test_set / "vi", folders, workers=1, conventions=CONVENTION,
                            metrics=RATIO_METRICS).to_dict()["methods"]
    means = {name: dict(r["mean"]) for name, r in res.items()}
    ratios = {name: {k: means[name][k] / means["max"][k] for k in RATIO_METRICS} for name in means}
    meets = {name: r["SF"] >= 1.02 and r["AG"] >= 1.02 and r["VIF"] >= 0.95 and r["Qabf"] >= 0.95
             for name, r in ratios.items()}
    return {"means": means, "ratios_to_max": ratios, "meets_issue22_target": meets}


def print_and_write(out: dict, title: str, extra: dict[str, list[str]], key: str, stem: str,
                    folder: Path | None) -> Path:
    """Print the ratio table (``extra``: more columns, header -> one cell per variant) and write
    ``out`` as the JSON record ``<folder>/<stem>-<date>.json`` (default folder results/benchmarks)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for col in ("variant", *(f"{k}/max" for k in RATIO_METRICS), *extra, "SF, AG >= 1.02 and VIF, Qabf >= 0.95"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for i, (name, r) in enumerate(out["ratios_to_max"].items()):
        table.add_row(name, *(f"{r[k]:.3f}" for k in RATIO_METRICS), *(cells[i] for cells in extra.values()),
                      "yes" if out["meets_issue22_target"][name] else "no")
    Console().print(table)
    path = write_record(make_record([], {key: out}, quick=False, command=sys.argv),
                        Path(folder or RESULTS) / f"{stem}-{dt.date.today().isoformat()}.json")
    print(f"written: {path}")
    return path


def run(test_set: Path, amounts: list[float]) -> dict:
    from fusion.fuse import load_fusion_method

    variants = {"max": load_fusion_method("max", device="cpu")}
    for kind in ("unsharp", "weak-hp"):
        for a in amounts:
            variants[f"{kind} {a:g}"] = SharpenedMax(kind, a).eval()
    return {"test_set": str(test_set), "convention": CONVENTION, **score_ratios(test_set, variants)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="msrs", help="a folder of ../shared/data/real (ir/, vi/)")
    ap.add_argument("--amounts", default="0.05,0.1,0.2,0.4")
    ap.add_argument("--out", type=Path, default=None, help="JSON folder (default results/benchmarks)")
    args = ap.parse_args(argv)
    test_set = REAL / args.set
    if not (test_set / "ir").is_dir():
        raise SystemExit(f"error: {test_set}/ir not found: this benchmark needs ../shared/data/real/{args.set}.")
    out = run(test_set, [float(a) for a in args.amounts.split(",")])
    print_and_write(out, f"sharpened max on {args.set} ({CONVENTION} preset), ratio to max", {},
                    "sharpen_oracle", f"sharpen-oracle-{args.set}", args.out)
    return out


if __name__ == "__main__":
    main()
