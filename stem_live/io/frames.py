"""Frames of a recording: :func:`read_frames` and :func:`count_frames` for every format we read.

Our own TIFF recordings (bit-exact, also when truncated), ImageJ and plain TIFF stacks, ``.npy``
arrays of shape (N, H, W) or (H, W), and vendor files (:mod:`stem_live.io.vendor`: .dm3, .dm4,
.emd, .ser, .mrc, .hspy). Pixel size, dwell and flyback are required: where neither the file,
a sidecar nor an option gives one, :class:`RecordError` names the missing fields and how to give
them. :func:`read_images` reads the pixels only, for analyses that need no scan metadata.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stem_live.io.metadata import (
    PIXELS_ONLY,
    RecordError,
    check_colour_stack,
    check_shape,
    convert_image,
    frame_times,
    guard_reading,
    parse_number,
    parse_options,
    parse_pair,
    read_sidecar,
    require_scan_metadata,
)
from stem_live.io.tiff_reader import (
    TIFF_MAGIC,
    TiffIndex,
    first_page_kind,
    no_frame_error,
    open_foreign_tiff,
    our_pages,
    quiet_tifffile,
)
from stem_live.io.vendor import count_vendor_frames, is_vendor_file, read_vendor_frames
from stem_live.protocol import Frame

NPY_MAGIC = b"\x93NUMPY"
log = logging.getLogger(__name__)


def _open_npy(path: Path) -> np.ndarray:
    a = np.load(path, mmap_mode="r", allow_pickle=False)
    check_colour_stack(a.shape, a.dtype, path.name)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise RecordError(f"{path.name}: a .npy stack must have shape (N, H, W) or (H, W), got {a.shape}")
    return a


def _array_frames(data: np.ndarray, meta: dict[str, Any], path: Path) -> Iterator[Frame]:
    n, rows, cols = data.shape
    px = meta["pixel_size_nm"]
    dwell, fly = meta["dwell_us"], meta["flyback_us"]
    times = frame_times(n, rows * (cols * dwell + fly) * 1e-6, meta, path)
    for i in range(n):
        yield Frame(seq=i, image=convert_image(np.array(data[i]), f"{path.name} frame {i}"), t_start=float(times[i]),
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
            seq=seq, image=image, t_start=parse_number(meta["t_start"], "t_start", where, -math.inf, math.inf),
            pixel_size_nm=opts["pixel_size_nm"] if "pixel_size_nm" in opts
            else parse_pair(meta["pixel_size_nm"], "pixel_size_nm", where, positive=True),
            dwell_us=opts["dwell_us"] if "dwell_us" in opts
            else parse_number(meta["dwell_us"], "dwell_us", where, -math.inf, math.inf),
            flyback_us=opts["flyback_us"] if "flyback_us" in opts
            else parse_number(meta["flyback_us"], "flyback_us", where, -math.inf, math.inf),
            scan_rotation_rad=parse_number(meta["scan_rotation_rad"], "scan_rotation_rad", where, -math.inf, math.inf),
            beam_shift_nm=parse_pair(meta["beam_shift_nm"], "beam_shift_nm", where),
            stream=str(meta["stream"]), detector=str(meta["detector"]))
    except (KeyError, ValueError, TypeError) as exc:
        raise RecordError(f"{where} has damaged metadata ({exc}): the recording is corrupt") from None


def _our_frames(path: Path, opts: Mapping[str, Any], on_truncated: Callable[[str], None] | None = None
                ) -> Iterator[Frame]:
    with open(path, "rb") as fh:
        t = TiffIndex(fh, os.fstat(fh.fileno()).st_size, path.name)
        for i, (meta, image, _) in enumerate(our_pages(t, path.name, data=True, on_truncated=on_truncated)):
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
    if head[:6] == NPY_MAGIC:
        return "npy"
    if head[:4] in TIFF_MAGIC:
        return "tiff"
    if not head:
        raise RecordError(f"{path.name} is empty: give a recording that holds frames")
    if len(head) < 8 and any(m.startswith(head[:4]) for m in TIFF_MAGIC):
        raise RecordError(f"{path.name} is truncated inside its TIFF header: give a complete file")
    raise RecordError(f"{path.name} is neither a TIFF stack nor a .npy array: give a .tif or .npy file")


def _open(path: Path, opts: Mapping[str, Any], defaults: Mapping[str, Any] | None = None, *, min_side: int = 2,
          on_truncated: Callable[[str], None] | None = None) -> tuple[int, Callable[[], Iterator[Frame]]]:
    """Validate ``path`` (``defaults`` fill in what neither the file, its sidecar nor ``opts`` give;
    frame sides below ``min_side`` px are refused) and return (number of frames or -1 where not
    counted, a frame iterator factory). ``on_truncated(message)``: see :func:`read_frames`."""
    kind = _sniff(path)
    try:
        if kind == "tiff":
            with open(path, "rb") as fh:
                t = TiffIndex(fh, os.fstat(fh.fileno()).st_size, path.name)
                state = first_page_kind(t)
                if state == "incomplete":
                    raise no_frame_error(path)
                if state == "ours":
                    first = next(our_pages(t, path.name, data=False), None)
                    if first is None:
                        raise no_frame_error(path)
                    check_shape(tuple(first[2]), path.name, min_side=min_side)
                    return -1, lambda: _our_frames(path, opts, on_truncated)  # counting would walk every page
            data, meta = open_foreign_tiff(path)
        else:
            data = _open_npy(path)
            meta = {}
            convert_image(np.zeros(1, data.dtype), path.name)
        if data.shape[0] == 0:
            raise RecordError(f"{path.name} holds no frames: give a non-empty stack")
        check_shape(tuple(data.shape[1:]), path.name, min_side=min_side)
        side, _ = read_sidecar(path)
        meta.update(side)
        meta.update(opts)
        meta = {**(defaults or {}), **meta}
        require_scan_metadata(meta, path)
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


def _warn_truncated(message: str) -> None:
    log.warning("%s", message)


def read_frames(path: str | os.PathLike, *, pixel_size_nm: float | tuple[float, float] | None = None,
                dwell_us: float | None = None, flyback_us: float | None = None, min_side: int = 2,
                on_truncated: Callable[[str], None] | None = None, frame_interval_s: float | None = None,
                frame_gap_us: float | None = None) -> Iterator[Frame]:
    """Frames of a recording, in order. The file is checked now (RecordError at call time);
    frames are read lazily as the iterator is consumed.

    Our own recordings give back the frames exactly as written (a truncated one: every
    complete page). Files without per-frame metadata get ``seq`` 0..N-1 and ``t_start``
    ``i * frame_interval_s`` (ImageJ ``finterval`` or sidecar) or else ``i * frame time``.
    Options override values from the file and its sidecar (``frame_interval_s``: start to start;
    ``frame_gap_us``: the pause after each frame's scan; our own recordings keep their own times).
    Frames with a side below ``min_side``
    px (an analysis passes ``MIN_ANALYSIS_SIDE``), colour images and stacks of more than 3
    dimensions are refused. A recording cut off mid-page ends at its last complete frame and
    ``on_truncated(message)`` is called with one line saying where (default: a logged warning).
    """
    p = Path(path)
    opts = parse_options(pixel_size_nm, dwell_us, flyback_us, frame_interval_s, frame_gap_us)
    if is_vendor_file(p):
        return read_vendor_frames(p, pixel_size_nm=pixel_size_nm, dwell_us=dwell_us, flyback_us=flyback_us,
                                  frame_interval_s=frame_interval_s, frame_gap_us=frame_gap_us)
    _, factory = _open(p, opts, min_side=min_side, on_truncated=on_truncated or _warn_truncated)
    return guard_reading(factory(), p)


def read_images(path: str | os.PathLike, *, min_side: int = 2) -> np.ndarray:
    """The images of any file :func:`read_frames` reads, as one (N, H, W) array (dtype as stored,
    or float32), for analyses that need the pixels only: a missing pixel size, dwell or flyback
    is not an error here. RecordError (one line) for a file that cannot be read."""
    p = Path(path)
    if is_vendor_file(p):
        frames = read_vendor_frames(p, defaults=PIXELS_ONLY)
    else:
        _, factory = _open(p, {}, PIXELS_ONLY, min_side=min_side, on_truncated=_warn_truncated)
        frames = guard_reading(factory(), p)
    images = [f.image for f in frames]
    if images and min_side > 2:
        check_shape(tuple(images[0].shape), p.name, min_side=min_side)
    if not images:
        raise no_frame_error(p)
    return np.stack(images)


def count_frames(path: str | os.PathLike) -> int:
    """Number of frames :func:`read_frames` yields (reads IFDs / headers only, no pixels).

    For files that need external metadata, a missing pixel size etc. is not an error here.
    """
    p = Path(path)
    if is_vendor_file(p):
        return count_vendor_frames(p)
    kind = _sniff(p)
    try:
        if kind == "npy":
            return int(_open_npy(p).shape[0])
        with open(p, "rb") as fh:
            t = TiffIndex(fh, os.fstat(fh.fileno()).st_size, p.name)
            state = first_page_kind(t)
            if state == "ours":
                return sum(1 for _ in our_pages(t, p.name, data=False))
            if state == "incomplete":
                return 0
        import tifffile  # noqa: PLC0415

        with quiet_tifffile(), tifffile.TiffFile(p) as tif:
            shape = tif.series[0].shape
            return int(math.prod(shape[:-2])) if len(shape) >= 2 else 0
    except RecordError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise RecordError(f"cannot read {p.name} ({type(exc).__name__}): the file is damaged or "
                          f"not a supported stack") from None
