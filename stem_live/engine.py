"""Per-frame pipeline and its state: pure compute, no sockets.

For every frame the engine measures the rigid shift of the image against a reference frame
(band-passed cross-correlation, :mod:`stem_live.register`), turns it into the specimen drift by adding the
beam shift that was in effect (``D = apparent shift + (b - b_ref)``; DESIGN.md: a column at
specimen position p appears at ``p + d(t) - b(t)``), predicts the drift at the middle of the
next frame from a straight line through the recent estimates, and, when armed, returns the
beam-shift target ``b_ref + D_pred`` that keeps the image still.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from .protocol import Correction, Frame
from .register import Reference, make_reference, register


@dataclass(frozen=True)
class EngineConfig:
    """Engine parameters. ``gain``: fraction of the predicted drift corrected each frame;
    ``history``: frames used for the velocity fit; ``deadband_nm``: corrections smaller than
    this are not sent; ``rereference_frac``: re-reference when the shift exceeds this fraction
    of the field; ``min_peak``: correlation peaks below this are treated as lost lock."""

    gain: float = 1.0
    history: int = 4
    deadband_nm: float = 0.002
    rereference_frac: float = 0.2
    min_peak: float = 0.02


@dataclass(frozen=True)
class FrameResult:
    """What the engine learnt from one frame. Units nm and s; pairs are (y, x)."""

    seq: int
    t_mid: float
    shift_px: np.ndarray  # apparent shift of the image vs the reference frame
    drift_nm: np.ndarray  # specimen drift d(t_mid) - d(t_ref)
    peak: float
    locked: bool
    correction: Correction | None
    timings_ms: dict[str, float] = field(default_factory=dict)


class Engine:
    """Stateful per-frame pipeline. Not thread-safe: one caller at a time (the service locks)."""

    def __init__(self, config: EngineConfig = EngineConfig()) -> None:
        self.config = config
        self.armed = False
        self._next_id = int(time.time() * 1000) % (1 << 40)  # distinct across restarts
        self.reset()

    def reset(self) -> None:
        """Forget the reference and the drift history (the next frame becomes the reference)."""
        self._ref: Reference | None = None
        self._ref_offset_nm = np.zeros(2)  # drift already accumulated when the current reference was taken
        self._ref_beam_nm = np.zeros(2)  # beam shift during the current reference frame
        self._b0_nm: np.ndarray | None = None  # beam shift during the very first frame
        self._hist: deque[tuple[float, np.ndarray]] = deque(maxlen=max(2, self.config.history))
        self.frames = 0
        self.last: FrameResult | None = None

    def next_correction_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def arm(self) -> None:
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    def set(self, **params: float) -> None:
        """Change engine parameters by name (``gain``, ``history``, ``deadband_nm``, ...)."""
        cur = self.config.__dict__.copy()
        unknown = set(params) - set(cur)
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(sorted(unknown))}; known: {', '.join(cur)}")
        cur.update({k: type(cur[k])(v) for k, v in params.items()})
        self.config = EngineConfig(**cur)
        self._hist = deque(self._hist, maxlen=max(2, self.config.history))

    def predict_drift(self, t: float) -> np.ndarray | None:
        """Drift (nm) predicted at time ``t`` from a straight-line fit of the recent estimates."""
        if not self._hist:
            return None
        ts = np.array([h[0] for h in self._hist])
        ds = np.stack([h[1] for h in self._hist])
        if len(ts) < 2 or np.ptp(ts) <= 0:
            return ds[-1]
        tc = ts - ts.mean()
        v = (tc[:, None] * (ds - ds.mean(0))).sum(0) / (tc**2).sum()
        return ds.mean(0) + v * (t - ts.mean())

    def process(self, frame: Frame) -> FrameResult:
        """Measure one frame; return the result and, when armed, the correction to send."""
        t0 = time.perf_counter()
        px = np.asarray(frame.pixel_size_nm, dtype=np.float64)
        beam = np.asarray(frame.beam_shift_nm, dtype=np.float64)
        t_mid = frame.t_start + 0.5 * frame.frame_time_s
        image = np.asarray(frame.image)
        if self._ref is None or self._ref.shape != image.shape:
            self._set_reference(image, beam, np.zeros(2) if self._ref is None else self._last_drift())
            if self._b0_nm is None:
                self._b0_nm = beam.copy()
            shift_px, peak = np.zeros(2), 1.0
        else:
            # where this frame should be, from the drift history and the beam shift it was taken with:
            # robust to skipped frames and to corrections that arrived late
            pred = self.predict_drift(t_mid)
            pred_px = np.zeros(2) if pred is None else (pred - self._ref_offset_nm - (beam - self._ref_beam_nm)) / px
            shift_px, peak = register(self._ref, image, predicted=tuple(pred_px))
        t1 = time.perf_counter()
        locked = peak >= self.config.min_peak
        drift = self._ref_offset_nm + shift_px * px + (beam - self._ref_beam_nm)
        if locked:
            self._hist.append((t_mid, drift))
            if np.hypot(*shift_px) > self.config.rereference_frac * min(image.shape):
                self._set_reference(image, beam, drift)  # keep the reference overlapping the image
        correction = None
        pred = self.predict_drift(t_mid + frame.frame_time_s)
        if pred is not None and self.armed and locked:
            correction = self._correction(frame, pred, beam)
        self.frames += 1
        self.last = FrameResult(seq=frame.seq, t_mid=t_mid, shift_px=shift_px, drift_nm=drift, peak=peak,
                                locked=locked, correction=correction,
                                timings_ms={"register": (t1 - t0) * 1e3, "total": (time.perf_counter() - t0) * 1e3})
        return self.last

    def _last_drift(self) -> np.ndarray:
        return self._hist[-1][1] if self._hist else np.zeros(2)

    def _set_reference(self, image: np.ndarray, beam: np.ndarray, drift: np.ndarray) -> None:
        self._ref = make_reference(image)
        self._ref_offset_nm = np.asarray(drift, dtype=np.float64).copy()
        self._ref_beam_nm = beam.copy()

    def _correction(self, frame: Frame, pred: np.ndarray, beam: np.ndarray) -> Correction | None:
        assert self._b0_nm is not None
        target = self._b0_nm + pred
        step = self.config.gain * (target - beam)
        if np.hypot(*step) < self.config.deadband_nm:
            return None
        new = beam + step
        return Correction(id=self.next_correction_id(), beam_shift_nm=(float(new[0]), float(new[1])), for_seq=frame.seq,
                          reason="predictive drift correction (rigid registration)")

    def status(self) -> dict:
        """A JSON-able summary of the engine state."""
        last = self.last
        return {
            "armed": self.armed,
            "frames": self.frames,
            "config": dict(self.config.__dict__),
            "last_seq": None if last is None else last.seq,
            "locked": None if last is None else last.locked,
            "drift_nm": None if last is None else [float(v) for v in last.drift_nm],
        }
