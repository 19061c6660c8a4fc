"""Classical column finding: band-pass filter, local maxima, non-maximum suppression,
threshold relative to the noise, then sub-pixel refinement (``refine.refine_positions``).

All heavy steps are whole-array numpy / scipy.fft; the fit is one jit'd JAX call.
"""

from __future__ import annotations

import functools
from typing import Sequence

import numpy as np

from .columns import Columns



@functools.lru_cache(maxsize=16)
def _bandpass_transfer(shape: tuple[int, int], sigma: float, sigma_bg: float):
    """rfft2 transfer function of G(sigma) - G(sigma_bg), the filter's noise gain
    sqrt(sum h**2) (white noise of unit variance -> filtered noise std), the Parseval
    weights of the rfft columns and the squared frequency of every bin."""
    fy = np.fft.fftfreq(shape[0]).astype(np.float32)[:, None]
    fx = np.fft.rfftfreq(shape[1]).astype(np.float32)[None, :]
    f2 = fy * fy + fx * fx
    c = np.float32(2.0 * np.pi**2)
    tf = np.exp(-c * sigma**2 * f2) - np.exp(-c * sigma_bg**2 * f2)
    tf = tf.astype(np.float32)
    # Parseval over the full (not half) spectrum: double the interior rfft columns
    wgt = np.full(tf.shape[1], 2.0)
    wgt[0] = 1.0
    if shape[1] % 2 == 0:
        wgt[-1] = 1.0
    gain = float(np.sqrt(np.sum((tf.astype(np.float64) ** 2) * wgt[None, :]) / (shape[0] * shape[1])))
    return tf, gain, wgt[None, :].astype(np.float32), f2


def bandpass(image: np.ndarray, sigma_px: float, background_px: float, *,
             wiener: float | None = 2.0, noise_std: float | None = None):
    """Difference-of-Gaussians band-pass (column-matched smoothing minus background) via
    FFT on a reflect-padded copy, optionally with a spectral-subtraction (Wiener-like)
    denoiser: each frequency is scaled by ``max(0, 1 - wiener * N / S)``, where S is the
    locally averaged power spectrum and N the white-noise power (from ``noise_std`` or the
    median power at the highest frequencies). This keeps lattice (Bragg) components and
    removes most of the noise between them: decisive on single noisy frames.

    Returns the filtered image with a 1-px border kept around it (shape + 2) and the
    filtered noise std per unit input noise std (the filter's white-noise gain).
    """
    from scipy import fft

    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape
    pad = int(np.ceil(2.0 * background_px)) + 1
    pad = min(pad, h - 1, w - 1)
    shape = (fft.next_fast_len(h + 2 * pad, real=True), fft.next_fast_len(w + 2 * pad, real=True))
    padded = np.pad(img, ((pad, shape[0] - h - pad), (pad, shape[1] - w - pad)), mode="reflect")
    tf, gain, colw, fr2 = _bandpass_transfer(shape, float(sigma_px), float(background_px))
    spec = fft.rfft2(padded, workers=-1)
    if wiener:
        power = spec.real * spec.real + spec.imag * spec.imag
        if noise_std is not None:
            n_power = float(noise_std) ** 2 * shape[0] * shape[1]
        else:
            n_power = float(np.median(power[fr2 > 0.35**2]))
        smooth = _box3(power)
        gw = 1.0 - np.float32(wiener * n_power) / np.maximum(smooth, np.float32(1e-30))
        np.maximum(gw, 0.0, out=gw)
        gw *= tf
        spec *= gw
        gain = float(np.sqrt(np.dot(np.einsum("ij,ij->j", gw, gw), colw[0]) / (shape[0] * shape[1])))
    else:
        spec *= tf
    out = fft.irfft2(spec, s=shape, workers=-1)
    return out[pad - 1 : pad + h + 1, pad - 1 : pad + w + 1], gain


def _box3(a: np.ndarray) -> np.ndarray:
    """3x3 box mean (rows wrapped, edge columns replicated): a cheap local average of the
    power spectrum."""
    out = a.copy()
    out[1:] += a[:-1]
    out[0] += a[-1]
    out[:-1] += a[1:]
    out[-1] += a[0]
    tmp = out.copy()
    out[:, 1:] += tmp[:, :-1]
    out[:, 0] += tmp[:, 0]
    out[:, :-1] += tmp[:, 1:]
    out[:, -1] += tmp[:, -1]
    out *= np.float32(1.0 / 9.0)
    return out


def noise_sigma(image: np.ndarray, max_samples: int = 60_000) -> float:
    """Robust per-pixel noise std: MAD of second differences along both axes (a smooth
    signal cancels; white noise of std s gives differences of std s * sqrt(6)).
    Uses a regular subsample of about ``max_samples`` differences per axis."""
    img = np.asarray(image, dtype=np.float32)
    h, w = img.shape
    step = max(1, int(np.sqrt(h * w / max_samples)))
    sub = img[::step]
    d1 = (sub[:, :-2] - 2.0 * sub[:, 1:-1] + sub[:, 2:])[:, ::step]
    sub = img[:, ::step]
    d2 = (sub[:-2] - 2.0 * sub[1:-1] + sub[2:])[::step]
    d = np.concatenate([d1.ravel(), d2.ravel()])
    d = d[np.isfinite(d)]
    if d.size == 0:
        return 0.0
    med = np.median(d)
    return float(1.4826 * np.median(np.abs(d - med)) / np.sqrt(6.0))


def find_peaks(filtered: np.ndarray, threshold_abs: float, min_distance: float):
    """Local maxima of a filtered image (with a 1-px border, as from ``bandpass``) above
    ``threshold_abs``, thinned so that no two are closer than ``min_distance`` (a peak is
    kept when it is the highest within that radius). Returns (K, 2) int (row, col) in the
    inner image and the peak heights."""
    from scipy.spatial import cKDTree

    fp = np.asarray(filtered)
    # 3x3 maximum by two separable passes of np.maximum (much faster than ndimage here)
    rowmax = np.maximum(fp[:, :-2], fp[:, 2:])
    np.maximum(rowmax, fp[:, 1:-1], out=rowmax)
    mx = np.maximum(rowmax[:-2], rowmax[2:])
    np.maximum(mx, rowmax[1:-1], out=mx)
    inner = fp[1:-1, 1:-1]
    mask = inner >= mx
    mask &= inner > threshold_abs
    cand = np.flatnonzero(mask)
    if cand.size == 0:
        return np.zeros((0, 2), int), np.zeros(0, np.float32)
    w = inner.shape[1]
    r = cand // w
    c = cand % w
    v = inner[r, c]
    pts = np.stack([r, c], axis=1)
    if len(pts) > 1 and min_distance > 1.0:
        tree = cKDTree(pts)
        pairs = tree.query_pairs(min_distance, output_type="ndarray")
        if len(pairs):
            i, j = pairs[:, 0], pairs[:, 1]
            # i is suppressed by j if j is higher (ties: lower index wins)
            higher_j = (v[j] > v[i]) | ((v[j] == v[i]) & (j < i))
            sup = np.zeros(len(pts), bool)
            sup[i[higher_j]] = True
            sup[j[~higher_j]] = True
            pts, v = pts[~sup], v[~sup]
    return pts, v


def _subpixel(filtered: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Quadratic (3-point, per axis) sub-pixel peak positions from the filtered image."""
    fp = filtered
    r = pts[:, 0] + 1
    c = pts[:, 1] + 1
    f0 = fp[r, c]
    fym, fyp = fp[r - 1, c], fp[r + 1, c]
    fxm, fxp = fp[r, c - 1], fp[r, c + 1]
    dy_den = fym - 2 * f0 + fyp
    dx_den = fxm - 2 * f0 + fxp
    with np.errstate(divide="ignore", invalid="ignore"):
        dy = np.where(dy_den < 0, 0.5 * (fym - fyp) / dy_den, 0.0)
        dx = np.where(dx_den < 0, 0.5 * (fxm - fxp) / dx_den, 0.0)
    off = np.clip(np.stack([dy, dx], axis=1), -0.5, 0.5)
    return pts + off


def locate_classical(
    image: np.ndarray,
    spacing_px: float | None = None,
    *,
    sigma_px: float | None = None,
    threshold: float = 1.0,
    min_rel: float = 0.1,
    min_distance_frac: float = 0.6,
    background_px: float | None = None,
    refine: bool = True,
    window_px: int | None = None,
    n_iter: int = 3,
    max_fit_std: float = 0.25,
    n_classes: int = 1,
    thresholds: Sequence[float] | None = None,
    classifier=None,
    wiener: float | None = 2.0,
    saturation: float | str | None = "auto",
    intensity_from: str = "filtered",
) -> Columns:
    """Find atomic columns in one frame.

    Parameters
    ----------
    image : (H, W) frame (any real dtype).
    spacing_px : nearest-neighbour column spacing in pixels; estimated from the image
        (``estimate_spacing``) when None.
    sigma_px : column width (Gaussian sigma) used for the matched smoothing and as the
        fit's start value; default 0.15 * spacing.
    threshold : detection threshold on the band-passed image, in units of its noise std
        (estimated robustly from the image and propagated through the filter). Low by
        default: the denoiser and the non-maximum suppression already remove most noise
        peaks; raise it where empty regions (vacuum, holes) must stay empty.
    min_rel : also require a peak height of at least ``min_rel`` x the 90th percentile
        of the peak heights (guards against tiny bumps in nearly noise-free images).
    min_distance_frac : non-maximum suppression radius as a fraction of the spacing.
    background_px : sigma of the subtracted background (default = spacing).
    refine : sub-pixel Gaussian fit (JAX) per column; otherwise quadratic interpolation of
        the band-passed peak, and ``intensity`` is the band-passed peak height.
    window_px : fit window (default ``window_for_spacing(spacing)``).
    max_fit_std : a fit whose position standard error (from its covariance) exceeds this
        (px) is not trusted: the column keeps its band-passed peak position. On very noisy
        single frames the denoised peak is the better estimate.
    n_classes, thresholds : intensity classes (``classify_intensity``); ``classifier``
        (an ``IntensityClassifier``) takes precedence and learns from the frames it sees.
    wiener : strength of the spectral-subtraction denoiser in the band-pass (``bandpass``);
        None or 0 switches it off (faster, fine for clean frames).
    saturation : detector value at which pixels are clipped. "auto": the image maximum if
        at least 0.05 % of the pixels sit exactly there. Peaks with a saturated pixel
        within one spacing are dropped (nothing can be measured there). None: off.
    intensity_from : "filtered": the band-passed (background-free, matched-smoothed)
        image at the final position, robust and the best for classes; "fit": the fitted
        Gaussian peak height above the fitted local background (noisier: the background
        term absorbs the neighbours).

    Returns
    -------
    ``Columns``; ``meta`` holds the spacing, sigma, noise level and absolute threshold used.
    """
    from .classes import classify_intensity
    from .refine import refine_positions, window_for_spacing

    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"locate_classical needs a 2-D image, got shape {img.shape}")
    if min(img.shape) < 8:
        raise ValueError(f"image too small for column finding: {img.shape}")
    img = img.astype(np.float32, copy=False)
    if not np.isfinite(img).all():
        img = np.where(np.isfinite(img), img, np.nanmedian(img)).astype(np.float32)
    if spacing_px is None:
        from .spacing import estimate_spacing

        spacing_px = estimate_spacing(img)
    spacing_px = float(spacing_px)
    if not np.isfinite(spacing_px) or spacing_px < 2.0:
        raise ValueError(f"column spacing must be >= 2 px, got {spacing_px}")
    if sigma_px is None:
        sigma_px = 0.15 * spacing_px
    if background_px is None:
        background_px = spacing_px
    background_px = max(float(background_px), 1.5 * float(sigma_px))

    noise_px = noise_sigma(img)
    filt, gain = bandpass(img, sigma_px, background_px, wiener=wiener,
                          noise_std=noise_px if noise_px > 0 else None)
    noise = noise_px * gain
    thr_abs = threshold * noise
    pts, heights = find_peaks(filt, thr_abs, min_distance_frac * spacing_px)
    if len(pts):
        sat_mask = _saturated(img, saturation)
        if sat_mask is not None:
            near = _count_in_box(sat_mask, pts, int(np.ceil(spacing_px)))
            pts, heights = pts[near == 0], heights[near == 0]
    if len(pts) and min_rel > 0:
        ref = np.percentile(heights, 90)
        keep = heights >= min_rel * ref
        pts, heights = pts[keep], heights[keep]
    meta = {"spacing_px": spacing_px, "sigma_px": float(sigma_px), "noise": float(noise),
            "threshold_abs": float(thr_abs)}
    if len(pts) == 0:
        return Columns(np.zeros((0, 2)), np.zeros(0, int), np.zeros(0), np.zeros(0),
                       np.zeros(0, bool), meta)
    start = _subpixel(filt, pts)
    snr = heights / max(noise, 1e-12)
    conf = 1.0 - np.exp(-np.maximum(snr - threshold, 0.0) / max(threshold, 1e-6) * 2.0)
    if window_px is None:
        window_px = window_for_spacing(spacing_px)
    window_px = int(window_px) | 1
    if refine:
        pos, intensity, border, info = refine_positions(
            img, start, window_px, sigma_px=sigma_px, n_iter=n_iter, return_info=True
        )
        moved = np.hypot(*(pos - start).T)
        good = (info["ok"] & (moved <= 0.5 * min_distance_frac * spacing_px)
                & (info["pos_std"] <= max_fit_std))
        pos = np.where(good[:, None], pos, start)
        if intensity_from == "filtered":
            intensity = _bilinear(filt, pos + 1.0)
        else:
            intensity = np.where(good, intensity, heights)
        conf = conf * np.where(good, 0.5 + 0.5 * info["r2"], 0.25)
        # two detections that converged onto the same column: keep the stronger
        pos, keep = _merge_duplicates(pos, intensity, 0.25 * spacing_px)
        pos, intensity, border, conf = pos[keep], intensity[keep], border[keep], conf[keep]
    else:
        pos = start
        intensity = heights.astype(np.float64)
        r = window_px // 2
        h, w = img.shape
        border = ((pts[:, 0] < r) | (pts[:, 0] > h - 1 - r) | (pts[:, 1] < r) | (pts[:, 1] > w - 1 - r))
    if intensity_from not in ("filtered", "fit"):
        raise ValueError(f"intensity_from must be 'filtered' or 'fit', got {intensity_from!r}")
    if classifier is not None:
        klass = classifier(intensity)
    else:
        klass, _ = classify_intensity(intensity, thresholds=thresholds, n_classes=n_classes)
    return Columns(pos, klass, intensity, np.clip(conf, 0.0, 1.0), border, meta)


def _merge_duplicates(pos: np.ndarray, strength: np.ndarray, radius: float):
    from scipy.spatial import cKDTree

    keep = np.ones(len(pos), bool)
    if len(pos) < 2:
        return pos, keep
    pairs = cKDTree(pos).query_pairs(radius, output_type="ndarray")
    if len(pairs):
        i, j = pairs[:, 0], pairs[:, 1]
        weaker = np.where(strength[i] >= strength[j], j, i)
        keep[weaker] = False
    return pos, keep


def _saturated(img: np.ndarray, saturation) -> np.ndarray | None:
    """Boolean mask of clipped pixels, or None."""
    if saturation is None:
        return None
    if isinstance(saturation, str):
        if saturation != "auto":
            raise ValueError(f"saturation must be a number, 'auto' or None, got {saturation!r}")
        top = img.max()
        mask = img == top
        if mask.sum() < max(20, 5e-4 * img.size):
            return None
        return mask
    mask = img >= float(saturation)
    return mask if mask.any() else None


def _count_in_box(mask: np.ndarray, pts: np.ndarray, rad: int) -> np.ndarray:
    """Number of True pixels of ``mask`` in the (2 rad + 1)^2 box around each point."""
    h, w = mask.shape
    ii = np.zeros((h + 1, w + 1), np.int32)
    np.cumsum(np.cumsum(mask, axis=0, dtype=np.int32), axis=1, out=ii[1:, 1:])
    r0 = np.clip(pts[:, 0] - rad, 0, h)
    r1 = np.clip(pts[:, 0] + rad + 1, 0, h)
    c0 = np.clip(pts[:, 1] - rad, 0, w)
    c1 = np.clip(pts[:, 1] + rad + 1, 0, w)
    return ii[r1, c1] - ii[r0, c1] - ii[r1, c0] + ii[r0, c0]


def _bilinear(img: np.ndarray, pos: np.ndarray) -> np.ndarray:
    """Bilinear interpolation of ``img`` at (row, col) positions (clipped to the image)."""
    h, w = img.shape
    y = np.clip(pos[:, 0], 0, h - 1.000001)
    x = np.clip(pos[:, 1], 0, w - 1.000001)
    i = y.astype(int)
    j = x.astype(int)
    fy = y - i
    fx = x - j
    return ((1 - fy) * (1 - fx) * img[i, j] + (1 - fy) * fx * img[i, j + 1]
            + fy * (1 - fx) * img[i + 1, j] + fy * fx * img[i + 1, j + 1]).astype(np.float64)
