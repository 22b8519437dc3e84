"""The fuse stage: build a fusion method (from the registry or from a checkpoint alone) and fuse
a folder of infrared/visible pairs into a folder of fused PNGs.

Output convention: one file ``OUT/STEM.png`` per pair (stem of the input files), the size of the
input; RGB when the visible image is colour, grey otherwise. A 3-channel visible file whose three
channels are identical (TNO stores grey images so) counts as grey. Files are written atomically
and existing outputs are skipped, so a killed run redoes only the missing images.
"""
from __future__ import annotations

import json
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fuseseg import runtime
from fuseseg.data.io import atomic_write_text, read_infrared, read_visible, sha256_file, write_image
from fuseseg.data.pairs import find_pairs
from fuseseg.data.paths import check_disjoint
from fuseseg.errors import CheckpointError, ConfigError, DataError, FusesegError
from fusion.registry import create_method, get_entry, load_plugins


# ---------------------------------------------------------------------- building a method
def load_fusion_method(name: str | None = None, checkpoint: Path | str | None = None,
                       kwargs: dict[str, Any] | None = None, device: str | torch.device = "auto",
                       *, plugins: Iterable[str] = (), allow_untrained: bool = False):
    """A ready-to-run fusion method (an ``nn.Module`` in eval mode on ``device``, or a callable).

    * ``checkpoint`` given: rebuilt from the file alone (its ``method``, ``kwargs`` and
      ``state_dict``); ``name``, when also given, must match the checkpoint's method, and
      ``kwargs`` override the stored ones. Corrupt file, another method or a shape mismatch:
      :class:`CheckpointError` naming the file.
    * ``checkpoint="pretrained"``, or a method with shipped weights (:mod:`fusion.pretrained`)
      and no checkpoint: the shipped weights (SHA-256 checked; damaged: CheckpointError).
    * otherwise ``create_method(name, **kwargs)``. A trainable (learned) method without a
      checkpoint would fuse with random weights: a ConfigError unless ``allow_untrained``.
    * A checkpoint whose training verdict is "undertrained" (see :func:`fusion.train.verdict`)
      is used, with a warning on stderr.
    """
    from fusion.pretrained import has_shipped, resolve_checkpoint

    device = runtime.resolve_device(device) if not isinstance(device, torch.device) else device
    if plugins:
        load_plugins(list(plugins))
    if checkpoint is None and not allow_untrained and has_shipped(name):
        checkpoint = "pretrained"
    checkpoint = resolve_checkpoint(checkpoint, name)
    if checkpoint is not None:
        path = Path(checkpoint)
        ckpt = runtime.load_checkpoint(path, map_location="cpu")
        if ckpt.get("kind", "fusion") != "fusion" or "method" not in ckpt:
            raise CheckpointError(f"checkpoint {path} is not a fusion checkpoint (kind="
                                  f"{ckpt.get('kind')!r}). Pass a file written by "
                                  "`fuseseg train-fusion` (its final.pt or last.pt).")
        method_name = ckpt["method"]
        if not isinstance(method_name, str):
            raise CheckpointError(f"checkpoint {path}: its `method` field is {method_name!r}, not a method "
                                  "name; the file is damaged or not written by fuseseg.")
        if name is not None and name != method_name:
            raise CheckpointError(f"checkpoint {path} holds fusion method {method_name!r}, not "
                                  f"{name!r}. Pass --method {method_name} (or leave --method out), "
                                  f"or the checkpoint of a {name!r} model.")
        try:
            get_entry(method_name)
        except ConfigError as exc:
            raise CheckpointError(f"checkpoint {path} holds fusion method {method_name!r}, which is "
                                  f"not registered here: {exc}") from exc
        stored = ckpt.get("kwargs") or {}
        build_kwargs = {**stored, **dict(kwargs or {})} if isinstance(stored, dict) else stored
        # widths checked on the meta device before the model is allocated (fuseseg.limits)
        method = runtime.build_from_checkpoint(lambda **kw: create_method(method_name, **kw),
                                               {**ckpt, "kwargs": build_kwargs}, path, f"{method_name!r} model")
        v = ckpt.get("verdict") if isinstance(ckpt.get("verdict"), dict) else {}
        if v.get("status") == "undertrained" and all(isinstance(v.get(k, 0.0), (int, float)) for k in ("fus", "fus_max")):
            import sys
            print(f"WARNING: {path} is UNDERTRAINED: its fusion loss {v.get('fus', float('nan')):.4f} "
                  f"did not beat {v.get('fus_max', float('nan')):.4f} of max(IR, VI_Y) in training "
                  "(see verdict.json next to it); train longer.", file=sys.stderr)
    else:
        if name is None:
            raise ConfigError("no fusion method given: pass a method name (--method NAME) or a "
                              "checkpoint (--checkpoint FILE).")
        entry = get_entry(name)
        if entry.trainable and not allow_untrained:
            raise ConfigError(f"fusion method {name!r} is a learned model: pass its trained weights "
                              "with --checkpoint FILE (the final.pt written by `fuseseg "
                              "train-fusion`).")
        method = create_method(name, **dict(kwargs or {}))
    if isinstance(method, nn.Module):
        method.to(device).eval()
    source = {"method": method_name if checkpoint is not None else name,
              "kwargs": build_kwargs if checkpoint is not None else dict(kwargs or {}),
              "checkpoint": str(checkpoint) if checkpoint is not None else None,
              "checkpoint_sha256": sha256_file(checkpoint) if checkpoint is not None else None}
    try:
        method._fuseseg_source = source  # what fuse_folder records in its output folder
    except AttributeError:  # pragma: no cover - a callable without attributes
        pass
    return method


# ---------------------------------------------------------------------- running a method
def _visible_array(vi: np.ndarray) -> np.ndarray:
    """A 3-channel visible whose channels are all equal becomes (H, W) grey."""
    if vi.ndim == 3 and np.array_equal(vi[..., 0], vi[..., 1]) and np.array_equal(vi[..., 0], vi[..., 2]):
        return np.ascontiguousarray(vi[..., 0])
    return vi


def _to_tensor(imgs: list[np.ndarray]) -> torch.Tensor:
    """List of (H, W) or (H, W, C) uint8 -> (B, C, H, W) float32 in [0, 1]."""
    x = torch.from_numpy(np.stack(imgs))
    x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)
    return x.float().div_(255.0)


def method_amp(method, amp: str) -> str:
    """The ``amp`` setting a method runs under: ``amp`` for a learned method (an ``nn.Module``
    with parameters), ``'off'`` for a classical one (its filters are not networks: they keep
    float32/float64 and the outputs stay exactly those of the reference formulas)."""
    learned = isinstance(method, nn.Module) and next(iter(method.parameters()), None) is not None
    return amp if learned else "off"


TILE = 1024        # pairs with a side above this are fused in overlapping tiles (bounded memory, any size)
TILE_MARGIN = 64   # context on each side of a tile, cropped off again: seams match the untiled result


def _spans(n: int, tile: int, margin: int) -> list[tuple[int, int]]:
    """Core intervals [a, b) covering 0..n: one when n <= tile, else cores of tile - 2 margin."""
    if n <= tile:
        return [(0, n)]
    core = max(1, tile - 2 * margin)
    return [(a, min(n, a + core)) for a in range(0, n, core)]


def _call(method, ir_t: torch.Tensor, vi_t: torch.Tensor, device: torch.device, amp: str,
          name: str) -> torch.Tensor:
    """One call of ``method`` under the contract's checks -> uint8 (B, C, h, w) on the CPU."""
    with torch.inference_mode():
        try:
            with runtime.autocast(device, amp):
                out = method(ir_t, vi_t)
        except torch.cuda.OutOfMemoryError:
            raise
        except SystemExit as exc:
            raise FusesegError(f"{name} called sys.exit({exc.code!r}) while fusing a batch of visible shape "
                               f"{tuple(vi_t.shape)}; nothing was written for it. A fusion method must raise an "
                               "exception to fail (fusion contract, fusion/registry.py), never exit.") from None
        except (RuntimeError, ValueError, TypeError, IndexError) as exc:
            if "can't allocate memory" in str(exc):
                raise
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise FusesegError(f"{name} failed on a batch of visible shape {tuple(vi_t.shape)} "
                               f"({type(exc).__name__}: {first}); a plug-in must follow the fusion "
                               "contract of fusion/registry.py.") from exc
        if not torch.is_tensor(out) or tuple(out.shape) != tuple(vi_t.shape):
            got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
            raise FusesegError(f"{name} returned {got} for visible input {tuple(vi_t.shape)}; the "
                               "fusion contract (fusion/registry.py) needs a (B, C, H, W) tensor "
                               "with the visible's shape.")
        bad = ~torch.isfinite(out)
        if bad.any():
            raise FusesegError(f"{name} returned {int(bad.sum())} non-finite value(s) (NaN or inf) for a "
                               f"batch of visible shape {tuple(vi_t.shape)}; nothing was written for it. "
                               "Fix the method (the contract needs values in [0, 1]).")
        _check_range(out, name, tuple(vi_t.shape))
        return out.float().clamp(0, 1).mul(255.0).round().to(torch.uint8).cpu()


RANGE_TOLERANCE = 0.01   # outputs beyond [0, 1] by more than this break the contract (clipping hides it)


def _check_range(out: torch.Tensor, name: str, shape: tuple) -> None:
    """A method's output must be a float tensor with values in [0, 1] (within RANGE_TOLERANCE):
    values in 0..255, or an integer tensor, would be clipped to a white image without a word."""
    if not torch.is_floating_point(out):
        lo, hi = (int(out.min()), int(out.max())) if out.numel() else (0, 0)
        raise FusesegError(f"{name} returned a {str(out.dtype).replace('torch.', '')} tensor (values {lo}..{hi}) "
                           f"for a batch of visible shape {shape}; the fusion contract (fusion/registry.py) "
                           "needs a float tensor in [0, 1] (for 0..255 values: out.float() / 255).")
    bad = (out < -RANGE_TOLERANCE) | (out > 1 + RANGE_TOLERANCE)
    n = int(bad.sum())
    if n:
        lo, hi = float(out.min()), float(out.max())
        raise FusesegError(f"{name} returned {n} of {out.numel()} value(s) outside [0, 1] (range {lo:.4g}.."
                           f"{hi:.4g}) for a batch of visible shape {shape}; nothing was written for it. The "
                           "fusion contract (fusion/registry.py) needs values in [0, 1]"
                           + (" (these look like 0..255: divide by 255)." if hi > 2 else "; clamp the output."))


class CompiledMethod:
    """``method`` (an ``nn.Module`` in eval mode) run through ``torch.compile`` (inductor, weights
    frozen into the graph: conv + activation fusion, pre-packed weights) for inference, one static
    graph per input shape (dynamic spatial shapes crash inductor in torch 2.14). Measured (#13,
    2-core CPU, bf16): SSPFusion on a 480x640 pair 145 -> 64 ms, after about 12-18 s of compiling
    per new shape, so it pays off on large folders of one size (MSRS), not on the small default
    set. When compiling fails (no C++ compiler, an inductor error) it says so in one line and
    runs ``method`` eagerly from then on."""

    def __init__(self, method: nn.Module, name: str = "fusion method"):
        import torch._inductor.config as inductor_config

        self.method, self.name = method, name
        # inductor reads `freezing` from its global config when a graph is compiled (at a call);
        # passed as torch.compile(options=...) it was not applied (measured: 116 vs 63 ms)
        self._freezing = lambda: inductor_config.patch(freezing=True)
        self.compiled = torch.compile(method, dynamic=False)
        self.failed: str | None = None

    def __call__(self, ir: torch.Tensor, vi: torch.Tensor) -> torch.Tensor:
        if self.failed is None:
            try:
                with self._freezing():
                    return self.compiled(ir, vi)
            except torch.cuda.OutOfMemoryError:
                raise
            except Exception as exc:   # noqa: BLE001 - any compiler failure: fall back, said once
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                self.failed = first
                runtime.notice(f"{self.name}: torch.compile failed ({type(exc).__name__}: {first}); "
                               "fusing without it (set fuse_compile: false to skip the attempt).")
        return self.method(ir, vi)


def compiled_method(method, name: str = "fusion method"):
    """The :class:`CompiledMethod` of a network ``method`` (made once per method object, so a
    second folder reuses its graphs); classical methods (no parameters) are returned as they are."""
    if not isinstance(method, nn.Module) or not any(True for _ in method.parameters()):
        return method
    hit = _COMPILED.get(method)
    if hit is None:
        hit = _COMPILED[method] = CompiledMethod(method, name)
    return hit


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _run(method, ir: list[np.ndarray], vi: list[np.ndarray], device: torch.device, amp: str,
         name: str = "fusion method", tile: int = TILE, margin: int = TILE_MARGIN,
         compile: bool = False) -> np.ndarray:
    """Fuse a batch of same-size pairs -> (B, H, W) or (B, H, W, 3) uint8.

    Pairs with a side above ``tile`` are fused tile by tile: each core tile is fused with
    ``margin`` pixels of context on every side, which are cropped off again, so memory is bounded
    whatever the image size and the result matches the untiled one wherever a method's receptive
    field fits in the margin."""
    amp = method_amp(method, amp)
    channels_last = runtime.precision_record(device, amp)["channels_last"]
    if channels_last and isinstance(method, nn.Module):
        method.to(memory_format=torch.channels_last)
    fn = compiled_method(method, name) if compile else method
    ir_t = _to_tensor(ir)
    vi_t = _to_tensor(vi)
    b, c, h, w = vi_t.shape
    out = torch.empty((b, c, h, w), dtype=torch.uint8)
    for y0, y1 in _spans(h, tile, margin):
        for x0, x1 in _spans(w, tile, margin):
            ya, yb, xa, xb = (max(0, y0 - margin), min(h, y1 + margin), max(0, x0 - margin), min(w, x1 + margin)) \
                if (h > tile or w > tile) else (0, h, 0, w)
            part = _call(fn, runtime.to_memory_format(ir_t[..., ya:yb, xa:xb].to(device), channels_last),
                         runtime.to_memory_format(vi_t[..., ya:yb, xa:xb].to(device), channels_last),
                         device, amp, name)
            out[..., y0:y1, x0:x1] = part[..., y0 - ya:y1 - ya, x0 - xa:x1 - xa]
    out = out[:, 0] if c == 1 else out.permute(0, 2, 3, 1)
    return out.numpy()


def fuse_arrays(method, ir_uint8: np.ndarray, vi_uint8: np.ndarray,
                device: str | torch.device = "cpu", amp: str = "auto") -> np.ndarray:
    """Fuse one pair held in memory: ``ir_uint8`` (H, W), ``vi_uint8`` (H, W, 3) RGB or (H, W)
    grey -> fused uint8, (H, W, 3) when the visible is colour, else (H, W)."""
    device = runtime.resolve_device(device) if not isinstance(device, torch.device) else device
    if ir_uint8.ndim != 2:
        raise DataError(f"infrared must be an (H, W) array, got shape {ir_uint8.shape}")
    vi = _visible_array(vi_uint8)
    if ir_uint8.shape != vi.shape[:2]:
        raise DataError(f"infrared {ir_uint8.shape} and visible {vi_uint8.shape[:2]} differ in size")
    return _run(method, [ir_uint8], [vi], device, amp)[0]


@dataclass
class FuseSummary:
    """What :func:`fuse_folder` did."""

    pairs: int
    written: int
    skipped: int
    seconds: float
    out_dir: Path

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


class _PairReader(torch.utils.data.Dataset):
    """Decodes pair ``i`` of ``stems`` (in a DataLoader worker when workers > 0)."""

    def __init__(self, pairs, stems: list[str], ir16: str):
        self.pairs, self.stems, self.ir16 = pairs, stems, ir16

    def __len__(self) -> int:
        return len(self.stems)

    def __getitem__(self, i: int):
        stem = self.stems[i]
        ir = read_infrared(self.pairs.ir[stem], self.ir16)
        vi = _visible_array(read_visible(self.pairs.vi[stem]))
        if ir.shape != vi.shape[:2]:
            raise DataError(f"pair {stem!r}: infrared {self.pairs.ir[stem]} is {ir.shape[0]}x"
                            f"{ir.shape[1]} but visible {self.pairs.vi[stem]} is {vi.shape[0]}x"
                            f"{vi.shape[1]}. Fusion needs registered pairs of equal size.")
        return stem, ir, vi


def _identity(x):
    return x


def size_batches(items: Iterable[tuple[str, np.ndarray, np.ndarray]], batch_size: int,
                 max_pending: int | None = None):
    """Group a stream of ``(stem, ir, vi)`` into batches of equal size and channel count.

    A batch is released as soon as ``batch_size`` items of one shape are pending; when more than
    ``max_pending`` (default ``4 * batch_size``) items are pending in all, the fullest group is
    released early, so memory stays bounded whatever the folder size or number of sizes. At the
    end every remaining group is released. Yields lists of items."""
    cap = max_pending if max_pending is not None else 4 * batch_size
    groups: dict[tuple, list] = {}
    pending = 0
    for item in items:
        key = item[2].shape
        group = groups.setdefault(key, [])
        group.append(item)
        pending += 1
        if len(group) >= batch_size:
            pending -= len(group)
            yield groups.pop(key)
        elif pending > cap:
            key = max(groups, key=lambda k: len(groups[k]))
            pending -= len(groups[key])
            yield groups.pop(key)
    for key in list(groups):
        yield groups.pop(key)


PROVENANCE = ".fuseseg-fuse.json"


def _same_source(a: dict, b: dict) -> bool:
    """Two provenance records describe the same images (the checkpoint by content, not path)."""
    keys = ("method", "kwargs", "checkpoint_sha256", "ir16")
    return json.dumps([a.get(k) for k in keys], sort_keys=True, default=str) == \
        json.dumps([b.get(k) for k in keys], sort_keys=True, default=str)


def _describe(src: dict) -> str:
    text = f"method {src.get('method')!r}"
    if src.get("kwargs"):
        text += f" {json.dumps(src['kwargs'], sort_keys=True, default=str)}"
    if src.get("checkpoint"):
        text += f" from checkpoint {src['checkpoint']} (sha256 {str(src.get('checkpoint_sha256'))[:12]})"
    return text + f", ir16={src.get('ir16')}"


def _claim_output(out_dir: Path, source: dict, stems: list[str], skip_existing: bool) -> None:
    """Record in ``out_dir/.fuseseg-fuse.json`` which method and checkpoint make its images.

    Images of another method (another record), or images without a record, are never kept
    silently: without ``skip_existing`` (``--overwrite``) they are deleted first (only the
    ``STEM.png`` of the pairs being fused), otherwise it is a ConfigError saying what is there."""
    record_path = out_dir / PROVENANCE
    old = None
    if record_path.is_file():
        try:
            old = json.loads(record_path.read_text())
        except (OSError, json.JSONDecodeError):
            old = {"method": "<unreadable record>"}
    if old is not None and _same_source(old, source):
        return
    present = [s for s in stems if (out_dir / f"{s}.png").is_file()]
    if present and skip_existing:
        made_by = (f"images fused by {_describe(old)}" if old is not None else
                   f"{len(present)} image(s) with the names of these pairs (e.g. {present[0]}.png) that "
                   "fuseseg has no record of making")
        raise ConfigError(f"output folder {out_dir} already holds {made_by}, not by {_describe(source)}. "
                          "Give --out a new folder, or add --overwrite to replace them.")
    for s in present:
        (out_dir / f"{s}.png").unlink()
    atomic_write_text(record_path, json.dumps(source, indent=2, default=str))


def fuse_folder(method, ir_dir: Path | str, vi_dir: Path | str, out_dir: Path | str,
                device: str | torch.device = "auto", batch_size: int = 4, skip_existing: bool = True,
                progress: bool = True, ir16: str = "minmax", *, amp: str = "auto", workers: int = 0,
                name: str | None = None, tile: int = TILE, compile: bool = False) -> FuseSummary:
    """Fuse every pair of ``ir_dir``/``vi_dir`` (paired by stem) into ``out_dir/STEM.png``.

    Pairs of the same size and channel count are fused in batches of up to ``batch_size``
    (folders may mix sizes); inference runs under ``torch.inference_mode`` and autocast in the
    precision ``amp`` resolves to (:func:`fuseseg.runtime.resolve_precision`: bf16 on CUDA and on a
    CPU with native bf16, channels-last with bf16 on a CPU). Outputs already present are skipped when ``skip_existing``. Decoding happens in
    ``workers`` DataLoader processes (0: in this process); memory does not grow with the folder
    size. ``out_dir`` may not be, contain or lie inside ``ir_dir``/``vi_dir``; it records the
    method and checkpoint that made its images (``.fuseseg-fuse.json``), and images of another
    method are refused, or replaced when not ``skip_existing``. Pairs with a side above
    ``tile`` pixels are fused in overlapping tiles (see :func:`_run`), so any image size fits in
    memory. ``compile``: run a network method through :class:`CompiledMethod` (torch.compile;
    eager again, with a notice, where compiling fails). Returns a :class:`FuseSummary`."""
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ConfigError(f"workers must be >= 0 (0: decode in this process), got {workers}")
    device = runtime.resolve_device(device) if not isinstance(device, torch.device) else device
    name = name or getattr(method, "name", None) or type(method).__name__
    check_disjoint(out_dir, {"--ir": ir_dir, "--vi": vi_dir}, "--out")
    pairs = find_pairs(ir_dir, vi_dir)
    out_dir = Path(out_dir)
    source = {**getattr(method, "_fuseseg_source", {"method": name}), "ir16": ir16}
    _claim_output(out_dir, source, pairs.stems, skip_existing)
    todo = [s for s in pairs.stems if not (skip_existing and (out_dir / f"{s}.png").is_file())]
    t0 = time.perf_counter()
    loader = torch.utils.data.DataLoader(_PairReader(pairs, todo, ir16), batch_size=None,
                                         num_workers=workers, collate_fn=_identity)
    bar = task = None
    if progress and todo:
        from fuseseg.progress import make_progress

        bar = make_progress()
        bar.start()
        task = bar.add_task(f"fusing ({name})", total=len(todo))
    written = 0
    try:
        for batch in size_batches(loader, batch_size):
            h, w = batch[0][1].shape[:2]
            with runtime.OOMGuard(f"fusing {len(batch)} pair(s) of {w}x{h} with {name} on {device}",
                                  "the fuse batch size", batch_size,
                                  advice=f"lower the fuse batch size (now {batch_size}): fuse_batch_size "
                                  "in an experiment config, --batch-size for `fuseseg fuse`"):
                fused = _run(method, [b[1] for b in batch], [b[2] for b in batch], device, amp, name, tile,
                             compile=compile)
            for (stem, _, _), img in zip(batch, fused, strict=True):
                write_image(out_dir / f"{stem}.png", img)
            written += len(batch)
            if bar is not None:
                bar.advance(task, len(batch))
    finally:
        if bar is not None:
            bar.stop()
    return FuseSummary(pairs=len(pairs), written=written, skipped=len(pairs) - len(todo),
                       seconds=time.perf_counter() - t0, out_dir=out_dir)
