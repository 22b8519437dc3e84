"""Reading and writing images, with errors that name the file and the fix.

Arrays in memory are numpy ``uint8``: grey images (H, W), colour images (H, W, 3) in **RGB**
order (OpenCV's BGR is converted at the boundary). Files are written atomically and durably: to a
temporary name in the same folder, fsynced, renamed, then the folder fsynced, so a crash (even of
the machine) never leaves a half-written or empty file under its final name. Files get the mode
the umask gives.
"""
from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import cv2
import numpy as np

from fuseseg.data.header import check_image_size
from fuseseg.data.paths import check_write_path
from fuseseg.errors import DataError

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
IR16_MAPPINGS = ("minmax", "scale")


def _decode(path: Path) -> np.ndarray:
    """Decode ``path`` with OpenCV (IMREAD_UNCHANGED) or raise a DataError naming it."""
    if not path.is_file():
        raise DataError(f"{path}: file not found. Check the data folder in your config.")
    check_image_size(path)   # pixels and decoded bytes from the header, before any decoding
    data = np.fromfile(str(path), dtype=np.uint8)
    if data.size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes). Re-copy or re-export this image, "
                        "or remove it together with its partner image.")
    if path.suffix.lower() == ".png" and b"IEND" not in data[-64:].tobytes():
        raise DataError(f"{path}: truncated or not a PNG (no IEND chunk at its end). "
                        "Re-copy or re-export this image, or remove it together with its partner.")
    img = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DataError(f"{path}: not a readable image (OpenCV could not decode it). "
                        "Re-copy or re-export this image, or remove it together with its partner.")
    return img


def to_uint8(img: np.ndarray, path: Path | str = "<array>", ir16: str = "minmax") -> np.ndarray:
    """Map a 16-bit (or float) image to uint8.

    ``ir16='minmax'``: linear stretch of the image's own [min, max] to [0, 255] (thermal cameras'
    raw counts usually occupy a narrow band of the 16-bit range); ``'scale'``: value / 257, the
    fixed full-range mapping (65535 -> 255)."""
    if img.dtype == np.uint8:
        return img
    if np.issubdtype(img.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(img)))
        if bad:
            raise DataError(f"{path}: {bad} of {img.size} pixel value(s) are NaN or infinite (a float "
                            "image); they would turn the whole image black. Replace them (e.g. by the "
                            "image's valid minimum) and save the image again.")
    if ir16 not in IR16_MAPPINGS:
        raise DataError(f"unknown 16-bit mapping {ir16!r} for {path}; valid: {', '.join(IR16_MAPPINGS)}")
    x = img.astype(np.float64)
    if ir16 == "scale":
        full = 65535.0 if img.dtype == np.uint16 else float(np.iinfo(img.dtype).max
                                                            if np.issubdtype(img.dtype, np.integer) else 1.0)
        x = x / full * 255.0
    else:
        lo, hi = float(x.min()), float(x.max())
        x = (x - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(x)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def read_infrared(path: Path | str, ir16: str = "minmax") -> np.ndarray:
    """Read an infrared image as (H, W) uint8.

    Accepts single-channel 8- or 16-bit files (16-bit mapped with ``ir16``, see :func:`to_uint8`)
    and 3/4-channel files whose colour channels are identical (TNO, LLVIP store IR so). A file
    whose channels differ is an error: it is probably a visible image in the infrared folder."""
    path = Path(path)
    img = _decode(path)
    if img.ndim == 3:
        img = img[..., :3]
        if not (np.array_equal(img[..., 0], img[..., 1]) and np.array_equal(img[..., 0], img[..., 2])):
            raise DataError(f"{path}: infrared image has 3 channels that differ, so it is not a grey "
                            "thermal image. Check that the ir/ and vi/ folders are not swapped, or "
                            "convert the file to single-channel grey.")
        img = img[..., 0]
    return to_uint8(img, path, ir16)


def read_visible(path: Path | str) -> np.ndarray:
    """Read a visible image: (H, W, 3) uint8 RGB, or (H, W) uint8 for a grey file (accepted)."""
    path = Path(path)
    img = _decode(path)
    if img.ndim == 3:
        if img.shape[2] == 1:
            img = img[..., 0]
        else:
            img = cv2.cvtColor(img[..., :3], cv2.COLOR_BGR2RGB)
    return to_uint8(img, path, "scale")


def read_label(path: Path | str) -> np.ndarray:
    """Read a label map as (H, W) uint8 class ids (a 3-channel file must have equal channels)."""
    path = Path(path)
    img = _decode(path)
    if img.ndim == 3:
        if not all(np.array_equal(img[..., 0], img[..., c]) for c in range(1, img.shape[2])):
            raise DataError(f"{path}: label map has several different channels; labels must be "
                            "single-channel class ids (0..C-1, 255 = ignore), not a colour palette.")
        img = img[..., 0]
    if img.dtype != np.uint8:
        raise DataError(f"{path}: label map has dtype {img.dtype}; expected 8-bit class ids.")
    return img


def _fsync_dir(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename is durable only once its folder is synced)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms that cannot open a folder
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - file systems without folder fsync
        pass
    finally:
        os.close(fd)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name beside ``path``, fsync it, rename it to ``path`` and
    fsync the folder: after a crash ``path`` is the old file or the complete new one, never a
    partial or empty one. The file gets the mode the umask gives (0666 & ~umask), like any file
    a shell or editor creates (``tempfile.mkstemp`` would make it 0600). Under
    :func:`~fuseseg.data.paths.confine_writes` the path is checked first (no link leads out)."""
    check_write_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
            break
        except FileExistsError:  # pragma: no cover - 32 random bits collided
            continue
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            # a failed write (e.g. a full disk: ENOSPC) names no file; name the one being written
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file in the same folder, then rename)."""
    _atomic_write(Path(path), data)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    _atomic_write(Path(path), text.encode("utf-8"))


def encode_image(img: np.ndarray, ext: str = ".png") -> bytes:
    """Encode an (H, W) grey or (H, W, 3) RGB uint8 array to the bytes of an image file."""
    if img.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {img.dtype}")
    if img.ndim == 3:
        img = cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    ok, buf = cv2.imencode(ext, img)
    if not ok:
        raise DataError(f"OpenCV could not encode an image as {ext}")
    return buf.tobytes()


def write_image(path: Path | str, img: np.ndarray) -> None:
    """Write an (H, W) grey or (H, W, 3) RGB uint8 image atomically; format from the extension."""
    path = Path(path)
    _atomic_write(path, encode_image(img, path.suffix or ".png"))


def sha256_file(path: Path | str) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks (checkpoint provenance, shipped weights)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
