"""A second detection pass on the residual: the frame less the fitted model of the columns found.

The band-pass smooths with a fixed Gaussian and subtracts a background one spacing wide, and the
spectral denoiser keeps the lattice-periodic part of the frame. Beside a much brighter column
(a substitutional Si in graphene, about 4 x a C column) the bright column's smoothed tail and
its negative background halo swamp a weaker neighbour's band-passed peak: it is no local
maximum, or its prominence drops below the threshold. With the found columns' fitted Gaussians
subtracted, the weaker column stands alone and is found by the plain band-pass (no denoiser).

A residual peak becomes a candidate when it is

- at least ``min_distance`` px from every column found (not the imperfectly subtracted centre
  of a found column),
- more prominent than ``threshold`` x the band-passed noise std (no denoiser: the noise std of
  the plain band-pass), and
- more prominent than ``min_frac`` x the median prominence of the found columns in the same
  filter of the frame itself: a whole column, not the sum of the probe tails that a Gaussian
  model leaves between columns of a real image (hexagon centres in graphene), and
- within ``near_frac`` x the spacing of a column at least ``bright_ratio`` x as bright as the
  median column: that is where the band-pass loses a column. Elsewhere the residual of a real
  image (probe tails, amorphous patches, a contamination edge) holds more spurious peaks than
  missed columns.
"""

from __future__ import annotations

import numpy as np


def render_model(shape: tuple[int, int], positions: np.ndarray, amplitudes: np.ndarray,
                 width_px: float, *, n_sigma: float = 4.0) -> np.ndarray:
    """(H, W) float32 sum of Gaussians (sigma ``width_px``, px) of height ``amplitudes`` at the
    (row, col) ``positions`` (px), each cut off at ``n_sigma`` sigma; no background.

    A Gaussian is separable, so the image is ``GY.T @ GX`` with GY (N, H) and GX (N, W) the
    columns' row and column profiles, sparse (2 n_sigma sigma + 1 entries a row): one sparse
    product, 3x faster than adding every column's patch (14 ms for 4000 columns at 1024 px)."""
    from scipy import sparse

    h, w = shape
    pos = np.asarray(positions, np.float64).reshape(-1, 2)
    amp = np.nan_to_num(np.asarray(amplitudes, np.float64).reshape(-1))
    ok = np.isfinite(pos).all(axis=1)
    pos, amp = pos[ok], amp[ok]
    n = len(pos)
    if n == 0:
        return np.zeros((h, w), np.float32)
    rad = int(np.ceil(n_sigma * width_px))
    off = np.arange(-rad, rad + 1)
    ci = np.rint(pos).astype(np.int64)
    rows, cols = ci[:, 0:1] + off, ci[:, 1:2] + off   # (N, K) pixel rows / columns of each patch
    inv = -0.5 / (width_px * width_px)
    gy = amp[:, None] * np.exp(inv * (rows - pos[:, 0:1]) ** 2)
    gx = np.exp(inv * (cols - pos[:, 1:2]) ** 2)
    owner = np.broadcast_to(np.arange(n)[:, None], rows.shape)
    in_r, in_c = (rows >= 0) & (rows < h), (cols >= 0) & (cols < w)
    prof_y = sparse.csr_matrix((gy[in_r], (owner[in_r], rows[in_r])), shape=(n, h))
    prof_x = sparse.csr_matrix((gx[in_c], (owner[in_c], cols[in_c])), shape=(n, w))
    return np.asarray((prof_y.T @ prof_x).toarray(), np.float32)


def residual_candidates(image: np.ndarray, positions: np.ndarray, amplitudes: np.ndarray, width_px: float,
                        spacing_px: float, *, sigma_px: float, background_px: float, noise_px: float,
                        threshold: float = 4.0, min_frac: float = 0.35, min_distance_frac: float = 0.6,
                        bright_ratio: float = 2.0, near_frac: float = 1.5,
                        saturation="auto", ops: tuple) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Columns the first pass missed beside brighter ones (see the module docstring).

    ``positions`` (N, 2) px and ``amplitudes`` (N,) (counts above the background; 0 for a column
    whose fit is not trusted: it is not subtracted, but no candidate is taken beside it) are the
    found columns, ``width_px`` their Gaussian sigma; ``sigma_px`` / ``background_px`` the band-pass
    of the first pass; ``noise_px`` the per-pixel noise std (``classical.noise_sigma``). ``ops``:
    the classical locator's ``(_filter, _suppress, near_saturation)`` (passed in: this module is
    a step of that locator and does not import it).
    Returns (K, 2) int (row, col) peaks, their band-passed heights and prominences (K,) in the
    residual's filter, in the order of ``classical._suppress``; K = 0 on most frames of a
    regular lattice.
    """
    from scipy.spatial import cKDTree

    _filter, _suppress, near_saturation = ops
    img = np.asarray(image, np.float32)
    empty = (np.zeros((0, 2), int), np.zeros(0, np.float32), np.zeros(0, np.float32))
    pos = np.asarray(positions, np.float64).reshape(-1, 2)
    ok = np.isfinite(pos).all(axis=1)
    pos, amp = pos[ok], np.asarray(amplitudes, np.float64).reshape(-1)[ok]
    if len(pos) < 3 or noise_px <= 0:
        return empty
    bright = amp >= bright_ratio * np.median(amp[amp > 0]) if np.any(amp > 0) else np.zeros(len(amp), bool)
    if not bright.any():  # nothing bright to hide a neighbour: no residual to search (most frames)
        return empty
    ring = 0.5 * spacing_px
    resid = img - render_model(img.shape, pos, amp, width_px)
    filt, gain, cand, prom_img = _filter(resid, sigma_px, background_px, None, None, ring_radius=ring,
                                         threshold_unit=threshold * noise_px)
    idx = np.flatnonzero(cand)
    if len(idx) == 0:
        return empty
    w = img.shape[1]
    pts = np.stack([idx // w, idx % w], axis=1)
    heights = filt[1:-1, 1:-1].ravel()[idx]
    prom = prom_img.ravel()[idx]
    min_distance = min_distance_frac * spacing_px
    d, _ = cKDTree(pos).query(pts)
    far = d >= min_distance
    d_bright, _ = cKDTree(pos[bright]).query(pts)
    far &= d_bright <= near_frac * spacing_px
    pts, heights, prom = pts[far], heights[far], prom[far]
    if len(pts) == 0:
        return empty
    # the typical whole column: the found columns' prominence in the same filter of the frame
    _, _, _, prom_frame = _filter(img, sigma_px, background_px, None, None, ring_radius=ring, threshold_unit=0.0)
    ij = np.clip(np.rint(pos).astype(int), 0, np.array(img.shape) - 1)
    typical = float(np.median(prom_frame[ij[:, 0], ij[:, 1]]))
    keep = prom >= min_frac * typical
    pts, heights, prom = pts[keep], heights[keep], prom[keep]
    pts, heights, prom = _suppress(pts, heights, prom, min_distance)
    if len(pts):
        near = near_saturation(img, pts, saturation, spacing_px)
        pts, heights, prom = pts[~near], heights[~near], prom[~near]
    return pts, heights, prom
