"""The synthetic data set: scenes rendered in parallel into the MSRS layout (:func:`make_synthetic`),
and the contrast measurements behind the generator's claims (:func:`measure_contrast`)."""
from __future__ import annotations

import json
import math
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import cv2
import numpy as np

from fuseseg.data.synthetic.canvas import CLASS_NAMES, NUM_CLASSES, valid_zoom
from fuseseg.data.synthetic.render import render_scene


# ----------------------------------------------------------------------------- contrast
def object_contrast(image: np.ndarray, mask: np.ndarray, gap: float = 2.0, width: float = 4.0,
                    c: float = 1.0, background: np.ndarray | None = None) -> float:
    """Contrast of an object against a ring of background around it (a Fisher-like ratio).

    With per-channel means ``mu_o`` (object pixels) and ``mu_r`` (ring pixels) and the ring's
    per-channel variances ``var_r``::

        C = || mu_o - mu_r ||_2 / (sqrt(mean_ch var_r) + c)

    i.e. how many background standard deviations the object's mean colour lies from its
    surroundings (1 channel for grey images, RGB distance for colour). The ring holds the pixels
    whose Euclidean distance to the mask lies in ``(gap, gap + width]`` (the gap keeps the blur of
    the object's own edge out of it) and, if ``background`` is given, to ``background`` pixels
    (e.g. ``label == 0``, so neighbouring objects do not count as background); ``c`` (grey levels)
    keeps the ratio finite on noiseless backgrounds. NaN when the mask or the ring is empty.

    Args: image (H, W) or (H, W, C) any numeric dtype; mask, background (H, W) bool.
    Returns C >= 0.
    """
    obj = np.asarray(mask, bool)
    if not obj.any() or obj.all():
        return math.nan
    dist = cv2.distanceTransform((~obj).astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    ring = (dist > gap) & (dist <= gap + width)
    if background is not None:
        ring &= np.asarray(background, bool)
    if not ring.any():
        return math.nan
    img = np.asarray(image, np.float64)
    img = img[..., None] if img.ndim == 2 else img
    vr = img[ring]
    sr = math.sqrt(float(vr.var(0).mean()))
    return float(np.linalg.norm(img[obj].mean(0) - vr.mean(0)) / (sr + c))


def measure_contrast(n_scenes: int = 16, size: tuple[int, int] = (240, 320), seed: int = 0,
                     night: bool | None = None, min_pixels: int = 30) -> dict:
    """Median :func:`object_contrast` per class and modality over ``n_scenes`` random scenes.

    Every labelled instance with at least ``min_pixels`` visible pixels counts once; its ring is
    restricted to unlabelled pixels (contrast against the background, not against neighbours,
    e.g. a bump against the road rather than the curbs at its ends). Returns
    ``{class_name: {"ir": median, "vi": median, "n": instances}}`` for the classes seen."""
    vals: dict[int, dict[str, list[float]]] = {}
    for i in range(n_scenes):
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(i,)))
        ir, vi, label, meta = render_scene(rng, size, night=night)
        inst = meta["instances"]
        seen = set()
        for o in meta["objects"]:
            k = o["instance"]
            if k == 0 or k in seen:
                continue
            seen.add(k)
            m = inst == k
            if int(m.sum()) < min_pixels:
                continue
            d = vals.setdefault(o["cls"], {"ir": [], "vi": []})
            d["ir"].append(object_contrast(ir, m, background=label == 0))
            d["vi"].append(object_contrast(vi, m, background=label == 0))
    return {CLASS_NAMES[k]: {"ir": float(np.nanmedian(v["ir"])), "vi": float(np.nanmedian(v["vi"])),
                             "n": len(v["ir"])} for k, v in sorted(vals.items())}


# ----------------------------------------------------------------------------- data set
def scene_rng(seed: int, index: int) -> np.random.Generator:
    """The generator of scene ``index`` of a data set with ``seed`` (independent of workers)."""
    return np.random.default_rng(np.random.SeedSequence(int(seed), spawn_key=(int(index),)))


def _write_png(path: Path, img: np.ndarray) -> None:
    from fuseseg.data.io import write_image
    write_image(path, img)


def _render_chunk(out: str, seed: int, size: tuple[int, int], n_train: int, indices: list[int],
                  zoom: float = 1.0):
    """Worker: render and write scenes ``indices``; returns (index, name, night, class counts)."""
    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)                      # one process per core; restored for in-process use
    res = []
    try:
        for i in indices:
            ir, vi, label, meta = render_scene(scene_rng(seed, i), size, zoom=zoom)
            name = f"{i + 1:05d}{'N' if meta['night'] else 'D'}.png"
            split = Path(out) / ("train" if i < n_train else "test")
            _write_png(split / "ir" / name, ir)
            _write_png(split / "vi" / name, vi)
            _write_png(split / "Segmentation_labels" / name, label)
            res.append((i, name, meta["night"], np.bincount(label.ravel(), minlength=NUM_CLASSES)))
    finally:
        cv2.setNumThreads(threads)
    return res


_SUBDIRS = ("ir", "vi", "Segmentation_labels")


def _clear_previous(out: Path) -> None:
    """Remove a previous synthetic set's images from ``out``; refuse to touch other images."""
    old = [f for split in ("train", "test") for sub in _SUBDIRS
           for f in sorted((out / split / sub).glob("*")) if f.is_file()]
    if not old:
        return
    if not (out / "synthetic.json").is_file():
        from fuseseg.errors import DataError
        raise DataError(f"{out}: holds {len(old)} files (e.g. {old[0]}) that make-synthetic did not "
                        "write (no synthetic.json there). Choose an empty or new output folder, or "
                        "remove those files.")
    for f in old:
        if re.fullmatch(r"\d{5}[DN]\.png", f.name):
            f.unlink()


def make_synthetic(out, n_train: int, n_test: int, size: tuple[int, int] = (240, 320), seed: int = 0,
                   workers: int | None = None, progress: bool = True, zoom: float = 1.0) -> dict:
    """Render a labelled MSRS-like data set into ``out`` (MSRS layout, see the module docstring).

    Scene ``i`` (0-based, train first, then test) uses :func:`scene_rng` (seed, i), so the same
    seed gives byte-identical files for any number of workers. Files are written atomically.
    A previous synthetic set in ``out`` (recognised by its ``synthetic.json``) is replaced; a
    folder holding other images is refused (DataError), never overwritten. ``workers`` processes
    (None: os.cpu_count()) render chunks of scenes. Also writes ``out/synthetic.json`` (the
    summary without timings).

    Returns the summary: ``out, train, test, size, seed, names`` per split, ``night_fraction``,
    ``class_pixel_fraction`` and ``class_image_count`` (per class name), ``seconds``,
    ``pairs_per_s``, ``workers``. ``zoom``: the cameras' focal-length factor (see
    :func:`render_scene`); recorded in the summary when it is not 1.
    """
    from fuseseg.data.io import atomic_write_text

    n_train, n_test = int(n_train), int(n_test)
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise ValueError(f"make_synthetic: need n_train >= 0, n_test >= 0 and at least one scene "
                         f"(got train={n_train}, test={n_test})")
    H, W = (int(v) for v in size)
    if H < 16 or W < 16:
        raise ValueError(f"make_synthetic: size {size} too small; use at least 16 16")
    if not valid_zoom(zoom):
        raise ValueError(f"make_synthetic: zoom={zoom!r}; give a focal-length factor > 0 (1.0 = the original camera)")
    zoom = float(zoom)
    out = Path(out)
    _clear_previous(out)
    n = n_train + n_test
    workers = max(1, min(int(workers or os.cpu_count() or 1), n))
    t0 = time.perf_counter()
    results = []
    chunk = max(1, min(32, math.ceil(n / (workers * 4))))
    chunks = [list(range(a, min(n, a + chunk))) for a in range(0, n, chunk)]
    bar = None
    if progress:
        from fuseseg.progress import make_progress

        bar = make_progress()
        bar.start()
        task = bar.add_task("synthetic scenes", total=n)
    try:
        if workers == 1:
            for ch in chunks:
                results.extend(_render_chunk(str(out), seed, (H, W), n_train, ch, zoom))
                if bar:
                    bar.advance(task, len(ch))
        else:
            import multiprocessing as mp
            with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as ex:
                futs = [ex.submit(_render_chunk, str(out), seed, (H, W), n_train, ch, zoom) for ch in chunks]
                for fut in as_completed(futs):
                    r = fut.result()
                    results.extend(r)
                    if bar:
                        bar.advance(task, len(r))
    finally:
        if bar:
            bar.stop()
    seconds = time.perf_counter() - t0
    results.sort(key=lambda r: r[0])
    counts = np.sum([r[3] for r in results], axis=0)
    present = np.sum([r[3] > 0 for r in results], axis=0)
    summary = {
        "out": str(out), "train": n_train, "test": n_test, "size": [H, W], "seed": int(seed),
        **({"zoom": zoom} if zoom != 1.0 else {}),
        "names": {"train": [r[1] for r in results[:n_train]], "test": [r[1] for r in results[n_train:]]},
        "night_fraction": float(np.mean([r[2] for r in results])),
        "class_pixel_fraction": {CLASS_NAMES[k]: float(counts[k] / counts.sum()) for k in range(NUM_CLASSES)},
        "class_image_count": {CLASS_NAMES[k]: int(present[k]) for k in range(NUM_CLASSES)},
    }
    manifest = {"generator": "fuseseg.data.synthetic", **{k: v for k, v in summary.items() if k != "out"}}
    atomic_write_text(out / "synthetic.json", json.dumps(manifest, indent=1) + "\n")
    summary.update(seconds=seconds, pairs_per_s=n / seconds if seconds > 0 else math.inf, workers=workers)
    return summary
