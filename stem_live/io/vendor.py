"""Vendor files (Gatan, Thermo Fisher, MRC, HyperSpy) as frame streams, through RosettaSciIO.

:func:`read_vendor_frames` turns the 2-D images in a vendor file (one image or a stack) into
:class:`~stem_live.protocol.Frame` objects for replay and calibration; :func:`is_vendor_file`
says whether a path is one of these formats (by its suffix). :func:`stem_live.io.read_frames`
and :func:`stem_live.io.count_frames` dispatch vendor files here.

Formats (RosettaSciIO plug-in): ``.dm3`` / ``.dm4`` Gatan DigitalMicrograph
(``digitalmicrograph``), ``.emd`` Velox or NCEM EMD (``emd``), ``.ser`` / ``.emi`` FEI TIA
(``tia``), ``.mrc`` (``mrc``), ``.hspy`` HyperSpy HDF5 (``hspy``). RosettaSciIO (and h5py for
the HDF5 formats) is the optional extra ``stem-live[vendor]``, imported only here, only when
a vendor file is read.

What is read, where a file has it (everything else: options or a JSON sidecar, below):

- **pixel size**: the scale of the two signal axes (y = rows, x = columns), with their units
  converted to nm (m, mm, um / µm, nm, pm, Å / A / angstrom);
- **dwell time**: Velox ``Scan/DwellTime`` (s); DigitalMicrograph ``DigiScan/Sample Time``
  (us), the first ``DigiScan`` tag group found (the image's own, else the one a stack
  builder kept under ``Tags at creation``);
- **flyback**: Velox ``Scan/LineTime`` (s) minus ``columns x DwellTime``; DigitalMicrograph
  ``DigiScan/Flyback`` (us);
- **scan rotation**: Velox ``Scan/ScanRotation`` (rad); DigitalMicrograph
  ``DigiScan/Rotation`` (degrees);
- **frame times**: a navigation axis in seconds (Velox ``Time``, HyperSpy) gives the frame
  interval; otherwise frames follow each other at their own frame time.

These fields are looked up in the file's original metadata wherever it is kept, so a
HyperSpy file saved from a Velox or DM file is read the same way. As in
:func:`stem_live.io.read_frames`, a JSON sidecar ``<file>.json`` / ``<stem>.json`` fills in
or overrides the file, and keyword options (``--pixel-size-nm``, ``--dwell-us``,
``--flyback-us``) override both. Missing pixel size, dwell or flyback raise
:class:`~stem_live.io.RecordError` naming the field, where it was looked for and how to
give it. Every problem with a file is one line, never a RosettaSciIO traceback.

Files with several signals (a Velox file with HAADF, DF and EDS): the first 2-D image signal
is read, or the one chosen with ``signal=`` (its index among the image signals, or its title).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from stem_live.io.metadata import (
    OPTION_FLAGS,
    RecordError,
    check_shape,
    convert_image,
    frame_times,
    guard_reading,
    parse_options,
    read_sidecar,
)
from stem_live.protocol import Frame

#: file suffix -> RosettaSciIO plug-in module
VENDOR_FORMATS: dict[str, str] = {
    ".dm3": "digitalmicrograph", ".dm4": "digitalmicrograph", ".emd": "emd", ".ser": "tia", ".emi": "tia",
    ".mrc": "mrc", ".hspy": "hspy",
}
_NEEDS_H5PY = {"emd", "hspy"}

#: length unit -> nm
UNIT_NM: dict[str, float] = {
    "m": 1e9, "mm": 1e6, "um": 1e3, "µm": 1e3, "μm": 1e3, "micron": 1e3, "microns": 1e3, "nm": 1.0,
    "pm": 1e-3, "å": 0.1, "a": 0.1, "angstrom": 0.1, "angstroms": 0.1, "ang": 0.1,
}

_WHERE = {
    "pixel_size_nm": "the signal axes (scale with a length unit)",
    "dwell_us": "Scan/DwellTime (Velox) or DigiScan/Sample Time (DigitalMicrograph)",
    "flyback_us": "Scan/LineTime (Velox) or DigiScan/Flyback (DigitalMicrograph)",
}


def is_vendor_file(path: str | os.PathLike) -> bool:
    """True for the suffixes :func:`read_vendor_frames` reads (.dm3 .dm4 .emd .ser .emi .mrc .hspy)."""
    return Path(path).suffix.lower() in VENDOR_FORMATS


# ============================================================================ reading


def _reader(path: Path) -> Callable[..., list[dict]]:
    plugin = VENDOR_FORMATS[path.suffix.lower()]
    try:
        import importlib  # noqa: PLC0415

        module = importlib.import_module(f"rsciio.{plugin}")
        if plugin in _NEEDS_H5PY:
            import h5py  # noqa: F401, PLC0415
    except ImportError as exc:
        what = "h5py" if getattr(exc, "name", "") == "h5py" else "rosettasciio"
        raise RecordError(f"reading {path.name} needs {what}: install stem-live[vendor] "
                          f"(pip install 'stem-live[vendor]')") from None
    return module.file_reader


def _load(path: Path) -> list[dict]:
    if not path.exists():
        raise RecordError(f"{path} does not exist: check the file name")
    if path.is_dir():
        raise RecordError(f"{path} is a folder: give a vendor file (.dm3, .dm4, .emd, .ser, .mrc, .hspy)")
    reader = _reader(path)
    try:
        try:
            signals = reader(str(path), lazy=True)
        except TypeError:  # a plug-in without lazy reading
            signals = reader(str(path))
    except RecordError:
        raise
    except MemoryError:
        raise RecordError(f"{path.name} is too large to load") from None
    except Exception as exc:  # noqa: BLE001 - RosettaSciIO errors must not leak as tracebacks
        text = str(exc).strip().splitlines()
        what = f"{type(exc).__name__}: {text[0][:100]}" if text else type(exc).__name__
        raise RecordError(f"cannot read {path.name} ({what}): the file is damaged or not a "
                          f"{VENDOR_FORMATS[path.suffix.lower()]} file") from None
    if isinstance(signals, dict):
        signals = [signals]
    return list(signals)


def _axes(sig: Mapping[str, Any]) -> list[dict]:
    axes = [dict(a) for a in sig.get("axes", [])]
    if all("index_in_array" in a for a in axes):
        axes.sort(key=lambda a: int(a["index_in_array"]))
    return axes


def _is_image(sig: Mapping[str, Any]) -> bool:
    data = sig.get("data")
    shape = getattr(data, "shape", ())
    if len(shape) < 2:
        return False
    axes = _axes(sig)
    if len(axes) != len(shape):
        return True  # no usable axes: take the last two array dimensions as the image
    signal_axes = [a for a in axes if not a.get("navigate", False)]
    return len(signal_axes) == 2 and all(not a.get("navigate", False) for a in axes[-2:])


def _title(sig: Mapping[str, Any]) -> str:
    try:
        return str(sig["metadata"]["General"]["title"])
    except (KeyError, TypeError):
        return ""


def _pick(signals: list[dict], choice: int | str | None, path: Path) -> dict:
    images = [s for s in signals if _is_image(s)]
    if not images:
        kinds = ", ".join(f"{_title(s) or '?'} {tuple(getattr(s.get('data'), 'shape', ()))}" for s in signals)
        raise RecordError(f"{path.name} holds no 2-D image ({kinds or 'no signals'}): "
                          f"give a file with STEM images")
    if choice is None:
        return images[0]
    if isinstance(choice, int) and not isinstance(choice, bool):
        if 0 <= choice < len(images):
            return images[choice]
    else:
        for s in images:
            if _title(s).lower() == str(choice).lower():
                return s
    titles = ", ".join(f"{i}: {_title(s) or '?'}" for i, s in enumerate(images))
    raise RecordError(f"{path.name} has no image signal {choice!r}: choose one of {titles}")


def _unit_nm(units: Any) -> float | None:
    if not isinstance(units, str):
        return None
    u = units.strip().lower().replace("\u00b5", "µ")
    return UNIT_NM.get(u)


def _axis_nm(axis: Mapping[str, Any]) -> float | None:
    factor = _unit_nm(axis.get("units"))
    try:
        scale = float(axis.get("scale", math.nan))
    except (TypeError, ValueError):
        return None
    if factor is None or not (math.isfinite(scale) and scale > 0):
        return None
    return scale * factor


def _float(v: Any) -> float | None:
    try:
        if isinstance(v, bool):
            return None
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _find_group(tree: Any, name: str) -> Mapping[str, Any] | None:
    """The first dict under key ``name`` in a nested metadata tree (breadth-first: the shallowest wins)."""
    if not isinstance(tree, Mapping):
        return None
    level: list[Mapping[str, Any]] = [tree]
    for _ in range(12):
        nxt: list[Mapping[str, Any]] = []
        for node in level:
            for k, v in node.items():
                if isinstance(v, Mapping):
                    if k == name:
                        return v
                    nxt.append(v)
        if not nxt:
            return None
        level = nxt
    return None


def scan_metadata(original_metadata: Mapping[str, Any], cols: int) -> dict[str, float]:
    """``dwell_us``, ``flyback_us``, ``scan_rotation_rad`` from Velox or DigitalMicrograph metadata (those found)."""
    out: dict[str, float] = {}
    velox = original_metadata.get("Scan") if isinstance(original_metadata, Mapping) else None
    if isinstance(velox, Mapping) and _float(velox.get("DwellTime")):
        dwell_s = _float(velox.get("DwellTime"))
        if dwell_s and dwell_s > 0:
            out["dwell_us"] = dwell_s * 1e6
            line_s = _float(velox.get("LineTime"))
            if line_s is not None and line_s > 0:
                fly = line_s * 1e6 - cols * out["dwell_us"]
                if fly > -1e-3 * line_s * 1e6:  # rounding in the file: clip tiny negatives
                    out["flyback_us"] = max(fly, 0.0)
        rot = _float(velox.get("ScanRotation"))
        if rot is not None:
            out["scan_rotation_rad"] = rot
        return out
    ds = _find_group(original_metadata, "DigiScan")
    if ds is not None:
        dwell = _float(ds.get("Sample Time"))
        if dwell is not None and dwell > 0:
            out["dwell_us"] = dwell
        fly = _float(ds.get("Flyback"))
        if fly is not None and fly >= 0:
            out["flyback_us"] = fly
        rot = _float(ds.get("Rotation"))
        if rot is not None:
            out["scan_rotation_rad"] = math.radians(rot)
    return out


def _frame_interval(nav_axes: list[dict]) -> float | None:
    for a in nav_axes:
        if isinstance(a.get("units"), str) and a["units"].strip() == "s":
            v = _float(a.get("scale"))
            if v is not None and v > 0:
                return v
    return None


def _require(meta: Mapping[str, Any], path: Path) -> None:
    missing = [k for k in ("pixel_size_nm", "dwell_us", "flyback_us") if k not in meta]
    if missing:
        flags = ", ".join(OPTION_FLAGS[k] for k in missing)
        where = "; ".join(f"{k} from {_WHERE[k]}" for k in missing)
        example = ", ".join(f'"{k}": ...' for k in missing)
        raise RecordError(f"{path.name}: {', '.join(missing)} not in the file (looked for {where}): pass {flags} "
                          f"or write a sidecar {path.with_suffix('.json').name} with {{{example}}}")


def _open(path: Path, opts: Mapping[str, Any], signal: int | str | None,
          defaults: Mapping[str, Any] | None = None) -> tuple[int, Callable[[], Iterator[Frame]]]:
    sig = _pick(_load(path), signal, path)
    data = sig["data"]
    shape = tuple(int(s) for s in data.shape)
    check_shape(shape[-2:], path.name)
    n = int(math.prod(shape[:-2])) if len(shape) > 2 else 1
    if n == 0:
        raise RecordError(f"{path.name} holds no frames: give a non-empty stack")
    convert_image(np.zeros(1, data.dtype), path.name)  # dtype check before reading pixels
    axes = _axes(sig)
    meta: dict[str, Any] = {}
    if len(axes) == len(shape):
        py, px = _axis_nm(axes[-2]), _axis_nm(axes[-1])
        if py is not None and px is not None:
            meta["pixel_size_nm"] = (py, px)
        interval = _frame_interval(axes[:-2])
        if interval is not None:
            meta["frame_interval_s"] = interval
    meta.update(scan_metadata(sig.get("original_metadata") or {}, shape[-1]))
    if path.suffix.lower() == ".emd" and _title(sig):
        meta["detector"] = _title(sig)  # Velox names its image signals after the detector
    side, _ = read_sidecar(path)
    meta.update(side)
    meta.update(opts)
    meta = {**(defaults or {}), **meta}
    _require(meta, path)
    return n, lambda: _frames(data, n, meta, path)


def _frames(data: Any, n: int, meta: Mapping[str, Any], path: Path) -> Iterator[Frame]:
    rows, cols = (int(s) for s in data.shape[-2:])
    flat = data.reshape((n, rows, cols)) if data.ndim != 3 else data
    px = tuple(float(v) for v in meta["pixel_size_nm"])
    dwell, fly = float(meta["dwell_us"]), float(meta["flyback_us"])
    times = frame_times(n, rows * (cols * dwell + fly) * 1e-6, meta, path)
    for i in range(n):
        image = convert_image(np.array(flat[i]), f"{path.name} frame {i}")
        yield Frame(seq=i, image=image, t_start=float(times[i]), pixel_size_nm=(px[0], px[1]), dwell_us=dwell,
                    flyback_us=fly, scan_rotation_rad=float(meta.get("scan_rotation_rad", 0.0)),
                    beam_shift_nm=tuple(meta.get("beam_shift_nm", (0.0, 0.0))),
                    stream=str(meta.get("stream", path.stem)), detector=str(meta.get("detector", "HAADF")))


def read_vendor_frames(path: str | os.PathLike, *, pixel_size_nm: float | tuple[float, float] | None = None,
                       dwell_us: float | None = None, flyback_us: float | None = None,
                       signal: int | str | None = None, defaults: Mapping[str, Any] | None = None,
                       frame_interval_s: float | None = None, frame_gap_us: float | None = None) -> Iterator[Frame]:
    """Frames of a vendor file, in order: ``seq`` 0..N-1, ``t_start`` from the frame interval.

    The file and its metadata are checked now (:class:`RecordError` at call time); pixels are
    read lazily as the iterator is consumed. Options override the file and its sidecar.
    """
    p = Path(path)
    if not is_vendor_file(p):
        raise RecordError(f"{p.name} is not a vendor file: expected one of {', '.join(sorted(VENDOR_FORMATS))}")
    _, factory = _open(p, parse_options(pixel_size_nm, dwell_us, flyback_us, frame_interval_s, frame_gap_us), signal,
                          defaults)
    return guard_reading(factory(), p)


def count_vendor_frames(path: str | os.PathLike, *, signal: int | str | None = None) -> int:
    """Number of frames :func:`read_vendor_frames` yields (reads the header, not the pixels)."""
    p = Path(path)
    sig = _pick(_load(p), signal, p)
    shape = tuple(int(s) for s in sig["data"].shape)
    return int(math.prod(shape[:-2])) if len(shape) > 2 else 1
