"""torch Datasets and samplers of infrared/visible pairs for training fusion models.

Determinism
-----------
Every random choice of the training pipeline is *keyed*, not drawn from a running RNG:

* the order of an epoch is ``np.random.default_rng([seed, epoch]).permutation(n)``
  (:class:`EpochBatchSampler`);
* the crop position and flips of a sample are drawn from
  ``np.random.default_rng([seed, epoch, index])`` (:class:`PairDataset`).

So a sample's augmentation does not depend on which worker process loads it, on the number of
workers, on the number of DDP ranks, or on whether the run was interrupted and resumed: the
sampler's whole state is ``(seed, epoch, batches already done)``. The batch sampler yields
``(index, epoch)`` keys, which :class:`PairDataset` accepts, so persistent workers see the epoch
without being re-created.
"""
from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from fuseseg.data.colour import KB, KG, KR
from fuseseg.data.io import read_infrared, read_label, read_visible
from fuseseg.data.pairs import PairSet
from fuseseg.errors import DataError

EXTRAS = ("labels", "visible")   # the extra items a PairDataset can provide
IGNORE = 255                      # label value of pixels (and whole pairs) without a class


def visible_luminance_u8(vi: np.ndarray) -> np.ndarray:
    """(H, W) or (H, W, 3) uint8 RGB -> (H, W) float32 luminance Y on the 0..255 scale
    (BT.601: Y = 0.299 R + 0.587 G + 0.114 B; a grey image is returned as is)."""
    if vi.ndim == 2:
        return vi.astype(np.float32)
    x = vi.astype(np.float32)
    return KR * x[..., 0] + KG * x[..., 1] + KB * x[..., 2]


def _pad_to(img: np.ndarray, h: int, w: int) -> np.ndarray:
    """Pad (H, W) or (H, W, C) ``img`` by reflection (without repeating the edge pixel) at the
    bottom/right up to at least (h, w). A side of length 1 cannot be reflected and is repeated."""
    ph, pw = max(0, h - img.shape[0]), max(0, w - img.shape[1])
    if ph == 0 and pw == 0:
        return img
    mode = "reflect" if min(img.shape[:2]) > 1 else "edge"
    return np.pad(img, ((0, ph), (0, pw)) + ((0, 0),) * (img.ndim - 2), mode=mode)


class PairDataset(Dataset):
    """Infrared / visible-luminance pairs of a :class:`fuseseg.data.pairs.PairSet` as tensors.

    ``ds[i]`` (or ``ds[(i, epoch)]``) -> ``(ir, vi_y)``, two float32 tensors of shape (1, h, w)
    with values in [0, 1]: the infrared (16-bit files mapped with ``ir16``) and the luminance Y of
    the visible image (BT.601; a grey visible is its own Y).

    * ``train=True``: a random ``crop`` x ``crop`` window (the same for both images) and a random
      horizontal flip (p = 0.5; also a vertical flip with ``vflip=True``), keyed by
      ``(seed, epoch, i)``. An image smaller than the crop is first padded by reflection.
    * ``train=False``: the centre ``crop`` window (padded likewise), or the whole image when
      ``crop`` is None.
    * ``photometric=((g_lo, g_hi), (gamma_lo, gamma_hi))`` (train only): a joint photometric
      augmentation, the SAME transform ``x -> clip(g * x ** gamma, 0, 1)`` applied to infrared and
      visible Y, with g ~ U(g_lo, g_hi) and gamma ~ U(gamma_lo, gamma_hi) keyed like the crop (so a
      bright training set also shows dark scenes and the relation between the two modalities is
      kept). None (default) or the identity ranges ((1, 1), (1, 1)) leave the images untouched.
    * ``extras``: more tensors per item, in the order given, after ``(ir, vi_y)``, cropped and
      flipped with the images: ``"labels"`` (h, w) int64 class ids from the pair set's label files,
      255 (ignore) everywhere for a pair without one; ``"visible"`` (3, h, w) float32 RGB in
      [0, 1] (a grey visible repeated; the photometric transform applied as to Y). A method that
      trains with a segmentation loss (SeAFusion's semantic rounds) asks for them.
    * ``cache=True`` keeps each decoded image (uint8 ir, float32 Y) in memory after its first
      read, so a file is decoded once per worker process (call :meth:`preload` before the
      DataLoader starts its workers to decode each file exactly once and share the arrays).
    """

    def __init__(self, pairset: PairSet, crop: int | None = 256, train: bool = True,
                 ir16: str = "minmax", *, cache: bool = False, seed: int = 0, vflip: bool = False,
                 photometric: tuple[tuple[float, float], tuple[float, float]] | None = None,
                 extras: tuple[str, ...] = ()):
        if crop is not None and crop < 1:
            raise DataError(f"crop size must be a positive number of pixels or None, got {crop}")
        if len(pairset) == 0:
            raise DataError(f"no image pairs in {pairset.ir_dir} / {pairset.vi_dir}")
        self.pairset = pairset
        self.stems = list(pairset.stems)
        self.crop = crop
        self.train = train
        self.ir16 = ir16
        self.cache = cache
        self.seed = int(seed)
        self.vflip = vflip
        if photometric is not None and tuple(map(tuple, photometric)) == ((1.0, 1.0), (1.0, 1.0)):
            photometric = None
        if photometric is not None:
            (g_lo, g_hi), (e_lo, e_hi) = photometric
            if not (0 < g_lo <= g_hi and 0 < e_lo <= e_hi):
                raise DataError(f"photometric augmentation needs 0 < low <= high for gain and gamma, "
                                f"got gain {photometric[0]}, gamma {photometric[1]}")
        self.photometric = photometric
        unknown = [e for e in extras if e not in EXTRAS]
        if unknown:
            raise DataError(f"unknown extra item(s) {unknown}; a pair dataset provides {list(EXTRAS)}")
        self.extras = tuple(extras)
        self._cache: dict[int, tuple[np.ndarray, ...]] = {}

    def __len__(self) -> int:
        return len(self.stems)

    # ------------------------------------------------------------------ decoding
    def load(self, i: int) -> tuple[np.ndarray, ...]:
        """Decoded pair ``i``: (H, W) uint8 infrared and (H, W) float32 visible Y (0..255), then
        one array per requested extra: (H, W) uint8 labels, (H, W, 3) uint8 visible RGB."""
        if i in self._cache:
            return self._cache[i]
        stem = self.stems[i]
        ir_path: Path = self.pairset.ir[stem]
        vi_path: Path = self.pairset.vi[stem]
        ir = read_infrared(ir_path, self.ir16)
        vi = read_visible(vi_path)
        vi_y = visible_luminance_u8(vi)
        if ir.shape != vi_y.shape:
            raise DataError(f"pair {stem!r}: infrared {ir_path} is {ir.shape[0]}x{ir.shape[1]} but "
                            f"visible {vi_path} is {vi_y.shape[0]}x{vi_y.shape[1]}. Fusion needs "
                            "registered pairs of equal size: resize/crop one of them or drop the pair.")
        more = tuple(self._extra_array(e, stem, vi, ir.shape) for e in self.extras)
        if self.cache:
            self._cache[i] = (ir, vi_y, *more)
        return (ir, vi_y, *more)

    def _extra_array(self, name: str, stem: str, vi: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
        if name == "visible":
            return np.repeat(vi[..., None], 3, axis=2) if vi.ndim == 2 else vi
        path = self.pairset.labels.get(stem)
        if path is None:
            return np.full(shape, IGNORE, np.uint8)
        label = read_label(path)
        if label.shape != shape:
            raise DataError(f"pair {stem!r}: label {path} is {label.shape[0]}x{label.shape[1]} but the "
                            f"images are {shape[0]}x{shape[1]}; a label must match its pair's size.")
        return label

    def preload(self) -> None:
        """Decode every pair now (only with ``cache=True``)."""
        if self.cache:
            for i in range(len(self)):
                self.load(i)

    # ------------------------------------------------------------------ items
    def __getitem__(self, key) -> tuple[torch.Tensor, ...]:
        if isinstance(key, (tuple, list)):
            i, epoch = int(key[0]), int(key[1])
        else:
            i, epoch = int(key), 0
        arrays = list(self.load(i))   # ir, vi_y, *extras: every one (H, W[, 3]), cropped alike
        if self.crop is not None:
            c = self.crop
            arrays = [_pad_to(a, c, c) for a in arrays]
            h, w = arrays[0].shape[:2]
            if self.train:
                rng = np.random.default_rng([self.seed, epoch, i])
                top = int(rng.integers(0, h - c + 1))
                left = int(rng.integers(0, w - c + 1))
                hflip, vflip = bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
            else:
                top, left, hflip, vflip = (h - c) // 2, (w - c) // 2, False, False
            arrays = [a[top:top + c, left:left + c] for a in arrays]
        elif self.train:
            rng = np.random.default_rng([self.seed, epoch, i])
            hflip, vflip = bool(rng.integers(0, 2)), bool(rng.integers(0, 2))
        else:
            hflip = vflip = False
        if self.train and hflip:
            arrays = [a[:, ::-1] for a in arrays]
        if self.train and self.vflip and vflip:
            arrays = [a[::-1] for a in arrays]
        ir, vi_y = arrays[:2]
        ir_t = torch.from_numpy(np.ascontiguousarray(ir, dtype=np.float32) / 255.0)[None]
        vi_t = torch.from_numpy(np.ascontiguousarray(vi_y, dtype=np.float32) / 255.0)[None].clamp_(0.0, 1.0)
        more = []
        for name, a in zip(self.extras, arrays[2:], strict=True):
            if name == "labels":
                more.append(torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)))
            else:
                more.append(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32) / 255.0).permute(2, 0, 1))
        if self.train and self.photometric is not None:
            gain, gamma = self.photometric_params(i, epoch)
            ir_t, vi_t = (photometric_transform(x, gain, gamma) for x in (ir_t, vi_t))
            more = [photometric_transform(x, gain, gamma) if n == "visible" else x
                    for n, x in zip(self.extras, more, strict=True)]
        return (ir_t, vi_t, *more)

    def photometric_params(self, i: int, epoch: int) -> tuple[float, float]:
        """(gain, gamma) of sample ``i`` in ``epoch``: keyed by (seed, epoch, i, 1), independent of
        the crop's stream, so enabling the augmentation leaves crops and flips unchanged."""
        (g_lo, g_hi), (e_lo, e_hi) = self.photometric
        rng = np.random.default_rng([self.seed, epoch, i, 1])
        return float(rng.uniform(g_lo, g_hi)), float(rng.uniform(e_lo, e_hi))


def photometric_transform(x: torch.Tensor, gain: float, gamma: float) -> torch.Tensor:
    """``clip(gain * x ** gamma, 0, 1)`` of an image in [0, 1] (the joint photometric augmentation)."""
    return (gain * x.clamp(0.0, 1.0) ** gamma).clamp_(0.0, 1.0)


class EpochBatchSampler(Sampler[list]):
    """Batches of ``(index, epoch)`` keys in a shuffled order keyed by ``(seed, epoch)``.

    The epoch's order is ``perm = default_rng([seed, epoch]).permutation(n)``; global batch ``k``
    is ``perm[k*B:(k+1)*B]`` with ``B = global_batch`` (an incomplete last batch is dropped).
    Under DDP, rank ``r`` of ``world`` takes the contiguous share ``[r*b:(r+1)*b]`` of every global
    batch, ``b = B / world``, so the ranks together see exactly the batches a single process sees
    (the role of ``DistributedSampler``, plus exact resumption). ``set_epoch(e)`` selects the
    epoch; ``set_epoch(e, start_batch=k)`` skips the first ``k`` batches (mid-epoch resume).
    """

    def __init__(self, n: int, global_batch: int, *, seed: int = 0, rank: int = 0, world: int = 1,
                 shuffle: bool = True):
        if global_batch % world:
            raise DataError(f"batch_size={global_batch} is the global batch and must be divisible by "
                            f"the number of processes ({world}); set batch_size to a multiple of {world}.")
        if n < global_batch:
            raise DataError(f"the training set has {n} pairs, fewer than one batch (batch_size="
                            f"{global_batch}); lower batch_size or add data.")
        self.n, self.global_batch, self.seed = n, global_batch, int(seed)
        self.rank, self.world, self.shuffle = rank, world, shuffle
        self.per_rank = global_batch // world
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    @property
    def batches_per_epoch(self) -> int:
        return self.n // self.global_batch

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "start_batch": self.start_batch}

    def __len__(self) -> int:
        return max(0, self.batches_per_epoch - self.start_batch)

    def __iter__(self) -> Iterator[list]:
        if self.shuffle:
            perm = np.random.default_rng([self.seed, self.epoch]).permutation(self.n)
        else:
            perm = np.arange(self.n)
        B, b, r = self.global_batch, self.per_rank, self.rank
        for k in range(self.start_batch, self.batches_per_epoch):
            share = perm[k * B + r * b: k * B + (r + 1) * b]
            yield [(int(i), self.epoch) for i in share]


def worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python/numpy from torch's per-worker seed (itself
    derived from the loader's generator) and ignore SIGINT, so that Ctrl-C reaches only the main
    process, which stops the run cleanly at a step boundary."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
