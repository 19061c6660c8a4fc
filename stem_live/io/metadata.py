"""Metadata of recordings: the error type, JSON sidecars, option parsing, dtype and shape checks.

A JSON sidecar ``<file>.json`` or ``<stem>.json`` gives what a file lacks (``pixel_size_nm`` as a
number or [y, x], ``dwell_us``, ``flyback_us``; optionally ``frame_interval_s``, ``t_start`` (a
number or one per frame), ``scan_rotation_rad``, ``beam_shift_nm``, ``detector``, ``stream``).
Keyword options override both the file and the sidecar. Images of dtype uint8, uint16 and
float32 are kept; int8, int16, int32, uint32, float16 and float64 become float32; anything else
is refused with a :class:`RecordError` that says what to do.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stem_live.protocol import IMAGE_DTYPES, MAX_IMAGE_SIDE, Frame

FORMAT = "record/1"
MARKER = "stem_live"
#: dtypes converted to float32 on reading
CONVERTIBLE = ("int8", "int16", "int32", "uint32", "float16", "float64")


log = logging.getLogger("stem_live.io")

class RecordError(Exception):
    """A recording cannot be written or a file cannot be read; the one-line text says what to do."""


# ============================================================================ reading: metadata


def parse_pair(value: Any, field: str, source: str, *, positive: bool = False) -> tuple[float, float]:
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


def parse_number(value: Any, field: str, source: str, lo: float, hi: float) -> float:
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


LIMITS = {"dwell_us": (1e-6, 1e6), "flyback_us": (0.0, 1e7)}
OPTION_FLAGS = {"pixel_size_nm": "--pixel-size-nm", "dwell_us": "--dwell-us", "flyback_us": "--flyback-us"}


def parse_options(pixel_size_nm: Any, dwell_us: Any, flyback_us: Any, frame_interval_s: Any = None,
                  frame_gap_us: Any = None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if pixel_size_nm is not None:
        out["pixel_size_nm"] = parse_pair(pixel_size_nm, "pixel_size_nm", "the options", positive=True)
    for key, v in (("dwell_us", dwell_us), ("flyback_us", flyback_us)):
        if v is not None:
            out[key] = parse_number(v, key, "the options", *LIMITS[key])
    if frame_interval_s is not None and frame_gap_us is not None:
        raise RecordError("give the frame timing once: --frame-period-s (start to start) or --frame-gap-us "
                          "(end of one frame to the start of the next)")
    if frame_interval_s is not None:
        out["frame_interval_s"] = parse_number(frame_interval_s, "frame period (s)", "the options", 1e-6, 1e6)
    if frame_gap_us is not None:
        out["frame_gap_us"] = parse_number(frame_gap_us, "frame gap (us)", "the options", 0.0, 1e12)
    return out


def frame_times(n: int, frame_time_s: float, meta: Mapping[str, Any], path: Path) -> np.ndarray:
    """(n,) start times (s) of a stack's frames: the file's or sidecar's own (``t_start`` per
    frame, or a frame interval), else a ``frame_gap_us`` after each frame's scan, else back to
    back (``frame_time_s`` apart: said once in the log, since a real scan pauses between frames
    and the drift model needs the true times)."""
    t0 = meta.get("t_start", 0.0)
    if isinstance(t0, list):
        if len(t0) != n:
            raise RecordError(f"{path.name}: sidecar t_start lists {len(t0)} times for {n} frames: "
                              f"give one per frame or a single start time")
        return np.asarray(t0, dtype=float)
    if "frame_interval_s" in meta:
        interval = float(meta["frame_interval_s"])
    elif "frame_gap_us" in meta:
        interval = frame_time_s + 1e-6 * float(meta["frame_gap_us"])
    else:
        interval = frame_time_s
        key = str(Path(path).resolve())
        if n > 1 and key not in _ASSUMED:
            _ASSUMED.add(key)
            log.warning("%s has no frame times: frames assumed back to back (%.4g s apart); give "
                        "--frame-period-s or --frame-gap-us if the scan paused between frames", path.name,
                        frame_time_s)
    return float(t0) + interval * np.arange(n)


_ASSUMED: set[str] = set()   # files whose frames were assumed back to back (said once per file)


def sidecar_paths(path: Path) -> list[Path]:
    """Where a JSON sidecar for ``path`` is looked for, in order."""
    return [path.with_name(path.name + ".json"), path.with_suffix(".json")]


def read_sidecar(path: Path) -> tuple[dict[str, Any], str]:
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
                    out[key] = parse_pair(v, key, src, positive=True)
                elif key in LIMITS:
                    out[key] = parse_number(v, key, src, *LIMITS[key])
                elif key in ("frame_interval_s", "scan_rotation_rad"):
                    out[key] = parse_number(v, key, src, -1e9, 1e9)
                elif key == "beam_shift_nm":
                    out[key] = parse_pair(v, key, src)
                elif key in ("detector", "stream"):
                    out[key] = str(v)
                elif key == "t_start":
                    if isinstance(v, list):
                        out[key] = [parse_number(x, key, src, -1e12, 1e12) for x in v]
                    else:
                        out[key] = parse_number(v, key, src, -1e12, 1e12)
            return out, p.name
    return {}, ""


def require_scan_metadata(meta: Mapping[str, Any], path: Path) -> None:
    missing = [k for k in ("pixel_size_nm", "dwell_us", "flyback_us") if k not in meta]
    if missing:
        flags = ", ".join(OPTION_FLAGS[k] for k in missing)
        example = ", ".join(f'"{k}": ...' for k in missing)
        raise RecordError(f"{path.name}: {', '.join(missing)} unknown: pass {flags} or write a sidecar "
                          f"{path.with_suffix('.json').name} with {{{example}}}")


def convert_image(a: np.ndarray, what: str) -> np.ndarray:
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


#: the smallest frame side (px) an analysis (replay, locate, calibrate) accepts: below it no
#: registration or column fit means anything
MIN_ANALYSIS_SIDE = 32


def check_shape(shape: tuple[int, ...], what: str, *, min_side: int = 2) -> None:
    """RecordError (one line) unless ``shape`` is that of a 2-D frame with sides in
    [``min_side``, MAX_IMAGE_SIDE] px; a trailing axis of 3 or 4 is named as colour channels."""
    if len(shape) == 3 and shape[-1] in (3, 4) and min(shape[:2]) >= min_side:
        raise RecordError(f"{what}: frames of shape {shape} look like colour (RGB) images: "
                          f"save a greyscale image (one value per pixel)")
    if len(shape) != 2:
        raise RecordError(f"{what}: frames must be 2-D images, got {len(shape)} dimensions {shape}")
    if not all(min_side <= s <= MAX_IMAGE_SIDE for s in shape):
        raise RecordError(f"{what}: frame sides must be in [{min_side}, {MAX_IMAGE_SIDE}] px, got {shape}")


def check_colour_stack(shape: tuple[int, ...], dtype: np.dtype, what: str) -> None:
    """A (H, W, 3|4) uint8 array, or an (N, H, W, 3|4) stack, is colour, not N frames: RecordError."""
    colour = (len(shape) == 3 and shape[-1] in (3, 4) and np.dtype(dtype) == np.uint8 and min(shape[:2]) >= 8) \
        or (len(shape) == 4 and shape[-1] in (3, 4))
    if colour:
        raise RecordError(f"{what} holds a colour (RGB) image of shape {shape}: save it as greyscale "
                          f"(one value per pixel), e.g. the mean over the last axis")


# ============================================================================ reading: foreign


UNIT_NM_TIFF = {"nm": 1.0, "nanometer": 1.0, "nanometers": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3,
            "\\u00b5m": 1e3, "micron": 1e3, "microns": 1e3, "micrometer": 1e3, "micrometers": 1e3,
            "mm": 1e6, "cm": 1e7, "m": 1e9, "pm": 1e-3, "a": 0.1, "å": 0.1, "angstrom": 0.1,
            "angstroms": 0.1}


def guard_reading(it: Iterator[Frame], path: Path) -> Iterator[Frame]:
    try:
        yield from it
    except RecordError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise RecordError(f"cannot read {path.name} ({type(exc).__name__}: {str(exc)[:100]}): "
                          f"the file is damaged") from None


#: stand-ins for an analysis that needs pixels only (``read_images``): nothing of the scan is measured with them
PIXELS_ONLY = {"pixel_size_nm": (1.0, 1.0), "dwell_us": 1.0, "flyback_us": 0.0}
