"""Recording and reading frame streams.

Writing: :class:`StackWriter` appends every :class:`~stem_live.protocol.Frame` as one
uncompressed TIFF page (BigTIFF by default, written with ``tifffile.TiffWriter``) whose
ImageDescription holds the frame's metadata as JSON (every field but ``image``, plus the
format marker ``"stem_live": "record/1"``). Resolution tags (pixels per centimetre) are
written as well where the pixel size fits a TIFF rational, so that other viewers show a
scale bar; our own reader always takes the pixel size from the JSON.

Crash safety: after every page the writer flushes Python's buffer to the OS, so a process
killed at any moment (SIGKILL included) leaves every finished page readable: the kernel
keeps what was written. ``os.fsync`` runs at most once per ``fsync_interval_s`` (default
1 s, and on close), which bounds what a power cut or kernel crash can take to about that
long without paying a disk sync per frame. tifffile links a new page into the IFD chain
before writing its data and IFD, so an interrupted file ends in a link to a page that is
missing or incomplete; the reader validates every page (IFD entries, strip extents inside
the file, JSON metadata) and stops at the first incomplete one.

Reading: :func:`read_frames` reads our own recordings (identical frames, bit-exact pixels),
also when truncated; ImageJ hyperstacks and plain multi-page TIFFs (pixel size from the
ImageJ ``unit`` with the resolution tags, or from centimetre/inch resolution tags); and
``.npy`` arrays of shape (N, H, W) or (H, W). A JSON sidecar ``<file>.json`` or
``<stem>.json`` can give what such files lack (``pixel_size_nm`` as a number or [y, x],
``dwell_us``, ``flyback_us``; optionally ``frame_interval_s``, ``t_start`` (a number or one
per frame), ``scan_rotation_rad``, ``beam_shift_nm``, ``detector``, ``stream``). Keyword
options override both the file and the sidecar. The sidecar is not consulted for our own
recordings, which carry complete metadata per frame.

Pixel size, dwell and flyback are required: where neither the file, a sidecar nor an option
gives one, :class:`RecordError` names the missing fields and how to give them. Images of
dtype uint8, uint16 and float32 are returned as they are; int8, int16, int32, uint32,
float16 and float64 are converted to float32 (int32/uint32 above 2**24 lose precision);
anything else (complex, int64, bool, ...) is refused. Every problem with a file raises
:class:`RecordError` with one line that says what to do, never a tifffile traceback.

Streaming: :func:`record_stream` subscribes to a frames PUB endpoint and writes frames as
they arrive (``python -m stem_live.record ENDPOINT PATH [--frames N]``). ZeroMQ is
imported only inside it, so this module stays usable in the zmq-free analysis core.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import json
import logging
import math
import os
import struct
import sys
import threading
import time
from fractions import Fraction
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from stem_live.protocol import IMAGE_DTYPES, MAX_IMAGE_SIDE, Frame, ProtocolError

log = logging.getLogger(__name__)

FORMAT = "record/1"
MARKER = "stem_live"
#: dtypes converted to float32 on reading
CONVERTIBLE = ("int8", "int16", "int32", "uint32", "float16", "float64")
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_NPY_MAGIC = b"\x93NUMPY"


class RecordError(Exception):
    """A recording cannot be written or a file cannot be read; the one-line text says what to do."""


# ============================================================================ writing


def _open_for_writing(path: Path, overwrite: bool):
    """Open the output file (a seam for tests that simulate a full disk)."""
    return open(path, "wb" if overwrite else "xb")


def _os_message(exc: OSError, path: Path, kept: int) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"disk full while writing {path} ({kept} frames kept and readable): "
                f"free some space or record to another disk")
    why = exc.strerror or str(exc) or type(exc).__name__
    return (f"cannot write {path}: {why} ({kept} frames kept and readable): "
            f"check the disk, the folder and its permissions")


def _resolution(pixel_size_nm: tuple[float, float]) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(x, y) pixels per centimetre as TIFF rationals, or None where they do not fit."""
    out = []
    for px_nm in (pixel_size_nm[1], pixel_size_nm[0]):
        per_cm = 1e7 / px_nm
        if not (math.isfinite(per_cm) and 1e-3 <= per_cm < 2**31):
            return None
        max_den = max(1, (2**32 - 1) // (math.ceil(per_cm) + 1))
        f = Fraction(per_cm).limit_denominator(max_den)
        if f.numerator <= 0 or f.numerator >= 2**32:
            return None
        out.append((f.numerator, f.denominator))
    return out[0], out[1]


def frame_metadata(frame: Frame) -> dict[str, Any]:
    """The JSON metadata stored with every page (all Frame fields but the image)."""
    return {
        MARKER: FORMAT,
        "seq": int(frame.seq),
        "stream": str(frame.stream),
        "t_start": float(frame.t_start),
        "pixel_size_nm": [float(v) for v in frame.pixel_size_nm],
        "dwell_us": float(frame.dwell_us),
        "flyback_us": float(frame.flyback_us),
        "scan_rotation_rad": float(frame.scan_rotation_rad),
        "beam_shift_nm": [float(v) for v in frame.beam_shift_nm],
        "detector": str(frame.detector),
    }


class StackWriter:
    """Append frames to a TIFF stack, one page per frame, safe against being killed.

    ``StackWriter(path, bigtiff=True, overwrite=False, fsync_interval_s=1.0)``; use as a
    context manager. ``write(frame)`` returns once the page is handed to the OS. An existing
    file is refused unless ``overwrite=True`` (a recording is never lost by accident).
    ``fsync_interval_s``: sync to disk at most this often (0: every frame; None: only on
    close). Any OSError (disk full, ...) becomes :class:`RecordError`; what was written
    before stays readable and the writer refuses further frames.
    """

    def __init__(self, path: str | os.PathLike, *, bigtiff: bool = True, overwrite: bool = False,
                 fsync_interval_s: float | None = 1.0) -> None:
        import tifffile  # noqa: PLC0415 - heavy import, only when writing

        self.path = Path(path)
        self.count = 0
        self._fsync_interval_s = fsync_interval_s
        self._last_sync = time.monotonic()
        self._failed: str | None = None
        self._closed = False
        try:
            self._fh = _open_for_writing(self.path, overwrite)
        except FileExistsError:
            raise RecordError(f"{self.path} already exists: choose another file name "
                              f"or allow overwriting it") from None
        except OSError as exc:
            raise RecordError(_os_message(exc, self.path, 0)) from None
        try:
            self._tif = tifffile.TiffWriter(self._fh, bigtiff=bigtiff, shaped=False)
            self._fh.flush()  # the header exists on disk before the first frame
        except OSError as exc:
            self._abort()
            raise RecordError(_os_message(exc, self.path, 0)) from None

    def __enter__(self) -> "StackWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def write(self, frame: Frame) -> None:
        """Append ``frame`` as one page and flush it to the OS."""
        if self._closed:
            raise RecordError(f"{self.path} is closed: open a new StackWriter to record more")
        if self._failed is not None:
            raise RecordError(self._failed)
        image = np.asarray(frame.image)
        if image.ndim != 2 or image.dtype.name not in IMAGE_DTYPES:
            raise RecordError(f"cannot record a {image.ndim}-D {image.dtype.name} image: "
                              f"frames must be 2-D uint8, uint16 or float32")
        if image.dtype.kind == "f" and not np.isfinite(image).all():
            raise RecordError(f"frame {frame.seq} holds NaN or infinite pixels: "
                              f"only finite images can be recorded")
        try:
            description = json.dumps(frame_metadata(frame), allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise RecordError(f"frame {frame.seq} has metadata that cannot be recorded ({exc}): "
                              f"use finite numbers") from None
        res = _resolution(tuple(frame.pixel_size_nm))
        kwargs: dict[str, Any] = {}
        if res is not None:
            kwargs.update(resolution=res, resolutionunit="CENTIMETER")
        try:
            self._tif.write(image, description=description, metadata=None, contiguous=False,
                            photometric="minisblack", software=False, datetime=False, **kwargs)
            self._fh.flush()
            if self._fsync_interval_s is not None:
                now = time.monotonic()
                if now - self._last_sync >= self._fsync_interval_s:
                    self._fsync()
                    self._last_sync = now
        except OSError as exc:
            self._failed = _os_message(exc, self.path, self.count)
            raise RecordError(self._failed) from None
        self.count += 1

    def close(self) -> None:
        """Finish the file (idempotent). Never raises after an earlier write error."""
        if self._closed:
            return
        self._closed = True
        if self._failed is not None:
            self._abort()
            return
        try:
            self._tif.close()
            self._fh.flush()
            self._fsync()
            self._fh.close()
        except OSError as exc:
            self._failed = _os_message(exc, self.path, self.count)
            self._abort()
            raise RecordError(self._failed) from None

    def _fsync(self) -> None:
        try:
            fd = self._fh.fileno()
        except (AttributeError, io.UnsupportedOperation):
            return  # not a real file (tests): nothing to sync
        os.fsync(fd)

    def _abort(self) -> None:
        # close without caring whether the last buffered bytes make it: the reader ignores
        # an incomplete tail, and every finished page was flushed already
        try:
            self._fh.close()
        except Exception:  # noqa: BLE001
            pass


# ============================================================================ reading: our TIFF


_TYPE_FMT = {1: "B", 2: "s", 3: "H", 4: "I", 5: "II", 6: "b", 7: "s", 8: "h", 9: "i",
             10: "ii", 11: "f", 12: "d", 13: "I", 16: "Q", 17: "q", 18: "Q"}
_TYPE_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4,
              16: 8, 17: 8, 18: 8}


class _Incomplete(Exception):
    """A page that is missing or only partly written (the end of a truncated recording)."""


class _Tiff:
    """A minimal, defensive TIFF / BigTIFF IFD walker (never trusts an offset)."""

    def __init__(self, fh, size: int, name: str) -> None:
        self.fh, self.size = fh, size
        head = fh.read(16)
        if len(head) < 8 or head[:4] not in _TIFF_MAGIC:
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


def _page_layout(t: _Tiff, tags) -> tuple[np.dtype, tuple[int, int], list[tuple[int, int]]]:
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


def _page_meta(t: _Tiff, tags) -> dict[str, Any]:
    raw = t.value(tags, 270).rstrip(b"\x00")
    try:
        meta = json.loads(raw.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise _Incomplete from None
    if not isinstance(meta, dict) or meta.get(MARKER) != FORMAT:
        raise _Incomplete
    return meta


def _our_pages(t: _Tiff, name: str, *, data: bool) -> Iterator[tuple[dict, np.ndarray | None, tuple]]:
    """(metadata, image or None, shape) for every complete page of one of our recordings."""
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
        except _Incomplete:
            log.info("%s: stopped at page %d, which is incomplete (recording interrupted?)", name, index)
            return
        except (struct.error, OSError, ValueError) as exc:
            log.info("%s: stopped at page %d (%s)", name, index, exc)
            return
        yield meta, image, shape
        offset, index = nxt, index + 1


def _first_page(t: _Tiff) -> str:
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


def _no_frame(path: Path) -> RecordError:
    return RecordError(f"{path.name} holds no complete frame (empty, or cut off before the first frame "
                       f"was finished): give a recording with at least one finished frame")


@contextlib.contextmanager
def _quiet_tifffile() -> Iterator[None]:
    """tifffile logs every defect of a damaged file; we report one line instead."""
    tlog = logging.getLogger("tifffile")
    level = tlog.level
    tlog.setLevel(logging.CRITICAL + 1)
    try:
        yield
    finally:
        tlog.setLevel(level)


# ============================================================================ reading: metadata


def _pair(value: Any, field: str, source: str, *, positive: bool = False) -> tuple[float, float]:
    vals = value if isinstance(value, (list, tuple)) else [value, value]
    try:
        if len(vals) != 2:
            raise ValueError
        out = tuple(float(v) for v in vals if not isinstance(v, bool))
        if len(out) != 2 or not all(math.isfinite(v) and (v > 0 or not positive) for v in out):
            raise ValueError
    except (TypeError, ValueError):
        kind = "positive " if positive else ""
        raise RecordError(f"{field} from {source} must be a finite {kind}number or [y, x] pair, "
                          f"got {value!r:.60}") from None
    return out  # type: ignore[return-value]


def _number(value: Any, field: str, source: str, lo: float, hi: float) -> float:
    try:
        if isinstance(value, bool):
            raise TypeError
        v = float(value)
        if not (math.isfinite(v) and lo <= v <= hi):
            raise ValueError
    except (TypeError, ValueError):
        raise RecordError(f"{field} from {source} must be a number in [{lo:g}, {hi:g}], "
                          f"got {value!r:.60}") from None
    return v


_LIMITS = {"dwell_us": (1e-6, 1e6), "flyback_us": (0.0, 1e7)}
_FLAGS = {"pixel_size_nm": "--pixel-size-nm", "dwell_us": "--dwell-us", "flyback_us": "--flyback-us"}


def _options(pixel_size_nm: Any, dwell_us: Any, flyback_us: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if pixel_size_nm is not None:
        out["pixel_size_nm"] = _pair(pixel_size_nm, "pixel_size_nm", "the options", positive=True)
    for key, v in (("dwell_us", dwell_us), ("flyback_us", flyback_us)):
        if v is not None:
            out[key] = _number(v, key, "the options", *_LIMITS[key])
    return out


def sidecar_paths(path: Path) -> list[Path]:
    """Where a JSON sidecar for ``path`` is looked for, in order."""
    return [path.with_name(path.name + ".json"), path.with_suffix(".json")]


def _sidecar(path: Path) -> tuple[dict[str, Any], str]:
    for p in sidecar_paths(path):
        if p.is_file() and p != path:
            try:
                data = json.loads(p.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise RecordError(f"sidecar {p} is not readable JSON ({type(exc).__name__}): "
                                  f"fix it or remove it") from None
            if not isinstance(data, dict):
                raise RecordError(f"sidecar {p} must hold a JSON object like {{\"pixel_size_nm\": 0.02}}")
            src = f"sidecar {p.name}"
            out: dict[str, Any] = {}
            for key, v in data.items():
                if key == "pixel_size_nm":
                    out[key] = _pair(v, key, src, positive=True)
                elif key in _LIMITS:
                    out[key] = _number(v, key, src, *_LIMITS[key])
                elif key in ("frame_interval_s", "scan_rotation_rad"):
                    out[key] = _number(v, key, src, -1e9, 1e9)
                elif key == "beam_shift_nm":
                    out[key] = _pair(v, key, src)
                elif key in ("detector", "stream"):
                    out[key] = str(v)
                elif key == "t_start":
                    if isinstance(v, list):
                        out[key] = [_number(x, key, src, -1e12, 1e12) for x in v]
                    else:
                        out[key] = _number(v, key, src, -1e12, 1e12)
            return out, p.name
    return {}, ""


def _require(meta: Mapping[str, Any], path: Path) -> None:
    missing = [k for k in ("pixel_size_nm", "dwell_us", "flyback_us") if k not in meta]
    if missing:
        flags = ", ".join(_FLAGS[k] for k in missing)
        example = ", ".join(f'"{k}": ...' for k in missing)
        raise RecordError(f"{path.name}: {', '.join(missing)} unknown: pass {flags} or write a sidecar "
                          f"{path.with_suffix('.json').name} with {{{example}}}")


def _convert(a: np.ndarray, what: str) -> np.ndarray:
    name = a.dtype.name
    if name in IMAGE_DTYPES:
        if a.dtype.byteorder not in ("=", "|"):
            a = a.astype(a.dtype.newbyteorder("="))
        out = a
    elif name in CONVERTIBLE:
        with np.errstate(over="ignore", invalid="ignore"):
            out = np.asarray(a, dtype=np.float32)
    else:
        raise RecordError(f"{what}: pixels of dtype {name} are not supported: convert to uint16 or float32")
    if out.dtype.kind == "f" and not np.isfinite(out).all():
        raise RecordError(f"{what}: holds NaN or infinite pixels (or values too large for float32): "
                          f"clean the data first")
    return out


def _check_shape(shape: tuple[int, ...], what: str) -> None:
    if len(shape) != 2 or not all(2 <= s <= MAX_IMAGE_SIDE for s in shape):
        raise RecordError(f"{what}: frames must be 2-D with sides in [2, {MAX_IMAGE_SIDE}], got {shape}")


# ============================================================================ reading: foreign


_UNIT_NM = {"nm": 1.0, "nanometer": 1.0, "nanometers": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3,
            "\\u00b5m": 1e3, "micron": 1e3, "microns": 1e3, "micrometer": 1e3, "micrometers": 1e3,
            "mm": 1e6, "cm": 1e7, "m": 1e9, "pm": 1e-3, "a": 0.1, "å": 0.1, "angstrom": 0.1,
            "angstroms": 0.1}


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
        factor = _UNIT_NM.get(str(ij["unit"]).strip().lower())
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


def _open_foreign_tiff(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    import tifffile  # noqa: PLC0415

    meta: dict[str, Any] = {}
    with _quiet_tifffile():
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
            _convert(np.zeros(1, series.dtype), path.name)  # dtype check before reading pixels
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


def _open_npy(path: Path) -> np.ndarray:
    a = np.load(path, mmap_mode="r", allow_pickle=False)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise RecordError(f"{path.name}: a .npy stack must have shape (N, H, W) or (H, W), got {a.shape}")
    return a


def _array_frames(data: np.ndarray, meta: dict[str, Any], path: Path) -> Iterator[Frame]:
    n, rows, cols = data.shape
    px = meta["pixel_size_nm"]
    dwell, fly = meta["dwell_us"], meta["flyback_us"]
    frame_time = rows * (cols * dwell + fly) * 1e-6
    interval = meta.get("frame_interval_s", frame_time)
    t0 = meta.get("t_start", 0.0)
    if isinstance(t0, list) and len(t0) != n:
        raise RecordError(f"{path.name}: sidecar t_start lists {len(t0)} times for {n} frames: "
                          f"give one per frame or a single start time")
    for i in range(n):
        t = t0[i] if isinstance(t0, list) else t0 + i * interval
        yield Frame(seq=i, image=_convert(np.array(data[i]), f"{path.name} frame {i}"), t_start=float(t),
                    pixel_size_nm=px, dwell_us=dwell, flyback_us=fly,
                    scan_rotation_rad=meta.get("scan_rotation_rad", 0.0),
                    beam_shift_nm=meta.get("beam_shift_nm", (0.0, 0.0)),
                    stream=meta.get("stream", path.stem), detector=meta.get("detector", "HAADF"))


def _frame_from_meta(meta: dict, image: np.ndarray, opts: Mapping[str, Any], where: str) -> Frame:
    try:
        seq = meta["seq"]
        if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
            raise ValueError("seq")
        return Frame(
            seq=seq, image=image, t_start=_number(meta["t_start"], "t_start", where, -math.inf, math.inf),
            pixel_size_nm=opts["pixel_size_nm"] if "pixel_size_nm" in opts
            else _pair(meta["pixel_size_nm"], "pixel_size_nm", where, positive=True),
            dwell_us=opts["dwell_us"] if "dwell_us" in opts
            else _number(meta["dwell_us"], "dwell_us", where, -math.inf, math.inf),
            flyback_us=opts["flyback_us"] if "flyback_us" in opts
            else _number(meta["flyback_us"], "flyback_us", where, -math.inf, math.inf),
            scan_rotation_rad=_number(meta["scan_rotation_rad"], "scan_rotation_rad", where, -math.inf, math.inf),
            beam_shift_nm=_pair(meta["beam_shift_nm"], "beam_shift_nm", where),
            stream=str(meta["stream"]), detector=str(meta["detector"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise RecordError(f"{where} has damaged metadata ({exc}): the recording is corrupt") from None


def _our_frames(path: Path, opts: Mapping[str, Any]) -> Iterator[Frame]:
    with open(path, "rb") as fh:
        t = _Tiff(fh, os.fstat(fh.fileno()).st_size, path.name)
        for i, (meta, image, _) in enumerate(_our_pages(t, path.name, data=True)):
            yield _frame_from_meta(meta, image, opts, f"{path.name} page {i}")


def _sniff(path: Path) -> str:
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except FileNotFoundError:
        raise RecordError(f"{path} does not exist: check the file name") from None
    except IsADirectoryError:
        raise RecordError(f"{path} is a folder: give a .tif or .npy file") from None
    except OSError as exc:
        raise RecordError(f"cannot open {path}: {exc.strerror or exc}: check the path and permissions") from None
    if head[:6] == _NPY_MAGIC:
        return "npy"
    if head[:4] in _TIFF_MAGIC:
        return "tiff"
    if not head:
        raise RecordError(f"{path.name} is empty: give a recording that holds frames")
    if len(head) < 8 and any(m.startswith(head[:4]) for m in _TIFF_MAGIC):
        raise RecordError(f"{path.name} is truncated inside its TIFF header: give a complete file")
    raise RecordError(f"{path.name} is neither a TIFF stack nor a .npy array: give a .tif or .npy file")


def _open(path: Path, opts: Mapping[str, Any]) -> tuple[int, Callable[[], Iterator[Frame]]]:
    """Validate ``path`` and return (number of frames or -1 where not counted, a frame iterator factory)."""
    kind = _sniff(path)
    try:
        if kind == "tiff":
            with open(path, "rb") as fh:
                t = _Tiff(fh, os.fstat(fh.fileno()).st_size, path.name)
                state = _first_page(t)
                if state == "incomplete":
                    raise _no_frame(path)
                if state == "ours":
                    if next(_our_pages(t, path.name, data=False), None) is None:
                        raise _no_frame(path)
                    return -1, lambda: _our_frames(path, opts)  # counting would walk every page
            data, meta = _open_foreign_tiff(path)
        else:
            data = _open_npy(path)
            meta = {}
            _convert(np.zeros(1, data.dtype), path.name)
        if data.shape[0] == 0:
            raise RecordError(f"{path.name} holds no frames: give a non-empty stack")
        _check_shape(tuple(data.shape[1:]), path.name)
        side, _ = _sidecar(path)
        meta.update(side)
        meta.update(opts)
        _require(meta, path)
        n = int(data.shape[0])
        return n, lambda: _array_frames(data, meta, path)
    except RecordError:
        raise
    except MemoryError:
        raise RecordError(f"{path.name} is too large to load: save it uncompressed so it can be memory-mapped") from None
    except Exception as exc:  # noqa: BLE001 - tifffile/numpy errors must not leak as tracebacks
        what = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise RecordError(f"cannot read {path.name} ({what}): the file is damaged or not a supported "
                          f"stack (TIFF, ImageJ TIFF, .npy)") from None


def read_frames(path: str | os.PathLike, *, pixel_size_nm: float | tuple[float, float] | None = None,
                dwell_us: float | None = None, flyback_us: float | None = None) -> Iterator[Frame]:
    """Frames of a recording, in order. The file is checked now (RecordError at call time);
    frames are read lazily as the iterator is consumed.

    Our own recordings give back the frames exactly as written (a truncated one: every
    complete page). Files without per-frame metadata get ``seq`` 0..N-1 and ``t_start``
    ``i * frame_interval_s`` (ImageJ ``finterval`` or sidecar) or else ``i * frame time``.
    Options override values from the file and its sidecar.
    """
    p = Path(path)
    _, factory = _open(p, _options(pixel_size_nm, dwell_us, flyback_us))
    return _guard(factory(), p)


def _guard(it: Iterator[Frame], path: Path) -> Iterator[Frame]:
    try:
        yield from it
    except RecordError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise RecordError(f"cannot read {path.name} ({type(exc).__name__}: {str(exc)[:100]}): "
                          f"the file is damaged") from None


def count_frames(path: str | os.PathLike) -> int:
    """Number of frames :func:`read_frames` yields (reads IFDs / headers only, no pixels).

    For files that need external metadata, a missing pixel size etc. is not an error here.
    """
    p = Path(path)
    kind = _sniff(p)
    try:
        if kind == "npy":
            return int(_open_npy(p).shape[0])
        with open(p, "rb") as fh:
            t = _Tiff(fh, os.fstat(fh.fileno()).st_size, p.name)
            state = _first_page(t)
            if state == "ours":
                return sum(1 for _ in _our_pages(t, p.name, data=False))
            if state == "incomplete":
                return 0
        import tifffile  # noqa: PLC0415

        with _quiet_tifffile(), tifffile.TiffFile(p) as tif:
            shape = tif.series[0].shape
            return int(math.prod(shape[:-2])) if len(shape) >= 2 else 0
    except RecordError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise RecordError(f"cannot read {p.name} ({type(exc).__name__}): the file is damaged or "
                          f"not a supported stack") from None


# ============================================================================ streaming


def record_stream(endpoint: str, path: str | os.PathLike, *, frames: int | None = None,
                  timeout_s: float | None = None, progress: Callable[[int, Frame], None] | None = None,
                  stop: threading.Event | None = None, overwrite: bool = False,
                  stats: dict[str, int] | None = None) -> int:
    """Subscribe to a frames PUB ``endpoint`` and record every frame to ``path``.

    Stops after ``frames`` frames, when no valid frame arrived for ``timeout_s`` seconds, or
    when ``stop`` is set. Invalid messages (and non-frame messages) are skipped, counted and
    logged in one line each. ``progress(n_written, frame)`` runs after each frame is flushed.
    ``stats`` (optional dict) receives ``written``, ``invalid`` and ``missed`` (gaps in seq).
    Returns the number of frames written.
    """
    import zmq  # noqa: PLC0415 - only the streaming path needs ZeroMQ

    from stem_live.protocol import recv  # noqa: PLC0415

    st = stats if stats is not None else {}
    st.update(written=0, invalid=0, missed=0)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 10000)  # a recorder should rather buffer than drop
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise RecordError(f"cannot connect to {endpoint!r} ({exc}): give an endpoint like "
                              f"tcp://127.0.0.1:5555") from None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        last_seq: dict[str, int] = {}
        with StackWriter(path, overwrite=overwrite) as writer:
            idle_since = time.monotonic()
            while frames is None or writer.count < frames:
                if stop is not None and stop.is_set():
                    break
                if timeout_s is not None and time.monotonic() - idle_since > timeout_s:
                    log.info("no frame for %.1f s on %s: stopping", timeout_s, endpoint)
                    break
                if not poller.poll(50):
                    continue
                try:
                    msg = recv(sock, flags=zmq.NOBLOCK)
                except zmq.Again:
                    continue
                except ProtocolError as exc:
                    st["invalid"] += 1
                    log.warning("skipped invalid message #%d: %s", st["invalid"], exc)
                    continue
                if not isinstance(msg, Frame):
                    st["invalid"] += 1
                    log.warning("skipped a %s message #%d on the frames endpoint", type(msg).__name__,
                                st["invalid"])
                    continue
                prev = last_seq.get(msg.stream)
                if prev is not None and msg.seq > prev + 1:
                    st["missed"] += msg.seq - prev - 1
                    log.warning("seq gap on stream %r: %d frame(s) missed before seq %d",
                                msg.stream, msg.seq - prev - 1, msg.seq)
                last_seq[msg.stream] = msg.seq
                writer.write(msg)
                st["written"] = writer.count
                idle_since = time.monotonic()
                if progress is not None:
                    progress(writer.count, msg)
            return writer.count
    finally:
        sock.close(0)
        ctx.term()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stem_live.record",
                                 description="Record a stem-live frame stream to a TIFF stack.")
    ap.add_argument("endpoint", help="frames PUB endpoint, e.g. tcp://127.0.0.1:5555")
    ap.add_argument("path", type=Path, help="output .tif (BigTIFF, one page per frame)")
    ap.add_argument("--frames", type=int, default=None, help="stop after N frames")
    ap.add_argument("--timeout", type=float, default=None, help="stop after S seconds without a frame")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing file")
    ap.add_argument("--quiet", action="store_true", help="no per-frame progress lines")
    args = ap.parse_args(argv)
    if args.frames is not None and args.frames < 1:
        ap.error("--frames must be at least 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    stop = threading.Event()
    try:
        import signal  # noqa: PLC0415

        signal.signal(signal.SIGTERM, lambda *_: stop.set())
    except (ValueError, OSError):  # pragma: no cover - not in the main thread
        pass

    def show(n: int, f: Frame) -> None:
        if not args.quiet:
            print(f"written {n} seq {f.seq}", flush=True)

    try:
        n = record_stream(args.endpoint, args.path, frames=args.frames, timeout_s=args.timeout,
                          progress=show, stop=stop, overwrite=args.overwrite)
    except RecordError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: every finished frame is kept", file=sys.stderr)
        return 130
    print(f"recorded {n} frames to {args.path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
