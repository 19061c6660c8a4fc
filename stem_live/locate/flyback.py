"""The scan's flyback as the column fit sees it.

After the beam flies back to the start of a line it overshoots along x and settles: the probe
of fast-scan pixel j is at x = j + shift(j), ``shift(j) = amplitude * exp(-j / decay)`` (px;
``flyback_px = (amplitude, decay)``, from a calibration: ``flyback_amp_nm`` / pixel size and
``flyback_tau_us`` / dwell). A column at scanned position u appears at the pixel j with
j + shift(j) = u (the simulator's truth convention). Where the left edge cuts a column, or the
displacement curves across its window, the fit on the regular pixel grid is biased; the fit
therefore takes each window pixel's scanned x there (``refine.refine_fixed_width(flyback_px=)``).
A constant or linear displacement across a whole window moves or stretches the column
symmetrically: its centre is found where it appears without that.
"""

from __future__ import annotations

import numpy as np

FlybackPx = tuple[float, float]


def shift(j: np.ndarray, flyback_px: FlybackPx) -> np.ndarray:
    """The scan's x displacement (px) at fast-scan pixel ``j`` (float ok; the line starts at 0)."""
    amp, decay = flyback_px
    return amp * np.exp(-np.maximum(np.asarray(j, dtype=np.float64), 0.0) / decay)


def slope(j: np.ndarray, flyback_px: FlybackPx) -> np.ndarray:
    """d shift / d j at ``j`` (0 before the line starts)."""
    j = np.asarray(j, dtype=np.float64)
    return np.where(j > 0, -shift(j, flyback_px) / flyback_px[1], 0.0)


def to_pixels(u: np.ndarray, flyback_px: FlybackPx, tol: float = 1e-10, max_iter: int = 60) -> np.ndarray:
    """The pixel j where the scan is at ``u``: j + shift(j) = u. Newton from j = u - shift(u);
    where a step would leave the bracket [u - max(shift, 0), u - min(shift, 0)] that holds the
    root, it bisects instead (near the monotone limit Newton overshoots at the line start)."""
    u = np.asarray(u, dtype=np.float64)
    amp = float(flyback_px[0])
    lo, hi = u - max(amp, 0.0), u - min(amp, 0.0)  # shift lies between 0 and amp
    j = np.clip(u - shift(u, flyback_px), lo, hi)
    for _ in range(max_iter):
        g = j + shift(j, flyback_px) - u  # increasing in j (a monotone scan)
        if np.all(np.abs(g) <= tol):
            break
        lo = np.where(g < 0, j, lo)
        hi = np.where(g > 0, j, hi)
        step = j - g / (1.0 + slope(j, flyback_px))
        j = np.where((step > lo) & (step < hi), step, 0.5 * (lo + hi))
    return j


def pixel_shift(j: np.ndarray, du: np.ndarray, flyback_px: FlybackPx) -> np.ndarray:
    """The shift in pixels (px) that moves a point at pixel ``j`` by ``du`` in scanned x."""
    j = np.asarray(j, dtype=np.float64)
    return to_pixels(j + shift(j, flyback_px) + du, flyback_px) - j


def check(flyback_px) -> FlybackPx:
    """``flyback_px`` as two floats; ValueError (saying what is expected) unless it is two finite
    numbers with decay > 0 and |amplitude| < decay (a scan that moves forward everywhere)."""
    try:
        amp, decay = (float(v) for v in flyback_px)
    except (TypeError, ValueError):
        raise ValueError(f"flyback_px must be two numbers (amplitude, decay) in fast-scan pixels, "
                         f"got {flyback_px!r}") from None
    if not (np.isfinite(amp) and np.isfinite(decay) and decay > 0 and abs(amp) < decay):
        raise ValueError(f"flyback_px must be (amplitude, decay) px with decay > 0 and |amplitude| < decay "
                         f"(a monotone scan), got {tuple(flyback_px)}")
    return amp, decay


def reaching_columns(centers: np.ndarray, ox: np.ndarray, r: int, flyback_px: FlybackPx | None,
                     tol_px: float = 0.01) -> tuple[np.ndarray, np.ndarray] | None:
    """The columns to fit on the distorted grid (``flyback_px`` as ``check`` returns it): those
    whose window (integer ``centers`` (N, 2),
    window pixel x offsets ``ox`` (K,), radius ``r``) the left edge cuts, and those across whose
    window the displacement departs from a straight line by more than ``tol_px`` (its curvature
    amplitude / decay**2 exp(-j / decay) times r**2 / 2). Returns (indices (M,), each window
    pixel's scanned x relative to the window centre's (M, K) float32 px), or None without a
    flyback above ``tol_px`` or where no window qualifies."""
    if flyback_px is None:
        return None
    amp, decay = flyback_px
    if abs(amp) <= tol_px:
        return None
    left = np.maximum(centers[:, 1] - r, 0.0)
    curve = 0.5 * abs(amp) / decay**2 * np.exp(-left / decay) * r**2
    idx = np.flatnonzero((centers[:, 1] - r < 0) | (curve > tol_px))
    if len(idx) == 0:
        return None
    cx = centers[idx, 1].astype(np.float64)
    xs = ox[None, :] + shift(cx[:, None] + ox[None, :], (amp, decay)) - shift(cx, (amp, decay))[:, None]
    return idx, xs.astype(np.float32)
