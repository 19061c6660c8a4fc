"""Image formation: incoherent HAADF from Gaussian sources, then the detector.

Expected electrons scattered onto the detector at a pixel whose probe samples the
specimen point r:

    N_e * kappa * sum_k W_k * g_k(r - p_k),   g_k = normalised 2-D Gaussian (1/A^2)

with N_e = dose * pixel area (electrons per pixel), kappa the HAADF cross-section per
unit of Z^1.7 (A^2), W_k = sum Z^1.7 of column k, and g_k of variance
sigma_probe^2 + sigma_k^2 (probe convolved with the source's own width). The detector
adds a constant background, Poisson (shot) noise and Gaussian readout noise, and the
result is rounded and clipped to uint16.

Speed: the sampling points of every pixel (``ry, rx``, which already contain drift,
beam shift and scan distortion) are computed once per frame; each source then only
touches a (2h+1)^2 window of pixels around its apparent position (N, w, w broadcast),
and the windows are scatter-added with ``np.bincount``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["render_sources", "pad_points", "disc_offsets", "detect", "fwhm_to_sigma"]

FWHM_PER_SIGMA = 2.0 * np.sqrt(2.0 * np.log(2.0))


def fwhm_to_sigma(fwhm: float) -> float:
    return float(fwhm) / FWHM_PER_SIGMA


PAD_VALUE = np.float32(1e4)  # sample-point value of padding pixels: far from everything


def disc_offsets(radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Integer (di, dj) offsets of the pixels within ``radius`` (pixels) of a centre."""
    half = int(np.ceil(radius))
    d = np.arange(-half, half + 1)
    di, dj = np.meshgrid(d, d, indexing="ij")
    keep = di * di + dj * dj <= radius * radius
    return di[keep], dj[keep]


def pad_points(ry: np.ndarray, rx: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad the sample-point maps by 2 * ``half`` pixels with PAD_VALUE (float32), so that
    footprints of sources centred up to ``half`` pixels outside the frame stay inside."""
    half = 2 * half
    out = []
    for r in (ry, rx):
        p = np.full((r.shape[0] + 2 * half, r.shape[1] + 2 * half), PAD_VALUE, np.float32)
        p[half:-half or None, half:-half or None] = r
        out.append(p)
    return out[0], out[1]


def render_sources(ryp: np.ndarray, rxp: np.ndarray, src_nm: np.ndarray, amp: np.ndarray,
                   sigma_nm: np.ndarray, centre_px: np.ndarray, half: int,
                   radius: float | None = None) -> np.ndarray:
    """Sum of Gaussians sampled at per-pixel specimen points.

    ryp, rxp: specimen point (nm, any common origin) sampled by each pixel, float32,
        padded by 2 * ``half`` pixels on every side (``pad_points``).
    src_nm: (M, 2) source positions (same origin); amp: (M,) peak values;
    sigma_nm: (M,) total Gaussian std; centre_px: (M, 2) int pixel (unpadded frame
        coordinates, within [-half, n - 1 + half]) nearest to where each source appears;
    half: padding unit (pixels, integer >= radius); radius: footprint radius in pixels
        around each centre pixel (default ``half``).
    Returns the (rows, cols) float64 sum over the unpadded frame.
    """
    prow, pcol = ryp.shape
    pad = 2 * half
    rows, cols = prow - 2 * pad, pcol - 2 * pad
    if len(amp) == 0:
        return np.zeros((rows, cols))
    di, dj = disc_offsets(half if radius is None else min(radius, half))
    off = (di * pcol + dj).astype(np.intp)
    ci = np.clip(centre_px[:, 0], -half, rows - 1 + half) + pad
    cj = np.clip(centre_px[:, 1], -half, cols - 1 + half) + pad
    base = (ci * pcol + cj).astype(np.intp)
    order = np.argsort(base, kind="stable")          # memory locality for gather / scatter
    base = base[order]
    src_nm, amp, sigma_nm = src_nm[order], np.asarray(amp)[order], np.asarray(sigma_nm)[order]
    flat = base[:, None] + off[None, :]                                   # (M, K)
    dy = np.take(ryp.ravel(), flat)
    dy -= src_nm[:, 0].astype(np.float32)[:, None]
    dx = np.take(rxp.ravel(), flat)
    dx -= src_nm[:, 1].astype(np.float32)[:, None]
    dy *= dy
    dx *= dx
    dy += dx
    dy *= (-0.5 / np.asarray(sigma_nm, dtype=np.float64) ** 2).astype(np.float32)[:, None]
    val = np.exp(dy, out=dy)
    val *= np.asarray(amp, dtype=np.float32)[:, None]
    img = np.bincount(flat.ravel(), weights=val.ravel(), minlength=prow * pcol).reshape(prow, pcol)
    return img[pad:pad + rows, pad:pad + cols]


def detect(expected: np.ndarray, rng: np.random.Generator | None, readout_noise: float) -> np.ndarray:
    """Detector: Poisson(expected) + N(0, readout_noise), rounded, clipped to uint16.

    ``rng=None`` returns the rounded expectation (no noise).
    """
    if rng is None:
        img = expected
    else:
        img = rng.poisson(np.maximum(expected, 0.0)).astype(np.float32)
        if readout_noise > 0:
            noise = rng.standard_normal(expected.shape, dtype=np.float32)
            noise *= np.float32(readout_noise)
            img += noise
    return np.clip(np.rint(img), 0, 65535).astype(np.uint16)
