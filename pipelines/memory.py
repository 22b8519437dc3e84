"""Peak memory of a stage: this process's peak resident set size (RSS), reset between stages
where Linux allows it, the largest peak of its finished child processes, and the CUDA peak.

The stage block (:class:`pipelines.stages.base.Stage`) reads these for every stage record
(``peak_rss_mib``, ``peak_rss_scope``, ``process_peak_rss_mib``, ``child_peak_rss_mib``,
``gpu_peak_mib``).
"""
from __future__ import annotations

import resource
from pathlib import Path


def gpu_peak_mib() -> float | None:
    """``torch.cuda.max_memory_allocated`` (MiB) since the last reset, or None when this process
    has not used CUDA (torch is not imported here just to ask)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda.max_memory_allocated() / 2**20


def reset_gpu_peak() -> None:
    if gpu_peak_mib() is not None:
        import torch

        torch.cuda.reset_peak_memory_stats()


_PROCESS_PEAK_MIB = 0.0   # this process's peak RSS over every stage so far (resets lower the kernel's)


def reset_peak_rss() -> bool:
    """Reset this process's peak resident set size so that the next reading is the peak of what
    follows (Linux >= 4.0: write 5 to /proc/self/clear_refs). False where that is not possible.
    The peak before the reset is kept in :data:`_PROCESS_PEAK_MIB`."""
    global _PROCESS_PEAK_MIB
    _PROCESS_PEAK_MIB = max(_PROCESS_PEAK_MIB, own_peak_rss_mib())
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def own_peak_rss_mib() -> float:
    """Peak RSS of this process since the last :func:`reset_peak_rss` (VmHWM), else since start."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def children_peak_rss_mib() -> float:
    """Largest peak RSS of any finished child process (torchrun workers, DataLoader workers)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0


def process_peak_rss_mib(own: float) -> float:
    """This process's peak RSS over every stage so far, given the current reading ``own``."""
    return max(_PROCESS_PEAK_MIB, own)
