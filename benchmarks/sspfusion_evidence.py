"""Evidence for SSPFusion: the shipped weights against classical fusions and the paper's Table 1,
on the 20 real MSRS pairs and on TNO, plus an ablation table (full, w/o SFE, w/o SPF).

    python -m benchmarks.sspfusion_evidence [--checkpoint pretrained] [--ablation-epochs N]
                                            [--no-ablation] [--out DIR]

Needs ../shared/data/real (msrs, tno; roadscene for the ablation training). Metrics: the
``sspfusion`` preset (reference conventions, MI in bits; MI and SSIM summed over the two sources,
as the paper's tables). SSPFusion is fused with one torch thread and batch 1, so its PNGs (and so
the metrics) are reproducible bit for bit; the shipped JSON's metrics come from
:func:`score_method` and are re-checked by the tests.

Targets (issues #12, #22): on MSRS at least 90 % of the paper's value on at least 5 of the 6
metrics; on MSRS and TNO a sharper fusion that keeps the max's information: SF and AG at least
1.02x the pixel-wise max's while VIF and Qabf stay at least 0.95x the max's; better than ``mean``
on at least 5 of the 6. With the shipped weights, the structure branch's IoU (P > 0.5 against
S_gt) at least 0.6 at every level (from the shipped JSON). The script prints which are met and
writes ``evidence.json`` into ``--out``.

Ablation: the three variants are trained with ``configs/sspfusion-pretrain.yaml``'s recipe
(same data, augmentation, lr schedule) but ``--ablation-epochs`` fusion epochs (a smaller budget
than the shipped weights, for time: say so when quoting it), then scored like the rest.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"
TABLE_METRICS = ("MI", "SF", "AG", "VIF", "Qabf", "SSIM")
#: Yang et al. 2023, Table 1 (MSRS), SSPFusion's row.
PAPER_MSRS = {"MI": 5.792, "SF": 11.007, "AG": 3.499, "VIF": 1.035, "Qabf": 0.703, "SSIM": 0.993}
BASELINES = ("mean", "max", "laplacian", "gff", "gtf")
ABLATIONS = ("sspfusion", "sspfusion_no_sfe", "sspfusion_no_spf")
CONVENTION = "sspfusion"


def fuse_reproducibly(method, ir: Path, vi: Path, out: Path) -> None:
    """Fuse in fp32 (amp off: the shipped metrics were made so) with one torch thread and batch 1
    (bit-reproducible PNGs on this CPU)."""
    from fusion.fuse import fuse_folder

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fuse_folder(method, ir, vi, out, "cpu", batch_size=1, progress=False, amp="off")
    finally:
        torch.set_num_threads(n)


def score_method(checkpoint, test_set: Path, out: Path, name: str = "sspfusion",
                 conventions: str = CONVENTION) -> dict[str, float]:
    """Fuse ``test_set`` (ir/, vi/) with ``checkpoint`` (a file or "pretrained") into ``out/name``
    and return its mean metrics (all 13, in the ``conventions`` preset: sspfusion by default)."""
    from fusion.fuse import load_fusion_method
    from fusion.scoring import score_folders

    method = load_fusion_method("sspfusion" if str(checkpoint) == "pretrained" else None,
                                checkpoint=checkpoint, device="cpu")
    fuse_reproducibly(method, test_set / "ir", test_set / "vi", out / name)
    res = score_folders(test_set / "ir", test_set / "vi", {name: out / name}, workers=1,
                        conventions=conventions)
    return dict(res.to_dict()["methods"][name]["mean"])


def score_all(fused: dict[str, Path], test_set: Path) -> dict[str, dict[str, float]]:
    from fusion.scoring import score_folders

    res = score_folders(test_set / "ir", test_set / "vi", fused, workers=2, conventions=CONVENTION)
    return {m: dict(v["mean"]) for m, v in res.to_dict()["methods"].items()}


def targets(means: dict[str, dict[str, float]], key: str, with_paper: bool) -> dict:
    """The issue's targets for method ``key`` (see the module doc)."""
    m, mx, mean = means[key], means["max"], means["mean"]
    out = {"vif_qabf_vs_max": {k: m[k] / mx[k] for k in ("VIF", "Qabf")},
           "sf_ag_vs_max": {k: m[k] / mx[k] for k in ("SF", "AG")},
           "better_than_mean": [k for k in TABLE_METRICS if m[k] > mean[k]]}
    out["vif_qabf_met"] = all(v >= 0.95 for v in out["vif_qabf_vs_max"].values())
    out["sharper_met"] = all(v >= 1.02 for v in out["sf_ag_vs_max"].values())
    out["mean_met"] = len(out["better_than_mean"]) >= 5
    if with_paper:
        out["vs_paper"] = {k: m[k] / PAPER_MSRS[k] for k in TABLE_METRICS}
        out["paper_90pct"] = [k for k in TABLE_METRICS if out["vs_paper"][k] >= 0.9]
        out["paper_met"] = len(out["paper_90pct"]) >= 5
    return out


def table(title: str, means: dict[str, dict[str, float]], paper: bool):
    from rich.table import Table

    t = Table(title=title)
    t.add_column("method")
    for k in TABLE_METRICS:
        t.add_column(k, justify="right")
    best = {k: max(v[k] for v in means.values()) for k in TABLE_METRICS}
    for name, v in means.items():
        t.add_row(name, *[f"{v[k]:.3f}" + ("*" if v[k] == best[k] else "") for k in TABLE_METRICS])
    if paper:
        t.add_row("paper, Table 1 (MSRS)", *[f"{PAPER_MSRS[k]:.3f}" for k in TABLE_METRICS], style="dim")
    return t


def train_ablations(epochs: int, out: Path) -> dict[str, Path]:
    """Train the three variants with the pretrain recipe and ``epochs`` fusion epochs."""
    from fusion.train import train_fusion
    from pipelines.commands.fusion import load_train_config

    ckpts = {}
    for name in ABLATIONS:
        cfg = load_train_config(REPO / "configs" / "sspfusion-pretrain.yaml",
                                [f"method={name}", f"epochs={epochs}"])
        run = out / "ablation" / name
        ckpts[name] = (run / "final.pt" if (run / "final.pt").is_file()
                       else train_fusion(cfg, run, resume=(run / "last.pt").is_file()))
    return ckpts


def main(argv=None) -> dict:
    from fusion.fuse import fuse_folder, load_fusion_method
    from pipelines.console import console

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", default="pretrained", help="SSPFusion weights (default: shipped)")
    ap.add_argument("--ablation-epochs", type=int, default=4)
    ap.add_argument("--ablation-runs", type=Path, help="folder holding ablation/<variant>/final.pt already")
    ap.add_argument("--no-ablation", action="store_true")
    ap.add_argument("--baselines", default=",".join(BASELINES),
                    help="classical fusions to compare; mean and max are always added, the targets name them (gtf is slow: ~2.5 min per 480x640 pair on a busy 2-core CPU)")
    ap.add_argument("--out", type=Path, default=REPO / "results" / "evidence-sspfusion")
    args = ap.parse_args(argv)
    if not (REAL / "msrs").is_dir():
        raise SystemExit(f"{REAL} is absent: this evidence needs ../shared/data/real")
    out = args.out
    baselines = [b for b in args.baselines.split(",") if b]
    baselines += [b for b in ("mean", "max") if b not in baselines]   # the targets are stated against them
    summary: dict = {"checkpoint": str(args.checkpoint), "convention": CONVENTION, "sets": {}, "timings": {}}
    if str(args.checkpoint) == "pretrained":
        from fusion.pretrained import shipped_info
        info = shipped_info()
        summary["shipped"] = {k: info.get(k) for k in ("command", "steps", "train_seconds", "data_summary",
                                                        "head", "rec_reduction", "structure_iou")}
        iou = (info.get("structure_iou") or {})
        console.print(f"shipped weights: {info.get('steps')} steps, head {info.get('head')}, L_rec "
                      f"{info.get('rec_reduction')}, structure IoU {iou.get('end_of_structure_phase')} -> "
                      f"{iou.get('end_of_training')} (>= 0.6 at every level: "
                      f"{'met' if iou.get('all_levels_at_least_0.6') else 'NOT met'})", highlight=False)
    for set_name in ("msrs", "tno"):
        ts = REAL / set_name
        fused: dict[str, Path] = {}
        t0 = time.perf_counter()
        method = load_fusion_method("sspfusion" if str(args.checkpoint) == "pretrained" else None,
                                    checkpoint=args.checkpoint, device="cpu")
        fused["sspfusion"] = out / set_name / "sspfusion"
        fuse_reproducibly(method, ts / "ir", ts / "vi", fused["sspfusion"])
        for b in baselines:
            fused[b] = out / set_name / b
            fuse_folder(load_fusion_method(b, device="cpu"), ts / "ir", ts / "vi", fused[b], "cpu",
                        progress=False)
        means = score_all(fused, ts)
        summary["timings"][f"{set_name} fuse+score (s)"] = round(time.perf_counter() - t0, 1)
        summary["sets"][set_name] = {"means": means,
                                     "targets": targets(means, "sspfusion", set_name == "msrs")}
        console.print(table(f"SSPFusion ({args.checkpoint}) vs classical fusions, {set_name} "
                            f"({CONVENTION} preset)", {k: means[k] for k in fused}, set_name == "msrs"))
    if not args.no_ablation:
        t0 = time.perf_counter()
        if args.ablation_runs:
            ckpts = {n: args.ablation_runs / "ablation" / n / "final.pt" for n in ABLATIONS}
        else:
            ckpts = train_ablations(args.ablation_epochs, out)
        summary["timings"]["ablation train (s)"] = round(time.perf_counter() - t0, 1)
        abl = {}
        for set_name in ("msrs", "tno"):
            ts = REAL / set_name
            fused = {}
            for n, ck in ckpts.items():
                fused[n] = out / "ablation" / set_name / n
                fuse_reproducibly(load_fusion_method(checkpoint=ck, device="cpu"), ts / "ir", ts / "vi",
                                  fused[n])
            fused["max"] = out / set_name / "max"
            abl[set_name] = score_all(fused, ts)
            console.print(table(f"Ablation ({args.ablation_epochs if not args.ablation_runs else 'given'} "
                                f"fusion epochs, same recipe), {set_name}", abl[set_name], False))
        summary["ablation"] = {"epochs": args.ablation_epochs, "means": abl,
                               "steps": {n: int(torch.load(ck, map_location="cpu", weights_only=False)["global_step"])
                                         for n, ck in ckpts.items()}}
    for set_name, d in summary["sets"].items():
        t = d["targets"]
        line = (f"{set_name}: SF/max {t['sf_ag_vs_max']['SF']:.3f}, AG/max {t['sf_ag_vs_max']['AG']:.3f} "
                f"(>= 1.02: {'met' if t['sharper_met'] else 'NOT met'}); VIF/max {t['vif_qabf_vs_max']['VIF']:.3f}, Qabf/max "
                f"{t['vif_qabf_vs_max']['Qabf']:.3f} (>= 0.95: {'met' if t['vif_qabf_met'] else 'NOT met'}); better "
                f"than mean on {len(t['better_than_mean'])}/6 ({'met' if t['mean_met'] else 'NOT met'})")
        if "paper_met" in t:
            line += (f"; >= 90 % of the paper on {len(t['paper_90pct'])}/6 "
                     f"({', '.join(t['paper_90pct'])}) ({'met' if t['paper_met'] else 'NOT met'})")
        console.print(line, highlight=False)
    out.mkdir(parents=True, exist_ok=True)
    from fuseseg.data.io import atomic_write_text

    atomic_write_text(out / "evidence.json", json.dumps(summary, indent=2, default=str))
    console.print(summary["timings"])
    return summary


if __name__ == "__main__":
    main()
