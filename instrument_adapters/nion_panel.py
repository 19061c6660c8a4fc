"""The logic of the stem-live panel in Nion Swift, free of Swift's UI: a bridge on a Swift scan device.

:class:`PanelController` starts a :class:`~instrument_adapters.bridge.Bridge` over a
:class:`~instrument_adapters.nion.NionInstrument` on a scan hardware source of this process (the
STEM controller's current scan device, or one named by id), arms and disarms correction, stops it,
and answers :meth:`PanelController.status` with a :class:`PanelStatus` snapshot. The Swift panel
(``nionswift_plugin/stem_live``) is a thin layer over it; from Swift's Python console the
controller can be used alone.

Arming throws two switches together: the bridge's own gate (while disarmed it answers every
correction with an error ack and never moves the beam, whatever the engine sends) and the engine's
``arm`` command on its commands endpoint. Disarming, stopping and a failed start close the gate
first. The engine's state comes from its ``status`` command, asked once a second by a thread that
owns the REQ socket, so no call here waits on the engine.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from instrument_adapters.actuator import CalibratedInstrument, load_matrix
from instrument_adapters.base import Instrument, InstrumentError
from instrument_adapters.bridge import CORRECTIONS_ENDPOINT, FRAMES_ENDPOINT, Bridge
from instrument_adapters.nion import CORRECTION_MODES, NionInstrument
from instrument_adapters.safety import Limits
from stem_live import protocol
from stem_live.protocol import Ack, Command, Correction, ProtocolError, Reply

#: the engine's commands endpoint (``stem-live run --commands``)
COMMANDS_ENDPOINT = "tcp://127.0.0.1:5558"
#: how often the engine is asked for its status (s)
STATUS_INTERVAL_S = 1.0
#: how long a command waits for the engine's reply (s)
REPLY_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class PanelSettings:
    """What the panel starts the bridge with. Endpoints as for ``stem-live serve`` (frames, corrections:
    bound here; commands: the engine's, connected to). ``scan_device_id`` ``""``: the current scan
    device. Limits in nm. ``actuator_calibration``: a ``stem-live calibrate --actuator`` file (``""``:
    none); ``stage_handover``: at the excursion budget the stage takes the shift over (as
    ``--stage-handover``). ``server_key`` / ``allowed_keys``: CURVE files, both or neither.
    ``strip_lines`` > 0: every frame goes out as strips of that many lines as it is scanned (as
    ``--nion-strips``; the engine corrects per strip with ``run --strip-corrections``)."""

    frames_endpoint: str = FRAMES_ENDPOINT
    corrections_endpoint: str = CORRECTIONS_ENDPOINT
    commands_endpoint: str = COMMANDS_ENDPOINT
    scan_device_id: str = ""
    correction_mode: str = "beam_shift"
    max_step_nm: float = 0.5
    max_excursion_nm: float = 10.0
    restore_on_stop: bool = True
    actuator_calibration: str = ""
    stage_handover: bool = False
    server_key: str = ""
    allowed_keys: str = ""
    strip_lines: int = 0

    def check(self) -> None:
        """Raise :class:`InstrumentError` (one line, what to change) for a setting that cannot work."""
        for name in ("frames_endpoint", "corrections_endpoint", "commands_endpoint"):
            value = getattr(self, name)
            if not value.startswith(("tcp://", "ipc://", "inproc://")):
                raise InstrumentError(f"{name.replace('_', ' ')} must look like tcp://127.0.0.1:5555, got {value!r}")
        if self.correction_mode not in CORRECTION_MODES:
            raise InstrumentError(f"correction must be one of {', '.join(CORRECTION_MODES)}, got {self.correction_mode!r}")
        for name in ("max_step_nm", "max_excursion_nm"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise InstrumentError(f"{name.replace('_nm', '').replace('_', ' ')} must be a positive number of nm, "
                                      f"got {value!r}")
        if not (isinstance(self.strip_lines, int) and self.strip_lines >= 0):
            raise InstrumentError(f"strip lines must be a whole number >= 0 (0: whole frames), got {self.strip_lines!r}")
        if bool(self.server_key) != bool(self.allowed_keys):
            raise InstrumentError("CURVE needs both the server key (NAME.key_secret) and the allowed-keys folder")


@dataclass(frozen=True)
class PanelStatus:
    """A snapshot for display. Shifts in nm (y, x); ``excursion_nm``: distance of the beam from where the
    bridge started, after the last correction; ``engine``: one line about the engine."""

    running: bool = False
    armed: bool = False
    scan_device: str = ""
    frames_sent: int = 0
    strips_sent: int = 0   # a strip stream (Strip lines > 0): the strips its frames went out in
    frames_dropped: int = 0
    corrections_applied: int = 0
    corrections_clamped: int = 0
    corrections_refused: int = 0
    last_correction_nm: tuple[float, float] | None = None  # the move the last applied correction made
    beam_offset_nm: tuple[float, float] = (0.0, 0.0)  # beam shift minus the starting one, after the last correction
    excursion_nm: float = 0.0
    excursion_budget_nm: float = 0.0
    engine: str = "not connected"
    engine_armed: bool | None = None  # None: the engine did not answer (yet)
    warning: str = ""
    last_error: str = ""


def scan_devices() -> list[tuple[str, str]]:
    """``(hardware_source_id, display name)`` of every scanning device in this process."""
    try:
        from nion.instrumentation import HardwareSource
    except ImportError:
        return []
    return [(hs.hardware_source_id, str(getattr(hs, "display_name", hs.hardware_source_id)))
            for hs in HardwareSource.HardwareSourceManager().hardware_sources
            if getattr(hs, "features", {}).get("is_scanning")]


def find_scan_device(device_id: str = "") -> Any:
    """The scan hardware source ``device_id``; ``""``: the STEM controller's current scan device, else the first."""
    try:
        from nion.instrumentation import HardwareSource
        from nion.utils import Registry
    except ImportError:
        raise InstrumentError("Nion Swift's instrumentation kit is not installed: pip install 'stem-live[nion]'") from None
    mgr = HardwareSource.HardwareSourceManager()
    if device_id:
        hs = mgr.get_hardware_source_for_hardware_source_id(device_id)
        if hs is None:
            found = ", ".join(i for i, _ in scan_devices()) or "none"
            raise InstrumentError(f"no scan device {device_id!r} in this Swift (found: {found})")
        return hs
    stem = Registry.get_component("stem_controller")
    hs = getattr(stem, "scan_controller", None) if stem is not None else None
    if hs is not None:
        return hs
    for hs in mgr.hardware_sources:
        if getattr(hs, "features", {}).get("is_scanning"):
            return hs
    raise InstrumentError("no scan device in this Swift: is the microscope's scan plug-in loaded?")


class _RecordingBridge(Bridge):
    """A bridge that remembers what the last applied correction did."""

    last_correction_nm: tuple[float, float] | None = None
    last_applied_nm: np.ndarray | None = None

    def apply(self, corr: Correction, *, peer: bytes = b"") -> Ack:
        with self._lock:
            before = np.asarray(self.instrument.get_beam_shift(), dtype=np.float64)
        ack = super().apply(corr, peer=peer)
        if not ack.error:
            applied = np.asarray(ack.applied_nm, dtype=np.float64)
            step = applied - before
            self.last_correction_nm = (float(step[0]), float(step[1]))
            self.last_applied_nm = applied
        return ack


@dataclass
class _EngineState:
    text: str = "not connected"
    armed: bool | None = None
    error: str = ""


class _EngineLink:
    """A thread with a REQ socket on the engine's commands endpoint: queued commands first, else
    ``status`` every ``interval_s``. A reply lost for ``timeout_s`` resets the socket."""

    def __init__(self, ctx: Any, endpoint: str, *, interval_s: float = STATUS_INTERVAL_S,
                 timeout_s: float = REPLY_TIMEOUT_S) -> None:
        self.ctx, self.endpoint, self.interval_s, self.timeout_s = ctx, endpoint, interval_s, timeout_s
        self.state = _EngineState()
        self._lock = threading.Lock()
        self._queue: queue.Queue[Command | None] = queue.Queue()
        self._closing = False
        self._req: Any = None
        self._thread = threading.Thread(target=self._run, name="stem-live-engine-link", daemon=True)

    def start(self) -> _EngineLink:
        self._thread.start()
        return self

    def send(self, cmd: Command) -> None:
        self._queue.put(cmd)

    def close(self, timeout: float = 3.0) -> None:
        """Send what is queued (briefly waiting for replies), then close the socket and end the thread."""
        self._closing = True
        self._queue.put(None)
        self._thread.join(timeout)

    def snapshot(self) -> _EngineState:
        with self._lock:
            return replace(self.state)

    def _socket(self) -> Any:
        import zmq

        if self._req is None:
            self._req = self.ctx.socket(zmq.REQ)
            self._req.setsockopt(zmq.LINGER, 0)
            self._req.connect(self.endpoint)
        return self._req

    def _reset(self) -> None:
        if self._req is not None:
            self._req.close(0)
            self._req = None

    def _run(self) -> None:
        try:
            while True:
                try:
                    cmd = self._queue.get(timeout=self.interval_s)
                except queue.Empty:
                    cmd = Command(cmd="status")
                if cmd is None:
                    return
                self._exchange(cmd)
        finally:
            self._reset()

    def _exchange(self, cmd: Command) -> None:
        import zmq

        timeout = min(self.timeout_s, 0.5) if self._closing else self.timeout_s
        try:
            sock = self._socket()
            protocol.send(sock, cmd, flags=zmq.NOBLOCK)
            if not sock.poll(int(timeout * 1000)):
                self._reset()  # a REQ socket that lost its reply never sends again
                self._set(None, f"no reply from the engine on {self.endpoint} in {timeout:g} s: is `stem-live run` "
                                f"running with --commands-endpoint {self.endpoint}?")
                return
            reply = protocol.recv(sock)
        except (zmq.ZMQError, ProtocolError) as exc:
            self._reset()
            self._set(None, f"engine link on {self.endpoint}: {exc}")
            return
        if not isinstance(reply, Reply):
            self._set(None, f"the engine answered '{cmd.cmd}' with a {type(reply).__name__.lower()}")
            return
        self._set(reply, "" if reply.ok else f"engine refused '{cmd.cmd}': {reply.message}")

    def _set(self, reply: Reply | None, error: str) -> None:
        """The reply, or (``reply`` None) why there is none: that goes to the engine line, not the error."""
        with self._lock:
            if reply is None:
                self.state.text, self.state.armed, self.state.error = error, None, ""
                return
            self.state.error = error
            self.state.text = engine_text(reply)
            armed = reply.state.get("armed")
            self.state.armed = bool(armed) if armed is not None else None


def engine_text(reply: Reply) -> str:
    """One line from the engine's ``status`` state: armed, frames processed, skipped, lock, banner."""
    st = reply.state
    counters = st.get("counters") if isinstance(st.get("counters"), dict) else {}
    parts = ["armed" if st.get("armed") else "disarmed"]
    if st.get("frames") is not None:
        parts.append(f"{st['frames']} frames processed")
    if counters.get("skipped"):
        parts.append(f"{counters['skipped']} skipped")
    if st.get("locked") is False:
        parts.append("lock lost")
    banner = st.get("banner") or st.get("instrument_warning")
    if banner:
        parts.append(str(banner))
    if not reply.ok and reply.message:
        parts.append(reply.message)
    return ", ".join(parts)


class PanelController:
    """Start/stop a bridge on a Swift scan device, arm/disarm, and report.

    Call from one thread (Swift's UI thread). ``context``: the ZeroMQ context (default the
    process-wide one); ``status_interval_s``: how often the engine is asked for its status (s);
    ``reply_timeout_s``: how long a command waits for the engine's reply (s).
    """

    def __init__(self, *, context: Any = None, status_interval_s: float = STATUS_INTERVAL_S,
                 reply_timeout_s: float = REPLY_TIMEOUT_S) -> None:
        self._ctx = context
        self.status_interval_s = status_interval_s
        self.reply_timeout_s = reply_timeout_s
        self.settings = PanelSettings()
        self.bridge: _RecordingBridge | None = None
        self.instrument: Instrument | None = None
        self._link: _EngineLink | None = None
        self._scan_device = ""
        self._error = ""
        self._final = PanelStatus()  # the last snapshot before the bridge stopped

    @property
    def running(self) -> bool:
        return self.bridge is not None

    @property
    def armed(self) -> bool:
        return self.bridge is not None and self.bridge.accept_corrections

    def start(self, settings: PanelSettings | None = None) -> None:
        """Start the bridge (disarmed) with ``settings``; raises :class:`InstrumentError` with what to do."""
        if self.running:
            raise InstrumentError("the bridge is already running: stop it first")
        settings = settings or self.settings
        try:
            settings.check()
            keys = None
            if settings.server_key:
                from stem_live.security import ServerKeys

                keys = ServerKeys(settings.server_key, settings.allowed_keys)
            matrix = load_matrix(settings.actuator_calibration) if settings.actuator_calibration else None
            hs = find_scan_device(settings.scan_device_id)
            inst: Instrument = NionInstrument(hs, correction_mode=settings.correction_mode,
                                              strip_lines=settings.strip_lines)
            try:
                if matrix is not None:
                    inst = CalibratedInstrument(inst, matrix)
                bridge = _RecordingBridge(
                    inst, frames_endpoint=settings.frames_endpoint, corrections_endpoint=settings.corrections_endpoint,
                    limits=Limits(max_step_nm=float(settings.max_step_nm), max_excursion_nm=float(settings.max_excursion_nm)),
                    accept_corrections=False, keys=keys, context=self._ctx, stage_handover=settings.stage_handover)
            except BaseException:
                inst.close()
                raise
        except InstrumentError as exc:
            self._error = str(exc)
            raise
        self.settings, self.instrument, self.bridge = settings, inst, bridge
        self._scan_device = str(hs.hardware_source_id)
        self._error = ""
        import zmq

        self._link = _EngineLink(self._ctx or zmq.Context.instance(), settings.commands_endpoint,
                                 interval_s=self.status_interval_s, timeout_s=self.reply_timeout_s).start()
        bridge.start()

    def arm(self) -> None:
        """Let corrections through the bridge and arm the engine."""
        if self.bridge is None:
            raise InstrumentError("start the bridge before arming")
        self.bridge.accept_corrections = True
        if self._link is not None:
            self._link.send(Command(cmd="arm"))

    def disarm(self) -> None:
        """Refuse every correction from now on and disarm the engine."""
        if self.bridge is None:
            return
        self.bridge.accept_corrections = False
        if self._link is not None:
            self._link.send(Command(cmd="disarm"))

    def stop(self) -> None:
        """Disarm, stop the bridge (restoring the starting beam shift when the settings say so), close the scan."""
        bridge, inst, link = self.bridge, self.instrument, self._link
        if bridge is None:
            return
        was_armed = bridge.accept_corrections
        bridge.accept_corrections = False
        if link is not None and was_armed:
            link.send(Command(cmd="disarm"))
        try:
            bridge.stop()
            if self.settings.restore_on_stop:
                bridge.restore()
        except InstrumentError as exc:
            start = bridge.start_shift_nm
            self._error = (f"could not restore the starting beam shift [{start[0]:+.3f}, {start[1]:+.3f}] nm ({exc}): "
                           "set it back by hand")
        finally:
            self._final = self.status()
            self.bridge = self.instrument = self._link = None
            if inst is not None:
                inst.close()
            if link is not None:
                link.close()

    def status(self) -> PanelStatus:
        """What to show now (never waits on the instrument or the engine)."""
        bridge = self.bridge
        if bridge is None:
            return replace(self._final, running=False, armed=False, engine="not connected", engine_armed=None,
                           last_error=self._error or self._final.last_error)
        s = bridge.stats
        link = self._link.snapshot() if self._link is not None else _EngineState()
        offset = (0.0, 0.0)
        if bridge.last_applied_nm is not None:
            d = bridge.last_applied_nm - bridge.start_shift_nm
            offset = (float(d[0]), float(d[1]))
        return PanelStatus(
            running=True, armed=bridge.accept_corrections, scan_device=self._scan_device,
            frames_sent=s.frames_published, strips_sent=s.strips_published, frames_dropped=s.frames_dropped,
            corrections_applied=s.corrections_applied, corrections_clamped=s.corrections_clamped,
            corrections_refused=s.corrections_refused, last_correction_nm=bridge.last_correction_nm,
            beam_offset_nm=offset, excursion_nm=s.excursion_nm, excursion_budget_nm=bridge.limits.max_excursion_nm,
            engine=link.text, engine_armed=link.armed, warning=s.budget_warning,
            last_error=self._error or s.last_error or link.error)

    def wait_frames(self, n: int, timeout_s: float = 10.0) -> bool:
        """Wait until ``n`` frames were sent (console, tests); False on timeout."""
        t_end = time.monotonic() + timeout_s
        while time.monotonic() < t_end:
            bridge = self.bridge
            if bridge is None:
                return False
            if bridge.stats.frames_published >= n:
                return True
            time.sleep(0.01)
        return False
