"""A tiny trainable fusion method for the trainer/fuse tests (imported as a plug-in module).

Test knobs are module globals (not init kwargs, so a resumed run has the same config):
``DELAY`` seconds slept per training step, ``NAN_AT`` (call number whose loss is NaN) and
``INTERRUPT_AT`` (call number that sends this process SIGINT, as a Ctrl-C would).
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fusion.base import LuminanceFusion
from fusion.registry import _REGISTRY, register_method

DELAY = 0.0
NAN_AT: int | None = None
INTERRUPT_AT: int | None = None
CALLS = 0


def reset_knobs() -> None:
    global DELAY, NAN_AT, INTERRUPT_AT, CALLS
    DELAY, NAN_AT, INTERRUPT_AT, CALLS = 0.0, None, None, 0


def _dx(x):
    return x[..., :, 1:] - x[..., :, :-1]


class TinyFusion(LuminanceFusion):
    """2-conv structure branch + 2-conv fusion branch; phases ("structure", "fusion")."""

    phases = ("structure", "fusion")

    def __init__(self, width: int = 4):
        super().__init__()
        self.init_kwargs = {"width": width}
        self.struct = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
                                    nn.Conv2d(width, 1, 3, padding=1))
        self.fuse = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(width, 1, 3, padding=1))

    def fuse_y(self, ir, vi_y):
        s = torch.sigmoid(self.struct(ir))
        return torch.sigmoid(self.fuse(torch.cat([ir, vi_y, s], 1)))

    def parameters_for_phase(self, phase):
        return self.struct.parameters() if phase == "structure" else self.parameters()

    def training_losses(self, ir, vi_y, phase):
        global CALLS
        CALLS += 1
        if DELAY:
            time.sleep(DELAY)
        if INTERRUPT_AT is not None and CALLS == INTERRUPT_AT:
            os.kill(os.getpid(), signal.SIGINT)
        edge = (F.avg_pool2d(ir, 3, 1, 1) - ir).abs()
        target = (edge > edge.mean(dim=(1, 2, 3), keepdim=True)).float()  # per image
        rec = (torch.sigmoid(self.struct(ir)) - target).pow(2).mean()
        if phase == "structure":
            loss, comps = rec, {"rec": rec.item()}
        else:
            f = self.fuse_y(ir, vi_y)
            l_int = (f - torch.maximum(ir, vi_y)).abs().mean()
            l_grad = (_dx(f).abs() - torch.maximum(_dx(ir).abs(), _dx(vi_y).abs())).abs().mean()
            loss = l_int + l_grad + 0.01 * rec
            comps = {"int": l_int.item(), "grad": l_grad.item(), "rec": rec.item()}
        if NAN_AT is not None and CALLS >= NAN_AT:
            loss = loss * float("nan")
            comps = {k: float("nan") if k == "int" else v for k, v in comps.items()}
        return loss, comps


if "tiny-trainable" not in _REGISTRY:
    register_method("tiny-trainable", trainable=True)(TinyFusion)


class MaxFusion(LuminanceFusion):
    """fused Y = max(IR, Y) (a reference with a closed form for the fuse tests)."""

    def fuse_y(self, ir, vi_y):
        return torch.maximum(ir, vi_y)


if "test-max" not in _REGISTRY:
    register_method("test-max")(MaxFusion)


def make_pairs(root, n: int = 12, size=(40, 48), seed: int = 0, colour: bool = True) -> None:
    """Write ``n`` smooth random pairs into ``root/ir`` and ``root/vi`` (PNG)."""
    import cv2

    from fuseseg.data.io import write_image

    rng = np.random.default_rng(seed)
    h, w = size
    for i in range(n):
        base = cv2.GaussianBlur(rng.random((h, w)).astype(np.float32), (0, 0), 2.0)
        base = (base - base.min()) / (np.ptp(base) + 1e-6)
        ir = (255 * base).astype(np.uint8)
        vi = (255 * np.clip(1 - base[..., None] * rng.random(3) + 0.1 * rng.random((h, w, 1)), 0, 1)
              ).astype(np.uint8)
        write_image(os.path.join(root, "ir", f"p{i:02d}.png"), ir)
        write_image(os.path.join(root, "vi", f"p{i:02d}.png"), vi if colour else vi[..., 0])


def train_config(data, **kw):
    """A FusionTrainConfig of the tiny trainable method on ``data`` (pairs of :func:`make_pairs`):
    1 structure + 3 fusion epochs, batch 4, 32 crops, CPU; ``kw`` overrides any field."""
    from fusion.train_config import FusionTrainConfig

    base = dict(method="tiny-trainable", plugins=["fusion_tiny"], data_root=str(data),
                structure_epochs=1, epochs=3, batch_size=4, crop_size=32, workers=0, lr=1e-2,
                seed=0, device="cpu", log_every=1)
    base.update(kw)
    return FusionTrainConfig(**base)


def ddp_worker(rank: int, world: int, port: int, cfg_dict: dict, out: str) -> None:
    """torch.multiprocessing.spawn target: one rank of a gloo DDP run on CPU."""
    os.environ.update({"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    torch.set_num_threads(1)
    from fusion.train import FusionTrainConfig, train_fusion

    train_fusion(FusionTrainConfig(**cfg_dict), out, progress=False)
