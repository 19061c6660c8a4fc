"""Cramer-Rao bound of column positions: the best any unbiased locator can do on a frame.

Written from this package's image formation (``render``): each column is a Gaussian of the
probe's width and amplitude ``dose * kappa * W / (2 pi sigma^2)`` counts on a constant
background, seen with Poisson + Gaussian readout noise. Per column the Fisher information
of (amplitude, row, col) is summed over the pixels within 4 sigma, with every neighbour's
expected counts in the variance but its parameters known: an optimistic bound (a real
locator must also estimate the neighbours). Scan distortion and drift are left out: the
bound is for the position of the column's image, not for the scan line through its centre
that ``FrameTruth.columns_px`` reports (see the locator tests).
"""
from __future__ import annotations

import numpy as np

from simulator.frame import FrameTruth
from simulator.microscope import MicroscopeConfig
from simulator.render import fwhm_to_sigma

__all__ = ["position_crlb_px"]


def position_crlb_px(config: MicroscopeConfig, truth: FrameTruth) -> np.ndarray:
    """(N,) 2-D position bound (px, sqrt of var(row) + var(col)) of every column of ``truth``.

    Square pixels assumed (the mean pixel size is used); crystal presets (a particle is three
    blobs, not one Gaussian)."""
    py, px = config.pixel_size
    pix = 0.5 * (py + px)
    s = fwhm_to_sigma(config.probe_fwhm) / pix
    amp = config.dose * config.haadf_cross_section_A2 * np.asarray(truth.weight, float) / (2.0 * np.pi * s * s)
    pos = np.asarray(truth.columns_px, float).reshape(-1, 2)
    h, w = config.shape
    r = int(np.ceil(4.0 * s))
    oy, ox = np.mgrid[-r : r + 1, -r : r + 1]
    c = np.rint(pos).astype(int)
    rr = c[:, 0:1] + oy.ravel()
    cc = c[:, 1:2] + ox.ravel()
    ok = (rr >= 0) & (rr < h) & (cc >= 0) & (cc < w)
    dy = rr - pos[:, 0:1]
    dx = cc - pos[:, 1:2]
    g = amp[:, None] * np.exp(-0.5 * (dy**2 + dx**2) / s**2)
    mu = np.bincount((rr * w + cc)[ok], g[ok], h * w).reshape(h, w) + config.background_counts
    var = mu[np.clip(rr, 0, h - 1), np.clip(cc, 0, w - 1)] + config.readout_noise**2
    jac = np.stack([g / amp[:, None], g * dy / s**2, g * dx / s**2], -1) * ok[..., None]
    fisher = np.einsum("nki,nkj,nk->nij", jac, jac, 1.0 / var)
    cov = np.linalg.inv(fisher)
    return np.sqrt(cov[:, 1, 1] + cov[:, 2, 2])
