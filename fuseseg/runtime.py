"""Runtime helpers shared by both trainers: device choice, seeding and RNG state, atomic and
self-describing checkpoints, mixed precision (bf16 autocast also on CPUs with native bf16), torch.distributed set-up, and Ctrl-C as a request to
stop at the next step (:class:`StopRequest`).

Nothing here calls ``.cuda()``: the device is chosen once (``resolve_device``) and passed in.
"""
from __future__ import annotations

import io
import os
import random
import re
import signal
import sys
import threading
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fuseseg.data.io import atomic_write_bytes
from fuseseg.errors import CheckpointError, ConfigError, FusesegError


# ---------------------------------------------------------------- device, precision
def resolve_device(spec: str = "auto") -> torch.device:
    """``'auto'`` -> CUDA (this process's local rank under torchrun) if available, else CPU;
    otherwise ``torch.device(spec)``, checked to exist."""
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"device {spec!r} is not a device name; use auto, cpu, cuda or cuda:N (the "
                          "`device` key of a config, or --device).") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} requested but CUDA is not available here; set "
                          "device=auto or device=cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                          f"(cuda:0..cuda:{torch.cuda.device_count() - 1}); pick one of them or device=auto.")
    return dev


#: The precisions a run can compute in (what ``amp`` resolves to on a device).
PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_notices: set[str] = set()


def _probe_cpu_bf16() -> tuple[bool, str]:
    """(native, what): whether this CPU computes bf16 matrix products natively (AVX-512 BF16 or
    AMX tiles, through oneDNN), and the instruction set found. Without them bf16 is emulated
    and slower than fp32. Tests replace this function to simulate other CPUs."""
    if not torch.backends.mkldnn.is_available():
        return False, "PyTorch built without oneDNN"
    cpu = getattr(torch, "cpu", None)
    found = [name for name, probe in (("AMX", "_is_amx_tile_supported"),
                                      ("AVX-512 BF16", "_is_avx512_bf16_supported"))
             if getattr(cpu, probe, None) is not None and getattr(cpu, probe)()]
    if found:
        return True, " + ".join(found)
    return False, f"{torch.backends.cpu.get_cpu_capability()} without AVX-512 BF16 or AMX"


_cpu_bf16: tuple[bool, str] | None = None


def cpu_bf16_supported() -> tuple[bool, str]:
    """Cached :func:`_probe_cpu_bf16` (the CPU does not change during a run)."""
    global _cpu_bf16
    if _cpu_bf16 is None:
        _cpu_bf16 = _probe_cpu_bf16()
    return _cpu_bf16


def notice(text: str) -> None:
    """Print a one-line notice to stderr, once per process."""
    if text not in _notices:
        _notices.add(text)
        print(f"note: {text}", file=sys.stderr, flush=True)


def resolve_precision(device: torch.device | str, amp: str = "auto") -> str:
    """The precision that ``amp`` means on ``device``: ``'fp32'``, ``'bf16'`` or ``'fp16'``.

    * ``'off'``: fp32 everywhere.
    * ``'auto'``: on CUDA bf16 where supported, else fp16 (with loss scaling); on a CPU with native
      bf16 (AVX-512 BF16 / AMX, :func:`cpu_bf16_supported`) bf16, on other CPUs fp32 (a one-line
      notice says so); fp32 on any other device.
    * ``'bf16'``: bf16 (on a CPU without native support it is emulated: correct, but slow).
    * ``'fp16'``: CUDA only (a ConfigError elsewhere).

    Autocast computes convolutions and matrix products in the low precision; losses and metrics
    stay float32/float64 (they cast their inputs, see :func:`fusion.structure.no_autocast`)."""
    device = torch.device(device)
    if amp not in ("auto", "off", "bf16", "fp16"):
        raise ConfigError(f"amp={amp!r} is not a precision setting; use auto, off, bf16 or fp16.")
    if amp == "off":
        return "fp32"
    if device.type == "cuda":
        if amp == "auto":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return amp
    if amp == "fp16":
        raise ConfigError(f"amp='fp16' needs a CUDA device (here: {device.type}); set amp to auto, "
                          "bf16 or off.")
    if device.type != "cpu":
        return "bf16" if amp == "bf16" else "fp32"
    if amp == "bf16":
        return "bf16"
    native, what = cpu_bf16_supported()
    if native:
        return "bf16"
    notice(f"this CPU has no native bf16 ({what}); amp=auto computes in fp32.")
    return "fp32"


def autocast(device: torch.device, amp: str = "auto"):
    """Mixed-precision context for :func:`resolve_precision` ``(device, amp)``: ``torch.autocast``
    with bf16/fp16 on CUDA and CPU, a no-op context for fp32."""
    precision = resolve_precision(device, amp)
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=_DTYPES[precision])


def needs_grad_scaler(device: torch.device, amp: str = "auto") -> bool:
    """True when autocast will use fp16 (which needs loss scaling)."""
    return resolve_precision(device, amp) == "fp16"


def use_channels_last(device: torch.device | str, precision: str, requested: bool = False) -> bool:
    """Whether to keep 4-D tensors (model and inputs) channels-last: when ``requested``, and
    always for bf16 on a CPU, where oneDNN's bf16 convolutions run 2.5-4x faster on channels-last
    tensors than on contiguous ones (issue #13: 3x3 convolutions, 16-64 channels, 240x320)."""
    return bool(requested) or (torch.device(device).type == "cpu" and precision == "bf16")


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """``x`` channels-last when asked and 4-D, else unchanged."""
    if channels_last and x.ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x


def precision_record(device: torch.device | str, amp: str = "auto", channels_last: bool = False) -> dict:
    """What checkpoints and run records store about the arithmetic: ``{amp, precision,
    channels_last}`` (``precision`` as resolved on ``device``)."""
    precision = resolve_precision(device, amp)
    return {"amp": amp, "precision": precision,
            "channels_last": use_channels_last(device, precision, channels_last)}


# ---------------------------------------------------------------- memory
def release_memory() -> bool:
    """Collect garbage, then hand the heap memory malloc keeps free back to the OS (glibc's
    ``malloc_trim(0)``; elsewhere only the collection). After a stage that allocated large
    temporary tensors in a worker thread (fusing under ``--executor local``), the freed memory
    otherwise stays in that thread's malloc arena: table4's submitting process held 3.2 GiB
    after its fuse stages, against 2.3 GiB for the whole run in process. Returns whether memory
    was trimmed."""
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):   # musl and other libcs without malloc_trim
        return False
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    trim(0)
    return True


# ---------------------------------------------------------------- seeds and RNG state
def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def get_rng_state() -> dict[str, Any]:
    """Every RNG state a training run depends on, for checkpoints, as tensors and plain Python
    values only (so a checkpoint loads with ``torch.load(weights_only=True)``)."""
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
             "numpy": {"kind": str(kind), "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`get_rng_state`'s states (also the raw tuples older checkpoints hold)."""
    py = state["python"]
    if isinstance(py, dict):
        py = (py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"])
    random.setstate(py)
    npy = state["numpy"]
    if isinstance(npy, dict):
        npy = (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
               npy["cached_gaussian"])
    np.random.set_state(npy)
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _legacy_safe_globals() -> list:
    """The types that checkpoints of older fuseseg versions hold (the numpy RNG state is a uint32
    array; ``torch.__version__`` a str subclass), allowed while loading them: they rebuild arrays
    of numbers and strings and run no code."""
    mod = getattr(np, "_core", None) or np.core
    from torch.torch_version import TorchVersion  # a str subclass (torch.__version__)

    return [mod.multiarray._reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)),
            mod.multiarray.scalar, type(np.dtype(np.float64)), type(np.dtype(np.int64)), TorchVersion]


# ---------------------------------------------------------------- checkpoints
def _plain(value: Any) -> Any:
    """``value`` with numpy arrays/scalars, paths and str subclasses (e.g. ``torch.__version__``)
    turned into tensors and plain Python types, recursively through dicts, lists and tuples."""
    if isinstance(value, dict):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_plain(v) for v in value)
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str) and type(value) is not str:
        return str(value)
    if isinstance(value, Path):
        return str(value)
    return value


def save_checkpoint(path: Path | str, payload: dict[str, Any]) -> None:
    """``torch.save`` ``payload`` to ``path`` atomically (temporary file, then rename).

    A self-describing checkpoint holds at least ``method``/``kind``, ``kwargs`` and
    ``state_dict``, so a model can be rebuilt from the file alone. Values are stored as tensors and
    plain Python types (:func:`_plain`), so that :func:`load_checkpoint` needs no unpickling of
    other objects."""
    buf = io.BytesIO()
    torch.save(_plain(payload), buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path | str, *, expect: dict[str, Any] | None = None,
                    map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save_checkpoint`, with ``torch.load(weights_only=True)``:
    only tensors and plain Python data are unpickled, so a crafted file cannot run code; one that
    needs other types is a CheckpointError saying so.

    ``expect`` maps keys to required values (e.g. ``{'kind': 'fusion', 'method': 'sspfusion'}``);
    a mismatch, a missing or corrupt file is a CheckpointError naming the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist. Check the path, or train first.")
    try:
        with torch.serialization.safe_globals(_legacy_safe_globals()):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        text = str(exc)
        found = re.search(r"GLOBAL\s+([\w.]+)", text)
        if found:  # the file names a Python callable or class beyond the allow-list
            raise CheckpointError(f"checkpoint {path} holds Python objects other than tensors and plain "
                                  f"data ({found.group(1)}); fuseseg refuses to unpickle them, because "
                                  "loading such a file can run any code. Use a checkpoint written by fuseseg, or one from a "
                                  "source you trust re-saved with tensors and plain types only.") from None
        detail = " ".join(text.split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0].split())
        raise CheckpointError(f"checkpoint {path} is corrupt or not a fuseseg checkpoint "
                              f"({type(exc).__name__}: {detail[:200]}). Delete it and retrain, or resume "
                              "from an earlier one.") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise CheckpointError(f"checkpoint {path} is not a fuseseg checkpoint (no state_dict). "
                              "Use a file written by `fuseseg train-fusion` or `fuseseg segment train`.")
    for key, want in (expect or {}).items():
        if ckpt.get(key) != want:
            raise CheckpointError(f"checkpoint {path} has {key}={ckpt.get(key)!r}, but {want!r} is "
                                  "needed here. Pass the checkpoint of the right method/model.")
    return ckpt


def load_state_dict_checked(model: torch.nn.Module, state_dict: dict, path: Path | str) -> None:
    """``model.load_state_dict`` with a CheckpointError naming the file on a shape/key mismatch."""
    try:
        model.load_state_dict(state_dict)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"checkpoint {path} does not fit this model (different shape or "
                              f"settings): {' '.join(first[:3])[:400]}. Use the settings it was "
                              "trained with (they are stored in the checkpoint's kwargs).") from exc


def _count_on_meta(factory, kwargs: dict) -> int | None:
    """Parameters of ``factory(**kwargs)`` built on the meta device (shapes only, no memory), or
    None when the factory cannot build there (it then runs for real, unchecked)."""
    try:
        with torch.device("meta"):
            model = factory(**kwargs)
    except Exception:   # noqa: BLE001 - the real build below reports the factory's own errors
        return None
    if not isinstance(model, torch.nn.Module):
        return None
    return sum(p.numel() for p in model.parameters())


def build_from_checkpoint(factory, ckpt: dict, path: Path | str, what: str) -> torch.nn.Module:
    """``factory(**ckpt['kwargs'])`` with its weights loaded, after checking the checkpoint's fields
    (``kwargs`` a mapping of names, ``state_dict`` a mapping of tensors) and, before any memory is
    allocated, the model's size: counted on the meta device, its parameters may not exceed
    :mod:`fuseseg.limits`' ``max_model_parameters`` nor the values the checkpoint's weights hold
    (a crafted ``kwargs`` cannot ask for gigabytes). Every failure is a CheckpointError naming
    ``path``."""
    from fuseseg.limits import current, how_to_raise

    kwargs, state = ckpt.get("kwargs") or {}, ckpt.get("state_dict")
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        raise CheckpointError(f"checkpoint {path}: its `kwargs` field is {type(kwargs).__name__} {str(kwargs)[:80]}, "
                              "not a mapping of setting names; the file is damaged or not written by fuseseg.")
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"checkpoint {path}: its `state_dict` field is not a mapping of tensors; the file "
                              "is damaged or not written by fuseseg.")
    stored = sum(v.numel() for v in state.values())
    n = _count_on_meta(factory, kwargs)
    limit = current().max_model_parameters
    if n is not None and n > limit:
        raise CheckpointError(f"checkpoint {path}: its kwargs describe a {what} of {n:,} parameters, over the "
                              f"limit of {limit:,}; it was not built. Use another checkpoint, or "
                              f"{how_to_raise('max_model_parameters')}.")
    if n is not None and n > stored:
        raise CheckpointError(f"checkpoint {path}: its kwargs describe a {what} of {n:,} parameters but its "
                              f"weights hold only {stored:,} values: the settings (its kwargs and any given with "
                              "it) do not match its weights. Use the settings it was trained with (stored in the "
                              "checkpoint's kwargs).")
    try:
        model = factory(**kwargs)
    except (TypeError, ValueError, FusesegError) as exc:
        raise CheckpointError(f"checkpoint {path}: its kwargs {str(kwargs)[:120]} do not build a {what} "
                              f"({str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__}).") from None
    if not isinstance(model, torch.nn.Module):
        raise CheckpointError(f"checkpoint {path}: the {what} it names has no weights to load.")
    load_state_dict_checked(model, state, path)
    return model


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare model inside DistributedDataParallel / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ---------------------------------------------------------------- out of memory
def oom_error(exc: BaseException, where: str, key: str, value: Any, advice: str | None = None) -> FusesegError:
    """The FusesegError for a ``torch.cuda.OutOfMemoryError`` raised ``where``: it names the
    config ``key`` to lower and its current ``value`` (``advice`` replaces that sentence)."""
    if advice is None:
        advice = f"lower {key} (now {value}" + (
            f", e.g. to {value // 2}" if isinstance(value, int) and value > 1 else "") + ")"
    text = str(exc).strip()
    first = text.splitlines()[0][:200] if text else "CUDA out of memory"
    return FusesegError(f"out of GPU memory {where}: {advice}, or set amp=bf16/fp16 if it is off, "
                        f"then run it again. ({first})")


class OOMGuard:
    """Context manager that turns ``torch.cuda.OutOfMemoryError`` into :func:`oom_error`.

    ``where``/``key``/``value`` may be updated inside the block (e.g. at a phase switch, when
    another batch-size key applies)."""

    def __init__(self, where: str, key: str, value: Any, advice: str | None = None):
        self.where, self.key, self.value, self.advice = where, key, value, advice

    def __enter__(self) -> OOMGuard:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None and issubclass(exc_type, torch.cuda.OutOfMemoryError):
            raise oom_error(exc, self.where, self.key, self.value, self.advice) from exc
        return False


# ---------------------------------------------------------------- distributed
def dist_info() -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) when not distributed."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Initialise torch.distributed when launched by torchrun (WORLD_SIZE > 1): NCCL on CUDA,
    gloo on CPU. Returns (rank, world_size)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)
    return dist_info()


def is_main_process() -> bool:
    return dist_info()[0] == 0


# ---------------------------------------------------------------- Ctrl-C
class StopRequest:
    """SIGINT (Ctrl-C) as a request to stop a training loop at the next step boundary.

    The first SIGINT only sets ``requested``; the loop checks it (:meth:`agreed`) at a step
    boundary, saves its exact position and raises KeyboardInterrupt. A second SIGINT raises
    KeyboardInterrupt at once (the previous checkpoint is kept). Use it as the handler itself
    (``signal.signal(SIGINT, stop)``) or as a context manager, which installs it (main thread
    only: Python delivers signals there) and restores the previous handler on exit."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __call__(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self)
            self._installed = True
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous if self._previous is not None
                          else signal.default_int_handler)
            self._installed = False
        return False

    def agreed(self, device: torch.device, world: int) -> bool:
        """True when any process asked to stop (one all-reduce MAX under DDP, so that every rank
        stops at the same step; a collective: all ranks must call it at the same point)."""
        if world <= 1:
            return self.requested
        flag = torch.tensor([float(self.requested)], device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
