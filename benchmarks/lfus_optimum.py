"""What does L_fus itself ask for on the test images? (issue #22's target, independent of any network)

    python -m benchmarks.lfus_optimum [--set msrs] [--steps 200] [--variants paper,hp-paper,...]

Each variant minimises the SSPFusion fusion loss ``w_ssim L_ssim + w_smooth L_smooth + w_grad L_grad``
(fusion/losses.py, Eq. 8-11) directly over the fused image of every test pair, starting from the
pixel-wise max M (Adam on a free correction z, ``--steps`` steps, lr ``--lr``):

* ``paper``: F = clamp(M + z), the paper's 1 : 1 : 1 weights: the best image the paper's loss can
  describe, a bound on what any network trained with it converges to on this image;
* ``hp-...``: F = clamp(M + z - blur(z)): only a zero-mean, high-pass correction is allowed (no
  smooth intensity shift);
* ``gradN``: the weights 1 : 1 : N (L_grad N times heavier); ``smoothN``: 1 : N : 1;
  ``no-ssim``: 0 : 1 : 1;
* ``gainG``: L_grad's target is G times the stronger input's gradient (``grad_gain``, paper: 1).

Each optimum's SF, AG, VIF and Qabf are printed as ratios to the max's (sspfusion preset, the
target's: SF, AG >= 1.02 and VIF, Qabf >= 0.95), with L_fus of the optimum and of the max. It
tells whether the loss, at its own minimum on these very images, delivers "sharper than max while
keeping max's information", and which change of the loss or of the head's form would.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchmarks.sharpen_oracle import print_and_write, score_ratios
from benchmarks.sspfusion_evidence import CONVENTION, REAL
from fusion.base import LuminanceFusion
from fusion.losses import fusion_loss
from fusion.structure import high_pass

VARIANTS = {
    # name: (parametrisation, (w_ssim, w_smooth, w_grad), grad_gain)
    "paper": ("free", (1.0, 1.0, 1.0), 1.0),
    "hp-paper": ("highpass", (1.0, 1.0, 1.0), 1.0),
    "grad4": ("free", (1.0, 1.0, 4.0), 1.0),
    "hp-grad4": ("highpass", (1.0, 1.0, 4.0), 1.0),
    "no-ssim": ("free", (0.0, 1.0, 1.0), 1.0),
    "hp-no-ssim": ("highpass", (0.0, 1.0, 1.0), 1.0),
    "hp-smooth2": ("highpass", (1.0, 2.0, 1.0), 1.0),
    "hp-smooth4": ("highpass", (1.0, 4.0, 1.0), 1.0),
    "hp-smooth8": ("highpass", (1.0, 8.0, 1.0), 1.0),
    "hp-smooth4-gain1.1": ("highpass", (1.0, 4.0, 1.0), 1.1),
    "hp-smooth8-gain1.05": ("highpass", (1.0, 8.0, 1.0), 1.05),
    "gain1.2": ("free", (1.0, 1.0, 1.0), 1.2),
    "hp-gain1.2": ("highpass", (1.0, 1.0, 1.0), 1.2),
    "hp-gain1.5": ("highpass", (1.0, 1.0, 1.0), 1.5),
}


class LossOptimum(LuminanceFusion):
    """The fused Y that minimises L_fus (given weights) on this very pair, found by Adam from the
    max. ``form``: "free" (F = clamp(M + z)) or "highpass" (F = clamp(M + z - blur(z))). A probe,
    not registered; records L_fus of the max and of the optimum per image in ``self.losses``."""

    def __init__(self, form: str, weights: tuple[float, float, float], steps: int, lr: float,
                 grad_gain: float = 1.0):
        super().__init__()
        if form not in ("free", "highpass"):
            raise ValueError(f"form must be free or highpass, got {form!r}")
        self.form, self.steps, self.lr = form, int(steps), float(lr)
        self.weights = dict(zip(("w_ssim", "w_smooth", "w_grad"), weights, strict=True))
        self.weights["grad_gain"] = float(grad_gain)
        self.losses: list[tuple[float, float]] = []

    def _fused(self, m: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        if self.form == "highpass":
            z = high_pass(z)
        return (m + z).clamp(0, 1)

    def fuse_y(self, ir: torch.Tensor, vi_y: torch.Tensor) -> torch.Tensor:
        # the fusion contract runs under inference mode: leave it, with ordinary copies of the inputs
        with torch.inference_mode(False), torch.enable_grad():
            ir, vi_y = ir.float().clone(), vi_y.float().clone()
            m = torch.maximum(ir, vi_y)
            z = torch.zeros_like(m, requires_grad=True)
            opt = torch.optim.Adam([z], lr=self.lr)
            loss_max = float(fusion_loss(m, ir, vi_y, **self.weights)[0])
            for _ in range(self.steps):
                opt.zero_grad(set_to_none=True)
                loss = fusion_loss(self._fused(m, z), ir, vi_y, **self.weights)[0]
                loss.backward()
                opt.step()
            with torch.no_grad():
                fused = self._fused(m, z)
                self.losses.append((loss_max, float(fusion_loss(fused, ir, vi_y, **self.weights)[0])))
        return fused.detach().clone()


def run(test_set: Path, variants: list[str], steps: int, lr: float) -> dict:
    from fusion.fuse import load_fusion_method

    methods = {"max": load_fusion_method("max", device="cpu")}
    for v in variants:
        form, weights, gain = VARIANTS[v]
        methods[v] = LossOptimum(form, weights, steps, lr, gain).eval()
    scored = score_ratios(test_set, methods)
    losses = {v: {"lfus_max": sum(a for a, _ in methods[v].losses) / len(methods[v].losses),
                  "lfus_optimum": sum(b for _, b in methods[v].losses) / len(methods[v].losses)}
              for v in variants}
    return {"test_set": str(test_set), "convention": CONVENTION, "steps": steps, "lr": lr,
            "variants": {v: dict(zip(("form", "weights", "grad_gain"), VARIANTS[v])) for v in variants},
            **scored, "lfus": losses}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="msrs", help="a folder of ../shared/data/real (ir/, vi/)")
    ap.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--out", type=Path, default=None, help="JSON folder (default results/benchmarks)")
    args = ap.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {', '.join(unknown)}; valid: {', '.join(VARIANTS)}")
    test_set = REAL / args.set
    if not (test_set / "ir").is_dir():
        raise SystemExit(f"error: {test_set}/ir not found: this benchmark needs ../shared/data/real/{args.set}.")
    out = run(test_set, variants, args.steps, args.lr)
    cells = [f"{out['lfus'][n]['lfus_max']:.4f} -> {out['lfus'][n]['lfus_optimum']:.4f}" if n in out["lfus"] else ""
             for n in out["ratios_to_max"]]
    print_and_write(out, f"L_fus minimised per image on {args.set} ({CONVENTION} preset), ratio to max",
                    {"L_fus max -> optimum": cells}, "lfus_optimum", f"lfus-optimum-{args.set}", args.out)
    return out


if __name__ == "__main__":
    main()
