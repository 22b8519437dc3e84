"""Shared test fixtures: tiny image folders and the location of ../shared."""
from __future__ import annotations

import os
from pathlib import Path

# One fixed thread count for the whole suite, also in the processes it starts. fuseseg's thread
# policy (fuseseg.threads) otherwise follows the machine's load, and a float sum split over 1 or 2
# threads rounds differently: the tests that compare a resumed, a killed-and-resumed or a
# `--jobs 2` run with an uninterrupted one bit for bit would then depend on what else the machine
# runs (they failed so under load). The policy itself is tested with explicit environments
# (tests/test_threads.py); a given OMP_NUM_THREADS (e.g. 1 beside a background training) is kept.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import cv2  # noqa: E402
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
REAL = SHARED / "data" / "real"


def require_shared(sub: str = "") -> Path:
    """Path under ../shared, or skip the test with the reason when it is absent (a user's clone)."""
    path = SHARED / sub
    if not path.exists():
        pytest.skip(f"{path} is absent: ../shared (real image pairs, metric vectors) exists only in "
                    "the project's CI and developer checkouts, not in a user's clone")
    return path


def write_png(path: Path, arr: np.ndarray) -> Path:
    """Write ``arr`` (grey, or RGB converted to OpenCV's BGR) as a PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = cv2.cvtColor(arr, cv2.COLOR_RGB2BGR) if arr.ndim == 3 and arr.shape[2] == 3 else arr
    assert cv2.imwrite(str(path), img)
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests with one torch thread (small tensors: threads only add overhead), also
    in the in-process ``fuseseg run``s, whose thread policy reads OMP_NUM_THREADS (so they compute
    as the one-thread subprocesses the tests compare them with)."""
    import torch

    n, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    torch.set_num_threads(n)
    if omp is None:
        os.environ.pop("OMP_NUM_THREADS", None)
    else:
        os.environ["OMP_NUM_THREADS"] = omp


@pytest.fixture
def make_pairs(tmp_path):
    """Factory: a pair folder ``root/{ir,vi[,Segmentation_labels]}`` with ``n`` random pairs."""

    def _make(n=3, size=(24, 32), labels=False, root=None, seed=0):
        rng = np.random.default_rng(seed)
        root = Path(root or tmp_path / "pairs")
        for i in range(n):
            name = f"{i + 1:05d}{'DN'[i % 2]}.png"
            write_png(root / "ir" / name, rng.integers(0, 256, size, dtype=np.uint8))
            write_png(root / "vi" / name, rng.integers(0, 256, size + (3,), dtype=np.uint8))
            if labels:
                write_png(root / "Segmentation_labels" / name, rng.integers(0, 9, size, dtype=np.uint8))
        return root

    return _make


def flat(text: str) -> str:
    """``text`` with every run of whitespace (rich's line wrapping included) as one space."""
    return " ".join(text.split())


@pytest.fixture
def wide_console(monkeypatch):
    """The project console without line wrapping (messages checked as one line)."""
    from pipelines.console import console

    monkeypatch.setattr(console, "_width", 10_000)


@pytest.fixture
def tiny_knobs():
    """fusion_tiny's module-level knobs reset before and after the test."""
    import fusion_tiny

    fusion_tiny.reset_knobs()
    yield
    fusion_tiny.reset_knobs()
