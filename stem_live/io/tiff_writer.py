"""Writing frame streams: :class:`StackWriter` appends every :class:`~stem_live.protocol.Frame` as
one uncompressed TIFF page (BigTIFF by default) whose ImageDescription holds the frame's
metadata as JSON (every field but ``image``, plus the marker ``"stem_live": "record/1"``).
Resolution tags (pixels per centimetre) are written where the pixel size fits a TIFF rational.

Crash safety: after every page the writer flushes Python's buffer to the OS, so a process
killed at any moment (SIGKILL included) leaves every finished page readable. ``os.fsync`` runs
at most once per ``fsync_interval_s`` (default 1 s, and on close), which bounds what a power
cut can take to about that long without paying a disk sync per frame.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import time
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np

from stem_live.io.metadata import FORMAT, MARKER, RecordError
from stem_live.protocol import IMAGE_DTYPES, Frame

# ============================================================================ writing


def open_for_writing(path: Path, overwrite: bool):
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
            self._fh = open_for_writing(self.path, overwrite)
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

    def __enter__(self) -> StackWriter:
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
