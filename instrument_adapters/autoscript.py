"""Thermo Fisher / FEI microscopes through AutoScript TEM, as an :class:`Instrument`.

Written against the documented AutoScript TEM client API::

    from autoscript_tem_microscope_client import TemMicroscopeClient
    from autoscript_tem_microscope_client.enumerations import DetectorType, ImageSize
    from autoscript_tem_microscope_client.structures import Point
    microscope = TemMicroscopeClient(); microscope.connect(host, port)
    image = microscope.acquisition.acquire_stem_image(DetectorType.HAADF, ImageSize.PRESET_512, dwell_s)
    image.data                                        # 2-D numpy array
    image.metadata.binary_result.pixel_size.x / .y    # metres per pixel
    microscope.optics.deflectors.beam_shift           # Point(x, y), metres; settable

The client ships with the microscope software (it is not on PyPI) and is imported only when
an :class:`AutoScriptInstrument` is created without an injected ``client`` (tests inject a
fake with the same surface).

Units and axes: AutoScript speaks metres and ``Point(x, y)``; stem-live speaks nm and
``(y, x)``. ``shift_matrix`` (2x2, default identity) maps our beam shift (nm, (y, x) in image
axes) to the deflector's (y, x) in nm, for microscopes whose beam-shift axes are rotated or
flipped with respect to the scan (measure it once: move the beam shift, watch the image).

Frame metadata: pixel size from the image metadata (``binary_result.pixel_size``, metres);
dwell time is the one requested; AutoScript does not report the line flyback, so it is the
``flyback_us`` option (default :data:`DEFAULT_FLYBACK_US`, a typical value: measure yours
with a calibration session); ``t_start`` is ``time.monotonic()`` when the acquisition call
starts; ``seq`` counts from 0; ``beam_shift_nm`` is the shift read just before the scan.

Every failure of the client (``ApplicationServerException``, a lost connection, ...) becomes
:class:`InstrumentError` with one line; the bridge logs it and calls ``acquire`` again.
"""

from __future__ import annotations

import argparse
import math
import threading
import time
from typing import Any

import numpy as np

from instrument_adapters.base import EndOfStream, Instrument, InstrumentError
from stem_live.protocol import Frame

#: line flyback assumed when AutoScript cannot tell (us)
DEFAULT_FLYBACK_US = 20.0
#: image sides AutoScript has presets for (``ImageSize.PRESET_<n>``)
PRESET_SIZES = (256, 512, 1024, 2048, 4096)

_CLIENT_MISSING = ("the AutoScript TEM client (autoscript_tem_microscope_client) is not installed: it comes with "
                   "the Thermo Fisher microscope software, install it into this Python environment")


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _matrix(m: Any) -> np.ndarray:
    a = np.eye(2) if m is None else np.asarray(m, dtype=np.float64)
    if a.shape != (2, 2) or not np.isfinite(a).all() or abs(np.linalg.det(a)) < 1e-12:
        raise InstrumentError(f"shift_matrix must be an invertible 2x2 matrix of finite numbers, got {m!r}")
    return a


class AutoScriptInstrument(Instrument):
    """A Thermo Fisher (S)TEM driven through AutoScript.

    ``AutoScriptInstrument(host="localhost", port=None, *, client=None, detector="HAADF",
    size=512, dwell_us=1.0, flyback_us=DEFAULT_FLYBACK_US, pixel_size_nm=None,
    scan_rotation_rad=0.0, shift_matrix=None, frames=None, stream="autoscript",
    enumerations=None, structures=None)``

    ``client``: an already connected ``TemMicroscopeClient`` (or a fake); otherwise one is
    created and connected to ``host``/``port``. ``enumerations`` / ``structures``: modules
    providing ``DetectorType``, ``ImageSize`` and ``Point`` (default: the client's own).
    ``pixel_size_nm`` is used only where an image carries no pixel size.
    ``frames``: end the stream (:class:`EndOfStream`) after that many frames.
    """

    def __init__(self, host: str = "localhost", port: int | None = None, *, client: Any = None,
                 detector: str = "HAADF", size: int = 512, dwell_us: float = 1.0,
                 flyback_us: float = DEFAULT_FLYBACK_US, pixel_size_nm: float | tuple[float, float] | None = None,
                 scan_rotation_rad: float = 0.0, shift_matrix: Any = None, frames: int | None = None,
                 stream: str = "autoscript", enumerations: Any = None, structures: Any = None) -> None:
        if not (isinstance(dwell_us, (int, float)) and math.isfinite(dwell_us) and dwell_us > 0):
            raise InstrumentError(f"dwell_us must be a positive number of microseconds, got {dwell_us!r}")
        if not (isinstance(flyback_us, (int, float)) and math.isfinite(flyback_us) and flyback_us >= 0):
            raise InstrumentError(f"flyback_us must be a number >= 0 (microseconds), got {flyback_us!r}")
        if not (isinstance(size, int) and 2 <= size <= 16384):
            raise InstrumentError(f"size must be an image side in pixels (e.g. 512), got {size!r}")
        self.dwell_us = float(dwell_us)
        self.flyback_us = float(flyback_us)
        self.size = size
        self.detector = str(detector)
        self.scan_rotation_rad = float(scan_rotation_rad)
        self.stream = stream
        self.frames = frames
        self._fallback_px = None
        if pixel_size_nm is not None:
            px = np.broadcast_to(np.asarray(pixel_size_nm, dtype=np.float64), (2,))
            if not (np.isfinite(px).all() and (px > 0).all()):
                raise InstrumentError(f"pixel_size_nm must be positive, got {pixel_size_nm!r}")
            self._fallback_px = (float(px[0]), float(px[1]))
        self._m = _matrix(shift_matrix)
        self._m_inv = np.linalg.inv(self._m)
        self._lock = threading.Lock()
        self._seq = 0
        self._owns_client = client is None
        if client is None:
            try:
                from autoscript_tem_microscope_client import TemMicroscopeClient  # noqa: PLC0415
            except ImportError:
                raise InstrumentError(_CLIENT_MISSING) from None
            client = TemMicroscopeClient()
            try:
                client.connect(host) if port is None else client.connect(host, port)
            except Exception as exc:  # noqa: BLE001 - any client failure is one line for the user
                raise InstrumentError(f"cannot connect to the AutoScript server at {host}"
                                      f"{'' if port is None else f':{port}'} ({_one_line(exc)}): "
                                      f"check the host, the port and that AutoScript runs on the microscope PC") from None
        self.client = client
        self._enums = enumerations if enumerations is not None else self._import("enumerations")
        self._structs = structures if structures is not None else self._import("structures")
        try:
            self._detector = getattr(self._enums.DetectorType, self.detector)
        except AttributeError:
            raise InstrumentError(f"unknown AutoScript detector {self.detector!r}: use a DetectorType name "
                                  f"such as HAADF, BF, DF") from None
        preset = getattr(self._enums, "ImageSize", None)
        self._size_arg = getattr(preset, f"PRESET_{size}", size) if preset is not None else size

    @staticmethod
    def _import(name: str) -> Any:
        try:
            import importlib  # noqa: PLC0415

            return importlib.import_module(f"autoscript_tem_microscope_client.{name}")
        except ImportError:
            raise InstrumentError(_CLIENT_MISSING + f" (or pass {name}= with the client's {name} module)") from None

    # ------------------------------------------------------------------ Instrument

    def acquire(self) -> Frame:
        if self.frames is not None and self._seq >= self.frames:
            raise EndOfStream(f"{self.frames} frames acquired")
        beam = self.get_beam_shift()
        t_start = time.monotonic()
        try:
            # no lock here: a correction arriving during a long scan must not wait for it
            image = self.client.acquisition.acquire_stem_image(self._detector, self._size_arg, self.dwell_us * 1e-6)
        except Exception as exc:  # noqa: BLE001 - ApplicationServerException and friends
            raise InstrumentError(f"AutoScript acquisition failed ({_one_line(exc)})") from None
        data = self._image_data(image)
        frame = Frame(seq=self._seq, image=data, t_start=t_start, pixel_size_nm=self._pixel_size(image),
                      dwell_us=self.dwell_us, flyback_us=self.flyback_us, scan_rotation_rad=self.scan_rotation_rad,
                      beam_shift_nm=(float(beam[0]), float(beam[1])), stream=self.stream, detector=self.detector)
        self._seq += 1
        return frame

    def get_beam_shift(self) -> np.ndarray:
        try:
            with self._lock:
                p = self.client.optics.deflectors.beam_shift
            native = np.array([float(p.y), float(p.x)]) * 1e9
        except Exception as exc:  # noqa: BLE001
            raise InstrumentError(f"cannot read the AutoScript beam shift ({_one_line(exc)})") from None
        return self._m_inv @ native

    def set_beam_shift(self, target_nm: np.ndarray) -> None:
        try:
            target = np.asarray(target_nm, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            target = np.full(1, np.nan)
        if target.shape != (2,) or not np.isfinite(target).all():
            raise InstrumentError(f"beam shift target must be two finite numbers (y, x) in nm, got {target_nm!r}")
        y, x = (self._m @ target) * 1e-9
        try:
            point = self._point(x=float(x), y=float(y))
            with self._lock:
                self.client.optics.deflectors.beam_shift = point
        except Exception as exc:  # noqa: BLE001
            raise InstrumentError(f"AutoScript refused the beam shift ({_one_line(exc)})") from None

    def close(self) -> None:
        if self._owns_client:
            try:
                self.client.disconnect()
            except Exception:  # noqa: BLE001 - closing must not raise
                pass

    # ------------------------------------------------------------------ helpers

    def _point(self, *, x: float, y: float) -> Any:
        point_type = getattr(self._structs, "Point", None)
        if point_type is None:
            point_type = type(self.client.optics.deflectors.beam_shift)
        return point_type(x=x, y=y)

    def _image_data(self, image: Any) -> np.ndarray:
        try:
            data = np.asarray(image.data)
        except Exception as exc:  # noqa: BLE001
            raise InstrumentError(f"AutoScript returned an image without data ({_one_line(exc)})") from None
        if data.ndim != 2 or min(data.shape) < 2:
            raise InstrumentError(f"AutoScript returned a {data.shape} array, expected a 2-D image")
        if data.dtype.name not in ("uint8", "uint16", "float32"):
            data = data.astype(np.float32)
        return np.ascontiguousarray(data)

    def _pixel_size(self, image: Any) -> tuple[float, float]:
        try:
            px = image.metadata.binary_result.pixel_size
            size = (float(px.y) * 1e9, float(px.x) * 1e9)
            if all(math.isfinite(v) and v > 0 for v in size):
                return size
        except (AttributeError, TypeError, ValueError):
            pass
        if self._fallback_px is not None:
            return self._fallback_px
        raise InstrumentError("the AutoScript image carries no pixel size (metadata.binary_result.pixel_size): "
                              "pass --autoscript-pixel-size-nm")


# ---------------------------------------------------------------------- command line


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``stem-live serve --instrument autoscript`` (all prefixed ``--autoscript-``)."""
    g = parser.add_argument_group("AutoScript (Thermo Fisher) instrument")
    g.add_argument("--autoscript-host", default="localhost", metavar="HOST",
                   help="AutoScript server (microscope PC), default localhost")
    g.add_argument("--autoscript-port", type=int, default=None, metavar="PORT", help="AutoScript server port")
    g.add_argument("--autoscript-detector", default="HAADF", metavar="NAME", help="DetectorType name (default HAADF)")
    g.add_argument("--autoscript-size", type=int, default=512, choices=PRESET_SIZES, help="image side (default 512)")
    g.add_argument("--autoscript-dwell-us", type=float, default=1.0, metavar="US", help="dwell time (default 1 us)")
    g.add_argument("--autoscript-flyback-us", type=float, default=DEFAULT_FLYBACK_US, metavar="US",
                   help=f"line flyback, which AutoScript does not report (default {DEFAULT_FLYBACK_US:g} us)")
    g.add_argument("--autoscript-pixel-size-nm", type=float, default=None, metavar="NM",
                   help="pixel size for images that carry none")
    g.add_argument("--autoscript-shift-matrix", type=float, nargs=4, default=None, metavar=("YY", "YX", "XY", "XX"),
                   help="maps our beam shift (y, x) to the deflector's (y, x) (default identity)")


def from_args(args: argparse.Namespace) -> AutoScriptInstrument:
    """Build the instrument from :func:`add_args` options (``frames`` is taken from ``args.count`` when present)."""
    m = args.autoscript_shift_matrix
    return AutoScriptInstrument(
        args.autoscript_host, args.autoscript_port, detector=args.autoscript_detector, size=args.autoscript_size,
        dwell_us=args.autoscript_dwell_us, flyback_us=args.autoscript_flyback_us,
        pixel_size_nm=args.autoscript_pixel_size_nm, shift_matrix=None if m is None else [m[:2], m[2:]],
        frames=getattr(args, "count", None))
