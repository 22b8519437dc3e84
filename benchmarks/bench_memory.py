"""Does ``configs/msrs.yaml`` (the paper's settings) fit a 24 GB GPU? An estimate measured on CPU.

Method: for one training step of each trainer, the tensors autograd saves for the backward pass
are counted with ``torch.autograd.graph.saved_tensors_hooks`` during the forward pass (each
storage once; parameters excluded, they are counted separately). Saved activations grow
linearly with the batch, so they are measured at two small batches b1 < b2 (2 and 4: the ASPP
pooling BatchNorm of DeepLabV3+ needs 2 samples; cheap on CPU) and extrapolated:
``saved(B) = saved(b1) + (B - b1) * (saved(b2) - saved(b1)) / (b2 - b1)``. Measured in float32 and under bf16
autocast (what ``amp: auto`` picks on a GPU that supports bf16; on CPU the same ops are cast).

    GPU estimate = W + T * (1 gradient + k optimiser states)   (W = bytes of all parameters,
                   T = of the trained ones; k = 2 for Adam, 1 for SGD with momentum)
                 + saved activations at the config's batch
                 + 25 % of it for the backward pass's transient gradients of activations
                 + 1 GiB CUDA context, cuDNN workspace and allocator slack

Steps: SSPFusion with the ``kwargs`` of ``configs/msrs.yaml`` (``PAPER_LIKE_CHANNELS``, 4.85 M
parameters), both phases, 256x256 crops, batch 8 (``fusion_train``); DeepLabV3+ with the resnet50 encoder at 480x480, batch 8 with everything
trainable (the config trains batch 8 with the encoder frozen and batch 4 unfrozen, so this is an
upper bound; the frozen phase saves no encoder activations). It is an estimate: the caching
allocator's fragmentation and cuDNN algorithm choices vary by GPU; on a GPU, ``bench_e2e``'s
per-stage ``gpu_peak_mib`` is the measured number.

What the estimate omits: cuDNN / cuBLAS workspaces beyond the 1 GiB allowance (``cudnn.benchmark``
may try algorithms with large workspaces), the DataLoader's pinned-memory batches, the
``torch.compile`` caches (``compile: true``), DDP's gradient buckets (one more copy of the
trained parameters per process), fragmentation of the caching allocator, and the evaluation /
fusing passes (no autograd, smaller). bf16 figures assume autocast keeps float32 master weights
(it does) and that the losses run in float32 (they do: ``fusion.losses``).

Usage: ``python -m benchmarks.bench_memory``.
"""
from __future__ import annotations

import argparse
import contextlib

import torch

from benchmarks.common import config_values, figure

GIB = 2**30
CONTEXT_BYTES = 1 * GIB
BACKWARD_FACTOR = 0.25
BUDGET_GB = 24


def saved_tensor_bytes(step, exclude: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while ``step()`` runs its forward pass,
    storages of ``exclude`` (the parameters) left out."""
    skip = {p.untyped_storage().data_ptr() for p in exclude}
    seen: dict[int, int] = {}

    def pack(t):
        try:
            st = t.untyped_storage()
            ptr = st.data_ptr()
            if ptr not in skip:
                seen[ptr] = max(seen.get(ptr, 0), st.nbytes())
        except (RuntimeError, NotImplementedError):  # e.g. sparse / wrapper tensors
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = step()
    del out
    return sum(seen.values())


def _autocast(amp: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if amp else contextlib.nullcontext()


def msrs_sspfusion_kwargs() -> dict:
    """The ``kwargs`` of the ``sspfusion`` entry of ``configs/msrs.yaml``'s ``fusion:`` list ({} if absent)."""
    import yaml

    from benchmarks.common import REPO

    path = REPO / "configs" / "msrs.yaml"
    doc = yaml.safe_load(path.read_text()) if path.is_file() else {}
    for m in (doc or {}).get("fusion", []):
        if (m.get("method") or m.get("name")) == "sspfusion":
            return dict(m.get("kwargs") or {})
    return {}


def sspfusion_saved(batch: int, crop: int, phase: str, amp: bool,
                    kwargs: dict | None = None) -> tuple[int, int, int]:
    """(saved activation bytes, parameter bytes, trained parameter bytes) of one SSPFusion training step's forward pass."""
    from fusion.models.sspfusion import SSPFusion

    torch.manual_seed(0)
    model = SSPFusion(**(kwargs or {})).train()
    params = list(model.parameters())
    ir, vi = torch.rand(batch, 1, crop, crop), torch.rand(batch, 1, crop, crop)

    def step():
        with _autocast(amp):
            return model.training_losses(ir, vi, phase)[0]

    trainable = model.parameters_for_phase(phase)
    return (saved_tensor_bytes(step, params), sum(p.numel() * p.element_size() for p in params),
            sum(p.numel() * p.element_size() for p in trainable))


def deeplab_saved(encoder: str, batch: int, crop: int, amp: bool) -> tuple[int, int, int]:
    """(saved activation bytes, parameter bytes, trained parameter bytes) of one DeepLabV3+ full-phase step's forward + loss."""
    from segmentation.config import SegConfig
    from segmentation.losses import DiceCELoss
    from segmentation.model import build_model, set_phase, train_mode

    cfg = SegConfig(encoder=encoder, crop_size=crop)
    torch.manual_seed(0)
    model = build_model(cfg.model_kwargs())
    set_phase(model, "full")
    train_mode(model)
    params = list(model.parameters())
    x = torch.randn(batch, 3, crop, crop)
    y = torch.randint(0, 9, (batch, crop, crop))
    loss_fn = DiceCELoss()

    def step():
        with _autocast(amp):
            logits = model(x)
        return loss_fn(logits, y)[0]

    nbytes = sum(p.numel() * p.element_size() for p in params)
    return saved_tensor_bytes(step, params), nbytes, nbytes


SMALL_BATCHES = (2, 4)


def extrapolate(s1: float, s2: float, batch: int, b1: int = SMALL_BATCHES[0], b2: int = SMALL_BATCHES[1]) -> float:
    """Linear in the batch through the measurements ``s1`` at batch ``b1`` and ``s2`` at ``b2``."""
    return s1 + (batch - b1) * (s2 - s1) / (b2 - b1)


def estimate_bytes(param_bytes: int, trained_bytes: int, saved: float, optimiser_states: int) -> float:
    """The module docstring's formula."""
    return (param_bytes + trained_bytes * (1 + optimiser_states) + saved * (1 + BACKWARD_FACTOR)
            + CONTEXT_BYTES)


def run(quick: bool = False) -> dict:
    ft = config_values("msrs", "fusion_train", {"crop_size": 256, "batch_size": 8})
    sg = config_values("msrs", "segmentation", {"encoder": "resnet50", "crop_size": 480,
                                                "batch_size": 4, "frozen_batch_size": 8})
    seg_batch = max(int(sg["batch_size"]), int(sg["frozen_batch_size"]))
    kw = msrs_sspfusion_kwargs()
    cases = []
    for amp in (False, True):
        from fusion.models.sspfusion import SSPFusion

        for phase in SSPFusion().phases:
            (s1, p, tr), (s2, _, _) = (sspfusion_saved(b, int(ft["crop_size"]), phase, amp, kw)
                                       for b in SMALL_BATCHES)
            saved = extrapolate(s1, s2, int(ft["batch_size"]))
            cases.append({"model": f"SSPFusion ({phase} phase)", "kwargs": kw, "crop": int(ft["crop_size"]),
                          "batch": int(ft["batch_size"]), "amp": "bf16" if amp else "fp32",
                          "small_batches": list(SMALL_BATCHES), "saved_small": [s1, s2], "saved": saved, "param_bytes": p,
                          "optimiser": "Adam", "estimate_bytes": estimate_bytes(p, tr, saved, 2)})
        (s1, p, tr), (s2, _, _) = (deeplab_saved(sg["encoder"], b, int(sg["crop_size"]), amp)
                                   for b in SMALL_BATCHES)
        saved = extrapolate(s1, s2, seg_batch)
        cases.append({"model": f"DeepLabV3+ {sg['encoder']} (all trainable)", "crop": int(sg["crop_size"]),
                      "batch": seg_batch, "amp": "bf16" if amp else "fp32", "small_batches": list(SMALL_BATCHES),
                      "saved_small": [s1, s2], "saved": saved, "param_bytes": p, "optimiser": "SGD momentum",
                      "estimate_bytes": estimate_bytes(p, tr, saved, 1)})
    worst = max(c["estimate_bytes"] for c in cases if c["amp"] == "fp32")
    worst_amp = max(c["estimate_bytes"] for c in cases if c["amp"] == "bf16")
    return {"cases": cases, "budget_gb": BUDGET_GB, "worst_fp32_gib": worst / GIB,
            "worst_bf16_gib": worst_amp / GIB, "fits_fp32": worst <= BUDGET_GB * 1e9,
            "fits_bf16": worst_amp <= BUDGET_GB * 1e9,
            "method": "saved_tensors_hooks count of autograd-saved storages at batch 2 and 4, "
                      "extrapolated linearly; + params x (2 + optimiser states) + 25 % backward "
                      "transients + 1 GiB CUDA context"}


def figures(result: dict) -> list[dict]:
    sec = "msrs.yaml est. GPU memory"
    out = []
    for c in result["cases"]:
        out.append(figure(sec, f"{c['model']} {c['crop']}^2 b{c['batch']} {c['amp']}",
                          c["estimate_bytes"] / GIB, "GiB",
                          f"saved activations {c['saved'] / GIB:.2f} GiB, parameters "
                          f"{c['param_bytes'] / 2**20:.0f} MiB, {c['optimiser']}"))
    for amp in ("fp32", "bf16"):
        fits = result[f"fits_{amp}"]
        out.append(figure(sec, f"msrs.yaml est. GPU memory ({amp}, worst step)", result[f"worst_{amp}_gib"],
                          "GiB", f"{'fits' if fits else 'does NOT fit'} a {result['budget_gb']} GB GPU; "
                          + result["method"]))
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="(same as the full run)")
    from rich.console import Console

    from benchmarks.common import figures_table

    Console().print(figures_table(figures(run(quick=ap.parse_args().quick)), "GPU memory estimate"))
