"""Helpers shared by the benchmarks: timing, machine description, figures, the JSON record.

A *figure* is one reported number: ``{"section", "figure", "value", "unit", "note"}`` (``note``
says how it was measured, e.g. ``"median of 5 after 1 warm-up"``). Every benchmark module's
``run(quick=False) -> dict`` returns its raw result; ``benchmarks/__main__.py`` turns each into
figures, prints one table and writes one JSON file (:func:`write_record`).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "results" / "benchmarks"
LIBRARIES = {"torch": "torch", "torchvision": "torchvision", "numpy": "numpy",
             "opencv": "cv2", "smp": "segmentation_models_pytorch", "timm": "timm",
             "albumentations": "albumentations"}
RECORD_KEYS = ("date", "quick", "command", "machine", "device", "versions", "figures", "benchmarks")


@dataclass
class Timing:
    """Result of :func:`timed`: ``times`` (seconds of each timed call, warm-ups excluded)."""

    times: list[float] = field(default_factory=list)
    warmup: int = 0

    @property
    def median(self) -> float:
        """Median seconds per call."""
        return statistics.median(self.times)

    @property
    def repeats(self) -> int:
        return len(self.times)

    def per_s(self, items: float = 1.0) -> float:
        """``items / median`` (e.g. samples per second when one call handles ``items`` samples)."""
        return items / max(self.median, 1e-12)

    def as_dict(self) -> dict:
        return {"median_s": self.median, "times_s": list(self.times), "warmup": self.warmup}


def _is_cuda(device) -> bool:
    return device is not None and str(device).startswith("cuda")


def synchronize(device) -> None:
    """Wait for queued CUDA work on ``device`` (no-op for CPU or None)."""
    if _is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1, device=None,
          clock: Callable[[], float] = time.perf_counter) -> Timing:
    """Call ``fn()`` ``warmup`` times untimed, then ``repeats`` times timed.

    Each timed call is ``t1 - t0`` of ``clock`` around ``fn()``; on a CUDA ``device`` the device is
    synchronised before ``t0`` and before ``t1`` (kernels are asynchronous, so an unsynchronised
    clock would time the launch, not the work). Report ``Timing.median``: the median is robust
    to the occasional slow repeat caused by other processes on a shared machine."""
    if repeats < 1:
        raise ValueError(f"timed: repeats must be >= 1, got {repeats}")
    for _ in range(max(0, warmup)):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = clock()
        fn()
        synchronize(device)
        times.append(clock() - t0)
    return Timing(times, max(0, warmup))


def figure(section: str, name: str, value: float | int | str | None, unit: str = "", note: str = "") -> dict:
    """One row of the benchmark table / JSON ``figures`` list."""
    if isinstance(value, float):
        value = float(f"{value:.6g}")
    return {"section": section, "figure": name, "value": value, "unit": unit, "note": note}


# ---------------------------------------------------------------- machine and versions
def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info() -> dict:
    """CPU model, logical cores (and those this process may use), memory, OS, Python, load."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        usable = os.cpu_count()
    return {"cpu_model": _cpu_model(), "cores": os.cpu_count(), "usable_cores": usable,
            "memory_gib": _memory_gib(), "platform": platform.platform(),
            "python": platform.python_version(), "load_average": list(os.getloadavg())}


def library_versions() -> dict:
    """Versions of the libraries that set the speed (``None`` when one is not importable)."""
    import importlib

    out = {}
    for label, module in LIBRARIES.items():
        try:
            out[label] = getattr(importlib.import_module(module), "__version__", "unknown")
        except Exception:  # noqa: BLE001 - a broken optional import must not stop the record
            out[label] = None
    return out


def device_info() -> dict:
    """The device the benchmarks run on (CUDA when present), and torch's CPU threads."""
    import torch

    info: dict[str, Any] = {"torch_threads": torch.get_num_threads(),
                            "torch_interop_threads": torch.get_num_interop_threads()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(type="cuda", name=p.name, memory_gib=round(p.total_memory / 2**30, 1),
                    count=torch.cuda.device_count(), cuda=torch.version.cuda)
    else:
        info.update(type="cpu", name=_cpu_model())
    return info


def default_device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# ---------------------------------------------------------------- the record
def make_record(figures: list[dict], benchmarks: dict, quick: bool, command: list[str] | None = None,
                machine: dict | None = None, device: dict | None = None,
                versions: dict | None = None) -> dict:
    """The JSON record of one ``python -m benchmarks`` run (keys: :data:`RECORD_KEYS`)."""
    return {"date": dt.datetime.now().isoformat(timespec="seconds"), "quick": bool(quick),
            "command": list(command or []),
            "machine": machine if machine is not None else machine_info(),
            "device": device if device is not None else device_info(),
            "versions": versions if versions is not None else library_versions(),
            "figures": list(figures), "benchmarks": benchmarks}


def default_record_path(today: dt.date | None = None) -> Path:
    return RESULTS / f"{(today or dt.date.today()).isoformat()}.json"


def write_record(record: dict, path: Path | str | None = None) -> Path:
    """Write ``record`` as indented JSON, atomically (default ``results/benchmarks/<date>.json``);
    values JSON cannot hold (paths, numpy scalars) are written as strings / numbers."""
    from fuseseg.data.io import atomic_write_text

    missing = [k for k in RECORD_KEYS if k not in record]
    if missing:
        raise ValueError(f"benchmark record lacks {missing}; build it with make_record()")
    path = Path(path) if path is not None else default_record_path()

    def plain(o):
        if hasattr(o, "item"):
            return o.item()
        return str(o)

    atomic_write_text(path, json.dumps(record, indent=2, default=plain) + "\n")
    return path


def figures_table(figures: list[dict], title: str = "fuseseg benchmarks"):
    """A rich Table of ``figures`` (section, figure, value, unit); section shown once per group."""
    from rich.table import Table
    from rich.text import Text

    t = Table(title=title, show_lines=False)
    t.add_column("section", style="bold")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("unit")
    last = None
    for f in figures:
        v = f["value"]
        if isinstance(v, float):
            v = f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
        elif v is None:
            v = "-"
        # names are text, not rich markup: "[fp32] wall time" must keep its brackets
        t.add_row(*(Text(x) for x in (f["section"] if f["section"] != last else "", f["figure"], str(v), f["unit"])))
        last = f["section"]
    return t


def config_values(config: str, section: str, fallback: dict) -> dict:
    """``fallback`` updated with the keys of ``configs/<config>.yaml``'s ``section`` (a dotted path,
    e.g. ``"data.synthetic"``) that it names; the fallback alone when the file/section is absent."""
    out = dict(fallback)
    path = REPO / "configs" / f"{config}.yaml"
    if path.is_file():
        import yaml

        node = yaml.safe_load(path.read_text()) or {}
        for part in section.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            out.update({k: node[k] for k in out if k in node})
    return out


# ---------------------------------------------------------------- compute rates and precisions
#: The precisions a benchmark compares: ``amp=off`` (fp32, contiguous tensors: what every CPU
#: step ran in before bf16 autocast, i.e. "before") and ``amp=auto`` (bf16 autocast + channels-last
#: on a CPU with native bf16, fp32 on one without; "after").
AMPS = ("off", "auto")


def matmul_rates(n: int = 2048, repeats: int = 5, device=None, budget_s: float = 20.0,
                 clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """GFLOP/s of an ``n x n`` matmul (``2 n^3`` FLOPs) in float32 and in bfloat16, measured now:
    every GFLOP/s figure of a benchmark is shown next to both, so a reader sees how much of the
    machine the benchmark got.

    Median of ``repeats`` timed calls after 2 warm-ups, except for a precision so slow that those
    calls would overrun ``budget_s`` (bf16 emulated on a CPU without native bf16: one 2048^2
    matmul takes ~60 s at 0.29 GFLOP/s): its first call is the only warm-up, and it gets
    ``max(1, budget_s // first)`` timed calls (2 calls in all instead of 7, ~2 instead of ~7 min)."""
    import torch

    device = device or "cpu"
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        first = timed(lambda a=a, b=b: a @ b, repeats=1, warmup=0, device=device, clock=clock).median
        if first * (repeats + 1) > budget_s:
            reps, warm = int(max(1, min(repeats, budget_s // max(first, 1e-9)))), 0
        else:
            reps, warm = repeats, 1
        sec = timed(lambda a=a, b=b: a @ b, repeats=reps, warmup=warm, device=device, clock=clock).median
        out[name] = 2 * n ** 3 / sec / 1e9
    return out


def rate_figures(section: str, rates: dict[str, float], n: int = 2048) -> list[dict]:
    """The two rows "fp32 / bf16 matmul n^2" that go next to a section's GFLOP/s figures."""
    return [figure(section, f"{p} matmul {n}x{n} (this run)", rates[p], "GFLOP/s",
                   "median; the machine's dense-compute speed in that precision")
            for p in ("fp32", "bf16") if p in rates]


def gflops_figures(section: str, name: str, gflops: float, rates: dict[str, float]) -> list[dict]:
    """A GFLOP/s figure and its fractions of the fp32 and bf16 matmul rates of the same run."""
    note = ", ".join(f"{p} matmul {rates[p]:.0f}" for p in ("fp32", "bf16") if p in rates)
    out = [figure(section, name, gflops, "GFLOP/s", f"same run: {note} GFLOP/s")]
    for p in ("fp32", "bf16"):
        if rates.get(p):
            out.append(figure(section, f"  {name} / {p} matmul", gflops / rates[p], "ratio"))
    return out


def seg_train_step(net, opt, crit, x, y, device, amp: str = "auto"):
    """One DeepLabV3+ optimiser step as ``segmentation.train`` runs it: forward under autocast
    for ``amp``, Dice+CE in float32, backward, step. Returns the loss."""
    from fuseseg.runtime import autocast

    with autocast(device, amp):
        logits = net(x)
    loss, _, _ = crit(logits, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss


def precision_of(amp: str) -> dict:
    """``fuseseg.runtime.precision_record`` on the CPU for ``amp``."""
    from fuseseg.runtime import precision_record

    return precision_record("cpu", amp)
