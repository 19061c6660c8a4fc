"""Serve any :class:`~instrument_adapters.base.Instrument` over the stem-live protocol.

Two threads:
- the *acquisition* thread calls ``instrument.acquire()`` back to back and hands each frame
  to the socket thread through a small queue (never blocking the instrument in live mode:
  when the queue is full the oldest frame is dropped and counted);
- the *socket* thread owns both sockets: it publishes frames on PUB and answers every
  correction arriving on ROUTER with an ``ack`` after clamping it (:mod:`.safety`).

The instrument side owns the limits: corrections are clamped to a maximum step and a
maximum excursion from the starting beam shift, non-finite values are refused, stale or
replayed corrections are refused, and :meth:`Bridge.restore` returns the beam to where the
session started.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from instrument_adapters.base import EndOfStream, Instrument, InstrumentError
from instrument_adapters.safety import Limits, clamp_path, clamp_target
from stem_live import protocol
from stem_live.protocol import Ack, Correction, Frame, ProtocolError, Strip
from stem_live.security import KeyFileError, ServerKeys, is_loopback

log = logging.getLogger("stem_live.bridge")

FRAMES_ENDPOINT = "tcp://127.0.0.1:5555"
CORRECTIONS_ENDPOINT = "tcp://127.0.0.1:5556"


def check_bind(endpoint: str, keys: ServerKeys | None = None) -> None:
    """Refuse to bind anything but loopback unless CURVE keys are given."""
    if keys is None and not is_loopback(endpoint):
        raise InstrumentError(f"refusing to bind {endpoint}: only loopback addresses (127.0.0.1) may be bound "
                              "without CURVE keys (make them with `stem-live keys`, then pass --server-key and "
                              "--allowed-keys)")


@dataclass
class BridgeStats:
    """Counters the bridge keeps; read them from any thread."""

    frames_published: int = 0   # whole frames (a strip stream: frames whose last strip went out)
    strips_published: int = 0
    frames_dropped: int = 0     # messages (frames or strips) the engine was too slow to take
    corrections_applied: int = 0
    corrections_clamped: int = 0
    corrections_refused: int = 0
    messages_rejected: int = 0
    last_error: str = ""
    acquire_errors: int = 0
    finished: bool = False
    reasons: dict[str, int] = field(default_factory=dict)
    excursion_nm: float = 0.0  # distance of the beam from the start after the last correction (nm)
    budget_warning: str = ""  # set while the excursion is above WARN_FRACTION of the budget
    budget_reached: int = 0  # times the excursion budget was reached (correction disarmed)
    stage_handovers: int = 0  # times the stage took the accumulated shift over


#: fraction of the excursion budget (``--max-excursion-nm``) at which the bridge warns
WARN_FRACTION = 0.8
#: below this fraction of the budget a spent budget counts as recentred: corrections are accepted again
RECENTRED_FRACTION = 0.5
BUDGET_REACHED = ("excursion budget reached ({budget:g} nm from the start): correction disarmed; recentre the specimen "
                  "with the stage, restore the beam (stem-live run --restore-on-exit, Ctrl-C), then arm again "
                  "(or serve with --stage-handover, or a larger --max-excursion-nm)")


class Bridge:
    """Publish an instrument's frames and apply (clamped) corrections sent back to it.

    ``accept_corrections=False`` acks every correction with an error and never moves the beam.
    ``wait_for_subscriber=True`` holds the first acquisition until a subscriber has connected
    (demo, tests: nothing is lost to ZeroMQ's slow-joiner effect).

    Excursion budget (``limits.max_excursion_nm``): above :data:`WARN_FRACTION` of it every ack
    carries a warning (and the log says so once); when a correction reaches it, either the stage
    takes the accumulated shift over (``stage_handover=True`` and the instrument can: the beam goes
    back to the start, the ack's warning says ``stage handover``, and corrections computed before
    it are refused) or the budget is spent: the ack says :data:`BUDGET_REACHED` (the engine
    disarms) and only corrections back towards the start are accepted until the beam is within
    :data:`RECENTRED_FRACTION` of the budget again.
    """

    def __init__(
        self,
        instrument: Instrument,
        *,
        frames_endpoint: str = FRAMES_ENDPOINT,
        corrections_endpoint: str = CORRECTIONS_ENDPOINT,
        limits: Limits = Limits(),
        accept_corrections: bool = True,
        queue_frames: int = 4,
        wait_for_subscriber: bool = False,
        keys: ServerKeys | None = None,
        context: object | None = None,
        stage_handover: bool = False,
    ) -> None:
        import zmq

        check_bind(frames_endpoint, keys)
        check_bind(corrections_endpoint, keys)
        self.instrument = instrument
        self.limits = limits
        self.accept_corrections = accept_corrections
        self.stage_handover = stage_handover
        self.stats = BridgeStats()
        self._budget_spent = False
        self._handover_seq = -1  # corrections for frames up to this one predate the last stage handover
        self.start_shift_nm = np.asarray(instrument.get_beam_shift(), dtype=np.float64).copy()
        self._ctx = context or zmq.Context.instance()
        self._auth = None
        if keys is not None:
            try:
                self._auth = keys.start_authenticator(self._ctx)
            except KeyFileError as exc:
                raise InstrumentError(str(exc)) from None
        self._pub = self._ctx.socket(zmq.XPUB)  # XPUB: a PUB that also sees subscriptions arrive
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 8 if not instrument.lossless else 0)
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        try:
            if keys is not None:
                keys.apply(self._pub)
                keys.apply(self._router)
            self._pub.bind(frames_endpoint)
            self._router.bind(corrections_endpoint)
        except (zmq.ZMQError, KeyFileError) as exc:
            self._pub.close()
            self._router.close()
            if self._auth is not None:
                self._auth.stop()
            if isinstance(exc, KeyFileError):
                raise InstrumentError(str(exc)) from None
            raise InstrumentError(f"cannot bind {frames_endpoint} / {corrections_endpoint}: {exc} "
                                  "(is another bridge running? pick other ports)") from None
        self.frames_endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.corrections_endpoint = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        # lossless (replay): bounded, the acquisition waits; live: bounded by _put to queue_frames
        # frames' worth of messages (a frame's strips count as one frame)
        self.queue_frames = int(queue_frames)
        self._frames: queue.Queue[Frame | Strip | None] = queue.Queue(maxsize=queue_frames if instrument.lossless else 0)
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        if not wait_for_subscriber:
            self._subscribed.set()
        self._lock = threading.Lock()  # serialises calls into the instrument
        self._last_seq = -1
        self._line_time_s = float("nan")   # the last frame's line time: a trajectory is followed line by line
        self._last_id: dict[bytes, int] = {}
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Bridge:
        for target, name in ((self._acquire_loop, "bridge-acquire"), (self._socket_loop, "bridge-sockets")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, *, restore: bool = False, timeout: float = 5.0) -> None:
        """Stop both threads, optionally restore the starting beam shift, close sockets."""
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
        if restore:
            self.restore()
        self._pub.close(0)
        self._router.close(0)
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def __enter__(self) -> Bridge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def finished(self) -> bool:
        """True once a finite source has delivered its last frame and it was published."""
        return self.stats.finished

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until a finite source has been published entirely."""
        t0 = time.monotonic()
        while not self.stats.finished and not self._stop.is_set():
            if timeout is not None and time.monotonic() - t0 > timeout:
                return False
            time.sleep(0.01)
        return self.stats.finished

    def restore(self) -> None:
        """Move the beam back to the shift it had when the bridge started."""
        with self._lock:
            self.instrument.set_beam_shift(self.start_shift_nm.copy())

    # ------------------------------------------------------------------ threads

    def _acquire_loop(self) -> None:
        while not self._subscribed.wait(0.05):  # optionally hold the first frame until someone listens
            if self._stop.is_set():
                return
        while not self._stop.is_set():
            try:
                frame = self.instrument.acquire()
            except EndOfStream:
                self._put(None)
                return
            except Exception as exc:  # a failing instrument must not kill the bridge
                self.stats.acquire_errors += 1
                self.stats.last_error = f"acquire failed: {exc}"
                log.error("instrument acquire failed: %s (retrying in 0.5 s)", exc)
                time.sleep(0.5)
                continue
            self._put(frame)

    def _put(self, frame: Frame | Strip | None) -> None:
        if self.instrument.lossless or frame is None:
            while not self._stop.is_set():
                try:
                    self._frames.put(frame, timeout=0.05)
                    return
                except queue.Full:
                    continue
            return
        # live: never block the microscope; drop the oldest pending messages past the bound
        per_frame = -(-frame.frame_rows // frame.image.shape[0]) if isinstance(frame, Strip) else 1
        while self._frames.qsize() >= self.queue_frames * per_frame:
            try:
                self._frames.get_nowait()
                self.stats.frames_dropped += 1
            except queue.Empty:
                break
        self._frames.put_nowait(frame)

    def _socket_loop(self) -> None:
        import zmq

        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        while not self._stop.is_set():
            while self._pub.poll(0):
                if bytes(self._pub.recv())[:1] == b"\x01":  # subscribe (0x00 would be unsubscribe)
                    self._subscribed.set()
            for _ in range(64):  # drain corrections first: they are small and urgent
                if not poller.poll(0):
                    break
                self._handle_correction(self._router.recv_multipart(copy=False))
            try:
                frame = self._frames.get(timeout=0.002)
            except queue.Empty:
                continue
            if frame is None:
                self.stats.finished = True
                continue
            try:
                protocol.send(self._pub, frame, flags=0 if self.instrument.lossless else zmq.NOBLOCK)
                self._last_seq = frame.seq
                self._line_time_s = frame.line_time_s
                strip = isinstance(frame, protocol.Strip)
                self.stats.frames_published += int(not strip or frame.last)
                self.stats.strips_published += int(strip)
            except zmq.Again:
                self.stats.frames_dropped += 1

    def _reject(self, reason: str) -> None:
        self.stats.messages_rejected += 1
        key = reason.split(":")[0][:60]
        self.stats.reasons[key] = self.stats.reasons.get(key, 0) + 1
        self.stats.last_error = reason
        if self.stats.messages_rejected <= 20 or self.stats.messages_rejected % 1000 == 0:  # a flood is counted, not logged line by line
            log.warning("rejected message (%d so far): %s", self.stats.messages_rejected, reason)

    def _handle_correction(self, parts: list) -> None:
        if len(parts) < 2:
            self._reject("message without routing identity")
            return
        ident, body = parts[0], parts[1:]
        ident_b = bytes(ident.buffer if hasattr(ident, "buffer") else ident)
        try:
            msg = protocol.decode(body)
        except ProtocolError as exc:
            self._reject(str(exc))
            return
        if not isinstance(msg, Correction):
            self._reject(f"expected a correction, got {type(msg).__name__.lower()}")
            return
        ack = self.apply(msg, peer=ident_b)
        self._router.send_multipart([ident_b, *protocol.encode(ack)])

    def apply(self, corr: Correction, *, peer: bytes = b"") -> Ack:
        """Check, clamp and apply one correction; always returns the ``ack`` to send."""
        with self._lock:
            current = np.asarray(self.instrument.get_beam_shift(), dtype=np.float64)
        if not self.accept_corrections:
            return self._refuse(corr, current, "corrections are disabled on this instrument")
        if corr.id <= self._last_id.get(peer, -1):
            return self._refuse(corr, current, f"correction id {corr.id} was already seen (replayed)")
        self._last_id[peer] = corr.id
        if self._last_seq >= 0 and (corr.for_seq > self._last_seq
                                    or corr.for_seq < self._last_seq - self.limits.stale_frames):
            return self._refuse(corr, current, f"correction for frame {corr.for_seq} is stale "
                                               f"(last frame sent: {self._last_seq})")
        if corr.for_seq <= self._handover_seq:
            return self._refuse(corr, current, f"correction for frame {corr.for_seq} predates the stage handover "
                                               f"after frame {self._handover_seq}")
        path = None
        if corr.trajectory is not None and self.instrument.follows_paths:
            path = clamp_path(corr.trajectory.t_s, corr.trajectory.beam_shift_nm, self._line_time_s, current,
                              self.start_shift_nm, self.limits)
            d = path
            end = path.applied_nm[-1]   # where the path leaves the beam
        else:   # a single shift (an instrument that cannot follow a path applies the correction's one shift)
            d = clamp_target(np.asarray(corr.beam_shift_nm), current, self.start_shift_nm, self.limits)
            end = d.applied_nm
        if d.error:
            return self._refuse(corr, current, d.error)
        budget = self.limits.max_excursion_nm
        now_exc = float(np.hypot(*(current - self.start_shift_nm)))
        new_exc = float(np.hypot(*(end - self.start_shift_nm)))
        if self._budget_spent and new_exc >= now_exc - 1e-9:  # only moves back towards the start
            return self._refuse(corr, current, BUDGET_REACHED.format(budget=budget))
        try:
            with self._lock:
                if path is not None:
                    self.instrument.follow_path(path.t_s, path.applied_nm)
                else:
                    self.instrument.set_beam_shift(d.applied_nm)
        except Exception as exc:
            return self._refuse(corr, current, f"instrument failed to move the beam: {exc}")
        self.stats.corrections_applied += 1
        self.stats.corrections_clamped += int(d.clamped)
        applied, warning = self._budget(np.asarray(end, np.float64), new_exc)
        return Ack(id=corr.id, applied_nm=(float(applied[0]), float(applied[1])), clamped=d.clamped, warning=warning)

    def _budget(self, applied: np.ndarray, excursion: float) -> tuple[np.ndarray, str]:
        """After a move to ``applied`` (``excursion`` nm from the start): the stage handover, the
        spent budget, or the 80 % warning. Returns where the beam is now and the ack's warning."""
        budget = self.limits.max_excursion_nm
        if self._budget_spent and excursion <= RECENTRED_FRACTION * budget:
            self._budget_spent = False
            log.warning("beam back within %.0f %% of the excursion budget: corrections accepted again",
                        100 * RECENTRED_FRACTION)
        if excursion >= budget * (1 - 1e-9) and not self._budget_spent:
            if self.stage_handover and self._hand_over(applied - self.start_shift_nm):
                self.stats.excursion_nm = 0.0
                self.stats.budget_warning = ""
                return self.start_shift_nm.copy(), (f"stage handover: the stage took over {excursion:.2f} nm of beam "
                                                    "shift and the beam is back at the start; the engine re-references")
            self._budget_spent = True
            self.stats.budget_reached += 1
            self.stats.last_error = BUDGET_REACHED.format(budget=budget)
            log.warning("%s", self.stats.last_error)
        self.stats.excursion_nm = excursion
        if self._budget_spent:
            return applied, BUDGET_REACHED.format(budget=budget)
        if excursion >= WARN_FRACTION * budget:
            text = (f"beam shift {excursion:.2f} nm from the start: {100 * excursion / budget:.0f} % of the {budget:g} nm "
                    "excursion budget (at 100 % correction disarms; recentre with the stage, or serve with "
                    "--stage-handover)")
            if not self.stats.budget_warning:
                log.warning("%s", text)
            self.stats.budget_warning = text
            return applied, text
        self.stats.budget_warning = ""
        return applied, ""

    def _hand_over(self, shift_nm: np.ndarray) -> bool:
        """Ask the instrument's stage to take ``shift_nm`` over, then set the beam back to the start."""
        try:
            with self._lock:
                if not self.instrument.hand_over_to_stage(shift_nm.copy()):
                    return False
                self.instrument.set_beam_shift(self.start_shift_nm.copy())
        except Exception as exc:  # noqa: BLE001 - a failed handover falls back to the spent budget
            log.error("stage handover failed: %s", exc)
            return False
        self._handover_seq = self._last_seq
        self.stats.stage_handovers += 1
        log.warning("stage handover: %.2f nm of beam shift moved to the stage after frame %d; beam back at the start",
                    float(np.hypot(*shift_nm)), self._last_seq)
        return True

    def _refuse(self, corr: Correction, current: np.ndarray, error: str) -> Ack:
        self.stats.corrections_refused += 1
        self.stats.last_error = error
        log.warning("correction %d refused: %s", corr.id, error)
        return Ack(id=corr.id, applied_nm=(float(current[0]), float(current[1])), clamped=False, error=error)
