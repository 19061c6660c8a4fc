"""Beam-shift limits owned by the instrument side: a pure function every adapter path uses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Limits:
    """Hard limits on corrections (nm). ``max_step_nm``: largest move per correction;
    ``max_excursion_nm``: largest distance from the beam shift the session started from;
    ``stale_frames``: a correction computed for a frame more than this many frames older than
    the newest frame sent is refused (and one for a frame not yet sent)."""

    max_step_nm: float = 0.5
    max_excursion_nm: float = 10.0
    stale_frames: int = 10


@dataclass(frozen=True)
class Decision:
    """Outcome of checking one correction: the absolute shift to apply (nm), or why none."""

    applied_nm: np.ndarray
    clamped: bool
    error: str


def clamp_target(target_nm: np.ndarray, current_nm: np.ndarray, start_nm: np.ndarray, limits: Limits) -> Decision:
    """Clamp a requested absolute beam shift (nm, (y, x)).

    The step from ``current_nm`` is shortened to ``max_step_nm`` and the result is pulled back
    onto the disc of radius ``max_excursion_nm`` around ``start_nm``. Non-finite or malformed
    targets are refused and the beam stays where it is.
    """
    current = np.asarray(current_nm, dtype=np.float64).reshape(2)
    try:
        target = np.asarray(target_nm, dtype=np.float64).reshape(2)
    except (TypeError, ValueError):
        return Decision(current, False, "refused: target must be two numbers [y, x] in nm")
    if not np.isfinite(target).all():
        return Decision(current, False, "refused: target is not finite")
    start = np.asarray(start_nm, dtype=np.float64).reshape(2)
    clamped = False
    step = target - current
    norm = float(np.hypot(*step))
    if norm > limits.max_step_nm:
        step *= limits.max_step_nm / norm
        clamped = True
    new = current + step
    excursion = new - start
    dist = float(np.hypot(*excursion))
    if dist > limits.max_excursion_nm:
        new = start + excursion * (limits.max_excursion_nm / dist)
        clamped = True
    return Decision(new, clamped, "")
