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


def fit_from_sites(x: np.ndarray, resid: np.ndarray, weight: np.ndarray, site: np.ndarray, *, min_x: float,
                   max_decay: float, min_chi2: float = 60.0, min_obs: int = 3,
                   decays: int = 64, n_iter: int = 3) -> tuple[FlybackPx | None, float]:
    """The flyback from where the same sites appear across frames that drift along x.

    ``x`` (M,) px: the fast-scan pixel each observation was fitted at (line-averaged, without
    a flyback model); ``resid`` (M,) px: its x in the lattice's reference coordinates (the
    frame's offsets taken off); ``weight`` (M,) 1 / px**2; ``site`` (M,) int: which site it is.
    A site at scanned x u appears at pixel j with j + shift(j) = u, so across the frames its
    reference x varies as -shift(j) about its mean: the amplitude is the least-squares slope
    of the per-site centred ``resid`` on the centred exp(-j / decay), the decay a grid search
    (``decays`` steps, geometric from 2 px to ``max_decay``, refined by a parabola; a best decay
    at either end is no flyback), and j is where the site's mean puts the column, found in
    ``n_iter`` rounds. Only observations at x >= ``min_x`` (windows the left edge does not cut:
    their fit without the flyback is biased on its own) and sites seen at least ``min_obs``
    times enter. Needs drift along x across the frames: a stack that stays
    put cannot tell a site's flyback from where it is.

    Returns ((amplitude, decay) px or None, chi**2 of the amplitude against the scatter left):
    None where chi**2 < ``min_chi2`` or the result is no monotone scan (``check``)."""
    x, r, w = (np.asarray(a, np.float64).reshape(-1) for a in (x, resid, weight))
    site = np.asarray(site).reshape(-1)
    keep = (site >= 0) & (w > 0) & np.isfinite(x) & np.isfinite(r) & np.isfinite(w) & (x >= min_x)
    x, r, w, site = x[keep], r[keep], w[keep], site[keep]
    _, inv, count = np.unique(site, return_inverse=True, return_counts=True)
    keep = count[inv] >= min_obs
    if keep.sum() < 2 * min_obs:
        return None, 0.0
    x, r, w = x[keep], r[keep], w[keep]
    _, inv = np.unique(site[keep], return_inverse=True)
    n_sites = int(inv.max()) + 1
    sw = np.bincount(inv, w, n_sites)

    def centred(v: np.ndarray) -> np.ndarray:  # less the site's weighted mean
        return v - (np.bincount(inv, w * v, n_sites) / sw)[inv]

    rc = centred(r)
    # each observation's pixel as its site's mean predicts it, not as fitted: the fit's own
    # noise would be on both sides of the regression (a stack that stays put then shows a
    # "flyback"). The site's mean carried into the frame is its scanned x less its mean shift,
    # xp = j + shift(j) - mean(shift), so j = xp - centred(shift(j)): solved by iterating.
    xp = x - rc
    grid = np.geomspace(2.0, max(float(max_decay), 3.0), int(decays))
    dof = len(r) - n_sites - 2

    def fit(j: np.ndarray, decay: float) -> tuple[float, float, float]:
        """(residual sum of squares, amplitude, sum w e**2) for this decay at pixels j."""
        e = centred(np.exp(-j / decay))
        den = float(np.sum(w * e * e))
        if not den > 0:
            return np.inf, 0.0, 0.0
        amp = -float(np.sum(w * rc * e)) / den
        return float(np.sum(w * (rc + amp * e) ** 2)), amp, den

    j = xp
    for _ in range(max(1, int(n_iter))):
        ss_grid = np.array([fit(j, d)[0] for d in grid])
        i = int(np.argmin(ss_grid))
        if not np.isfinite(ss_grid[i]) or dof < 1 or i in (0, len(grid) - 1):
            # gone before the first pixels measured (an edge effect of the fit, say) or not
            # decaying within reach (a stretch of the scan): no flyback this model can tell
            return None, 0.0
        # a parabola in log(decay) through the best three: the grid's steps are ~7 %
        g0, g1, g2 = ss_grid[i - 1 : i + 2]
        curv = g0 - 2.0 * g1 + g2
        step = float(np.clip(0.5 * (g0 - g2) / curv, -1.0, 1.0)) if curv > 0 else 0.0
        decay = float(grid[i] * (grid[1] / grid[0]) ** step)
        ss, amp, den = fit(j, decay)
        j = xp - centred(shift(j, (amp, decay)))
    chi2 = amp * amp * den / max(ss / dof, 1e-30)
    if not np.isfinite(chi2) or chi2 < min_chi2:
        return None, float(chi2) if np.isfinite(chi2) else 0.0
    try:
        return check((amp, decay)), float(chi2)
    except ValueError:
        return None, float(chi2)
