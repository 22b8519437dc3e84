"""Optional TensorBoard logging of the trainers (``tensorboard: true`` in an experiment config).

:class:`TrainingLog` writes event files into ``OUT/tensorboard/`` of a training run (inside the run
folder, so ``tensorboard --logdir results/NAME`` shows every training of an experiment), or does
nothing when disabled or on a DDP rank other than 0. The ``tensorboard`` package is an optional
extra (``pip install "fuseseg[tensorboard]"``); asking for it without the package is a one-line
error saying so. On resume, events after the resumed step are purged, so curves never double back.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from fuseseg.errors import ConfigError


def require_tensorboard():
    """torch's ``SummaryWriter``; a one-line ConfigError saying what to install when the
    ``tensorboard`` package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ConfigError("tensorboard: true needs the tensorboard package: pip install tensorboard "
                          f"(or the fuseseg[tensorboard] extra), or set tensorboard: false ({exc}).") from exc
    return SummaryWriter


class TrainingLog:
    """Scalars and images for TensorBoard; every method is a no-op when disabled."""

    def __init__(self, out_dir: Path | str, enabled: bool, purge_step: int | None = None):
        self.writer = None
        if not enabled:
            return
        SummaryWriter = require_tensorboard()
        self.dir = Path(out_dir) / "tensorboard"
        self.writer = SummaryWriter(str(self.dir), purge_step=purge_step or None)

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """Log each finite number of ``values`` as ``prefix + name`` at ``step``."""
        if self.writer is None:
            return
        for k, v in values.items():
            try:
                v = float(v)
            except (TypeError, ValueError):
                continue
            if np.isfinite(v):
                self.writer.add_scalar(prefix + k, v, step)

    def images(self, step: int, tag: str, rows: list[list[np.ndarray]]) -> None:
        """Log a grid image: ``rows`` of equally sized (H, W) float images in [0, 1], each row
        laid side by side (e.g. infrared | visible | fused), rows stacked."""
        if self.writer is None or not rows:
            return
        grid = np.concatenate([np.concatenate(r, axis=1) for r in rows], axis=0)
        self.writer.add_image(tag, np.clip(grid, 0, 1)[None], step, dataformats="CHW")

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
