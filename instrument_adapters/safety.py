"""Beam-shift limits owned by the instrument side: a pure function every adapter path uses."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Limits:
    """Hard limits on corrections (nm). ``max_step_nm``: largest move per correction (for a
    trajectory: its first line's move from where the beam is); ``max_excursion_nm``: largest
    distance from the beam shift the session started from; ``stale_frames``: a correction
    computed for a frame more than this many frames older than the newest frame sent is refused
    (and one for a frame not yet sent); ``max_step_per_line_nm``: along a trajectory, the
    largest move between two consecutive lines (a path a mains line of 30 pm at 50 Hz follows on
    1 ms lines moves by 9 pm a line)."""

    max_step_nm: float = 0.5
    max_excursion_nm: float = 10.0
    stale_frames: int = 10
    #: largest move from one scan line to the next along a trajectory (nm)
    max_step_per_line_nm: float = 0.02


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
    new, clamped = _move(current, target, start, limits.max_step_nm, limits.max_excursion_nm)
    return Decision(new, clamped, "")


def _move(current: np.ndarray, target: np.ndarray, start: np.ndarray, max_step: float,
          max_excursion: float) -> tuple[np.ndarray, bool]:
    """One move from ``current`` towards ``target`` (nm): the step shortened to ``max_step``
    along its direction, the result pulled back onto the disc of radius ``max_excursion``
    around ``start``. Returns (where the beam goes, whether a limit shortened the move)."""
    clamped = False
    step = target - current
    norm = float(np.hypot(*step))
    if norm > max_step:
        step = step * (max_step / norm)
        clamped = True
    new = current + step
    excursion = new - start
    dist = float(np.hypot(*excursion))
    if dist > max_excursion:
        new = start + excursion * (max_excursion / dist)
        clamped = True
    return new, clamped


@dataclass(frozen=True)
class PathDecision:
    """Outcome of checking one trajectory: the absolute shift (n, 2) nm to apply at each line
    time (n,) s, or why none (``applied_nm`` then the current shift, once)."""

    t_s: np.ndarray
    applied_nm: np.ndarray
    clamped: bool
    error: str


def clamp_path(t_s, path_nm, line_time_s: float, current_nm: np.ndarray, start_nm: np.ndarray, limits: Limits, *,
               max_lines: int = 1 << 16) -> PathDecision:
    """Clamp a trajectory (knots ``t_s`` (K,) s, ``path_nm`` (K, 2) absolute nm, linear between
    them) sampled at every scan line from its first knot to its last (``line_time_s`` apart).

    Line by line: the first line moves at most ``max_step_nm`` from ``current_nm``, each later
    line at most ``max_step_per_line_nm`` from the line before, and every line stays on the disc
    of radius ``max_excursion_nm`` around ``start_nm``. Non-finite, unordered or too long paths
    (more than ``max_lines`` lines) are refused and the beam stays where it is.
    """
    current = np.asarray(current_nm, dtype=np.float64).reshape(2)
    start = np.asarray(start_nm, dtype=np.float64).reshape(2)

    def refuse(why: str) -> PathDecision:
        return PathDecision(np.zeros(1), current[None, :].copy(), False, f"refused: {why}")

    try:
        t = np.asarray(t_s, dtype=np.float64).reshape(-1)
        b = np.asarray(path_nm, dtype=np.float64).reshape(len(t), 2)
    except (TypeError, ValueError):
        return refuse("a trajectory needs K times (s) and K [y, x] targets (nm)")
    if not len(t) or not (np.isfinite(t).all() and np.isfinite(b).all()):
        return refuse("trajectory is empty or not finite")
    if np.any(np.diff(t) <= 0):
        return refuse("trajectory times must increase")
    if not (np.isfinite(line_time_s) and line_time_s > 0):
        return refuse(f"no line time to follow a trajectory with (got {line_time_s!r}): send a frame first")
    n = int(np.floor((t[-1] - t[0]) / line_time_s + 1e-9)) + 1
    if n > max_lines:
        return refuse(f"trajectory spans {n} lines, more than {max_lines}")
    lines = t[0] + np.arange(n) * line_time_s
    want = np.stack([np.interp(lines, t, b[:, q]) for q in range(2)], axis=1)
    out = np.empty_like(want)
    prev, clamped = current, False
    for i in range(n):   # each line's limit depends on the line before: one pass, lines not pixels
        limit = limits.max_step_nm if i == 0 else limits.max_step_per_line_nm
        prev, cut = _move(prev, want[i], start, limit, limits.max_excursion_nm)
        out[i] = prev
        clamped |= cut
    return PathDecision(lines, out, clamped, "")
