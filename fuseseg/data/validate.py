"""Validate a data set before anything is trained on it, and summarise it.

``validate_pairset`` reads every image of a :class:`~fuseseg.data.pairs.PairSet` once and
raises one :class:`~fuseseg.errors.DataError` listing every problem found (up to a limit), each
naming the file(s) and the fix: unreadable/truncated/empty images, infrared with differing
channels, pairs whose sizes differ, label maps of the wrong size or with values outside
``0..num_classes-1`` other than 255.
"""
from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from fuseseg.data.io import read_infrared, read_label, read_visible
from fuseseg.data.pairs import IGNORE_INDEX, PairSet, day_or_night
from fuseseg.errors import DataError

MAX_REPORTED = 10


@dataclass
class SplitSummary:
    pairs: int = 0
    sizes: Counter = field(default_factory=Counter)      # (H, W) -> count
    day: int = 0
    night: int = 0
    other: int = 0                                        # names not of MSRS's form (digits, then D or N)
    visible_grey: int = 0
    class_pixels: np.ndarray | None = None                # (num_classes + 1,), last = ignore
    labelled: bool = False


def _check_one(pairs: PairSet, stem: str, num_classes: int, ir16: str):
    """Read one pair (+label). Returns (problems, shape, vi_grey, class counts or None)."""
    problems: list[str] = []
    ir = vi = None
    try:
        ir = read_infrared(pairs.ir[stem], ir16=ir16)
    except DataError as exc:
        problems.append(str(exc))
    try:
        vi = read_visible(pairs.vi[stem])
    except DataError as exc:
        problems.append(str(exc))
    if ir is not None and vi is not None and ir.shape[:2] != vi.shape[:2]:
        problems.append(f"pair {stem!r} has different sizes: {pairs.ir[stem]} is "
                        f"{ir.shape[1]}x{ir.shape[0]} but {pairs.vi[stem]} is {vi.shape[1]}x{vi.shape[0]} "
                        "(WxH). Register/resize the pair so both images have the same size, or remove it.")
    counts = None
    if pairs.labels:
        try:
            lab = read_label(pairs.labels[stem])
        except DataError as exc:
            problems.append(str(exc))
            lab = None
        if lab is not None:
            ref = ir if ir is not None else vi
            if ref is not None and lab.shape != ref.shape[:2]:
                problems.append(f"label map {pairs.labels[stem]} is {lab.shape[1]}x{lab.shape[0]} but its "
                                f"images are {ref.shape[1]}x{ref.shape[0]} (WxH). Labels must have the "
                                "image size.")
            hist = np.bincount(lab.ravel(), minlength=256)
            stray = [int(v) for v in np.nonzero(hist)[0] if v >= num_classes and v != IGNORE_INDEX]
            if stray:
                problems.append(f"label map {pairs.labels[stem]} has values {stray[:8]} outside "
                                f"0..{num_classes - 1} (255 = ignore). Fix the labels, or set the "
                                "number of classes in the config.")
            counts = np.append(hist[:num_classes], hist[IGNORE_INDEX])
    shape = (ir if ir is not None else vi).shape[:2] if (ir is not None or vi is not None) else None
    return problems, shape, (vi is not None and vi.ndim == 2), counts


def validate_pairset(pairs: PairSet, num_classes: int = 9, ir16: str = "minmax",
                     workers: int = 2, progress=None) -> SplitSummary:
    """Read and check every pair of ``pairs``; a DataError listing all problems, or a summary.

    ``progress``: optional callable invoked once per pair (e.g. a rich progress advance)."""
    summary = SplitSummary(pairs=len(pairs), labelled=bool(pairs.labels))
    if pairs.labels:
        summary.class_pixels = np.zeros(num_classes + 1, dtype=np.int64)
    problems: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:  # cv2 releases the GIL
        for stem, (probs, shape, grey, counts) in zip(
                pairs.stems, pool.map(lambda s: _check_one(pairs, s, num_classes, ir16), pairs.stems)):
            problems.extend(probs)
            if shape is not None:
                summary.sizes[shape] += 1
            summary.visible_grey += int(grey)
            if counts is not None:
                summary.class_pixels += counts
            tag = day_or_night(stem)
            if tag == "day":
                summary.day += 1
            elif tag == "night":
                summary.night += 1
            else:
                summary.other += 1
            if progress:
                progress()
    if problems:
        shown = problems[:MAX_REPORTED]
        more = f"\n  ... and {len(problems) - MAX_REPORTED} more problem(s)" if len(problems) > MAX_REPORTED else ""
        raise DataError(f"{len(problems)} problem(s) in the data set ({pairs.ir_dir.parent}):\n  - " +
                        "\n  - ".join(shown) + more)
    return summary
