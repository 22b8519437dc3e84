"""Run-folder bookkeeping: the lock, stage records with fingerprints, and the environment record.

A stage is skipped when its record exists and its fingerprint (a hash of its configuration and
of the fingerprints of the stages it reads) is unchanged; otherwise it is redone, and since the
stages after it include its fingerprint in theirs, they are redone too.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import platform
import socket
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from fuseseg.data.io import atomic_write_text
from fuseseg.errors import FusesegError

# the stages of `fuseseg run`, in the order they run (their records are stages/<stage>[__...].json)
STAGES = ("data", "train_fusion", "fuse", "metrics", "segment", "report")


def fingerprint(*parts: Any) -> str:
    """A short stable hash of JSON-able ``parts`` (dict keys sorted)."""
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def fuseseg_version() -> str:
    """The installed fuseseg version (part of every stage's fingerprint: new code, new results)."""
    import importlib.metadata

    try:
        return importlib.metadata.version("fuseseg")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source tree not installed
        return "unknown"


def folder_manifest(root: Path) -> str:
    """A hash of the manifest (relative name, size, mtime) of every file under ``root``.

    An edited, added or removed file changes it, so stages fingerprinted with it are redone;
    the files are not read (a stat each). A dangling symlink is a DataError naming it."""
    from fuseseg.errors import DataError

    root = Path(root)
    entries = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames.sort()
        for name in sorted(filenames):
            p = Path(dirpath) / name
            try:
                st = p.stat()
            except FileNotFoundError:
                raise DataError(f"{p} is a dangling symbolic link (its target {os.readlink(p)} does not "
                                "exist); restore the target or delete the link.") from None
            entries.append((str(p.relative_to(root)), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def run_relative(path: Path | str, run_dir: Path | str) -> str | None:
    """How a path inside the run folder enters a fingerprint: relative to the run folder
    (``<run>/data``), so a moved or copied run folder stays up to date; None for a path outside it
    (those are fingerprinted as given: another file there is another input)."""
    p, r = Path(path).resolve(), Path(run_dir).resolve()
    if p == r or p.is_relative_to(r):
        return "<run>/" + p.relative_to(r).as_posix()
    return None


def accept_earlier_form(run_dir: Path, key: str, fp: str, earlier: list[str]) -> str:
    """``fp``, or the one of ``earlier`` (the same inputs fingerprinted as an older fuseseg did,
    e.g. with the run folder's path written out) that stage ``key``'s finished record holds: a
    run folder made before keeps its results, and the stages after it, whose fingerprints
    include this one, stay up to date too."""
    rec = stage_record(run_dir, key) or {}
    if rec.get("status") == "done" and rec.get("fingerprint") != fp and rec.get("fingerprint") in earlier:
        return next(e for e in earlier if e == rec.get("fingerprint"))
    return fp


def update_stage_record(run_dir: Path, key: str, **fields: Any) -> None:
    """Add ``fields`` to the existing record of stage ``key`` (nothing when there is none)."""
    rec = stage_record(run_dir, key)
    if rec is not None:
        atomic_write_text(_record_path(run_dir, key), json.dumps({**rec, **fields}, indent=2, default=str))


def source_digest(module: str) -> str | None:
    """A hash of the source file of an imported ``module`` (None when it has none)."""
    mod = sys.modules.get(module)
    path = getattr(mod, "__file__", None)
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class Fingerprint(str):
    """A stage fingerprint that remembers a hash of each of its named inputs (``.parts``, nested
    mappings flattened to dotted keys), so that a later run can say *which* input changed."""

    parts: dict[str, str]


def named_fingerprint(kind: str, **inputs: Any) -> Fingerprint:
    """``fingerprint(kind, *inputs.values())`` (the same value, so records written before stay
    current), plus the per-input hashes in ``.parts`` (recorded as the stage's ``inputs``)."""
    fp = Fingerprint(fingerprint(kind, *inputs.values()))
    parts: dict[str, str] = {}

    def flatten(prefix: str, value: Any) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                flatten(f"{prefix}.{k}", v)
        else:
            parts[prefix] = fingerprint(value)

    for name, value in inputs.items():
        flatten(name, value)
    fp.parts = parts
    return fp


def explain_stage(run_dir: Path, key: str, fp: str) -> tuple[bool, str]:
    """(up to date?, why) for stage ``key`` of ``run_dir`` against fingerprint ``fp``: ``up to
    date``, ``never run here``, ``last run did not finish``, or ``changed: <inputs>`` (the inputs
    whose hash differs from the record's; a record without them says so)."""
    rec = stage_record(run_dir, key)
    if rec is None:
        return False, "never run here"
    if rec.get("status") != "done":
        return False, f"last run did not finish (status {rec.get('status')!r})"
    if rec.get("fingerprint") == fp:
        return True, "up to date"
    old, new = rec.get("inputs"), getattr(fp, "parts", None)
    if not old or not new:
        return False, "its configuration or an upstream stage changed (the record names no inputs)"
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
    return False, f"changed: {shown}" if changed else "its fingerprint changed"


def _record_path(run_dir: Path, key: str) -> Path:
    return run_dir / "stages" / f"{key.replace('/', '__')}.json"


_NUM = (int, float)
# the fields a stage record may hold, with their types (required ones: status, fingerprint)
RECORD_FIELDS: dict[str, tuple] = {
    "key": (str,), "status": (str,), "fingerprint": (str,), "seconds": _NUM, "inputs": (dict,),
    "attempt": (int,), "job_id": (str, int), "job_folder": (str,), "executor": (str,), "submitted_at": _NUM,
    "miou": (*_NUM, type(None)), "peak_rss_mib": (*_NUM, str, type(None)),
    "child_peak_rss_mib": (*_NUM, type(None)), "peak_rss_scope": (str, type(None)),
}


def record_problem(rec: Any) -> str | None:
    """What is wrong with a stage record's fields (None when nothing is)."""
    if not isinstance(rec, dict):
        return f"it holds a JSON {type(rec).__name__}, not an object"
    for name in ("status", "fingerprint"):
        if name not in rec:
            return f"the field {name!r} is missing"
    for name, types in RECORD_FIELDS.items():
        if name in rec and (not isinstance(rec[name], types) or isinstance(rec[name], bool)):
            return f"the field {name!r} is {type(rec[name]).__name__} {str(rec[name])[:40]!r}"
    inputs = rec.get("inputs", {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in inputs.items()):
        return "the field 'inputs' is not a mapping of names to hashes"
    return None


def read_record(path: Path) -> dict | None:
    """The stage record in ``path``, or None when it is absent, unreadable or malformed (then the
    stage counts as never run and is redone; a note on stderr names the file)."""
    if not path.is_file():
        return None
    try:
        rec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        rec, problem = None, "it is not readable JSON"
    else:
        problem = record_problem(rec)
    if problem is not None:
        from fuseseg.runtime import notice

        notice(f"the stage record {path} is damaged ({problem}); its stage counts as never run and is "
               "redone (delete the file to silence this note).")
        return None
    return rec


def stage_record(run_dir: Path, key: str) -> dict | None:
    return read_record(_record_path(run_dir, key))


def stage_is_current(run_dir: Path, key: str, fp: str) -> bool:
    rec = stage_record(run_dir, key)
    return bool(rec) and rec.get("fingerprint") == fp and rec.get("status") == "done"


def mark_stage_done(run_dir: Path, key: str, fp: str, seconds: float, **info: Any) -> None:
    rec = {"key": key, "fingerprint": str(fp), "status": "done", "seconds": round(seconds, 3),
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    if getattr(fp, "parts", None):
        rec["inputs"] = fp.parts
    atomic_write_text(_record_path(run_dir, key), json.dumps(rec, indent=2, default=str))


def mark_stage_submitted(run_dir: Path, key: str, fp: str, **info: Any) -> None:
    """Record that stage ``key`` was handed to a job (``pipelines.executor``): job id, log, attempt."""
    rec = {"key": key, "fingerprint": fp, "status": "submitted",
           "submitted": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    atomic_write_text(_record_path(run_dir, key), json.dumps(rec, indent=2, default=str))


RUN_MARKER = ".fuseseg-run"   # in every run folder fuseseg made (its version and creation time)


def claim_run_folder(run_dir: Path) -> None:
    """Make ``run_dir`` a run folder, or check that it is one fuseseg made, before anything is
    written into it. A folder that exists without :data:`RUN_MARKER` is taken only when it is
    empty or a run folder of an earlier fuseseg version (:func:`_earlier_run_folder`), and then
    gets the marker; any other folder (or a link to one) is refused, naming it, and left alone."""
    marker = run_dir / RUN_MARKER
    if run_dir.is_symlink() or run_dir.exists():
        if not run_dir.is_dir():
            raise FusesegError(f"the run folder {run_dir} is a file or a dangling link; move it away, or choose "
                               "another run folder (results_dir=... / name=...).")
        if marker.is_file():
            return
        if any(run_dir.iterdir()) and not _earlier_run_folder(run_dir):
            raise FusesegError(
                f"{run_dir} exists but is not a fuseseg run folder (no {RUN_MARKER} file in it, nor the "
                "config.yaml, environment.json and stages/ records of an earlier fuseseg's run), so fuseseg "
                "does not write into it (it would overwrite config.yaml, environment.json, report.md, ...). "
                "Choose another run folder (name=... / results_dir=...) or move it away; if it is a run "
                f"folder of yours, `touch {marker}` lets fuseseg use it.")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(marker, json.dumps({"fuseseg": fuseseg_version(),
                                          "created": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")


def _earlier_run_folder(run_dir: Path) -> bool:
    """A run folder of a fuseseg version before the marker: its own ``config.yaml`` (an experiment
    config), ``environment.json`` (seed, versions) and at least one stage record."""
    import yaml

    def small(p: Path) -> str | None:
        try:
            return p.read_text() if p.is_file() and not p.is_symlink() and p.stat().st_size < 1 << 20 else None
        except (OSError, UnicodeDecodeError):
            return None

    try:
        cfg = yaml.safe_load(small(run_dir / "config.yaml") or "")
        env = json.loads(small(run_dir / "environment.json") or "null")
        recs = [json.loads(small(p) or "null") for p in sorted((run_dir / "stages").glob("*.json"))[:50]]
    except (yaml.YAMLError, json.JSONDecodeError, RecursionError):
        return False
    return (isinstance(cfg, dict) and {"name", "results_dir", "fusion", "segmentation"} <= cfg.keys()
            and isinstance(env, dict) and {"seed", "versions"} <= env.keys()
            and any(isinstance(r, dict) and {"key", "fingerprint", "status"} <= r.keys() for r in recs))


def clear_stage(run_dir: Path, key: str) -> None:
    _record_path(run_dir, key).unlink(missing_ok=True)


class RunLock:
    """An exclusive OS lock on a folder, held through the file ``path`` (``FOLDER/.lock``).

    The lock is the kernel's (``filelock``: ``flock`` on POSIX, ``LockFileEx`` on Windows), held
    by this process and dropped by the kernel however the process ends (``kill -9`` included):
    a dead run never blocks its resume, and two live processes can never both hold it (there is
    no check-then-create window). The file holds the holder's host, pid and start time, only for
    the message that a refused process prints; it stays in the folder (it is not the lock).

    Who locks what: ``fuseseg run`` locks the run folder; ``train-fusion``, ``segment train``,
    ``fuse``, ``segment eval --save-predictions``, ``metrics --out``, ``compare --out`` and
    ``make-synthetic`` lock their output folder (:func:`folder_lock`). An executor that runs a
    stage as a separate job (e.g. under SLURM) has that job lock the stage's own folder
    (``RunLock(stage_dir / ".lock")``) while the submitting ``fuseseg run`` keeps the run
    folder's lock: two jobs of one stage never write together. Under torchrun only rank 0 locks.
    """

    def __init__(self, path: Path | str, what: str = "run folder",
                 advice: str = "Wait for it to finish, or use another experiment name (name=...)."):
        self.path, self.what, self.advice = Path(path), what, advice
        self._lock = None

    def _owner(self) -> dict:
        """The holder recorded in the file; {} when unreadable or left by a dead process of this
        host (the new holder has not written itself yet)."""
        try:
            other = json.loads(self.path.read_text() or "{}")
        except (OSError, json.JSONDecodeError, UnicodeDecodeError):
            return {}
        if not isinstance(other, dict):
            return {}
        if other.get("host") == socket.gethostname() and isinstance(other.get("pid"), int):
            try:
                os.kill(other["pid"], 0)
            except ProcessLookupError:
                return {}
            except PermissionError:
                pass
        return other

    def acquire(self) -> RunLock:
        import filelock

        self.path.parent.mkdir(parents=True, exist_ok=True)
        options = {"preserve_lock_file": True}  # filelock >= 3.x differ: pass what this one has
        params = inspect.signature(filelock.FileLock.__init__).parameters
        lock = filelock.FileLock(str(self.path), timeout=0,
                                 **{k: v for k, v in options.items() if k in params})
        try:
            lock.acquire()
        except filelock.Timeout:
            other = self._owner()
            who = (f"pid {other.get('pid', '?')}, host {other.get('host', '?')}, started "
                   f"{other.get('since', '?')}") if other else "its pid is not recorded yet"
            raise FusesegError(f"{self.what} {self.path.parent} is in use by another fuseseg process "
                               f"({who}). {self.advice}") from None
        self._lock = lock
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        fd = os.open(self.path, os.O_WRONLY)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(me).encode())
        finally:
            os.close(fd)
        return self

    def release(self) -> None:
        if self._lock is None:
            return
        try:
            fd = os.open(self.path, os.O_WRONLY)
            try:
                os.ftruncate(fd, 0)  # nobody holds it now: no owner to name
            finally:
                os.close(fd)
        except OSError:
            pass
        self._lock.release()
        self._lock = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def folder_lock(folder: Path | str | None, option: str):
    """The :class:`RunLock` of the output folder ``folder`` given by ``option`` (e.g. ``fuseseg
    fuse --out``); a no-op without a folder and in torchrun ranks other than 0 (rank 0 writes)."""
    if folder is None or int(os.environ.get("RANK", "0")) != 0:
        return nullcontext()
    return RunLock(Path(folder) / ".lock", what="output folder",
                   advice=f"Wait for it to finish, or give `{option}` another folder.")


def environment_record(device: str, seed: int) -> dict:
    """Seeds, library versions and the device, written into every run folder."""
    import cv2
    import numpy
    import torch

    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": numpy.__version__,
                "opencv": cv2.__version__}
    for mod in ("segmentation_models_pytorch", "timm", "albumentations", "torchvision"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover - optional
            versions[mod] = None
    dev = {"requested": device, "cuda_available": torch.cuda.is_available(),
           "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        dev["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {"seed": seed, "versions": versions, "device": dev, "host": socket.gethostname(),
            "platform": platform.platform(), "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
