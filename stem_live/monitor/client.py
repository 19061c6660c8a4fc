"""The monitor's connection to the engine: maps subscriber + command requester, driven by a QTimer.

Everything runs in the GUI thread without ever blocking it: each tick drains the SUB socket
without waiting (newest wins for display; every message is handed over so that traces can
accumulate cheaply), and polls the REQ socket for the reply to the one command in flight.

- The SUB socket reconnects by itself when the engine stops and comes back (ZeroMQ does that).
  No maps for ``stale_s`` seconds -> :attr:`EngineClient.responding` turns False and
  ``connectionChanged(False)`` is emitted; the next maps turn it back on.
- A REQ socket whose reply is lost is stuck for good (it refuses to send again), so after
  ``command_timeout_s`` without a reply the socket is closed and a fresh one connected; the
  command is answered locally with ``Reply(ok=False, "no reply ...")``.
"""

from __future__ import annotations

import logging
import time
from collections import deque

import zmq
from qtpy.QtCore import QObject, QTimer, Signal

from stem_live import protocol
from stem_live.protocol import Command, Maps, ProtocolError, Reply

log = logging.getLogger("stem_live.monitor")


class EngineClient(QObject):
    """SUB on ``maps_endpoint`` + REQ on ``commands_endpoint``, polled by a QTimer in the GUI thread."""

    #: a list of :class:`Maps` received since the last tick, oldest first (never empty)
    mapsReceived = Signal(object)
    #: (Command, Reply) for every command sent; a local Reply(ok=False) on timeout
    replyReceived = Signal(object, object)
    #: True when maps flow, False when none arrived for ``stale_s`` seconds
    connectionChanged = Signal(bool)

    def __init__(self, maps_endpoint: str, commands_endpoint: str, *, context: zmq.Context | None = None,
                 tick_ms: int = 50, stale_s: float = 2.0, command_timeout_s: float = 3.0,
                 max_drain: int = 256, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.maps_endpoint = maps_endpoint
        self.commands_endpoint = commands_endpoint
        self.stale_s = stale_s
        self.command_timeout_s = command_timeout_s
        self.max_drain = max_drain
        self._own_ctx = context is None
        self._ctx = context if context is not None else zmq.Context()
        self._sub: zmq.Socket | None = None
        self._req: zmq.Socket | None = None
        self._queue: deque[Command] = deque()
        self._in_flight: tuple[Command, float] | None = None
        self.responding = False
        self.last_maps_time: float | None = None  # monotonic time of the newest maps
        self.last_seq: int | None = None
        self.received = 0
        self.rejected = 0
        self.last_reject = ""
        self.timeouts = 0
        self._timer = QTimer(self)
        self._timer.setInterval(tick_ms)
        self._timer.timeout.connect(self.tick)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Connect both sockets (raises ``zmq.ZMQError`` for a malformed endpoint) and start ticking."""
        sub = self._ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 64)
        sub.setsockopt(zmq.RECONNECT_IVL, 100)
        sub.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            sub.connect(self.maps_endpoint)
            self._sub = sub
            self._new_req()
        except zmq.ZMQError:
            sub.close(0)
            self.stop()
            raise
        self._timer.start()

    def stop(self) -> None:
        """Stop ticking and close the sockets. Sends nothing: acquisition goes on without us."""
        self._timer.stop()
        for s in (self._sub, self._req):
            if s is not None:
                s.close(0)
        self._sub = self._req = None
        self._queue.clear()
        self._in_flight = None
        if self._own_ctx:
            self._ctx.term()
            self._own_ctx = False

    def _new_req(self) -> None:
        if self._req is not None:
            self._req.close(0)
            self._req = None
        req = self._ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.setsockopt(zmq.RECONNECT_IVL, 100)
        req.setsockopt(zmq.RECONNECT_IVL_MAX, 1000)
        try:
            req.connect(self.commands_endpoint)
        except zmq.ZMQError:
            req.close(0)
            raise
        self._req = req

    # ------------------------------------------------------------------ commands

    def send(self, cmd: Command) -> None:
        """Queue a command; its reply (or a timeout) arrives through ``replyReceived``."""
        self._queue.append(cmd)
        self._pump_commands()

    @property
    def busy(self) -> bool:
        return self._in_flight is not None or bool(self._queue)

    def _pump_commands(self) -> None:
        if self._req is None:
            return
        if self._in_flight is not None:
            cmd, deadline = self._in_flight
            reply: Reply | None = None
            if self._req.poll(0):
                try:
                    msg = protocol.recv(self._req, flags=zmq.NOBLOCK)
                    reply = msg if isinstance(msg, Reply) else Reply(
                        cmd=cmd.cmd, ok=False, message=f"expected a reply, got {type(msg).__name__.lower()}")
                except ProtocolError as exc:
                    reply = Reply(cmd=cmd.cmd, ok=False, message=f"bad reply from the engine: {exc}")
                except zmq.Again:
                    return
            elif time.monotonic() > deadline:
                self.timeouts += 1
                self._new_req()  # a REQ socket that lost its reply never sends again: start afresh
                reply = Reply(cmd=cmd.cmd, ok=False,
                              message=f"no reply to '{cmd.cmd}' in {self.command_timeout_s:g} s: "
                                      f"is the engine running on {self.commands_endpoint}?")
            if reply is None:
                return
            self._in_flight = None
            self.replyReceived.emit(cmd, reply)
        if self._in_flight is None and self._queue:
            cmd = self._queue.popleft()
            try:
                protocol.send(self._req, cmd, flags=zmq.NOBLOCK)
            except (zmq.ZMQError, ProtocolError) as exc:
                self._new_req()
                self.replyReceived.emit(cmd, Reply(cmd=cmd.cmd, ok=False, message=f"cannot send '{cmd.cmd}': {exc}"))
                return
            self._in_flight = (cmd, time.monotonic() + self.command_timeout_s)

    # ------------------------------------------------------------------ maps

    def _drain(self) -> list[Maps]:
        out: list[Maps] = []
        sub = self._sub
        if sub is None:
            return out
        for _ in range(self.max_drain):
            try:
                parts = sub.recv_multipart(flags=zmq.NOBLOCK, copy=False)
            except zmq.Again:
                break
            try:
                msg = protocol.decode(parts)
            except ProtocolError as exc:
                self.rejected += 1
                self.last_reject = str(exc)
                log.warning("rejected maps message: %s", exc)
                continue
            if isinstance(msg, Maps):
                out.append(msg)
            else:
                self.rejected += 1
                self.last_reject = f"expected maps, got {type(msg).__name__.lower()}"
        return out

    def tick(self) -> None:
        """One poll of both sockets; never waits."""
        try:
            batch = self._drain()
            now = time.monotonic()
            if batch:
                self.received += len(batch)
                self.last_seq = batch[-1].seq
                self.last_maps_time = now
                if not self.responding:
                    self.responding = True
                    self.connectionChanged.emit(True)
                self.mapsReceived.emit(batch)
            elif self.responding and (self.last_maps_time is None or now - self.last_maps_time > self.stale_s):
                self.responding = False
                self.connectionChanged.emit(False)
            self._pump_commands()
        except zmq.ZMQError as exc:  # e.g. the context was terminated under us
            log.error("monitor connection error: %s", exc)

    def seconds_since_maps(self) -> float | None:
        return None if self.last_maps_time is None else time.monotonic() - self.last_maps_time
