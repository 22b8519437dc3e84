"""One colour per class, for writing predictions as viewable PNGs.

The first nine colours are the ones the MSRS tools use for its classes (unlabelled black, car,
person, bike, curve, car_stop, guardrail, color_cone, bump); further classes take the PASCAL-VOC
bit-interleaving colour map. The ignore index (255) is drawn white.
"""
from __future__ import annotations

import numpy as np

MSRS_PALETTE = np.array([
    (0, 0, 0),        # 0 unlabelled
    (64, 0, 128),     # 1 car
    (64, 64, 0),      # 2 person
    (0, 128, 192),    # 3 bike
    (0, 0, 192),      # 4 curve
    (128, 128, 0),    # 5 car_stop
    (64, 64, 128),    # 6 guardrail
    (192, 128, 128),  # 7 color_cone
    (192, 64, 0),     # 8 bump
], dtype=np.uint8)
IGNORE_COLOUR = (255, 255, 255)


def _voc_colour(k: int) -> tuple[int, int, int]:
    r = g = b = 0
    for shift in range(8):
        r |= ((k >> 0) & 1) << (7 - shift)
        g |= ((k >> 1) & 1) << (7 - shift)
        b |= ((k >> 2) & 1) << (7 - shift)
        k >>= 3
    return r, g, b


def palette(num_classes: int) -> np.ndarray:
    """(num_classes, 3) uint8 RGB colours, one per class (distinct for up to 255 classes)."""
    if num_classes <= len(MSRS_PALETTE):
        return MSRS_PALETTE[:num_classes].copy()
    used = {tuple(c) for c in MSRS_PALETTE.tolist()}
    extra, k = [], 1
    while len(MSRS_PALETTE) + len(extra) < num_classes:
        c = _voc_colour(k)
        k += 1
        if c not in used and c != IGNORE_COLOUR:
            used.add(c)
            extra.append(c)
    return np.concatenate([MSRS_PALETTE, np.array(extra, dtype=np.uint8)])


def colorize(label: np.ndarray, num_classes: int = 9) -> np.ndarray:
    """(H, W) integer class map -> (H, W, 3) uint8 RGB; 255 (ignore) -> white."""
    lut = np.zeros((256, 3), dtype=np.uint8)
    lut[:num_classes] = palette(num_classes)
    lut[255] = IGNORE_COLOUR
    return lut[np.asarray(label, dtype=np.uint8)]
