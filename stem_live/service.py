"""Sockets and threads around the :class:`~stem_live.engine.Engine`: live, replay, commands.

Threads (each owns its sockets; ZeroMQ sockets are not thread-safe):
- *receiver*: SUB on the instrument's frames; keeps only the newest pending frame (live) and
  counts what it overwrote; rejects bad messages with a one-line log and a counter;
- *worker*: runs the engine on the pending frame, sends corrections on a DEALER connected to
  the instrument's ROUTER, reads acks, publishes ``maps`` (rate-limited) on PUB;
- *commands*: REP answering ``command`` messages (arm, disarm, reset, record, set, status, train).

Replay does not go through sockets at all: :func:`run_replay` feeds every frame of a file to the
engine in order (lossless) while still publishing maps and answering commands.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stem_live import protocol
from stem_live.actuator_response import ActuatorMonitor
from stem_live.engine import Engine, FrameRefused, FrameResult
from stem_live.heap import SETTLE_AFTER_FRAMES, settle_heap
from stem_live.protocol import Ack, Command, Frame, Maps, ProtocolError, Reply, Strip
from stem_live.security import ClientKeys, is_loopback
from stem_live.service_state import Counters, LatestSlot, Recorder, gp_arrays, worth_logging
from stem_live.strips import StripAssembler

log = logging.getLogger("stem_live.service")

MAPS_ENDPOINT = "tcp://127.0.0.1:5557"
COMMANDS_ENDPOINT = "tcp://127.0.0.1:5558"


# how often an idle helper thread (receiver, commands, rVAE) wakes to check for stop: every
# wake-up takes the GIL from the frame thread (1024 px, 10 Hz: latency p50 / p99 106 / 158 ms;
# 2 Hz: 93 / 130 ms); stop() waits up to this long
IDLE_POLL_MS = 500
# frames stopping for longer than this (or 3 frame times, whichever is longer) disarm the correction
SILENCE_S = 2.0


class EngineService:
    """Run an engine live against an instrument's endpoints; publish maps; answer commands."""

    def __init__(
        self,
        engine: Engine,
        *,
        frames_endpoint: str = "tcp://127.0.0.1:5555",
        corrections_endpoint: str = "tcp://127.0.0.1:5556",
        maps_endpoint: str = MAPS_ENDPOINT,
        commands_endpoint: str = COMMANDS_ENDPOINT,
        maps_max_hz: float = 20.0,
        latent_maps_max_hz: float = 2.0,
        preview_max_px: int = 512,
        on_result: Callable[[Frame, FrameResult], None] | None = None,
        keys: ClientKeys | None = None,
        context: object | None = None,
        actuator_expected: np.ndarray | None = None,
    ) -> None:
        """``actuator_expected``: the actuator response the :class:`ActuatorMonitor` expects (2x2,
        effective per commanded beam shift; default identity: a bridge that applies the calibration)."""
        import zmq

        for ep in (maps_endpoint, commands_endpoint):
            if not is_loopback(ep):
                raise RuntimeError(f"refusing to bind {ep}: the engine's maps and commands endpoints are loopback-only")
        self.engine = engine
        self.counters = Counters()
        self.recorder = Recorder()
        self.frames_endpoint = frames_endpoint
        self.corrections_endpoint = corrections_endpoint
        self.maps_max_hz = maps_max_hz
        self.latent_maps_max_hz = latent_maps_max_hz
        self._last_latent_maps = -np.inf
        self.preview_max_px = preview_max_px
        self.on_result = on_result
        self.keys = keys
        self._ctx = context or zmq.Context.instance()
        self._lock = threading.Lock()  # guards the engine
        self._frames = LatestSlot()  # (Frame, arrival time): receiver -> worker
        self._strip_slot = LatestSlot(self._frames.cond)  # (Strip, arrival): the strip loop's, same waiter
        self._strips = StripAssembler()  # an instrument's strips -> whole frames (receiver thread)
        self._stop = threading.Event()
        self._last_seq: int | None = None  # newest seq received
        self.first_seq: int | None = None  # first seq received (accounting: processed + skipped + pending)
        self._last_processed: int | None = None
        self._start_beam_nm: np.ndarray | None = None  # beam shift during the first frame processed
        self._threads: list[threading.Thread] = []
        # the rVAE stage runs in its own thread on the newest processed frame (on a second core,
        # beside the next frame's locate/track/GP); the maps show its latest latents
        self._rvae_slot = LatestSlot()  # (Frame, FrameResult): worker -> rVAE thread
        self._rvae_latest: FrameResult | None = None
        # set while the worker has no frame in hand: the rVAE thread encodes in chunks and waits
        # for this before each one, so a frame (and its correction) never shares the cores with
        # more than one chunk of encoding
        self._frame_idle = threading.Event()
        self._frame_idle.set()
        self.rvae_max_wait_s = 1.0  # ... but never waits longer per chunk (no starvation under overload)
        # bind the engine's own sockets now so that a port clash is reported at start-up
        self._maps = self._ctx.socket(zmq.PUB)
        self._maps.setsockopt(zmq.LINGER, 0)
        self._maps.setsockopt(zmq.SNDHWM, 4)
        self._rep = self._ctx.socket(zmq.REP)
        self._rep.setsockopt(zmq.LINGER, 0)
        try:
            self._maps.bind(maps_endpoint)
            self._rep.bind(commands_endpoint)
        except zmq.ZMQError as exc:
            self._maps.close(0)
            self._rep.close(0)
            raise RuntimeError(f"cannot bind {maps_endpoint} / {commands_endpoint}: {exc} "
                               "(is another engine running? use --maps/--commands to pick other ports)") from None
        self.maps_endpoint = self._maps.getsockopt_string(zmq.LAST_ENDPOINT)
        self.commands_endpoint = self._rep.getsockopt_string(zmq.LAST_ENDPOINT)
        self._last_maps = 0.0
        self._started_at = time.monotonic()
        self._last_frame_at: float | None = None  # monotonic arrival of the newest frame
        self.last_beam_nm: tuple[int, tuple[float, float]] | None = None  # (seq, beam shift nm) of the newest frame
        self._frame_interval_s = 0.0  # the newest frame's scan time (s)
        self.banner = ""  # what the operator must know now (silence disarmed the correction); "" when all is well
        self.actuator = ActuatorMonitor(actuator_expected)
        self.instrument_warning = ""  # the bridge's latest ack warning (excursion budget); "" when none
        self.stage_handovers = 0
        self._last_heartbeat = 0.0

    # ------------------------------------------------------------------ silence

    def silence_limit_s(self) -> float:
        """Seconds without a frame after which the stream counts as stopped: 2 s or 3 frame times."""
        return max(SILENCE_S, 3.0 * self._frame_interval_s)

    def waiting(self) -> str | None:
        """One line while no frame arrives (before the first, or after the stream stopped); None while frames flow."""
        now = time.monotonic()
        if self._last_frame_at is None:
            return f"waiting for frames from {self.frames_endpoint} ({now - self._started_at:.0f} s)"
        silent = now - self._last_frame_at
        if silent <= self.silence_limit_s():
            return None
        return f"no frames from {self.frames_endpoint} for {silent:.0f} s" + (f"; {self.banner}" if self.banner else "")

    def _check_silence(self) -> None:
        """(worker, between frames) Disarm when the frames stopped while armed; publish a heartbeat
        ``maps`` (no arrays; ``info["banner"]``) once a second while no frames arrive."""
        line = self.waiting()
        if line is None:
            return
        if self._last_frame_at is not None and self.engine.armed:
            with self._lock:
                self.engine.disarm()
            self.banner = ("correction DISARMED: the frames stopped; it stays disarmed until the operator arms it "
                           "again (monitor Arm, or the arm command)")
            log.warning("no frames from %s for %.1f s: %s", self.frames_endpoint,
                        time.monotonic() - self._last_frame_at, self.banner)
        now = time.monotonic()
        if now - self._last_heartbeat >= 1.0:
            self._last_heartbeat = now
            self._heartbeat(self.waiting() or line)

    def _heartbeat(self, line: str) -> None:
        import zmq

        msg = Maps(seq=max(self._last_seq or 0, 0), metrics={"armed": float(self.engine.armed)},
                   info={"heartbeat": True, "banner": line})
        try:
            protocol.send(self._maps, msg, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> EngineService:
        for target, name in ((self._receive_loop, "engine-recv"), (self._work_loop, "engine-work"),
                             (self._command_loop, "engine-commands"), (self._rvae_loop, "engine-rvae")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._frames.wake()
        self._rvae_slot.wake()
        for t in self._threads:
            t.join(timeout)
        self.recorder.stop()
        self._maps.close(0)
        self._rep.close(0)

    def __enter__(self) -> EngineService:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ threads

    def _reject(self, reason: str) -> None:
        self.counters.rejected += 1
        self.counters.last_reject = reason
        if worth_logging(self.counters.rejected):
            log.warning("rejected message (%d so far): %s", self.counters.rejected, reason)

    def _receive_loop(self) -> None:
        import zmq

        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 16)   # a frame's strips (8 of 64 lines at 512 px) fit twice over
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.setsockopt(zmq.RECONNECT_IVL, 100)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        if self.keys is not None:
            self.keys.apply(sub)
        sub.connect(self.frames_endpoint)
        try:
            while not self._stop.is_set():
                if not sub.poll(IDLE_POLL_MS):
                    continue
                try:
                    msg = protocol.recv(sub)
                except ProtocolError as exc:
                    self._reject(str(exc))
                    continue
                if isinstance(msg, Strip):   # an instrument that sends strips: whole frames from them
                    if self.engine.config.strip_corrections and self._strip_slot.put((msg, time.perf_counter())):
                        self.counters.strips_skipped += 1
                    dropped = self._strips.frames_dropped
                    msg = self._strips.add(msg)
                    if self._strips.frames_dropped > dropped:
                        self._reject(f"strips: {self._strips.last_error}")
                    if msg is None:
                        continue
                if not isinstance(msg, Frame):
                    self._reject(f"expected a frame or a strip on the frames socket, got {type(msg).__name__.lower()}")
                    continue
                self.counters.received += 1
                self._last_frame_at = time.monotonic()
                self._frame_interval_s = msg.frame_time_s
                self.last_beam_nm = (msg.seq, tuple(map(float, msg.beam_shift_nm)))
                self._count_gap(msg.seq)
                if self._frames.put((msg, time.perf_counter())):
                    self.counters.skipped += 1  # overwritten: the engine only takes the newest frame
        finally:
            sub.close(0)

    def _work_loop(self) -> None:
        import zmq

        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        dealer.setsockopt(zmq.SNDHWM, 16)
        if self.keys is not None:
            self.keys.apply(dealer)
        dealer.connect(self.corrections_endpoint)
        try:
            while not self._stop.is_set():
                self._read_acks(dealer)
                strip = self._strip_slot.take(0.0)
                if strip is not None:   # before a frame: a strip's correction is the urgent one
                    self._work_on_strip(dealer, *strip)
                    continue
                item = self._frames.take(0.05)
                if item is None:
                    self._check_silence()
                    continue
                frame, arrived = item
                self._frame_idle.clear()
                try:
                    self._work_on(dealer, frame, arrived)
                finally:
                    self._frame_idle.set()
        finally:
            dealer.close(0)

    def _work_on(self, dealer: object, frame: Frame, arrived: float) -> None:
        """One frame: engine, correction out, rVAE hand-off, recording, callbacks, maps."""
        if self._last_processed is not None and frame.seq <= self._last_processed:
            log.warning("new stream (seq %d after %d): the instrument restarted; resetting the reference",
                        frame.seq, self._last_processed)
            with self._lock:
                self.engine.reset()
            self.actuator.break_()
        self._last_processed = frame.seq
        if self._start_beam_nm is None:
            self._start_beam_nm = np.asarray(frame.beam_shift_nm, dtype=np.float64)
        try:
            with self._lock:
                result = self.engine.process(frame, encode=False)
        except FrameRefused as exc:  # never processed, counted, kept in a recording; the stream goes on
            self.counters.refused += 1
            self.counters.last_refused = str(exc)
            if worth_logging(self.counters.refused):
                log.warning("%s (%d refused so far)", exc, self.counters.refused)
            self.recorder.write(frame)
            return
        except Exception as exc:  # noqa: BLE001  (a bad frame must not stop the stream)
            self._engine_failed(frame, exc)
            return
        if result.correction is not None:  # sent before the rVAE stage: it never waits for it
            self._send(dealer, result.correction, arrived, self.counters.latency_ms)
        if getattr(self.engine, "rvae", None) is not None and result.columns is not None:
            if self._rvae_slot.put((frame, result)):
                self.counters.rvae_skipped += 1  # the encoder fell behind: it takes the newest
        self._frame_idle.set()  # what follows is light: the rVAE may go on
        self._watch_actuator(frame, result)
        self.recorder.write(frame)
        self.counters.processed += 1
        if self.counters.processed == SETTLE_AFTER_FRAMES:
            settle_heap()
        self.counters.frame_ms.append((time.perf_counter() - arrived) * 1e3)
        self.counters.stamps.append(time.perf_counter())
        if self.on_result is not None:
            self.on_result(frame, result)
        self._publish_maps(frame, result)

    def _work_on_strip(self, dealer: object, strip: Strip, arrived: float) -> None:
        """One strip (``Engine.process_strip``): its correction out at once; a strip the engine
        refuses or fails on is counted, logged and left (its frame still comes whole)."""
        try:
            with self._lock:
                result = self.engine.process_strip(strip)
        except Exception as exc:  # noqa: BLE001  (a bad strip must not stop the stream)
            self.counters.failed += 1
            self.counters.last_error = (f"strip loop failed on frame {strip.seq} (rows from {strip.row0}): "
                                        f"{type(exc).__name__}: {exc}")
            if worth_logging(self.counters.failed):
                log.error("%s; the stream goes on", self.counters.last_error)
            return
        self.counters.strips += 1
        if result.correction is not None:
            self._send(dealer, result.correction, arrived, self.counters.strip_latency_ms)

    def _send(self, dealer: object, correction: object, arrived: float, latency_ms: object) -> None:
        """Send one correction (never blocking); its latency from ``arrived`` goes to ``latency_ms``."""
        import zmq

        try:
            dealer.send_multipart(protocol.encode(correction), flags=zmq.NOBLOCK)
            self.counters.corrections_sent += 1
            latency_ms.append((time.perf_counter() - arrived) * 1e3)
        except zmq.Again:
            log.warning("instrument not reachable: correction %d not sent", correction.id)

    def _watch_actuator(self, frame: Frame, result: FrameResult) -> None:
        """Feed the actuator monitor: commanded beam shift vs apparent image shift (measured frames only)."""
        if result.lost or result.flagged:
            return
        beam = np.asarray(frame.beam_shift_nm, dtype=np.float64)
        self.actuator.add(beam, np.asarray(result.drift_nm, dtype=np.float64) - beam)

    def _rvae_loop(self) -> None:
        """Encode the columns of the newest processed frame (never holds up a correction)."""
        while not self._stop.is_set():
            item = self._rvae_slot.take(IDLE_POLL_MS / 1e3)
            if item is None:
                continue
            frame, result = item
            try:
                out = self.engine.encode(frame, result, between=self._wait_frame_idle)
            except Exception as exc:  # noqa: BLE001  (no latents for this frame; the stream goes on)
                self._engine_failed(frame, exc, stage="rVAE")
                continue
            if "rvae" in out.timings_ms:
                self.counters.rvae_ms.append(out.timings_ms["rvae"])
            if out.latents is not None:
                self._rvae_latest = out

    def _wait_frame_idle(self) -> None:
        """Between two rVAE chunks: wait while the worker has a frame in hand (bounded)."""
        self._frame_idle.wait(self.rvae_max_wait_s)

    def _engine_failed(self, frame: Frame, exc: Exception, stage: str = "engine") -> None:
        """Count and log (rate-limited, one line) a frame the engine raised on; keep its pixels."""
        self.counters.failed += 1
        self.counters.last_error = f"{stage} failed on frame {frame.seq}: {type(exc).__name__}: {exc}"
        if worth_logging(self.counters.failed):
            log.error("%s (%d so far); the stream goes on", self.counters.last_error, self.counters.failed)
        if stage == "engine":
            self.recorder.write(frame)  # nothing recorded is lost, even when the analysis fails

    def _count_gap(self, seq: int) -> None:
        """Count frames the instrument sent that never reached us (gaps in ``seq``)."""
        last = self._last_seq
        if self.first_seq is None:
            self.first_seq = seq
        if last is not None:
            if seq > last + 1:
                self.counters.skipped += seq - last - 1
            elif seq <= last:
                log.warning("frame seq went back from %d to %d: the instrument restarted its stream", last, seq)
        self._last_seq = seq

    @property
    def start_beam_nm(self) -> np.ndarray | None:
        """Beam shift (nm) during the first frame processed; None before it."""
        return None if self._start_beam_nm is None else self._start_beam_nm.copy()

    def restore_beam(self, timeout_s: float = 5.0) -> bool:
        """Disarm, then send the beam back to where it was during the first frame processed.

        Call it before :meth:`stop` (corrections must name a recent frame). The instrument clamps
        each step, so this repeats until an ack reports the target reached. True when reached."""
        import zmq

        with self._lock:
            self.engine.disarm()
        target = self._start_beam_nm
        if target is None or self._last_seq is None:
            return False
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        if self.keys is not None:
            self.keys.apply(dealer)
        dealer.connect(self.corrections_endpoint)
        t0 = time.monotonic()
        try:
            for _i in range(1000):
                if time.monotonic() - t0 > timeout_s:
                    return False
                corr = protocol.Correction(id=self.engine.next_correction_id(), beam_shift_nm=tuple(map(float, target)),
                                           for_seq=self._last_seq, reason="restore the starting beam shift")
                try:
                    protocol.send(dealer, corr, flags=zmq.NOBLOCK)
                except zmq.Again:
                    time.sleep(0.05)
                    continue
                if not dealer.poll(1000):
                    continue
                ack = protocol.recv(dealer)
                if isinstance(ack, Ack) and ack.id == corr.id:
                    if ack.error and "stale" not in ack.error:  # stale: our newest seq lagged; try again
                        log.error("restore refused: %s", ack.error)
                        return False
                    if np.allclose(ack.applied_nm, target, atol=1e-9):
                        return True
            return False
        finally:
            dealer.close(0)

    def _read_acks(self, dealer: object) -> None:
        import zmq

        while dealer.poll(0):
            try:
                msg = protocol.recv(dealer, flags=zmq.NOBLOCK)
            except ProtocolError as exc:
                self._reject(str(exc))
                continue
            if not isinstance(msg, Ack):
                self._reject(f"expected an ack on the corrections socket, got {type(msg).__name__.lower()}")
                continue
            self.counters.acks += 1
            self.counters.acks_clamped += int(msg.clamped)
            if msg.error:
                self.counters.acks_refused += 1
                self.counters.last_ack_error = msg.error
            self._instrument_says(msg)

    def _instrument_says(self, ack: Ack) -> None:
        """Act on the bridge's excursion budget: disarm when it is reached, re-reference after a
        stage handover, show the 80 % warning."""
        text = ack.error or ack.warning
        if ack.warning.startswith("stage handover"):
            with self._lock:
                self.engine.reset()
            self.actuator.break_()
            self.stage_handovers += 1
            self.instrument_warning = ""
            log.warning("%s (correction %d)", ack.warning, ack.id)
        elif text.startswith("excursion budget reached"):
            if self.engine.armed:
                with self._lock:
                    self.engine.disarm()
                log.warning("%s", text)
            self.banner = "correction DISARMED: " + text
            self.instrument_warning = text
        else:
            if ack.warning and not self.instrument_warning:
                log.warning("%s", ack.warning)
            self.instrument_warning = ack.warning

    def _publish_maps(self, frame: Frame, result: FrameResult) -> None:
        import zmq

        now = time.perf_counter()
        if now - self._last_maps < 1.0 / self.maps_max_hz:
            return
        self._last_maps = now
        try:
            protocol.send(self._maps, self.make_maps(frame, result), flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def make_maps(self, frame: Frame, result: FrameResult) -> Maps:
        """The ``maps`` message for one processed frame."""
        img = np.asarray(frame.image)
        step = max(1, int(np.ceil(max(img.shape) / self.preview_max_px)))
        preview = np.ascontiguousarray(img[::step, ::step]).astype(np.float32)
        c = self.counters.as_dict()
        metrics = {
            "fps": c["fps"], "skipped": c["skipped"], "rejected": c["rejected"],
            "latency_p50_ms": c["latency_p50_ms"], "latency_p99_ms": c["latency_p99_ms"],
            "armed": float(self.engine.armed), "peak": result.peak, "lost": float(result.lost), "flagged": float(bool(result.flagged)),
            "refused": c["refused"],
            **{f"stage_{k}_ms": round(v, 3) for k, v in result.timings_ms.items()},
        }
        arrays = {"preview": preview, "drift_nm": np.asarray(result.drift_nm, np.float64)}
        if result.correction is not None:
            arrays["correction_nm"] = np.asarray(result.correction.beam_shift_nm, np.float64)
        latent_seq = None  # the frame the latent maps were encoded from (maybe an earlier one)
        cols = result.columns
        if cols is not None:  # (N, 3): row, col in preview pixels, class
            pos = np.asarray(cols.positions, np.float64).reshape(-1, 2)
            arrays["columns"] = np.column_stack([pos / step, np.asarray(cols.klass, np.float64)]).astype(np.float32)
            stage = getattr(self.engine, "rvae", None)
            # the newest encoded frame: this one (engine.encode done by the caller) or one the rVAE
            # thread finished since (a frame or so behind)
            enc = result if result.latents is not None else self._rvae_latest
            now = time.perf_counter()
            if (enc is not None and enc.latents is not None and enc.columns is not None and stage is not None
                    and now - self._last_latent_maps >= 1.0 / self.latent_maps_max_hz):
                epos = np.asarray(enc.columns.positions, np.float64).reshape(-1, 2)
                if len(enc.latents.get("angle", ())) == len(epos):
                    # painting the maps costs ~10 ms: at most latent_maps_max_hz (the monitor keeps the last)
                    self._last_latent_maps = now
                    arrays.update(stage.maps(epos, enc.latents, img.shape, step))
                    latent_seq = int(enc.seq)
        if result.line_drift_nm is not None and result.line_sigma_nm is not None:
            arrays.update(gp_arrays(frame, result, step, self.engine.start_beam_nm))
        return Maps(seq=frame.seq, arrays=arrays,
                    metrics=metrics, info={"t_mid": result.t_mid, "preview_step": step,
                                           "banner": self.banner or self.instrument_warning or self.actuator.status.warning,
                                           "pixel_size_nm": list(frame.pixel_size_nm),
                                           **({} if latent_seq is None else {"latent_seq": latent_seq})})

    def _command_loop(self) -> None:
        while not self._stop.is_set():
            if not self._rep.poll(IDLE_POLL_MS):
                continue
            try:
                cmd = protocol.recv(self._rep)
                reply = self.handle(cmd) if isinstance(cmd, Command) else Reply(
                    cmd="?", ok=False, message=f"expected a command, got {type(cmd).__name__.lower()}")
            except ProtocolError as exc:
                self._reject(str(exc))
                reply = Reply(cmd="?", ok=False, message=f"bad command: {exc}")
            protocol.send(self._rep, reply)

    def status(self) -> dict:
        with self._lock:
            st = self.engine.status()
        st["counters"] = self.counters.as_dict()
        st["banner"] = self.banner
        st["instrument_warning"] = self.instrument_warning
        st["stage_handovers"] = self.stage_handovers
        st["actuator"] = self.actuator.as_dict()
        st["recording"] = {"active": self.recorder.active, "path": str(self.recorder.path or ""),
                           "frames": self.recorder.frames, "error": self.recorder.error}
        return st

    def handle(self, cmd: Command) -> Reply:
        """Carry out one command and say what happened."""
        try:
            if cmd.cmd == "arm":
                with self._lock:
                    self.engine.arm()
                self.banner = ""
                self.instrument_warning = ""
                msg = "correction armed"
            elif cmd.cmd == "disarm":
                with self._lock:
                    self.engine.disarm()
                msg = "correction disarmed"
            elif cmd.cmd == "reset":
                with self._lock:
                    self.engine.reset()
                msg = "model reset: the next frame is the new reference"
            elif cmd.cmd == "set":
                with self._lock:
                    self.engine.set(**dict(cmd.args))
                msg = f"set {', '.join(f'{k}={v}' for k, v in cmd.args.items())}"
            elif cmd.cmd == "record":
                path = cmd.args.get("path")
                if cmd.args.get("stop") or path is None:
                    self.recorder.stop()
                    msg = f"recording stopped ({self.recorder.frames} frames)"
                else:
                    self.recorder.start(Path(str(path)).expanduser())
                    msg = f"recording to {path}"
            elif cmd.cmd == "train":
                steps = cmd.args.get("steps")
                # not under the engine lock: starting the background fine-tune must not hold up a frame
                msg = self.engine.train(None if steps is None else int(steps))
            elif cmd.cmd == "status":
                msg = "ok"
            else:
                return Reply(cmd=cmd.cmd, ok=False, message=f"'{cmd.cmd}' is not available in this version",
                             state=self.status())
        except (ValueError, TypeError, OSError) as exc:
            return Reply(cmd=cmd.cmd, ok=False, message=str(exc), state=self.status())
        return Reply(cmd=cmd.cmd, ok=True, message=msg, state=self.status())

