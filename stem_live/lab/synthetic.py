"""Tiny synthetic column images with exactly known positions (benchmarks, examples).

Not a microscope simulator (see the ``simulator`` package for that): Gaussian columns on a
flat background with Poisson noise.
"""

from __future__ import annotations

import numpy as np


def honeycomb(shape, spacing_px: float, *, angle_rad: float = 0.0, origin=(0.0, 0.0),
              margin_px: float = 0.0) -> np.ndarray:
    """Sites of a honeycomb (graphene-like) lattice with nearest-neighbour ``spacing_px``
    that fall inside ``shape`` (minus ``margin_px``), as (N, 2) (row, col)."""
    h, w = shape
    a = np.sqrt(3.0) * spacing_px
    c, s = np.cos(angle_rad), np.sin(angle_rad)
    rot = np.array([[c, -s], [s, c]])
    a1 = rot @ np.array([0.0, a])
    a2 = rot @ np.array([a * np.sqrt(3) / 2, a / 2])
    basis = [np.zeros(2), rot @ np.array([spacing_px, 0.0])]
    n = int(np.ceil(2 * max(h, w) / a)) + 2
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    lat = i.reshape(-1, 1) * a1 + j.reshape(-1, 1) * a2 + np.asarray(origin, float)
    pts = np.concatenate([lat + b for b in basis])
    keep = (
        (pts[:, 0] >= margin_px) & (pts[:, 0] <= h - 1 - margin_px)
        & (pts[:, 1] >= margin_px) & (pts[:, 1] <= w - 1 - margin_px)
    )
    return pts[keep]


def render_columns(shape, positions, *, sigma_px: float, amplitude=1.0, background: float = 0.1,
                   dose: float | None = 200.0, rng=None) -> np.ndarray:
    """Render Gaussian columns at ``positions``; ``amplitude`` scalar or (N,).

    With ``dose`` (counts at unit intensity) the image is Poisson-sampled and divided by the
    dose, so the noise-free image has the same scale as the noisy one.
    """
    rng = np.random.default_rng(rng)
    h, w = shape
    pos = np.asarray(positions, float).reshape(-1, 2)
    amp = np.broadcast_to(np.asarray(amplitude, float), (len(pos),))
    img = np.full((h, w), float(background))
    rad = int(np.ceil(4 * sigma_px))
    off = np.arange(-rad, rad + 1)
    ci = np.rint(pos).astype(int)
    rows = ci[:, 0:1, None] + off[None, :, None]
    cols = ci[:, 1:2, None] + off[None, None, :]
    val = amp[:, None, None] * np.exp(
        -((rows - pos[:, 0:1, None]) ** 2 + (cols - pos[:, 1:2, None]) ** 2) / (2 * sigma_px**2)
    )
    rows, cols = np.broadcast_arrays(rows, cols)
    inside = (rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)
    np.add.at(img, (rows[inside], cols[inside]), val[inside])
    if dose is not None:
        img = rng.poisson(img * dose) / float(dose)
    return img.astype(np.float32)
