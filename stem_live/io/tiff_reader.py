"""Reading TIFF files: our own recordings page by page (validated, so a truncated recording
gives every complete page), and foreign TIFFs (ImageJ hyperstacks, plain multi-page TIFFs)
with their pixel size from the ImageJ ``unit`` and resolution tags.

tifffile links a new page into the IFD chain before writing its data, so an interrupted file
ends in a link to a page that is missing or incomplete; :func:`our_pages` checks every page
(IFD entries, strip extents inside the file, JSON metadata) and stops at the first incomplete one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from stem_live.io.metadata import FORMAT, MARKER, UNIT_NM_TIFF, RecordError, convert_image
from stem_live.protocol import MAX_IMAGE_SIDE

log = logging.getLogger(__name__)


# ============================================================================ reading: our TIFF


TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_TYPE_FMT = {1: "B", 2: "s", 3: "H", 4: "I", 5: "II", 6: "b", 7: "s", 8: "h", 9: "i",
             10: "ii", 11: "f", 12: "d", 13: "I", 16: "Q", 17: "q", 18: "Q"}
_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
              16: 8, 17: 8, 18: 8}


class _Incomplete(Exception):
    """A page that is missing or only partly written (the end of a truncated recording)."""


class TiffIndex:
    """A minimal, defensive TIFF / BigTIFF IFD walker (never trusts an offset)."""

    def __init__(self, fh, size: int, name: str) -> None:
        self.fh, self.size = fh, size
        head = fh.read(16)
        if len(head) < 8 or head[:4] not in TIFF_MAGIC:
            raise RecordError(f"{name} is not a TIFF file or is truncated inside its header: "
                              f"give a complete .tif recording")
        self.bo = "<" if head[:2] == b"II" else ">"
        self.big = head[2:4] in (b"+\x00", b"\x00+")
        if self.big:
            if len(head) < 16 or struct.unpack(self.bo + "HH", head[4:8]) != (8, 0):
                raise RecordError(f"{name} is truncated inside its BigTIFF header: "
                                  f"give a complete .tif recording")
            self.first = struct.unpack(self.bo + "Q", head[8:16])[0]
            self.cnt_fmt, self.off_fmt, self.entry, self.inline = "Q", "Q", 20, 8
        else:
            self.first = struct.unpack(self.bo + "I", head[4:8])[0]
            self.cnt_fmt, self.off_fmt, self.entry, self.inline = "H", "I", 12, 4

    def _read(self, offset: int, n: int) -> bytes:
        if offset <= 0 or offset + n > self.size:
            raise _Incomplete
        self.fh.seek(offset)
        data = self.fh.read(n)
        if len(data) != n:
            raise _Incomplete
        return data

    def ifd(self, offset: int) -> tuple[dict[int, tuple[int, int, bytes]], int]:
        """Tags {code: (type, count, raw value or inline bytes)} and the next IFD offset."""
        cnt_size = struct.calcsize(self.cnt_fmt)
        (n,) = struct.unpack(self.bo + self.cnt_fmt, self._read(offset, cnt_size))
        if not 4 <= n <= 512:
            raise _Incomplete
        raw = self._read(offset + cnt_size, n * self.entry + struct.calcsize(self.off_fmt))
        tags: dict[int, tuple[int, int, bytes]] = {}
        last = -1
        for k in range(n):
            e = raw[k * self.entry:(k + 1) * self.entry]
            code, typ = struct.unpack(self.bo + "HH", e[:4])
            (count,) = struct.unpack(self.bo + self.off_fmt, e[4:4 + self.inline])
            value = e[4 + self.inline:]
            if code <= last or typ not in _TYPE_SIZE:
                raise _Incomplete  # zeros or garbage: a page that was never finished
            last = code
            tags[code] = (typ, count, value)
        (nxt,) = struct.unpack(self.bo + self.off_fmt, raw[n * self.entry:])
        return tags, nxt

    def value(self, tags, code: int) -> Any:
        """Decoded tag value: tuple of numbers, or bytes for ASCII/UNDEFINED."""
        if code not in tags:
            raise _Incomplete
        typ, count, raw = tags[code]
        nbytes = _TYPE_SIZE[typ] * count
        if count > 1 << 24:
            raise _Incomplete
        if nbytes > self.inline:
            (off,) = struct.unpack(self.bo + self.off_fmt, raw)
            data = self._read(off, nbytes)
        else:
            data = raw[:nbytes]
        if typ in (2, 7):
            return data
        return struct.unpack(f"{self.bo}{count * _TYPE_FMT[typ]}" if len(_TYPE_FMT[typ]) == 1
                             else f"{self.bo}{count * 2}{_TYPE_FMT[typ][0]}", data)


def _page_layout(t: TiffIndex, tags) -> tuple[np.dtype, tuple[int, int], list[tuple[int, int]]]:
    """dtype, shape and strips of one of our pages; raises _Incomplete for an unfinished page."""
    width, = t.value(tags, 256)
    length, = t.value(tags, 257)
    bits = t.value(tags, 258)[0]
    compression = t.value(tags, 259)[0] if 259 in tags else 1
    spp = t.value(tags, 277)[0] if 277 in tags else 1
    fmt = t.value(tags, 339)[0] if 339 in tags else 1
    if compression != 1 or spp != 1 or 322 in tags:
        raise _Incomplete
    dtype = {(8, 1): "u1", (16, 1): "u2", (32, 3): "f4"}.get((bits, fmt))
    if dtype is None or not (1 <= width <= MAX_IMAGE_SIDE and 1 <= length <= MAX_IMAGE_SIDE):
        raise _Incomplete
    dt = np.dtype(t.bo + dtype)
    offsets = t.value(tags, 273)
    counts = t.value(tags, 279)
    if len(offsets) != len(counts) or sum(counts) != width * length * dt.itemsize:
        raise _Incomplete
    for o, c in zip(offsets, counts):
        if o <= 0 or o + c > t.size:
            raise _Incomplete
    return dt, (length, width), list(zip(offsets, counts))


def _page_meta(t: TiffIndex, tags) -> dict[str, Any]:
    raw = t.value(tags, 270).rstrip(b"\x00")
    try:
        meta = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise _Incomplete from None
    if not isinstance(meta, dict) or meta.get(MARKER) != FORMAT:
        raise _Incomplete
    return meta


def truncation_message(name: str, complete: int) -> str:
    """One line: where a recording that was cut off ends."""
    return (f"{name} is truncated: it ends after {complete} complete frame(s) (page {complete + 1} is cut off: "
            f"recording interrupted?); only those {complete} are used")


def our_pages(t: TiffIndex, name: str, *, data: bool, on_truncated: Callable[[str], None] | None = None
              ) -> Iterator[tuple[dict, np.ndarray | None, tuple]]:
    """(metadata, image or None, shape) for every complete page of one of our recordings;
    where the chain links to a page that is missing or incomplete, ``on_truncated`` gets
    :func:`truncation_message` (without it, the stop is logged at INFO level)."""
    offset, seen, index = t.first, set(), 0
    while offset:
        if offset in seen:
            return
        seen.add(offset)
        try:
            tags, nxt = t.ifd(offset)
            meta = _page_meta(t, tags)
            dt, shape, strips = _page_layout(t, tags)
            image = None
            if data:
                buf = bytearray(sum(c for _, c in strips))
                view, pos = memoryview(buf), 0
                for o, c in strips:
                    t.fh.seek(o)
                    if t.fh.readinto(view[pos:pos + c]) != c:
                        raise _Incomplete
                    pos += c
                image = np.frombuffer(buf, dtype=dt).reshape(shape)
                if dt.byteorder not in ("=", "|", "<" if sys.byteorder == "little" else ">"):
                    image = image.astype(dt.newbyteorder("="))
        except (_Incomplete, struct.error, OSError, ValueError) as exc:
            log.info("%s: stopped at page %d, which is incomplete (%s)", name, index, type(exc).__name__)
            if on_truncated is not None:
                on_truncated(truncation_message(name, index))
            return
        yield meta, image, shape
        offset, index = nxt, index + 1


def first_page_kind(t: TiffIndex) -> str:
    """'ours', 'foreign', or 'incomplete' (no first page, or one that runs past the end of the file)."""
    try:
        tags, _ = t.ifd(t.first)
        for code, (typ, count, _raw) in tags.items():
            if _TYPE_SIZE[typ] * count > t.inline:  # out-of-line value: must lie inside the file
                t.value(tags, code)
        raw = t.value(tags, 270) if 270 in tags else b""
    except (_Incomplete, struct.error, OSError, ValueError):
        return "incomplete"
    try:
        _page_meta(t, tags)
        return "ours"
    except _Incomplete:
        return "incomplete" if raw.startswith(b'{"' + MARKER.encode()) else "foreign"


def no_frame_error(path: Path) -> RecordError:
    return RecordError(f"{path.name} holds no complete frame (empty, or cut off before the first frame "
                       f"was finished): give a recording with at least one finished frame")


@contextlib.contextmanager
def quiet_tifffile() -> Iterator[None]:
    """tifffile logs every defect of a damaged file; we report one line instead."""
    tlog = logging.getLogger("tifffile")
    level = tlog.level
    tlog.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        tlog.setLevel(level)


def _tiff_pixel_size(tif) -> tuple[float, float] | None:
    page = tif.pages.first
    tags = page.tags
    xr, yr = tags.get("XResolution"), tags.get("YResolution")
    if xr is None or yr is None:
        return None
    try:
        xres = xr.value[0] / xr.value[1]
        yres = yr.value[0] / yr.value[1]
    except (TypeError, IndexError, ZeroDivisionError):
        return None
    if not (xres > 0 and yres > 0):
        return None
    ij = tif.imagej_metadata or {}
    if tif.is_imagej and "unit" in ij:
        factor = UNIT_NM_TIFF.get(str(ij["unit"]).strip().lower())
        if factor is None:
            return None
        return (factor / yres, factor / xres)
    ru = tags.get("ResolutionUnit")
    unit = int(ru.value) if ru is not None else 2
    factor = {2: 2.54e7, 3: 1e7}.get(unit)
    if factor is None:
        return None
    size = (factor / yres, factor / xres)
    # a default 72/96/300-dpi tag means "unknown", not a STEM pixel of a third of a millimetre
    if not all(1e-5 <= s <= 1e4 for s in size):
        return None
    return size


def open_foreign_tiff(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    import tifffile  # noqa: PLC0415

    meta: dict[str, Any] = {}
    with quiet_tifffile():
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            axes, shape = series.axes, tuple(series.shape)
            if "S" in axes or (len(axes) and axes[-1] in "S"):
                raise RecordError(f"{path.name} holds colour (RGB) images: save it as greyscale")
            if "C" in axes and shape[axes.index("C")] > 1:
                raise RecordError(f"{path.name} holds {shape[axes.index('C')]} channels: "
                                  f"save the channel to replay as its own stack")
            if len(shape) < 2 or axes[-2:] != "YX":
                raise RecordError(f"{path.name}: expected a stack of 2-D images, got axes {axes} {shape}")
            convert_image(np.zeros(1, series.dtype), path.name)  # dtype check before reading pixels
            px = _tiff_pixel_size(tif)
            if px is not None:
                meta["pixel_size_nm"] = px
            ij = tif.imagej_metadata or {}
            fi = ij.get("finterval")
            if isinstance(fi, (int, float)) and math.isfinite(fi) and fi > 0:
                meta["frame_interval_s"] = float(fi)
            try:
                data = tifffile.memmap(path, series=0, mode="r")
            except Exception:  # noqa: BLE001 - compressed, tiled, ...: read it all
                data = series.asarray()
            data = np.asarray(data).reshape(-1, *shape[-2:])
    return data, meta
