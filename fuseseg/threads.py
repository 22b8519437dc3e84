"""How many torch threads a fuseseg process uses, on a machine it may share.

torch's default is one thread per core of the machine. That is wrong twice over on a shared
machine: a job may use fewer CPUs than the machine has (an affinity mask, a cgroup CPU quota, a
SLURM allocation), and two busy processes that each run one thread per core make each other
wait at every parallel region. Measured on a 2-core machine, one DeepLabV3+ training loop
(resnet10t, 96 px crops, batch 4): 69 images/s alone; two at once with 2 threads each: 4.7
images/s each; two at once with 1 thread each: 44 images/s each.

So fuseseg starts from the CPUs it may use (:func:`usable_cpus`), gives each of the local
executor's ``--jobs N`` a share, and -- unless a thread count was given (``--threads N``,
``threads: N``, or ``OMP_NUM_THREADS``) -- uses fewer threads while other work keeps those CPUs
busy (:func:`threads_for_load`), re-deciding between training epochs (:class:`EpochPace`, which
also warns once when an epoch's throughput falls below a third of the training's best).

The deciding functions are pure (file contents, environment and load in; a number out); the
readers around them take the files and the environment of this process.
"""
from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
COLLAPSE = 3.0   # warn when an epoch runs this many times slower than the training's best


# ------------------------------------------------------------------ pure: parsing and deciding
def cgroup_v2_cpus(cpu_max: str) -> float | None:
    """CPUs a cgroup v2 ``cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``) allows; None
    when unlimited or unreadable."""
    fields = cpu_max.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def cgroup_v1_cpus(quota_us: str, period_us: str) -> float | None:
    """CPUs a cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` pair allows; None when the
    quota is -1 (unlimited) or unreadable."""
    try:
        quota, period = int(quota_us.strip()), int(period_us.strip())
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def slurm_cpus(env: Mapping[str, str]) -> int | None:
    """CPUs SLURM gave this task: ``SLURM_CPUS_PER_TASK``, else ``SLURM_CPUS_ON_NODE``; None
    outside a SLURM job (or for a value that is not a positive number)."""
    for key in ("SLURM_CPUS_PER_TASK", "SLURM_CPUS_ON_NODE"):
        text = env.get(key, "").strip()
        if text.isdigit() and int(text) > 0:
            return int(text)
    return None


def combine_limits(machine: int, affinity: int | None, quota: float | None,
                   slurm: int | None) -> tuple[int, str]:
    """(CPUs usable, why): the smallest of the machine's CPU count, the affinity mask, the cgroup
    quota (rounded down, at least 1) and SLURM's allocation; ``why`` names each limit found."""
    limits = {"machine": machine}
    if affinity:
        limits["affinity mask"] = affinity
    if quota is not None:
        limits["cgroup CPU quota"] = max(1, math.floor(quota + 1e-9))
    if slurm:
        limits["SLURM allocation"] = slurm
    n = max(1, min(limits.values()))
    shown = ", ".join(f"{k} {v}" for k, v in limits.items())
    return n, f"{n} usable CPU{'s' if n > 1 else ''} ({shown})"


def threads_for_load(load1: float, cpus: int, own: int, ceiling: int, running_others: float | None = None) -> int:
    """Threads to use when the 1-minute load average is ``load1`` and ``own`` of it is this
    process's own threads: the CPUs the other work leaves free (to the nearest whole CPU, so a
    little background load costs no thread), between 1 and ``ceiling``. ``running_others`` (other
    threads runnable right now, :func:`runnable_others`) counts too when higher: the load average
    takes about a minute to notice a process that just started. Two busy processes on 2 CPUs each
    settle at 1 thread (measured 44 images/s each, against 4.7 with 2 threads each)."""
    others = max(0.0, load1 - own, running_others or 0.0)
    free = math.floor(cpus - others + 0.5)
    return max(1, min(ceiling, free))


def runnable_others(samples: list[int]) -> float | None:
    """Other threads runnable now, from samples of the kernel's count of runnable threads
    (``/proc/loadavg``'s 4th field, which counts the sampling thread itself): their median less
    one; None without samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    return max(0.0, float(ordered[len(ordered) // 2]) - 1.0)


def share_of(cpus: int, jobs: int) -> int:
    """Threads of each of ``jobs`` jobs run at once on ``cpus`` CPUs: max(1, cpus // jobs)."""
    return max(1, cpus // max(1, jobs))


# ------------------------------------------------------------------ readers of this process's facts
def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: str | None = None) -> float | None:
    """The tightest CPU quota of this process's cgroup and its ancestors (v2 ``cpu.max``, v1
    ``cpu.cfs_quota_us``), None when none is set or the files are absent."""
    if proc_cgroup is None:
        proc_cgroup = _read(Path("/proc/self/cgroup")) or ""
    found: list[float] = []
    for line in proc_cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier, controllers, rel = parts
        rel_parts = [p for p in rel.strip().split("/") if p]
        folders = [Path(*rel_parts[:i]) if i else Path() for i in range(len(rel_parts), -1, -1)]
        for folder in folders:
            if hier == "0" and controllers == "":          # cgroup v2
                text = _read(root / folder / "cpu.max")
                value = cgroup_v2_cpus(text) if text else None
            elif "cpu" in controllers.split(","):           # cgroup v1
                base = root / controllers / folder
                if not base.is_dir():
                    base = root / "cpu" / folder
                q, p = _read(base / "cpu.cfs_quota_us"), _read(base / "cpu.cfs_period_us")
                value = cgroup_v1_cpus(q, p) if q and p else None
            else:
                continue
            if value is not None:
                found.append(value)
    return min(found) if found else None


def usable_cpus(env: Mapping[str, str] | None = None,
                affinity: Callable[[int], set] | None = None) -> tuple[int, str]:
    """(CPUs this process may use, why) from the affinity mask, the cgroup CPU quota and SLURM."""
    env = os.environ if env is None else env
    getaff = affinity or getattr(os, "sched_getaffinity", None)
    try:
        aff = len(getaff(0)) if getaff else None
    except OSError:
        aff = None
    return combine_limits(os.cpu_count() or 1, aff, cgroup_quota(), slurm_cpus(env))


def sample_runnable(n: int = 9, interval_s: float = 0.01) -> list[int]:
    """``n`` samples of the runnable-thread count of ``/proc/loadavg`` (empty where it is absent)."""
    import time

    out = []
    for i in range(n):
        text = _read(Path("/proc/loadavg"))
        fields = text.split() if text else []
        if len(fields) < 4 or not fields[3].split("/")[0].isdigit():
            return []
        out.append(int(fields[3].split("/")[0]))
        if i + 1 < n:
            time.sleep(interval_s)
    return out


def load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except (OSError, AttributeError):
        return None


# ------------------------------------------------------------------ the process's policy
@dataclass
class ThreadPolicy:
    """This process's thread decision: ``threads`` now, the ``ceiling`` it may use, whether it
    adapts to the load (``adaptive``: no thread count was given), and ``why`` in words."""

    threads: int
    ceiling: int
    cpus: int
    adaptive: bool
    why: str
    load1: float | None = None

    def record(self) -> dict:
        """For environment.json."""
        return {"threads": self.threads, "ceiling": self.ceiling, "usable_cpus": self.cpus,
                "adaptive": self.adaptive, "load_average_1min": self.load1, "why": self.why}


_ACTIVE: ThreadPolicy | None = None


def decide(requested: int | None, jobs: int = 1, env: Mapping[str, str] | None = None,
           load1: float | None = None, cpus: tuple[int, str] | None = None,
           running: float | None = None) -> ThreadPolicy:
    """The thread policy for a process: ``requested`` (``--threads``/``threads:``; 0 or None =
    choose) wins, then ``OMP_NUM_THREADS``; otherwise the usable CPUs' share of ``jobs`` jobs,
    fewer while other work keeps the CPUs busy (``load1``, the 1-minute load average)."""
    if requested is not None and requested < 0:
        from fuseseg.errors import ConfigError

        raise ConfigError(f"--threads / threads: {requested}: give a thread count of 1 or more, or 0 to choose "
                          "from the CPUs this process may use.")
    env = os.environ if env is None else env
    n_cpus, cpu_why = cpus or usable_cpus(env)
    if requested:
        return ThreadPolicy(requested, requested, n_cpus, False, f"{requested} as given (--threads / threads:)")
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) > 0:
        return ThreadPolicy(int(omp), int(omp), n_cpus, False, f"{omp} from OMP_NUM_THREADS")
    ceiling = share_of(n_cpus, jobs)
    why = cpu_why + (f", {jobs} jobs at once: {ceiling} each" if jobs > 1 else "")
    n = ceiling if load1 is None else threads_for_load(load1, n_cpus, 0, ceiling, running)
    if n < ceiling:
        now = "" if running is None else f", {running:g} other threads running now"
        why += f"; {n} while other work keeps the CPUs busy (load average {load1:.1f}{now})"
    return ThreadPolicy(n, ceiling, n_cpus, True, why, load1)


def apply(policy: ThreadPolicy) -> ThreadPolicy:
    """Set torch's thread count to the policy's and make it this process's (trainers adapt it
    between epochs when it is adaptive)."""
    import torch

    global _ACTIVE
    torch.set_num_threads(policy.threads)
    _ACTIVE = policy
    return policy


def configure(requested: int | None, jobs: int = 1) -> ThreadPolicy:
    """:func:`decide` with this process's CPUs, environment and load, then :func:`apply`."""
    return apply(decide(requested, jobs, load1=load_average(), running=runnable_others(sample_runnable())))


def active() -> ThreadPolicy | None:
    return _ACTIVE


def reset() -> None:
    """Forget the process's policy (tests)."""
    global _ACTIVE
    _ACTIVE = None


@contextmanager
def scoped(requested: int | None) -> Iterator[ThreadPolicy]:
    """:func:`configure` for the length of a with-block (``fuseseg run``); afterwards torch's thread
    count and the process's policy are what they were (a library caller's own choice stays)."""
    import torch

    global _ACTIVE
    before, prev = torch.get_num_threads(), _ACTIVE
    try:
        yield configure(requested)
    finally:
        torch.set_num_threads(before)
        _ACTIVE = prev


def readapt(load1: float | None = None, running: float | None = None) -> int | None:
    """Between epochs: the adaptive policy's thread count for the load now (set in torch when it
    changed); None when the process has no adaptive policy (a count was given, or a library
    caller chose its own)."""
    import torch

    pol = _ACTIVE
    if pol is None or not pol.adaptive:
        return None
    load1 = load_average() if load1 is None else load1
    if load1 is None:
        return None
    running = runnable_others(sample_runnable()) if running is None else running
    n = threads_for_load(load1, pol.cpus, torch.get_num_threads(), pol.ceiling, running)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    pol.threads, pol.load1 = n, load1
    return n


@dataclass
class EpochPace:
    """One training's throughput: after each epoch, re-decide the threads (:func:`readapt`) and
    warn once when the epoch's images/s fell below a third of the best epoch so far."""

    what: str
    best: float = 0.0
    warned: bool = False
    say: Callable[[str], None] = field(default=lambda text: _say(text))

    def __post_init__(self) -> None:
        readapt()   # a training starts: the threads for the machine's load now

    def epoch_done(self, images_per_s: float, epoch: int | str, load1: float | None = None) -> str | None:
        """Returns the warning when it gave one."""
        readapt(load1)
        msg = collapse_warning(self.what, images_per_s, self.best, epoch,
                               load_average() if load1 is None else load1) if not self.warned else None
        self.best = max(self.best, images_per_s)
        if msg:
            self.warned = True
            self.say(msg)
        return msg


def _say(text: str) -> None:
    if os.environ.get("RANK", "0") == "0":   # under torchrun: rank 0 speaks
        print(text, file=sys.stderr, flush=True)


def collapse_warning(what: str, rate: float, best: float, epoch: int | str, load1: float | None) -> str | None:
    """The one-line warning when ``rate`` (images/s) is under a third of ``best``, else None."""
    if best <= 0 or rate * COLLAPSE >= best:
        return None
    load = "" if load1 is None else f" (1-minute load average {load1:.1f})"
    return (f"warning: {what} ran at {rate:.1f} images/s in epoch {epoch}, under a third of its best "
            f"{best:.1f} images/s: other work is using this machine's CPUs{load}. Fewer threads help "
            "(--threads 1 or threads: 1; see README, 'Threads and shared machines').")


# ------------------------------------------------------------------ jobs of an executor
def job_threads(jobs: int) -> tuple[int, bool]:
    """(threads, adaptive) of each of ``jobs`` trainings the local executor runs at once: the
    submitting process's given count, else the usable CPUs' share (max(1, cpus // jobs)),
    adapted to the load inside the job."""
    pol = _ACTIVE
    if pol is not None and not pol.adaptive:
        return pol.threads, False
    return share_of(usable_cpus()[0], jobs), True


def enter_job(threads: int | None, adaptive: bool) -> None:
    """In a job's process: use ``threads`` (OMP_NUM_THREADS, when set, wins), adapting between
    epochs when ``adaptive``; without a count (a SLURM job without ``cpus_per_job``) the CPUs the
    job may use (its SLURM allocation, cgroup, affinity), adapting."""
    if os.environ.get("OMP_NUM_THREADS"):
        return
    if not threads:
        configure(None)
        return
    cpus, why = usable_cpus()
    apply(ThreadPolicy(threads, threads, cpus, adaptive, f"{threads} (the executor's share for each job; {why})"))
