"""Data-loading speed of both trainers, next to the speed at which each trainer consumes samples.

For a synthetic MSRS-like data set generated into a temporary folder
(``fuseseg.data.synthetic.make_synthetic``): at the size of ``configs/default.yaml``'s synthetic
set (the default run's data) and at 480x640 (MSRS, the paper's data), measures decoded and
augmented samples/s of

* the fusion trainer's ``PairDataset`` (random crop + flips, keyed by (seed, epoch, index)) at
  ``configs/default.yaml``'s crop (128) and the paper's 256, with and without its decoded-image
  cache, through a DataLoader built as ``fusion/train.py`` builds it (``EpochBatchSampler``,
  persistent workers when workers > 0);
* the segmentation trainer's ``LabelledFolder`` (rescale 0.5-2, pad, crop, flip, ImageNet
  normalisation) at the default crop (192) and the paper's 480, through a DataLoader built as
  ``segmentation/train.py`` builds it: a new loader (new worker processes) every epoch;

with DataLoader workers 0, 1, 2 (and ``pin_memory`` on and off when CUDA is present: it only
matters for host-to-GPU copies). One timed *pass* iterates the whole set once (the samples/s an
epoch sees, worker start-up included where the trainer pays it every epoch); median over passes
after one warm-up pass.

Next to it, the samples/s each trainer consumes: one optimiser step (forward, losses, backward,
step) on random tensors of the trainer's crop and batch (SSPFusion fusion phase; DeepLabV3+
with the config's encoder, full phase). With workers = 0 loading and training alternate in one
process, so the share of an epoch spent loading is ``train_rate / (train_rate + load_rate)``;
loading is called the bottleneck when that share exceeds 20 % (then workers > 0 pay off, when
spare cores exist).

Usage: ``python -m benchmarks.bench_dataloading [--quick]`` (or ``python -m benchmarks --only
dataloading``).
"""
from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader, RandomSampler

from benchmarks.common import config_values, default_device, figure, timed

PAPER_SIZE = (480, 640)
BOTTLENECK_SHARE = 0.20


def _fusion_loader(ds, batch: int, workers: int, pin: bool, seed: int = 0):
    from fusion.datasets import EpochBatchSampler, worker_init

    sampler = EpochBatchSampler(len(ds), batch, seed=seed)
    loader = DataLoader(ds, batch_sampler=sampler, num_workers=workers, pin_memory=pin,
                        persistent_workers=workers > 0, worker_init_fn=worker_init,
                        generator=torch.Generator().manual_seed(seed))
    return loader, sampler


def fusion_loading(pairs, crop: int, batch: int, workers: int, cache: bool, pin: bool,
                   repeats: int) -> dict:
    """Samples/s of full passes over ``pairs`` through the fusion trainer's loader."""
    from fusion.datasets import PairDataset

    ds = PairDataset(pairs, crop=crop, train=True, cache=cache, seed=0)
    if cache and workers > 0:
        ds.preload()  # as fusion/train.py does: decode once, shared with the forked workers
    loader, sampler = _fusion_loader(ds, batch, workers, pin)
    n = sampler.batches_per_epoch * batch
    epoch = [0]

    def one_pass():
        sampler.set_epoch(epoch[0])
        epoch[0] += 1
        for _ in loader:
            pass

    t = timed(one_pass, repeats=repeats, warmup=1)  # the persistent workers stop with the loader
    return {"samples_per_pass": n, "samples_per_s": t.per_s(n), **t.as_dict()}


def seg_loading(images: Path, labels: Path, crop: int, batch: int, workers: int, pin: bool,
                repeats: int) -> dict:
    """Samples/s of full passes through the segmentation trainer's loader (a new DataLoader,
    hence new worker processes, per pass, as ``segmentation/train.py`` builds one per epoch)."""
    from segmentation.data import LabelledFolder, build_train_transform

    ds = LabelledFolder(images, labels, 9, build_train_transform(crop), "imagenet", 3, seed=0)
    n = (len(ds) // batch) * batch
    epoch = [0]

    def one_pass():
        ds.set_epoch(epoch[0])
        gen = torch.Generator().manual_seed(epoch[0])
        epoch[0] += 1
        loader = DataLoader(ds, batch_size=batch, sampler=RandomSampler(ds, generator=gen),
                            num_workers=workers, drop_last=True, pin_memory=pin)
        for _ in loader:
            pass

    t = timed(one_pass, repeats=repeats, warmup=1)
    return {"samples_per_pass": n, "samples_per_s": t.per_s(n), **t.as_dict()}


def fusion_train_rate(crop: int, batch: int, repeats: int, device=None) -> float:
    """Images/s of SSPFusion fusion-phase optimiser steps on random (batch, 1, crop, crop) pairs."""
    from fusion.models.sspfusion import SSPFusion

    device = device or torch.device("cpu")
    torch.manual_seed(0)
    model = SSPFusion().to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-4)
    ir, vi = torch.rand(2, batch, 1, crop, crop, device=device)

    def step():
        loss, _ = model.training_losses(ir, vi, "fusion")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed(step, repeats=repeats, warmup=1, device=device).per_s(batch)


def seg_train_rate(encoder: str, crop: int, batch: int, repeats: int, device=None) -> float:
    """Images/s of DeepLabV3+ full-phase optimiser steps (Dice+CE, SGD) on random inputs."""
    from segmentation.config import SegConfig
    from segmentation.losses import DiceCELoss
    from segmentation.model import build_model, set_phase, train_mode
    from segmentation.train import build_optimizer

    device = device or torch.device("cpu")
    cfg = SegConfig(encoder=encoder, crop_size=crop, batch_size=batch, frozen_batch_size=batch)
    torch.manual_seed(0)
    model = build_model(cfg.model_kwargs()).to(device)
    set_phase(model, "full")
    train_mode(model)
    opt = build_optimizer(model, cfg)
    loss_fn = DiceCELoss()
    x = torch.randn(batch, 3, crop, crop, device=device)
    y = torch.randint(0, 9, (batch, crop, crop), device=device)

    def step():
        loss, _, _ = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return timed(step, repeats=repeats, warmup=1, device=device).per_s(batch)


def verdict(load_rate: float, train_rate: float) -> dict:
    """Share of a workers=0 epoch spent loading: ``train / (train + load)`` (each sample costs
    1/load + 1/train seconds, 1/load of them loading), and whether that makes loading the
    bottleneck (share > :data:`BOTTLENECK_SHARE`)."""
    share = train_rate / (train_rate + load_rate)
    return {"loading_share": share, "bottleneck": share > BOTTLENECK_SHARE}


def run(quick: bool = False) -> dict:
    from fuseseg.data.pairs import load_split
    from fuseseg.data.synthetic import make_synthetic
    from segmentation.config import DEFAULT_ENCODER, PAPER_ENCODER

    device = default_device()
    cuda = device.type == "cuda"
    pins = (False, True) if cuda else (False,)
    workers_list = (0, 1, 2)
    repeats = 3 if quick else 5
    syn = config_values("default", "data.synthetic", {"size": [192, 256]})
    ft_default = config_values("default", "fusion_train", {"crop_size": 128, "batch_size": 8, "workers": 0})
    ft_paper = config_values("msrs", "fusion_train", {"crop_size": 256, "batch_size": 8, "workers": 8})
    sg_default = config_values("default", "segmentation", {"encoder": DEFAULT_ENCODER, "crop_size": 192,
                                                           "batch_size": 8, "workers": 0})
    sg_paper = config_values("msrs", "segmentation", {"encoder": PAPER_ENCODER, "crop_size": 480,
                                                      "batch_size": 4, "workers": 8})
    n_default, n_paper = (32, 16) if quick else (64, 32)
    result: dict = {"quick": quick, "device": str(device), "repeats": repeats, "cases": [],
                    "trainers": {}}
    with tempfile.TemporaryDirectory(prefix="bench-loading-") as tmp:
        sets = {"default": (Path(tmp) / "default", tuple(syn["size"]), n_default),
                "paper": (Path(tmp) / "paper", PAPER_SIZE, n_paper)}
        for root, size, n in sets.values():
            make_synthetic(root, n, 0, size=size, seed=0, progress=False)
        result["sets"] = {k: {"size": list(v[1]), "pairs": v[2]} for k, v in sets.items()}
        plans = [("fusion", "default", ft_default), ("fusion", "paper", ft_paper),
                 ("segmentation", "default", sg_default), ("segmentation", "paper", sg_paper)]
        for trainer, which, cfg in plans:
            root = sets[which][0]
            crop, batch = int(cfg["crop_size"]), int(cfg["batch_size"])
            for workers in workers_list:
                for pin in pins:
                    for cache in ((False, True) if trainer == "fusion" else (False,)):
                        if trainer == "fusion":
                            r = fusion_loading(load_split(root, "train"), crop, batch, workers, cache,
                                               pin, repeats)
                        else:
                            r = seg_loading(root / "train" / "vi", root / "train" / "Segmentation_labels",
                                            crop, batch, workers, pin, repeats)
                        result["cases"].append({"trainer": trainer, "config": which,
                                                "image_size": list(sets[which][1]), "crop": crop,
                                                "batch": batch, "workers": workers, "pin_memory": pin,
                                                "cache": cache, **r})
    # the samples/s each trainer consumes (the paper-sized segmenter only in the full run: ~25 s)
    reps = 2 if quick else 3
    rates = {("fusion", "default"): fusion_train_rate(int(ft_default["crop_size"]),
                                                      int(ft_default["batch_size"]), reps, device),
             ("fusion", "paper"): fusion_train_rate(int(ft_paper["crop_size"]), int(ft_paper["batch_size"]),
                                                    1 if quick else reps, device),
             ("segmentation", "default"): seg_train_rate(sg_default["encoder"], int(sg_default["crop_size"]),
                                                         int(sg_default["batch_size"]), reps, device)}
    if not quick or cuda:
        rates[("segmentation", "paper")] = seg_train_rate(sg_paper["encoder"], int(sg_paper["crop_size"]),
                                                          int(sg_paper["batch_size"]), 1, device)
    for (trainer, which), rate in rates.items():
        base = [c for c in result["cases"] if c["trainer"] == trainer and c["config"] == which
                and c["workers"] == 0 and not c["cache"] and not c["pin_memory"]][0]
        best = max((c for c in result["cases"] if c["trainer"] == trainer and c["config"] == which),
                   key=lambda c: c["samples_per_s"])
        result["trainers"][f"{trainer}/{which}"] = {
            "train_samples_per_s": rate, "load_samples_per_s_workers0": base["samples_per_s"],
            "best_loader": {k: best[k] for k in ("workers", "cache", "pin_memory", "samples_per_s")},
            **verdict(base["samples_per_s"], rate)}
    return result


def figures(result: dict) -> list[dict]:
    out = []
    for c in result["cases"]:
        name = (f"{c['trainer']} {c['config']} {c['image_size'][0]}x{c['image_size'][1]} crop {c['crop']} "
                f"b{c['batch']}, workers {c['workers']}" + (", cache" if c["cache"] else "")
                + (", pin" if c["pin_memory"] else ""))
        out.append(figure("data loading", name, c["samples_per_s"], "samples/s",
                          f"median of {len(c['times_s'])} passes of {c['samples_per_pass']} samples "
                          "after 1 warm-up pass"))
    for key, t in result["trainers"].items():
        out.append(figure("data loading", f"{key}: trainer consumes", t["train_samples_per_s"], "samples/s",
                          f"optimiser steps on {result['device']}"))
        out.append(figure("data loading", f"{key}: loading share (workers 0)", 100 * t["loading_share"], "%",
                          "bottleneck" if t["bottleneck"] else "not the bottleneck"))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sets, fewer repeats")
    from rich.console import Console

    from benchmarks.common import figures_table

    Console().print(figures_table(figures(run(quick=ap.parse_args().quick)), "data loading"))
