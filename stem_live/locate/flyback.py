"""The scan's flyback as the column fit sees it.

After the beam flies back to the start of a line it overshoots along x and settles: the probe
of fast-scan pixel j is at x = j + shift(j), ``shift(j) = amplitude * exp(-j / decay)`` (px;
``flyback_px = (amplitude, decay)``, from a calibration: ``flyback_amp_nm`` / pixel size and
``flyback_tau_us`` / dwell). A column at scanned position u appears at the pixel j with
j + shift(j) = u (the simulator's truth convention). Near the left edge its image is stretched
and, where the edge cuts it, the fit on the regular pixel grid is biased; the fit therefore
takes each window pixel's scanned x there (``refine.refine_fixed_width(flyback_px=)``).
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


def to_pixels(u: np.ndarray, flyback_px: FlybackPx, n_iter: int = 6) -> np.ndarray:
    """The pixel j where the scan is at ``u``: j + shift(j) = u (Newton; the scan is monotone
    for |amplitude| < decay)."""
    u = np.asarray(u, dtype=np.float64)
    j = u - shift(u, flyback_px)
    for _ in range(n_iter):
        j = j - (j + shift(j, flyback_px) - u) / (1.0 + slope(j, flyback_px))
    return j


def check(flyback_px) -> FlybackPx:
    """``flyback_px`` as two floats; ValueError unless decay > 0 and |amplitude| < decay."""
    amp, decay = (float(v) for v in flyback_px)
    if not (np.isfinite(amp) and np.isfinite(decay) and decay > 0 and abs(amp) < decay):
        raise ValueError(f"flyback_px must be (amplitude, decay) px with decay > 0 and |amplitude| < decay "
                         f"(a monotone scan), got {tuple(flyback_px)}")
    return amp, decay


def reaching_columns(centers: np.ndarray, ox: np.ndarray, r: int, flyback_px: FlybackPx | None,
                     tol_px: float = 0.01) -> tuple[np.ndarray, np.ndarray] | None:
    """The columns whose fit window (integer ``centers`` (N, 2), window pixel x offsets ``ox``
    (K,), radius ``r``) reaches where the displacement exceeds ``tol_px``: (indices (M,), each
    window pixel's scanned x relative to the window centre's (M, K) float32 px). None without a
    flyback or where no window reaches it."""
    if flyback_px is None:
        return None
    amp, decay = check(flyback_px)
    if abs(amp) <= tol_px:
        return None
    idx = np.flatnonzero(centers[:, 1] - r < decay * np.log(abs(amp) / tol_px))
    if len(idx) == 0:
        return None
    cx = centers[idx, 1].astype(np.float64)
    xs = ox[None, :] + shift(cx[:, None] + ox[None, :], (amp, decay)) - shift(cx, (amp, decay))[:, None]
    return idx, xs.astype(np.float32)
