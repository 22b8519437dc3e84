"""Image size from a file's header, read before decoding (PNG, JPEG, TIFF, BMP).

:func:`check_image_size` refuses an image whose header declares more pixels or decoded bytes
than :mod:`fuseseg.limits` allows, so a small crafted file cannot make the decoder ask for
gigabytes. The format is recognised by the file's first bytes (as the decoder does), not by its
name. Only the header is parsed; a format not recognised here is left to the decoder.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from fuseseg.errors import DataError


@dataclass(frozen=True)
class Header:
    fmt: str
    width: int
    height: int
    channels: int           # channels of the decoded array (worst case)
    bytes_per_sample: int

    @property
    def pixels(self) -> int:
        return self.width * self.height

    @property
    def decoded_bytes(self) -> int:
        return self.pixels * self.channels * self.bytes_per_sample


def _png(b: bytes) -> Header | None:
    if len(b) < 29 or b[12:16] != b"IHDR":
        return None
    w, h, depth, colour = struct.unpack(">IIBB", b[16:26])
    channels = {0: 1, 2: 3, 3: 4, 4: 4, 6: 4}.get(colour, 4)   # palette/grey+alpha decode to BGR(A)
    return Header("PNG", w, h, channels, 2 if depth == 16 else 1)


def _jpeg(b: bytes) -> Header | None:
    i = 2
    while i + 9 < len(b):
        if b[i] != 0xFF:
            return None
        marker = b[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):   # start of frame
            precision, h, w, comps = struct.unpack(">BHHB", b[i + 4:i + 10])
            return Header("JPEG", w, h, max(3, comps), 2 if precision > 8 else 1)
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            i += 2
            continue
        i += 2 + struct.unpack(">H", b[i + 2:i + 4])[0]
    return None


_TIFF_TYPES = {3: ("H", 2), 4: ("I", 4), 16: ("Q", 8)}   # SHORT, LONG, LONG8


def _tiff(b: bytes, path: Path) -> Header | None:
    end = "<" if b[:2] == b"II" else ">"
    version = struct.unpack(end + "H", b[2:4])[0]
    big = version == 43
    with open(path, "rb") as f:
        def read(pos: int, n: int) -> bytes:
            f.seek(pos)
            data = f.read(n)
            if len(data) < n:
                raise EOFError
            return data

        try:
            ifd = struct.unpack(end + ("Q" if big else "I"), b[8:16] if big else b[4:8])[0]
            count = struct.unpack(end + ("Q" if big else "H"), read(ifd, 8 if big else 2))[0]
            entry, first = (20, ifd + 8) if big else (12, ifd + 2)
            tags: dict[int, list[int]] = {}
            for k in range(min(count, 4096)):
                raw = read(first + k * entry, entry)
                tag, typ = struct.unpack(end + "HH", raw[:4])
                if tag not in (256, 257, 258, 277) or typ not in _TIFF_TYPES:
                    continue
                n = struct.unpack(end + ("Q" if big else "I"), raw[4:12] if big else raw[4:8])[0]
                code, size = _TIFF_TYPES[typ]
                inline = raw[12:20] if big else raw[8:12]
                n = min(n, 16)
                data = inline if n * size <= len(inline) else \
                    read(struct.unpack(end + ("Q" if big else "I"), inline)[0], n * size)
                tags[tag] = list(struct.unpack(end + code * n, data[:n * size]))
        except (EOFError, struct.error, OverflowError, ValueError):
            return None
    if 256 not in tags or 257 not in tags:
        return None
    bits = max(tags.get(258, [8]) or [8])
    spp = max(tags.get(277, [1])[0], 1)
    return Header("TIFF", tags[256][0], tags[257][0], max(spp, 3) if spp > 1 else 1, max(1, -(-bits // 8)))


def _bmp(b: bytes) -> Header | None:
    if len(b) < 30:
        return None
    w, h = struct.unpack("<ii", b[18:26])
    bpp = struct.unpack("<H", b[28:30])[0]
    return Header("BMP", abs(w), abs(h), 4 if bpp == 32 else 3, 1)


def read_header(path: Path | str) -> Header | None:
    """The :class:`Header` of ``path`` (PNG, JPEG, TIFF, BMP by their first bytes), or None for a
    format not parsed here or a header too damaged to read."""
    path = Path(path)
    with open(path, "rb") as f:
        b = f.read(65536)
    if b.startswith(b"\x89PNG\r\n\x1a\n"):
        return _png(b)
    if b.startswith(b"\xff\xd8"):
        return _jpeg(b)
    if b[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return _tiff(b, path)
    if b.startswith(b"BM"):
        return _bmp(b)
    return None


def check_image_size(path: Path | str) -> Header | None:
    """Refuse ``path`` (DataError naming it, the limit and how to raise it) when its header declares
    more pixels or decoded bytes than :func:`fuseseg.limits.current` allows. Returns the header."""
    from fuseseg.limits import current, how_to_raise

    head = read_header(path)
    if head is None:
        return None
    lim = current()
    if head.pixels > lim.max_pixels:
        raise DataError(f"{path}: its {head.fmt} header declares {head.width}x{head.height} = "
                        f"{head.pixels:,} pixels, over the limit of {lim.max_pixels:,} pixels per image; "
                        f"it was not decoded. Downscale the image, or {how_to_raise('max_pixels')}.")
    if head.decoded_bytes > lim.max_image_bytes:
        raise DataError(f"{path}: its {head.fmt} header declares {head.width}x{head.height} pixels x "
                        f"{head.channels} channel(s) x {head.bytes_per_sample} byte(s) = "
                        f"{head.decoded_bytes / 2**20:,.0f} MiB decoded, over the limit of "
                        f"{lim.max_image_bytes / 2**20:,.0f} MiB per image; it was not decoded. Downscale "
                        f"or convert it to 8 bits, or {how_to_raise('max_image_bytes')}.")
    return head
