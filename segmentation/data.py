"""Labelled image folders for segmentation: loading, label validation, augmentation.

A labelled folder is an image folder (infrared, visible or fused images) and a label folder of
single-channel class-id PNGs, paired by file stem (``a.png`` with ``a.png``; extensions may
differ). Images reach the network as (3, H, W) float tensors: a grey image (infrared, grey fused)
becomes 3 identical channels, so every variant uses one network shape. Labels are (H, W) int64
class ids in ``0..C-1``, 255 = ignore.

Augmentation (training only; albumentations, identical geometry for image and mask): random
rescale (bilinear image, nearest mask), pad to the crop size (image 0, mask 255 = ignored), random
crop, horizontal flip. Its randomness is a pure function of ``(seed, epoch, sample index)``, so it
does not depend on the number of loader workers and is reproduced exactly on ``--resume``.
"""
from __future__ import annotations

from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
from torch.utils.data import Dataset

from fuseseg.data.io import read_label, read_visible
from fuseseg.data.pairs import IGNORE_INDEX, list_images, match_stems
from fuseseg.errors import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
NORMALISATIONS = ("imagenet", "unit")


def normalise(img: np.ndarray, mode: str = "imagenet") -> torch.Tensor:
    """(H, W, C) uint8 -> (C, H, W) float32: ``x/255`` then, for ``'imagenet'``, ``(x - mean)/std``
    with the fixed ImageNet statistics (1-channel input uses their channel average)."""
    if mode not in NORMALISATIONS:
        raise ConfigError(f"unknown normalisation {mode!r}; valid: {', '.join(NORMALISATIONS)}")
    x = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float().div_(255.0)
    if mode == "imagenet":
        c = x.shape[0]
        mean = torch.tensor(IMAGENET_MEAN) if c == 3 else torch.tensor([sum(IMAGENET_MEAN) / 3])
        std = torch.tensor(IMAGENET_STD) if c == 3 else torch.tensor([sum(IMAGENET_STD) / 3])
        x = (x - mean[:, None, None]) / std[:, None, None]
    return x


def to_channels(img: np.ndarray, in_channels: int = 3) -> np.ndarray:
    """An (H, W) grey or (H, W, 3) RGB uint8 image as (H, W, in_channels): grey is repeated to 3
    identical channels; for ``in_channels=1`` colour is converted to grey (ITU-R BT.601)."""
    if in_channels == 3:
        return np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)
    return img[..., None]


def check_label(label: np.ndarray, label_path: Path, image_shape: tuple[int, int] | None,
                image_path: Path | None, num_classes: int) -> None:
    """DataError unless ``label`` has the image's size and values in ``0..C-1`` or 255."""
    if image_shape is not None and tuple(label.shape[:2]) != tuple(image_shape):
        h, w = label.shape[:2]
        raise DataError(f"{label_path}: label map is {h}x{w} (HxW) but its image {image_path} is "
                        f"{image_shape[0]}x{image_shape[1]}. A label must have its image's size: "
                        "re-export it at that size (nearest-neighbour resize) or fix the pairing.")
    counts = np.bincount(label.reshape(-1), minlength=256)
    allowed = np.zeros(256, dtype=bool)
    allowed[:num_classes] = True
    allowed[IGNORE_INDEX] = True
    stray = np.nonzero((counts > 0) & ~allowed)[0]
    if stray.size:
        shown = ", ".join(str(v) for v in stray[:12]) + (" ..." if stray.size > 12 else "")
        raise DataError(f"{label_path}: label values {shown} are neither class ids 0..{num_classes - 1} "
                        f"nor the ignore value {IGNORE_INDEX} ({int(counts[stray].sum())} pixels). "
                        "Fix: remap them to class ids (a colour-palette or 0/255 mask must be "
                        f"converted), mark them {IGNORE_INDEX}, or set num_classes to match the data.")


def build_train_transform(crop_size: int, scale_range: tuple[float, float] = (0.5, 2.0),
                          hflip: bool = True) -> A.Compose:
    """Random rescale (image bilinear, mask nearest) -> pad to ``crop_size`` (image 0, mask 255)
    -> random ``crop_size`` square crop -> horizontal flip (p=0.5)."""
    lo, hi = scale_range
    tfs = [
        A.RandomScale(scale_limit=(lo - 1.0, hi - 1.0), interpolation=cv2.INTER_LINEAR,
                      mask_interpolation=cv2.INTER_NEAREST, p=1.0),
        A.PadIfNeeded(min_height=crop_size, min_width=crop_size, border_mode=cv2.BORDER_CONSTANT,
                      fill=0, fill_mask=IGNORE_INDEX),
        A.RandomCrop(height=crop_size, width=crop_size),
    ]
    if hflip:
        tfs.append(A.HorizontalFlip(p=0.5))
    return A.Compose(tfs)


def sample_seed(*keys: int) -> int:
    """A 32-bit seed that is a pure function of ``keys`` (e.g. seed, epoch, index)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1)[0])


def apply_transform(tf: A.Compose, img: np.ndarray, mask: np.ndarray, seed: int):
    """Apply ``tf`` to (image, mask) with its randomness fixed by ``seed``. Each transform gets its
    own derived seed (albumentations would otherwise give all of them the same stream, tying
    e.g. the flip decision to the scale factor)."""
    tf.set_random_seed(seed)
    for k, t in enumerate(tf.transforms):
        t.set_random_seed(sample_seed(seed, k))
    out = tf(image=img, mask=mask)
    return out["image"], out["mask"]


#: decoded training pairs kept in memory per data set (MiB); MSRS's 1083 train pairs are ~1 GiB
#: decoded, so they are read from disk each time, the default synthetic set (13 MiB) once
CACHE_MIB = 256


class LabelledFolder(Dataset):
    """Images and labels paired by stem, as network-ready tensors.

    ``ds[i]`` -> ``(image (in_channels, h, w) float32, label (h, w) int64)``; ``ds.load(i)`` ->
    the raw validated ``(image (H, W, in_channels) uint8, label (H, W) uint8, stem)``.
    """

    def __init__(self, images_dir: Path | str, labels_dir: Path | str, num_classes: int = 9,
                 transform: A.Compose | None = None, normalisation: str = "imagenet",
                 in_channels: int = 3, seed: int = 0, cache_mib: float = CACHE_MIB):
        self.images_dir, self.labels_dir = Path(images_dir), Path(labels_dir)
        images = list_images(self.images_dir, "image")
        labels = list_images(self.labels_dir, "label")
        self.stems = match_stems({"images": images, "labels": labels},
                                 {"images": self.images_dir, "labels": self.labels_dir})
        self.image_paths = [images[s] for s in self.stems]
        self.label_paths = [labels[s] for s in self.stems]
        self.num_classes = num_classes
        self.transform = transform
        self.normalisation = normalisation
        self.in_channels = in_channels
        self.seed = seed
        self.epoch = 0
        self.cache_bytes = int(cache_mib * 2 ** 20)
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._cached_bytes = 0

    def __len__(self) -> int:
        return len(self.stems)

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of ``epoch`` (call before building each epoch's loader)."""
        self.epoch = int(epoch)

    def load(self, i: int) -> tuple[np.ndarray, np.ndarray, str]:
        """The decoded, validated pair ``i``. Pairs are kept in memory once read while the kept
        ones total at most ``cache_mib`` (default :data:`CACHE_MIB`; 0 = read every time), so a
        small set (the default synthetic one: 13 MiB) is decoded once instead of every epoch
        (PNG decoding was about 5 % of a training step there, #13). The returned arrays may be
        the kept ones: callers must not write into them (augmentation, :func:`normalise` and
        the evaluation make new arrays)."""
        hit = self._cache.get(i)
        if hit is not None:
            return hit[0], hit[1], self.stems[i]
        img = read_visible(self.image_paths[i])
        label = read_label(self.label_paths[i])
        check_label(label, self.label_paths[i], img.shape[:2], self.image_paths[i], self.num_classes)
        img = to_channels(img, self.in_channels)
        size = img.nbytes + label.nbytes
        if self._cached_bytes + size <= self.cache_bytes:
            self._cache[i] = (img, label)
            self._cached_bytes += size
        return img, label, self.stems[i]

    def check_all(self) -> None:
        """Read and validate every pair now (fail before training rather than mid-epoch)."""
        for i in range(len(self)):
            self.load(i)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        img, label, _ = self.load(i)
        if self.transform is not None:
            img, label = apply_transform(self.transform, img, label, sample_seed(self.seed, self.epoch, i))
            if img.ndim == 2:  # cv2 drops a singleton channel axis
                img = img[..., None]
        return normalise(img, self.normalisation), torch.from_numpy(np.ascontiguousarray(label)).long()
