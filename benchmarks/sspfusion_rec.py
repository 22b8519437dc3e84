"""How large is alpha L_rec against L_fus? Both reductions of Eq. 7, on the training data of a run.

    python -m benchmarks.sspfusion_rec RUN_DIR [CHECKPOINT ...] [--batches 8] [--json FILE]

For the untrained model (the run's kwargs, seed 0) and each CHECKPOINT (default: RUN_DIR/final.pt),
on ``--batches`` training batches of the run's recipe (its crops, photometric augmentation and
data, fixed seed), it prints and records, per reduction (``norm``: Eq. 7 as printed,
``sqrt(||P - S||^2 + eps^2)`` per map; ``mean``: the per-pixel Charbonnier mean):
``alpha L_rec``, ``L_fus`` and their ratio, and the structure IoU per level. The reduction used
in training is the checkpoint's ``rec_reduction``; the other one is computed on the same P.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def measure(model, batches, alpha: float) -> dict:
    from fusion.losses import fusion_loss, rec_loss
    from fusion.structure import structure_pyramid

    sums: dict[str, float] = {}
    model.eval()
    with torch.no_grad():
        for ir, vi in batches:
            ir_p, vi_p = model._pad(ir, vi)
            fused, p_ir, p_vi = model._run(ir_p, vi_p, need_structure=True)
            l_fus = float(fusion_loss(fused[..., :ir.shape[-2], :ir.shape[-1]], ir, vi)[0])
            out = {"fus": l_fus}
            for red in ("norm", "mean"):
                terms = [rec_loss(p, s, model.charbonnier_eps, red)
                         for img, preds in ((ir_p, p_ir), (vi_p, p_vi))
                         for p, s in zip(preds, structure_pyramid(img, model.levels), strict=True)]
                out[f"alpha_rec_{red}"] = alpha * float(torch.stack(terms).mean())
            out.update(model._structure_iou(ir_p, vi_p, p_ir, p_vi))
            for k, v in out.items():
                sums[k] = sums.get(k, 0.0) + v
    res = {k: v / len(batches) for k, v in sums.items()}
    for red in ("norm", "mean"):
        res[f"ratio_{red}"] = res[f"alpha_rec_{red}"] / res["fus"]
    return res


def main(argv=None) -> dict:
    from fusion.datasets import PairDataset
    from fusion.registry import create_method
    from fusion.train import FusionTrainConfig, resolve_pairs

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("checkpoints", nargs="*", type=Path)
    ap.add_argument("--batches", type=int, default=8)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    cks = args.checkpoints or [args.run / "final.pt"]
    first = torch.load(cks[0], map_location="cpu", weights_only=False)
    cfg = FusionTrainConfig(**{k: v for k, v in first["config"].items()})
    ds = PairDataset(resolve_pairs(cfg, args.run), crop=cfg.crop_size, train=True, seed=123,
                     photometric=cfg.photometric_range())
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(ds), generator=g).tolist()
    bs = cfg.batch_size
    batches = []
    for b in range(args.batches):
        items = [ds[i] for i in order[b * bs:(b + 1) * bs]]
        batches.append((torch.stack([x[0] for x in items]), torch.stack([x[1] for x in items])))
    results = {}
    torch.manual_seed(cfg.seed)
    init = create_method(first["method"], **first["kwargs"])
    alpha = init.alpha
    results["untrained"] = measure(init, batches, alpha)
    for ck in cks:
        c = torch.load(ck, map_location="cpu", weights_only=False)
        m = create_method(c["method"], **c["kwargs"])
        m.load_state_dict(c["state_dict"])
        results[f"{ck} (step {c['global_step']}, {c.get('phase')})"] = measure(m, batches, alpha)
    print(f"{'model':60s} {'L_fus':>7s} {'aRec norm':>9s} {'ratio':>6s} {'aRec mean':>9s} {'ratio':>6s}  IoU 1/2/3")
    for name, r in results.items():
        print(f"{name[-60:]:60s} {r['fus']:7.4f} {r['alpha_rec_norm']:9.4f} {r['ratio_norm']:6.3f} "
              f"{r['alpha_rec_mean']:9.4f} {r['ratio_mean']:6.3f}  "
              + "/".join(f"{r[k]:.3f}" for k in sorted(r) if k.startswith("iou")))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
