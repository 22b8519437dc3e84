"""Data-set scoring: every fusion metric for every fused image of one or more methods.

Files are matched by stem (``a.png`` pairs with ``a.jpg``) across the infrared folder, the
visible folder and each method's fused folder; images are read as the reference evaluator reads
them (:func:`fusion.metrics.read_gray_reference`). Work is spread over threads (one task per
image stem, all methods at once so the sources are read once), streamed so only a few images
are in memory at a time. The data-set score of a metric is the plain mean of its per-image
values (the reference's convention). Results go to ``metrics.csv`` (one row per method and
image) and ``metrics.json`` (per image, means, and the convention), written atomically.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from fuseseg.data.io import atomic_write_text
from fuseseg.data.pairs import list_images, match_stems
from fuseseg.errors import DataError
from fusion.metrics import (
    LOWER_IS_BETTER,
    Convention,
    compute_all,
    read_gray_reference,
    resolve_convention,
    resolve_metrics,
    warm_up,
)

ProgressFn = Callable[[int, int], None]


@dataclass
class ScoreResult:
    """Scores of several methods on one data set.

    per_image[method][stem][metric] -> value; means[method][metric] -> mean over the images."""

    methods: list[str]
    stems: list[str]
    metrics: tuple[str, ...]
    convention: Convention
    per_image: dict[str, dict[str, dict[str, float]]]
    means: dict[str, dict[str, float]]
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def n_images(self) -> int:
        return len(self.stems)

    def best(self) -> dict[str, list[str]]:
        """metric -> the method(s) with the best mean (lowest for MSE and Nabf, else highest)."""
        out = {}
        for m in self.metrics:
            vals = {k: self.means[k][m] for k in self.methods if not math.isnan(self.means[k][m])}
            if not vals:
                out[m] = []
                continue
            target = (min if m in LOWER_IS_BETTER else max)(vals.values())
            out[m] = [k for k, v in vals.items() if v == target]
        return out

    def to_dict(self) -> dict:
        """JSON-ready dict: convention, means, per-image values. Non-finite values (PSNR is
        +inf when fused = ir = vi) are written as null (strict JSON); metrics.csv keeps 'inf'."""
        return {
            "convention": self.convention.to_dict(),
            "convention_text": self.convention.describe(),
            "metrics": list(self.metrics),
            "lower_is_better": sorted(LOWER_IS_BETTER & set(self.metrics)),
            "n_images": len(self.stems),
            "methods": {
                k: {"mean": _jsonable(self.means[k]),
                    "per_image": {s: _jsonable(self.per_image[k][s]) for s in self.stems}}
                for k in self.methods
            },
        }


def _jsonable(d: Mapping[str, float]) -> dict:
    return {k: (v if math.isfinite(v) else None) for k, v in d.items()}


# ----------------------------------------------------------------------------- worker side
def _score_stem(task) -> tuple[str, dict[str, dict[str, float]]]:
    """Read one image's sources once and score every method's fused image of it."""
    stem, ir_path, vi_path, fused_paths, metrics, convention = task
    ir = read_gray_reference(ir_path)
    vi = read_gray_reference(vi_path)
    if ir.shape != vi.shape:
        raise DataError(f"image {stem!r}: infrared {ir_path} is {ir.shape[0]}x{ir.shape[1]} but visible "
                        f"{vi_path} is {vi.shape[0]}x{vi.shape[1]}. Register/resize the pair to one size.")
    out = {}
    for method, path in fused_paths:
        fused = read_gray_reference(path)
        if fused.shape != ir.shape:
            raise DataError(f"image {stem!r}: fused image of method {method!r} ({path}) is "
                            f"{fused.shape[0]}x{fused.shape[1]} but its sources ({ir_path}, {vi_path}) are "
                            f"{ir.shape[0]}x{ir.shape[1]}. Fused images must keep the source size.")
        try:
            out[method] = compute_all(fused, ir, vi, metrics, convention)
        except DataError as exc:
            raise DataError(f"image {stem!r}, method {method!r} ({path}): {exc}") from None
    return stem, out


# ----------------------------------------------------------------------------- driver
def _match(ir_dir: Path, vi_dir: Path, fused: Mapping[str, Path]) -> tuple[list[str], dict]:
    if not fused:
        raise DataError("no fused folders given: pass at least one NAME=DIR (method name and folder).")
    for name in fused:
        if not name or name in ("ir", "vi"):
            raise DataError(f"method name {name!r} is not allowed (empty, 'ir' and 'vi' are reserved). "
                            "Name each fused folder after its method, e.g. sspfusion=out/sspfusion.")
    listings = {"ir": list_images(ir_dir, "infrared"), "vi": list_images(vi_dir, "visible")}
    folders = {"ir": ir_dir, "vi": vi_dir}
    for name, d in fused.items():
        listings[name] = list_images(d, f"fused ({name})")
        folders[name] = Path(d)
    return match_stems(listings, folders), listings


def score_folders(ir_dir: str | Path, vi_dir: str | Path, fused: Mapping[str, str | Path],
                  out_dir: str | Path | None = None, workers: int | None = None,
                  conventions: Convention | str | None = None,
                  metrics: Iterable[str] | None = None,
                  progress: ProgressFn | None = None) -> ScoreResult:
    """Score every fused folder against the infrared/visible folders.

    ir_dir, vi_dir: source folders; fused: {method name: folder}. Files match by stem; a stem
    missing anywhere, or differing image sizes, is a DataError naming the files. workers: threads
    (default: all CPU cores, capped at the number of images; 1 = no pool). conventions:
    Convention or preset name (default reference). metrics: subset of METRICS. progress: called
    as progress(done, total) after each image. out_dir: when given, writes metrics.csv and
    metrics.json there (atomically) and records their paths in ``result.files``."""
    ir_dir, vi_dir = Path(ir_dir), Path(vi_dir)
    fused = {str(k): Path(v) for k, v in fused.items()}
    convention = resolve_convention(conventions)
    names = resolve_metrics(metrics)
    stems, listings = _match(ir_dir, vi_dir, fused)
    methods = list(fused)
    tasks = [(s, listings["ir"][s], listings["vi"][s], [(m, listings[m][s]) for m in methods],
              names, convention) for s in stems]
    total = len(tasks)
    if workers is None:
        workers = os.cpu_count() or 1
    workers = max(1, min(int(workers), total))

    per_image: dict[str, dict[str, dict[str, float]]] = {m: {} for m in methods}
    done = 0

    def collect(stem: str, vals: dict[str, dict[str, float]]) -> None:
        nonlocal done
        for m in methods:
            per_image[m][stem] = vals[m]
        done += 1
        if progress is not None:
            progress(done, total)

    if workers == 1:
        for task in tasks:
            collect(*_score_stem(task))
    else:
        # Threads, not processes: the compiled metric kernels, numpy's ufuncs and OpenCV's
        # image decoding release the GIL, so threads run the images in parallel without a pool
        # start-up (process start, imports, kernel loading) that costs as much as a small data
        # set takes. OpenCV's own thread pool is limited to one thread meanwhile (no
        # oversubscription) and restored afterwards.
        import cv2
        warm_up()  # compile (or load) the kernels once, before the threads need them
        cv_threads = cv2.getNumThreads()
        cv2.setNumThreads(1)
        try:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fuseseg-metrics") as pool:
                pending: set[Future] = set()
                it = iter(tasks)
                try:
                    while True:
                        while len(pending) < 2 * workers:  # bounded: only a few images in flight
                            task = next(it, None)
                            if task is None:
                                break
                            pending.add(pool.submit(_score_stem, task))
                        if not pending:
                            break
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            collect(*fut.result())
                except BaseException:
                    for fut in pending:
                        fut.cancel()
                    raise
        finally:
            cv2.setNumThreads(cv_threads)

    means = {m: {k: math.fsum(per_image[m][s][k] for s in stems) / total for k in names}
             for m in methods}
    result = ScoreResult(methods, stems, names, convention,
                         {m: {s: per_image[m][s] for s in stems} for m in methods}, means)
    if out_dir is not None:
        result.files = write_results(result, out_dir)
    return result


def write_results(result: ScoreResult, out_dir: str | Path) -> dict[str, Path]:
    """Write ``metrics.csv`` (method, image, one column per metric) and ``metrics.json``
    atomically into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", "image", *result.metrics])
    for m in result.methods:
        for s in result.stems:
            w.writerow([m, s, *(repr(float(result.per_image[m][s][k])) for k in result.metrics)])
    paths = {"csv": out_dir / "metrics.csv", "json": out_dir / "metrics.json"}
    atomic_write_text(paths["csv"], buf.getvalue())
    atomic_write_text(paths["json"], json.dumps(result.to_dict(), indent=1) + "\n")
    return paths


def results_table(result: ScoreResult, title: str | None = None):
    """A rich renderable: the table of means (one row per metric, one column per method; the
    best value of each metric in bold green with a '*', lowest for MSE and Nabf) followed by the
    convention line, wrapped at the console width."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    best = result.best()
    unit = {"MI": f" ({result.convention.mi_unit})", "PSNR": " (dB)", "EN": " (bits)"}
    table = Table(title=title or f"Fusion metrics, mean over {len(result.stems)} image(s)")
    table.add_column("metric", style="bold")
    for m in result.methods:
        table.add_column(m, justify="right")
    for k in result.metrics:
        cells = []
        for m in result.methods:
            text = _fmt(result.means[m][k])
            cells.append(f"[bold green]{text}*[/]" if m in best[k] and len(result.methods) > 1
                         else text)
        table.add_row(k + unit.get(k, "") + (" \u2193" if k in LOWER_IS_BETTER else ""), *cells)
    note = Text(f"Conventions: {result.convention.describe()}. * = best (\u2193 = lower is better).",
                style="dim")
    return Group(table, note)


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a != 0 and (a < 1e-3 or a >= 1e5):
        return f"{v:.3e}"
    return f"{v:.4f}"
