"""Nion microscopes through Nion Swift's instrumentation kit, as an :class:`Instrument`.

Frames come from the scan ``HardwareSource`` of ``nionswift-instrumentation`` (a
``scan_base.ScanHardwareSource``): the adapter sets the frame parameters (``size``,
``pixel_time_us``, ``fov_nm``, ``rotation_rad``), then either keeps the scan running and takes
every frame as it finishes (``acquisition="continuous"``, ``get_next_xdatas_to_finish``: the
microscope never waits) or records one frame per call (``acquisition="single"``,
``record_immediate``: every frame starts after the call, so a correction never lands inside
a frame, at the cost of dead time between frames). With ``strip_lines`` (continuous only) each
frame goes out as strips of that many lines as it is scanned, cut from the scan's partial reads
(:mod:`.nion_strips`).

Corrections move the beam in one of two ways (``correction_mode``):

- ``"beam_shift"`` (default): the ``CSH`` control of the STEM controller, in metres
  (``SetVal("CSH.x", m)`` / ``"CSH.y"``, or ``SetValAndConfirm`` with ``confirm=True``);
- ``"scan_offset"``: the scan's ``center_nm`` frame parameter (what Nion's own drift tracker
  moves). Only scan-time devices move; nothing in the column changes.

Units and axes: stem-live's beam shift is nm, ``(y, x)`` in *image* axes (rows, columns).
``CSH`` and ``center_nm`` live in the unrotated (context) frame, so with a scan rotation
``theta`` the adapter rotates: ``native = R(theta)^T @ ours`` (checked against
``nionswift-usim``: with no rotation, CSH +x moves the image content by -x, as stem-live's beam
shift ``b`` does: a specimen point appears displaced by ``drift - b``). ``shift_matrix`` (2x2,
ours -> native (y, x)) replaces that rotation where a microscope's CSH axes differ from its
scan axes.

Frame metadata: pixel size from the xdata's dimensional calibrations (nm, um, A, ...); dwell
from the frame's ``pixel_time_us``; flyback from the scan device's ``flyback_pixels`` times
the dwell where it reports it (usim does), else ``flyback_us`` (default
:data:`DEFAULT_FLYBACK_US`); ``t_start`` = ``time.monotonic()`` when the frame finished minus
the frame time; ``seq`` counts from 0; ``beam_shift_nm`` is the shift in effect at the middle
of the frame (a correction this adapter applied later than that is not counted).

Where it runs: the hardware sources exist inside the Nion Swift process. Run the bridge
there (Swift's Python console or a plug-in; see docs/adapters.md), or use :func:`start_usim`
for Nion's simulated STEM without a GUI (``stem-live serve --instrument nion --nion-usim``).
The Nion packages are GPL-3.0 and optional (extra ``stem-live[nion]``); they are imported
only inside this module's functions.
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from instrument_adapters.base import EndOfStream, Instrument, InstrumentError
from instrument_adapters.nion_strips import CutStrip, StripCutter
from stem_live.protocol import Frame, Strip

#: line flyback assumed when the scan device does not report ``flyback_pixels`` (us)
DEFAULT_FLYBACK_US = 10.0
CORRECTION_MODES = ("beam_shift", "scan_offset")
ACQUISITION_MODES = ("continuous", "single")

_MISSING = ("Nion Swift's instrumentation kit is not installed: pip install 'stem-live[nion]' "
            "(nionswift-instrumentation; nionswift-usim for the simulator)")
_UNIT_NM = {"nm": 1.0, "um": 1e3, "µm": 1e3, "μm": 1e3, "pm": 1e-3, "å": 0.1, "a": 0.1, "m": 1e9, "mm": 1e6}


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:160]}" if text else type(exc).__name__


def _geometry() -> Any:
    try:
        from nion.utils import Geometry  # noqa: PLC0415
    except ImportError:
        raise InstrumentError(_MISSING) from None
    return Geometry


def rotation_matrix(theta: float) -> np.ndarray:
    """ours (y, x) in image axes -> native (y, x) in the context frame, for a scan rotated by ``theta``."""
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, s], [-s, c]])


class NionInstrument(Instrument):
    """A Nion STEM (or nionswift-usim) scan device.

    ``NionInstrument(scan_hardware_source=None, stem_controller=None, *, scan_device_id=None,
    size=None, pixel_time_us=None, fov_nm=None, rotation_rad=None, channel=0,
    correction_mode="beam_shift", acquisition="continuous", flyback_us=None,
    shift_matrix=None, confirm=False, timeout_s=10.0, frames=None, stream="nion",
    stage_controls=("stage_position_m.x", "stage_position_m.y"), stage_sign=-1.0, strip_lines=0)``

    Without ``scan_hardware_source`` the scan device is looked up in this process's
    ``HardwareSourceManager`` (by ``scan_device_id``, else the first scanning device);
    without ``stem_controller`` it is the hardware source's own. Frame parameters left
    ``None`` keep the device's current values. ``channel``: index among the enabled channels.
    ``strip_lines`` > 0 (continuous acquisition): ``acquire`` returns each frame as strips of
    that many lines, cut from the scan's partial reads as they arrive (:mod:`.nion_strips`).
    """

    def __init__(self, scan_hardware_source: Any = None, stem_controller: Any = None, *,
                 scan_device_id: str | None = None, size: int | tuple[int, int] | None = None,
                 pixel_time_us: float | None = None, fov_nm: float | None = None, rotation_rad: float | None = None,
                 channel: int = 0, correction_mode: str = "beam_shift", acquisition: str = "continuous",
                 flyback_us: float | None = None, shift_matrix: Any = None, confirm: bool = False,
                 timeout_s: float = 10.0, frames: int | None = None, stream: str = "nion",
                 stage_controls: tuple[str, str] | None = ("stage_position_m.x", "stage_position_m.y"),
                 stage_sign: float = -1.0, strip_lines: int = 0) -> None:
        if correction_mode not in CORRECTION_MODES:
            raise InstrumentError(f"correction_mode must be one of {', '.join(CORRECTION_MODES)}, got {correction_mode!r}")
        if acquisition not in ACQUISITION_MODES:
            raise InstrumentError(f"acquisition must be one of {', '.join(ACQUISITION_MODES)}, got {acquisition!r}")
        if int(strip_lines) < 0 or (int(strip_lines) and acquisition != "continuous"):
            raise InstrumentError(f"strip_lines must be >= 0, and strips need acquisition='continuous' "
                                  f"(got {strip_lines!r} with {acquisition!r})")
        if flyback_us is not None and not (math.isfinite(flyback_us) and flyback_us >= 0):
            raise InstrumentError(f"flyback_us must be a number >= 0, got {flyback_us!r}")
        self.correction_mode = correction_mode
        self.stage_controls = stage_controls
        self.stage_sign = float(stage_sign)
        self.acquisition = acquisition
        self.channel = int(channel)
        self.flyback_us = flyback_us
        self.confirm = bool(confirm)
        self.timeout_s = float(timeout_s)
        self.frames = frames
        self.stream = stream
        self._geom = _geometry()
        hs = scan_hardware_source if scan_hardware_source is not None else self._find_scan(scan_device_id)
        self.hs = hs
        self.stem = stem_controller if stem_controller is not None else getattr(hs, "stem_controller", None)
        if self.stem is None and correction_mode == "beam_shift":
            raise InstrumentError("no STEM controller for the beam shift: pass stem_controller= or use "
                                  "correction_mode='scan_offset'")
        self._fixed_matrix = None
        if shift_matrix is not None:
            m = np.asarray(shift_matrix, dtype=np.float64)
            if m.shape != (2, 2) or not np.isfinite(m).all() or abs(np.linalg.det(m)) < 1e-12:
                raise InstrumentError(f"shift_matrix must be an invertible 2x2 matrix, got {shift_matrix!r}")
            self._fixed_matrix = m
        self._lock = threading.Lock()
        self._changes: deque[tuple[float, np.ndarray]] = deque(maxlen=16)  # (time, shift before the change)
        self._seq = 0
        self._started = False
        self.strip_lines = int(strip_lines)
        self._cutter = StripCutter(self.strip_lines) if self.strip_lines else None
        self._strips: deque[tuple[CutStrip, dict, float]] = deque()   # (strip, scan metadata, line time s)
        self._strips_ready = threading.Condition()
        self._listener: Any = None      # the data channel listener of strip mode
        self._channel_id: str | None = None
        self.strips_dropped = 0         # strips nobody took in time (the oldest go first)
        self.read_error = ""            # the last error of the partial-read listener (it must not raise)
        try:
            fp = hs.get_current_frame_parameters()
            if size is not None:
                h, w = (size, size) if isinstance(size, int) else size
                fp.size = self._geom.IntSize(height=int(h), width=int(w))
            if pixel_time_us is not None:
                fp.pixel_time_us = float(pixel_time_us)
            if fov_nm is not None:
                fp.fov_nm = float(fov_nm)
            if rotation_rad is not None:
                fp.rotation_rad = float(rotation_rad)
            hs.set_current_frame_parameters(fp)
        except InstrumentError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise InstrumentError(f"cannot set the Nion scan frame parameters ({_one_line(exc)})") from None

    # ------------------------------------------------------------------ setup

    @staticmethod
    def _find_scan(scan_device_id: str | None) -> Any:
        try:
            from nion.instrumentation import HardwareSource  # noqa: PLC0415
        except ImportError:
            raise InstrumentError(_MISSING) from None
        mgr = HardwareSource.HardwareSourceManager()
        if scan_device_id:
            hs = mgr.get_hardware_source_for_hardware_source_id(scan_device_id)
            if hs is None:
                ids = ", ".join(h.hardware_source_id for h in mgr.hardware_sources) or "none"
                raise InstrumentError(f"no Nion hardware source {scan_device_id!r} (found: {ids})")
            return hs
        for hs in mgr.hardware_sources:
            if getattr(hs, "features", {}).get("is_scanning"):
                return hs
        raise InstrumentError("no Nion scan device in this process: run the bridge inside Nion Swift "
                              "(see docs/adapters.md) or use the simulator (--nion-usim)")

    def _matrix(self, rotation: float | None = None) -> np.ndarray:
        if self._fixed_matrix is not None:
            return self._fixed_matrix
        if rotation is None:
            rotation = float(self.hs.get_current_frame_parameters().rotation_rad)
        return rotation_matrix(rotation)

    # ------------------------------------------------------------------ Instrument

    def acquire(self) -> Frame | Strip:
        if self.frames is not None and self._seq >= self.frames:
            raise EndOfStream(f"{self.frames} frames acquired")
        if self._cutter is not None:
            return self._next_strip()
        try:
            if self.acquisition == "single":
                xdatas = self.hs.record_immediate(self.hs.get_current_frame_parameters())
            else:
                if not self._started or not self.hs.is_playing:
                    self.hs.start_playing()
                    self._started = True
                xdatas = self.hs.get_next_xdatas_to_finish(self.timeout_s)
        except Exception as exc:  # noqa: BLE001 - the kit raises assorted errors (timeouts, device errors)
            raise InstrumentError(f"Nion scan failed ({_one_line(exc)})") from None
        t_done = time.monotonic()
        xdatas = [x for x in (xdatas or []) if x is not None]
        if not xdatas:
            raise InstrumentError(f"Nion scan returned no data within {self.timeout_s:g} s: is the scan running?")
        if not 0 <= self.channel < len(xdatas):
            raise InstrumentError(f"channel {self.channel} is not acquired ({len(xdatas)} channel(s) enabled)")
        x = xdatas[self.channel]
        image = np.asarray(x.data)
        if image.ndim != 2 or min(image.shape) < 2:
            raise InstrumentError(f"Nion scan returned a {image.shape} array, expected a 2-D image")
        if image.dtype.name not in ("uint8", "uint16", "float32"):
            image = image.astype(np.float32)
        meta = self._scan_meta(x)
        rows, cols = image.shape
        frame_time = rows * (cols * meta["dwell_us"] + meta["flyback_us"]) * 1e-6
        t_start = t_done - frame_time
        beam = self._shift_at(t_start + 0.5 * frame_time)
        frame = Frame(seq=self._seq, image=np.ascontiguousarray(image), t_start=t_start,
                      beam_shift_nm=(float(beam[0]), float(beam[1])), stream=self.stream, **meta)
        self._seq += 1
        return frame

    def _scan_meta(self, x: Any) -> dict:
        """A frame's scan metadata (``Frame`` fields) from one channel's xdata."""
        md = x.metadata or {}
        hsmd = md.get("hardware_source", {}) if isinstance(md, dict) else {}
        scmd = md.get("scan", {}) if isinstance(md, dict) else {}
        fp = self.hs.get_current_frame_parameters()
        dwell = float(hsmd.get("pixel_time_us", fp.pixel_time_us))
        fly = self.flyback_us
        if fly is None:
            fly_px = (scmd.get("scan_device_properties") or {}).get("flyback_pixels")
            fly = float(fly_px) * dwell if isinstance(fly_px, (int, float)) else DEFAULT_FLYBACK_US
        return dict(pixel_size_nm=self._pixel_size(x), dwell_us=dwell, flyback_us=fly,
                    scan_rotation_rad=float(scmd.get("rotation", fp.rotation_rad)),
                    detector=str(hsmd.get("channel_name", "HAADF")))

    # ------------------------------------------------------------------ strips

    def _next_strip(self) -> Strip:
        """The next strip of the running scan (waits up to ``timeout_s`` for it)."""
        if self._listener is None:
            channels = [self.hs.get_channel_id(i) for i in range(self.hs.get_channel_count())
                        if self.hs.get_channel_enabled(i)]
            if not 0 <= self.channel < len(channels):
                raise InstrumentError(f"channel {self.channel} is not acquired ({len(channels)} channel(s) enabled)")
            self._channel_id = channels[self.channel]
            self._listener = self.hs.data_channel_updated_event.listen(self._on_read)
        try:
            if not self._started or not self.hs.is_playing:
                self.hs.start_playing()
                self._started = True
        except Exception as exc:  # noqa: BLE001
            raise InstrumentError(f"Nion scan failed ({_one_line(exc)})") from None
        with self._strips_ready:
            if not self._strips_ready.wait_for(lambda: bool(self._strips), timeout=self.timeout_s):
                why = f" ({self.read_error})" if self.read_error else ""
                raise InstrumentError(f"Nion scan returned no rows within {self.timeout_s:g} s{why}: is the scan running?")
            cut, meta, line_s = self._strips.popleft()
        beam = self._shift_at(cut.t_start + (cut.row0 + 0.5 * len(cut.rows)) * line_s)
        image = cut.rows if cut.rows.dtype.name in ("uint8", "uint16", "float32") else cut.rows.astype(np.float32)
        strip = Strip(seq=cut.frame, row0=cut.row0, frame_rows=cut.frame_rows, image=image, t_start=cut.t_start,
                      beam_shift_nm=(float(beam[0]), float(beam[1])), stream=self.stream, **meta)
        if strip.last:
            self._seq = strip.seq + 1
        return strip

    def _on_read(self, args: Any, xdata: Any) -> None:
        """One partial read (the kit's acquisition thread): cut it, queue the strips. Never raises."""
        try:
            if getattr(args, "channel_id", None) != self._channel_id or getattr(args, "data_channel_id", None) != self._channel_id:
                return   # another channel, or a variant of this one (a subscan, the drift area)
            t_read = time.monotonic()
            data = np.asarray(xdata.data)
            if data.ndim != 2:
                return
            md = xdata.metadata or {}
            valid = (md.get("scan") or {}).get("valid_rows", (md.get("hardware_source") or {}).get("valid_rows"))
            complete = getattr(args, "state", "partial") == "complete"
            if valid is None:
                valid = data.shape[0] if complete else 0
            meta = self._scan_meta(xdata)
            line_s = (data.shape[1] * meta["dwell_us"] + meta["flyback_us"]) * 1e-6
            cut = self._cutter.update(data, int(valid), complete, t_read, line_s)
        except Exception as exc:  # noqa: BLE001 - an error here would stop Nion's acquisition thread
            self.read_error = _one_line(exc)
            return
        if not cut:
            return
        with self._strips_ready:
            self._strips.extend((c, meta, line_s) for c in cut)
            # four frames' worth waiting: the bridge is not taking them; the oldest go
            room = 4 * max(1, -(-cut[0].frame_rows // self.strip_lines))
            while len(self._strips) > room:
                self._strips.popleft()
                self.strips_dropped += 1
            self._strips_ready.notify_all()

    def _shift_at(self, t: float) -> np.ndarray:
        beam = self.get_beam_shift()
        with self._lock:
            for when, before in reversed(self._changes):
                if when <= t:
                    break
                beam = before
        return beam

    def _pixel_size(self, xdata: Any) -> tuple[float, float]:
        out = []
        for cal in list(xdata.dimensional_calibrations)[-2:]:
            factor = _UNIT_NM.get(str(cal.units or "").strip().lower())
            scale = float(cal.scale)
            if factor is None or not (math.isfinite(scale) and scale > 0):
                raise InstrumentError(f"the Nion frame is not calibrated in length units ({cal.units!r}): "
                                      f"check the scan device's calibration")
            out.append(scale * factor)
        return out[0], out[1]

    def get_beam_shift(self) -> np.ndarray:
        try:
            if self.correction_mode == "beam_shift":
                native = np.array([self.stem.GetVal("CSH.y"), self.stem.GetVal("CSH.x")], dtype=np.float64) * 1e9
            else:
                c = self.hs.get_current_frame_parameters().center_nm
                native = np.array([c.y, c.x], dtype=np.float64)
        except Exception as exc:  # noqa: BLE001
            raise InstrumentError(f"cannot read the Nion {self._what()} ({_one_line(exc)})") from None
        return np.linalg.solve(self._matrix(), native)

    def set_beam_shift(self, target_nm: np.ndarray) -> None:
        try:
            target = np.asarray(target_nm, dtype=np.float64).reshape(-1)
        except (TypeError, ValueError):
            target = np.full(1, np.nan)
        if target.shape != (2,) or not np.isfinite(target).all():
            raise InstrumentError(f"beam shift target must be two finite numbers (y, x) in nm, got {target_nm!r}")
        before = self.get_beam_shift()
        y, x = self._matrix() @ target
        try:
            if self.correction_mode == "beam_shift":
                for name, value in (("CSH.x", x * 1e-9), ("CSH.y", y * 1e-9)):
                    ok = (self.stem.SetValAndConfirm(name, float(value), 1.0, int(self.timeout_s * 1000))
                          if self.confirm else self.stem.SetVal(name, float(value)))
                    if ok is False:
                        raise InstrumentError(f"the Nion STEM controller refused {name} = {value:.4g} m")
            else:
                fp = self.hs.get_current_frame_parameters()
                fp.center_nm = self._geom.FloatPoint(y=float(y), x=float(x))
                self.hs.set_current_frame_parameters(fp)
        except InstrumentError:
            raise
        except Exception as exc:  # noqa: BLE001
            raise InstrumentError(f"Nion refused the {self._what()} ({_one_line(exc)})") from None
        with self._lock:
            self._changes.append((time.monotonic(), before))

    def hand_over_to_stage(self, shift_nm: np.ndarray) -> bool:
        """Move the stage by the specimen motion a beam shift of ``shift_nm`` (nm, (y, x), ours) caused.

        Through the STEM controller's stage controls ``stage_controls`` (x, y; metres; default
        ``("stage_position_m.x", "stage_position_m.y")``, the names nionswift-usim exposes, where
        the image offset is ``stage - beam shift``: the stage moves by ``stage_sign`` (-1) times the
        native beam shift). On a real Nion STEM the stage control names, axes and sign belong to the
        installation: pass ``stage_controls``/``stage_sign`` after checking them in Nion Swift; the
        stage is much coarser than the beam shift (backlash), which is why the engine re-references
        after a handover. Returns False (nothing moved) where the controls do not exist, and in
        ``scan_offset`` mode (only the beam shift is handed over). The bridge then sets the beam back."""
        if self.correction_mode != "beam_shift" or self.stage_controls is None:
            return False
        native = self._matrix() @ np.asarray(shift_nm, dtype=np.float64).reshape(2)  # (y, x) nm
        try:
            names = dict(zip(("x", "y"), self.stage_controls))
            values = {}
            for axis, name in names.items():
                ok, value = self.stem.TryGetVal(name)
                if not ok or value is None:
                    return False
                values[axis] = float(value)
            for axis, delta in (("x", native[1]), ("y", native[0])):
                if self.stem.SetVal(names[axis], values[axis] + self.stage_sign * delta * 1e-9) is False:
                    return False
        except Exception as exc:  # noqa: BLE001
            raise InstrumentError(f"Nion refused the stage move ({_one_line(exc)})") from None
        return True

    def _what(self) -> str:
        return "beam shift (CSH)" if self.correction_mode == "beam_shift" else "scan offset (center_nm)"

    def close(self) -> None:
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        if self._started:
            try:
                self.hs.stop_playing(sync_timeout=5.0)
            except Exception:  # noqa: BLE001 - closing must not raise
                pass
            self._started = False


# ---------------------------------------------------------------------- simulator


@dataclass
class UsimSession:
    """Nion's simulated STEM (nionswift-usim) registered headlessly in this process; ``close()`` it."""

    configuration: Any
    scan_hardware_source: Any
    instrument: Any  # the usim STEM controller (GetVal/SetVal, stage_position_m)
    settings_dir: Path | None = None  # a folder start_usim made for usim's settings: removed on close
    _closed: bool = field(default=False, repr=False)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        from nion.instrumentation import HardwareSource, scan_base  # noqa: PLC0415

        try:
            if self.scan_hardware_source.is_playing:
                self.scan_hardware_source.abort_playing(sync_timeout=5.0)
        finally:
            self.configuration.stop()
            scan_base.stop()
            HardwareSource.stop()
            HardwareSource.HardwareSourceManager().close()
            # the configuration also creates two simulated cameras whose threads run from the start
            # (Nion Swift closes them through camera_base, which a headless session does not run)
            for name in ("ronchigram_camera_device", "eels_camera_device"):
                camera = getattr(self.configuration, name, None)
                if camera is not None:
                    try:
                        camera.close()
                    except Exception:  # noqa: BLE001 - already closed
                        pass
            if self.settings_dir is not None:
                shutil.rmtree(self.settings_dir, ignore_errors=True)

    def __enter__(self) -> UsimSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def start_usim(sample_index: int = 1, settings_dir: str | Path | None = None) -> UsimSession:
    """Register nionswift-usim's STEM controller and scan device in this process, without Nion Swift's GUI.

    ``sample_index``: 0 flakes, 1 amorphous (the default: texture everywhere, fast), 2 gold
    balls on amorphous carbon (slow: about 1 s a frame). usim has no drift of its own: move
    ``session.instrument.stage_position_m`` to make some. One session per process at a time.
    """
    try:
        from nion.instrumentation import HardwareSource, scan_base  # noqa: PLC0415
        from nion.usim_device import DeviceConfiguration  # noqa: PLC0415
    except ImportError:
        raise InstrumentError(_MISSING) from None
    conf = DeviceConfiguration.AcquisitionContextConfiguration(sample_index=sample_index,
                                                               set_configuration_location=False)
    HardwareSource.run()
    own_dir = None if settings_dir else Path(tempfile.mkdtemp(prefix="stem-live-usim-"))
    scan_base.run(Path(settings_dir) if settings_dir else own_dir)
    conf.run()
    hs = HardwareSource.HardwareSourceManager().get_hardware_source_for_hardware_source_id(
        conf.scan_module.device.scan_device_id)
    if hs is None:
        conf.stop()
        scan_base.stop()
        HardwareSource.stop()
        if own_dir is not None:
            shutil.rmtree(own_dir, ignore_errors=True)
        raise InstrumentError("nionswift-usim did not register its scan device")
    session = UsimSession(conf, hs, conf.instrument, settings_dir=own_dir)
    # usim's camera and scan threads are not daemons: a forgotten session would keep the
    # interpreter from exiting. threading's own pre-shutdown hook (the one concurrent.futures
    # uses) closes it before Python waits for those threads.
    register = getattr(threading, "_register_atexit", None)
    if register is not None:
        register(session.close)
    return session


# ---------------------------------------------------------------------- command line


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``stem-live serve --instrument nion`` (all prefixed ``--nion-``)."""
    g = parser.add_argument_group("Nion instrument")
    g.add_argument("--nion-scan-device", default=None, metavar="ID", help="scan hardware source id (default: the first)")
    g.add_argument("--nion-usim", action="store_true", help="use Nion's simulated STEM (nionswift-usim), no GUI")
    g.add_argument("--nion-usim-sample", type=int, default=1, choices=(0, 1, 2),
                   help="usim sample: 0 flakes, 1 amorphous (default), 2 gold balls")
    g.add_argument("--nion-size", type=int, default=None, metavar="PX", help="frame side in pixels")
    g.add_argument("--nion-pixel-time-us", type=float, default=None, metavar="US", help="dwell time")
    g.add_argument("--nion-fov-nm", type=float, default=None, metavar="NM", help="field of view")
    g.add_argument("--nion-rotation-deg", type=float, default=None, metavar="DEG", help="scan rotation")
    g.add_argument("--nion-correction", choices=CORRECTION_MODES, default="beam_shift",
                   help="move the beam shift (CSH, default) or the scan offset (center_nm)")
    g.add_argument("--nion-acquisition", choices=ACQUISITION_MODES, default="continuous",
                   help="continuous view (default) or one recorded frame per call")
    g.add_argument("--nion-flyback-us", type=float, default=None, metavar="US",
                   help=f"flyback when the device does not report it (default {DEFAULT_FLYBACK_US:g} us)")
    g.add_argument("--nion-confirm", action="store_true", help="use SetValAndConfirm for CSH")
    g.add_argument("--nion-strips", type=int, default=0, metavar="LINES",
                   help="send every frame as strips of this many lines, cut from the scan's partial reads "
                        "(continuous acquisition; default 0: whole frames)")


def from_args(args: argparse.Namespace) -> NionInstrument:
    """Build the instrument from :func:`add_args` options; ``--nion-usim`` starts the simulator first
    (closed with the instrument). ``frames`` is taken from ``args.count`` when present."""
    session = start_usim(args.nion_usim_sample) if args.nion_usim else None
    try:
        inst = NionInstrument(
            session.scan_hardware_source if session else None,
            scan_device_id=args.nion_scan_device, size=args.nion_size, pixel_time_us=args.nion_pixel_time_us,
            fov_nm=args.nion_fov_nm,
            rotation_rad=None if args.nion_rotation_deg is None else math.radians(args.nion_rotation_deg),
            correction_mode=args.nion_correction, acquisition=args.nion_acquisition, flyback_us=args.nion_flyback_us,
            confirm=args.nion_confirm, frames=getattr(args, "count", None), strip_lines=max(0, args.nion_strips))
    except BaseException:
        if session:
            session.close()
        raise
    if session is not None:
        close = inst.close

        def close_all() -> None:
            close()
            session.close()

        inst.close = close_all  # type: ignore[method-assign]
    return inst
