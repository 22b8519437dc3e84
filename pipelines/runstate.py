"""Run-folder bookkeeping: the lock, stage records with fingerprints, and the environment record.

A stage is skipped when its record exists and its fingerprint (a hash of its configuration and
of the fingerprints of the stages it reads) is unchanged; otherwise it is redone, and since the
stages after it include its fingerprint in theirs, they are redone too.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fusion.data.io import atomic_write_text
from fusion.errors import FusesegError


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
    from fusion.errors import DataError

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


def source_digest(module: str) -> str | None:
    """A hash of the source file of an imported ``module`` (None when it has none)."""
    mod = sys.modules.get(module)
    path = getattr(mod, "__file__", None)
    if not path or not Path(path).is_file():
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _record_path(run_dir: Path, key: str) -> Path:
    return run_dir / "stages" / f"{key.replace('/', '__')}.json"


def stage_record(run_dir: Path, key: str) -> dict | None:
    p = _record_path(run_dir, key)
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None  # a damaged record means: redo the stage


def stage_is_current(run_dir: Path, key: str, fp: str) -> bool:
    rec = stage_record(run_dir, key)
    return bool(rec) and rec.get("fingerprint") == fp and rec.get("status") == "done"


def mark_stage_done(run_dir: Path, key: str, fp: str, seconds: float, **info: Any) -> None:
    rec = {"key": key, "fingerprint": fp, "status": "done", "seconds": round(seconds, 3),
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}
    atomic_write_text(_record_path(run_dir, key), json.dumps(rec, indent=2, default=str))


def clear_stage(run_dir: Path, key: str) -> None:
    _record_path(run_dir, key).unlink(missing_ok=True)


@dataclass
class RunLock:
    """An exclusive lock on a run folder (``.lock`` holding host and pid).

    A second ``fuseseg run`` on the same folder refuses with a clear message; a lock left by a
    dead process on this host is taken over (so a SIGKILLed run never blocks its own resume)."""

    path: Path

    def _pid_alive(self, pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(), "since": time.strftime("%Y-%m-%dT%H:%M:%S")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text())
                except (OSError, json.JSONDecodeError):
                    other = {}
                same_host = other.get("host") == me["host"]
                pid = int(other.get("pid", -1))
                if same_host and pid > 0 and pid != os.getpid() and self._pid_alive(pid):
                    raise FusesegError(
                        f"run folder {self.path.parent} is in use by another fuseseg process (pid {pid}, "
                        f"started {other.get('since', '?')}). Wait for it to finish, or use another "
                        "experiment name (name=...).") from None
                if not same_host and other:
                    raise FusesegError(
                        f"run folder {self.path.parent} is locked by host {other.get('host')} (pid {pid}). "
                        f"If that run is dead, delete {self.path} and run again.") from None
                self.path.unlink(missing_ok=True)  # stale lock of a dead process: take it over
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return self
        raise FusesegError(f"could not take the lock {self.path}; delete it if no run is active.")

    def release(self) -> None:
        try:
            other = json.loads(self.path.read_text())
            if other.get("pid") == os.getpid():
                self.path.unlink()
        except (OSError, json.JSONDecodeError):
            pass

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


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
