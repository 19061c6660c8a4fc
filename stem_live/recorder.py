"""Recording a live frame stream: :func:`record_stream` subscribes to a frames PUB endpoint and
writes every frame to a TIFF stack as it arrives (:class:`~stem_live.io.StackWriter`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable

from stem_live.io.metadata import RecordError
from stem_live.io.tiff_writer import StackWriter
from stem_live.protocol import Frame, ProtocolError

# ============================================================================ streaming


log = logging.getLogger(__name__)


def record_stream(endpoint: str, path: str | os.PathLike, *, frames: int | None = None,
                  timeout_s: float | None = None, progress: Callable[[int, Frame], None] | None = None,
                  stop: threading.Event | None = None, overwrite: bool = False,
                  stats: dict[str, int] | None = None, on_wait: Callable[[float], None] | None = None) -> int:
    """Subscribe to a frames PUB ``endpoint`` and record every frame to ``path``.

    Stops after ``frames`` frames, when no valid frame arrived for ``timeout_s`` seconds, or
    when ``stop`` is set. Invalid messages (and non-frame messages) are skipped, counted and
    logged in one line each. ``progress(n_written, frame)`` runs after each frame is flushed.
    ``stats`` (optional dict) receives ``written``, ``invalid`` and ``missed`` (gaps in seq).
    ``on_wait(seconds)`` runs about once a second while no frame has arrived yet. Returns the
    number of frames written; with none, ``path`` is removed again (no empty stack is left).
    """
    import zmq  # noqa: PLC0415 - only the streaming path needs ZeroMQ

    from stem_live.protocol import recv  # noqa: PLC0415

    st = stats if stats is not None else {}
    st.update(written=0, invalid=0, missed=0)
    ctx = zmq.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.RCVHWM, 10000)  # a recorder should rather buffer than drop
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        try:
            sock.connect(endpoint)
        except zmq.ZMQError as exc:
            raise RecordError(f"cannot connect to {endpoint!r} ({exc}): give an endpoint like "
                              f"tcp://127.0.0.1:5555") from None
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        last_seq: dict[str, int] = {}
        with StackWriter(path, overwrite=overwrite) as writer:
            idle_since = started = waited = time.monotonic()
            while frames is None or writer.count < frames:
                if stop is not None and stop.is_set():
                    break
                if timeout_s is not None and time.monotonic() - idle_since > timeout_s:
                    log.info("no frame for %.1f s on %s: stopping", timeout_s, endpoint)
                    break
                if not poller.poll(50):
                    if on_wait is not None and writer.count == 0 and time.monotonic() - waited >= 1.0:
                        waited = time.monotonic()
                        on_wait(waited - started)
                    continue
                try:
                    msg = recv(sock, flags=zmq.NOBLOCK)
                except zmq.Again:
                    continue
                except ProtocolError as exc:
                    st["invalid"] += 1
                    log.warning("skipped invalid message #%d: %s", st["invalid"], exc)
                    continue
                if not isinstance(msg, Frame):
                    st["invalid"] += 1
                    log.warning("skipped a %s message #%d on the frames endpoint", type(msg).__name__,
                                st["invalid"])
                    continue
                prev = last_seq.get(msg.stream)
                if prev is not None and msg.seq > prev + 1:
                    st["missed"] += msg.seq - prev - 1
                    log.warning("seq gap on stream %r: %d frame(s) missed before seq %d",
                                msg.stream, msg.seq - prev - 1, msg.seq)
                last_seq[msg.stream] = msg.seq
                writer.write(msg)
                st["written"] = writer.count
                idle_since = time.monotonic()
                if progress is not None:
                    progress(writer.count, msg)
        if writer.count == 0:
            with contextlib.suppress(OSError):
                os.unlink(path)
        return writer.count
    finally:
        sock.close(0)
        ctx.term()
