"""State the service's threads share: stream-health counters, the newest-frame hand-off, and
the recorder of processed frames (the ``record`` command); the maps' GP arrays (``gp_arrays``).
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from stem_live.protocol import Frame

log = logging.getLogger("stem_live.service")


@dataclass
class Counters:
    """Stream health, shared between threads (ints only: updates are atomic enough)."""

    received: int = 0
    processed: int = 0
    skipped: int = 0  # frames never processed: overwritten while busy, or gaps in seq
    rejected: int = 0
    corrections_sent: int = 0
    acks: int = 0
    acks_clamped: int = 0
    acks_refused: int = 0
    failed: int = 0  # frames the engine raised on (logged; the stream goes on)
    refused: int = 0  # frames that cannot be STEM frames (engine.frame_problem): never processed
    last_refused: str = ""
    rvae_skipped: int = 0  # processed frames the rVAE thread had no time to encode
    rvae_ms: deque = field(default_factory=lambda: deque(maxlen=256))
    last_reject: str = ""
    last_ack_error: str = ""
    last_error: str = ""
    latency_ms: deque = field(default_factory=lambda: deque(maxlen=256))  # frame arrival -> correction sent
    frame_ms: deque = field(default_factory=lambda: deque(maxlen=256))
    stamps: deque = field(default_factory=lambda: deque(maxlen=64))  # processing end times, for fps
    strips: int = 0          # strips the strip loop processed (EngineConfig.strip_corrections)
    strips_skipped: int = 0  # strips overwritten by a newer one while the engine was busy
    strip_latency_ms: deque = field(default_factory=lambda: deque(maxlen=256))  # strip arrival -> correction sent

    def fps(self) -> float:
        if len(self.stamps) < 2:
            return 0.0
        return (len(self.stamps) - 1) / max(self.stamps[-1] - self.stamps[0], 1e-9)

    def as_dict(self) -> dict:
        lat, fm = list(self.latency_ms), list(self.frame_ms)
        return {
            "received": self.received, "processed": self.processed, "skipped": self.skipped,
            "rejected": self.rejected, "corrections_sent": self.corrections_sent, "acks": self.acks,
            "acks_clamped": self.acks_clamped, "acks_refused": self.acks_refused, "fps": round(self.fps(), 3),
            "latency_p50_ms": percentile(lat, 50), "latency_p99_ms": percentile(lat, 99), "frame_ms_p50": percentile(fm, 50),
            "last_reject": self.last_reject, "last_ack_error": self.last_ack_error,
            "failed": self.failed, "last_error": self.last_error, "rvae_skipped": self.rvae_skipped,
            "refused": self.refused, "last_refused": self.last_refused,
            "strips": self.strips, "strips_skipped": self.strips_skipped,
            "strip_latency_p99_ms": percentile(list(self.strip_latency_ms), 99),
        }


def worth_logging(count: int) -> bool:
    """Log the first 20 of a kind, then every 1000th: a flood is counted, not logged line by line."""
    return count <= 20 or count % 1000 == 0


def percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values else None


class LatestSlot:
    """A one-item hand-off between two threads that keeps only the newest item: ``put`` over
    an item not yet taken replaces it (and says so: the caller counts it as skipped)."""

    def __init__(self, cond: threading.Condition | None = None) -> None:
        self._cond = threading.Condition() if cond is None else cond   # shared: one waiter for two slots
        self._item: object | None = None

    @property
    def cond(self) -> threading.Condition:
        return self._cond

    def put(self, item: object) -> bool:
        """Store ``item``; True when it replaced one that was never taken."""
        with self._cond:
            replaced = self._item is not None
            self._item = item
            self._cond.notify()
        return replaced

    def take(self, timeout_s: float) -> object | None:
        """The newest item (emptying the slot), waiting up to ``timeout_s``; None if none came."""
        with self._cond:
            if self._item is None:
                self._cond.wait(timeout_s)
            item, self._item = self._item, None
        return item

    @property
    def full(self) -> bool:
        """An item is waiting (a snapshot: another thread may take or replace it next)."""
        return self._item is not None

    def wake(self) -> None:
        """Wake a thread waiting in ``take`` (on stop)."""
        with self._cond:
            self._cond.notify_all()


class Recorder:
    """Start/stop recording processed frames to a TIFF stack (used by the ``record`` command)."""

    def __init__(self) -> None:
        self._writer = None
        self.path: Path | None = None
        self.frames = 0
        self.error = ""

    @property
    def active(self) -> bool:
        return self._writer is not None

    def start(self, path: Path) -> None:
        from stem_live.io import StackWriter

        self.stop()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._writer = StackWriter(path)
        self.path, self.frames, self.error = path, 0, ""

    def write(self, frame: Frame) -> None:
        if self._writer is None:
            return
        try:
            self._writer.write(frame)
            self.frames += 1
        except Exception as exc:  # disk full etc.: stop recording, keep the stream going
            self.error = str(exc)
            log.error("recording stopped: %s", exc)
            self.stop()

    def stop(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def gp_arrays(frame: Frame, result: object, step: int, start_beam_nm: np.ndarray | None, max_points: int = 128) -> dict:
    """The maps' GP arrays of a processed frame (``FrameResult``): mean and sigma at <= ``max_points``
    line times (mean shifted by the first frame's beam shift ``start_beam_nm``, so it shares
    ``drift_nm``'s origin), and the per-line distortion (the modelled
    drift at every ``step``-th line minus its frame mean)."""
    mean = np.asarray(result.line_drift_nm, np.float64).reshape(-1, 2)
    sd = np.asarray(result.line_sigma_nm, np.float64).reshape(-1, 2)
    lines = np.asarray(frame.line_times(), np.float64)
    n = min(len(lines), len(mean), len(sd))
    if n == 0:
        return {}
    idx = np.unique(np.linspace(0, n - 1, min(max_points, n)).round().astype(int))
    origin = np.zeros(2) if start_beam_nm is None else start_beam_nm
    return {"gp_t": lines[idx], "gp_mean_nm": mean[idx] - origin, "gp_sigma_nm": sd[idx],
            "line_distortion_nm": np.ascontiguousarray((mean[:n] - mean[:n].mean(0))[::step])}
