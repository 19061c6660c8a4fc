"""Watch the beam-shift actuator during a session: commanded steps vs the image's response.

Between two measured frames the commanded beam shift changes by ``dc`` and the apparent image
shift (drift less beam shift, as the engine measures it) by ``di``. With the actuator matrix
``A`` (effective per commanded beam shift) and a drift ``v`` per frame, ``di = v - A dc``.
Over a window of frame pairs the monitor fits ``A`` along the directions the steps excited
(a step pattern along one direction only tells the response along it) and compares it with the
expected matrix (identity where the bridge applies the calibration). A gain off by more than
``gain_tol`` or a rotation off by more than ``angle_tol_deg`` gives one warning (log line and
``status()["warning"]``); it clears when the response is back within limits.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from dataclasses import asdict, dataclass

import numpy as np

log = logging.getLogger("stem_live.actuator")


@dataclass(frozen=True)
class ResponseStatus:
    """The measured response: gain ratio (measured / expected) and rotation (deg) along the worst
    excited direction, the pairs used, and the warning ("" when within limits or unknown)."""

    pairs: int
    directions: int  # 0: not enough excitation yet; 1 or 2 directions measured
    gain_ratio: float | None
    rotation_deg: float | None
    warning: str


class ActuatorMonitor:
    """Applied-vs-observed actuator response over the last ``window`` frame pairs (nm, (y, x))."""

    def __init__(self, expected: np.ndarray | None = None, *, window: int = 40, min_step_nm: float = 0.01,
                 gain_tol: float = 0.05, angle_tol_deg: float = 3.0, min_pairs: int = 8) -> None:
        self.expected = np.eye(2) if expected is None else np.asarray(expected, dtype=np.float64).reshape(2, 2)
        self.min_step_nm = float(min_step_nm)
        self.gain_tol = float(gain_tol)
        self.angle_tol_deg = float(angle_tol_deg)
        self.min_pairs = int(min_pairs)
        self._pairs: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=int(window))
        self._last: tuple[np.ndarray, np.ndarray] | None = None
        self.status = ResponseStatus(0, 0, None, None, "")
        self.warnings = 0

    def break_(self) -> None:
        """The measurement restarted (new reference, new stream): the next frame starts a new pair."""
        self._last = None

    def add(self, beam_nm: np.ndarray, image_nm: np.ndarray) -> str:
        """One measured frame: the commanded beam shift in effect and the apparent image shift (nm).
        Returns a warning line when the response newly left the limits, else ""."""
        c = np.asarray(beam_nm, dtype=np.float64).reshape(2)
        i = np.asarray(image_nm, dtype=np.float64).reshape(2)
        if not (np.isfinite(c).all() and np.isfinite(i).all()):
            return ""
        if self._last is not None:
            self._pairs.append((c - self._last[0], i - self._last[1]))
        self._last = (c, i)
        before = self.status.warning
        self.status = self._evaluate()
        if self.status.warning and not before:
            self.warnings += 1
            log.warning("%s", self.status.warning)
            return self.status.warning
        return ""

    def as_dict(self) -> dict:
        return asdict(self.status)

    def _evaluate(self) -> ResponseStatus:
        n = len(self._pairs)
        if n < self.min_pairs:
            return ResponseStatus(n, 0, None, None, "")
        dc = np.array([p[0] for p in self._pairs])
        di = np.array([p[1] for p in self._pairs])
        c = dc - dc.mean(0)
        d = di - di.mean(0)
        lam, vec = np.linalg.eigh(c.T @ c / n)
        excited = [vec[:, k] for k in (1, 0) if lam[k] >= self.min_step_nm**2]
        if not excited:
            return ResponseStatus(n, 0, None, None, "")
        worst = (1.0, 0.0)
        for u in excited:
            s = c @ u
            w = -(s[:, None] * d).sum(0) / (s @ s)  # measured A @ u
            e = self.expected @ u
            ratio = float(np.hypot(*w) / max(np.hypot(*e), 1e-12))
            angle = math.degrees(math.atan2(e[0] * w[1] - e[1] * w[0], e @ w))
            if abs(ratio - 1) / self.gain_tol + abs(angle) / self.angle_tol_deg > \
                    abs(worst[0] - 1) / self.gain_tol + abs(worst[1]) / self.angle_tol_deg:
                worst = (ratio, angle)
        ratio, angle = worst
        warning = ""
        if abs(ratio - 1) > self.gain_tol or abs(angle) > self.angle_tol_deg:
            warning = (f"actuator response off its calibration: gain x{ratio:.3f}, rotation {angle:+.1f} deg over the "
                       f"last {n} corrections (limits {self.gain_tol:.0%}, {self.angle_tol_deg:g} deg): recalibrate "
                       "with `stem-live calibrate --actuator`")
        return ResponseStatus(n, len(excited), round(ratio, 4), round(angle, 3), warning)
