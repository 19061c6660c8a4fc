"""The reference lattice's warp along the slow scan axis, measured on the lattice itself.

The tracker's reference (``Tracker.reference``: the running mean of each site's positions, one
rigid shift per frame taken out) keeps what repeats from frame to frame as a function of the
row: a mains line phase-locked to the frames (a frame period that is a whole number of mains
periods, as a line-synchronised scan makes it), and the drift's wander within the frames it was
built from. Drift samples taken against it lose that displacement ``e(row)``: within a frame it
is indistinguishable from drift (rows are times), so no model of the drift in time sees it.

A lattice tells it apart: sites one lattice vector ``v`` apart differ by ``v`` plus
``e(row') - e(row)``. :func:`row_warp` fits ``e`` at knots along the rows to those differences
over all the pairs of the lattice vectors that cross rows (least squares, outlier pairs
dropped), without its constant and linear parts (a shift and a scale/shear of the lattice,
which the lattice vectors absorb). A specimen without a lattice gives no pairs and no warp.
"""

from __future__ import annotations

import numpy as np


def _hat(rows: np.ndarray, n_rows: int, n_knots: int):
    """(n, n_knots) sparse hat basis of ``rows`` on knots evenly over [0, n_rows - 1]
    (``lattice_prior.hat_weights``)."""
    from scipy import sparse

    from stem_live.lattice_prior import hat_weights

    k, f = hat_weights(rows, 0.0, n_rows - 1.0, n_knots)
    n = len(k)
    return sparse.csr_matrix((np.concatenate([1.0 - f, f]), (np.tile(np.arange(n), 2), np.concatenate([k, k + 1]))),
                             shape=(n, n_knots))


def row_warp(ref_px: np.ndarray, spacing_px: float, n_rows: int, *, vectors: np.ndarray | None = None,
             knot_rows: float | None = None, tol_frac: float = 0.2, min_pairs: int = 50,
             ridge: float = 1e-3) -> np.ndarray | None:
    """The warp ``e(row)`` (px, (M, 2)) of every reference site (``ref_px`` (M, 2) px, (row,
    col)), or None where the sites show no lattice (fewer than ``min_pairs`` pairs).
    ``vectors``: the lattice vectors ((K, 2) px; default ``spacing.lattice_vectors`` of the
    sites: a stream computes them once in a while, they do not change);
    ``knot_rows``: knot spacing (default the column spacing, at least 8 rows: a warp of
    a shorter period is not told apart from the lattice); ``tol_frac``: a pair is two sites
    within ``tol_frac`` x the spacing of one lattice vector apart; ``ridge``: damping of the
    knots (px^-2; what the pairs cannot tell, e.g. a warp periodic with the lattice's row
    period, stays near zero)."""
    from scipy.spatial import cKDTree

    from stem_live.lattice_prior import eval_row_offsets
    from stem_live.locate.spacing import lattice_vectors

    ref = np.asarray(ref_px, np.float64).reshape(-1, 2)
    good = np.isfinite(ref).all(axis=1)
    if good.sum() < 8 or not spacing_px or not np.isfinite(spacing_px):
        return None
    pts = ref[good]
    vecs = np.asarray(lattice_vectors(pts, spacing_px) if vectors is None else vectors, np.float64).reshape(-1, 2)
    vecs = vecs[np.isfinite(vecs).all(axis=1) & (vecs[:, 0] > 0.25 * spacing_px)]   # one sign; those that cross rows
    if not len(vecs):
        return None
    tree = cKDTree(pts)
    ii, jj, vi = [], [], []
    for k, v in enumerate(vecs):   # a few lattice vectors, not atoms
        d, j = tree.query(pts + v, distance_upper_bound=tol_frac * spacing_px)
        ok = np.isfinite(d)
        ii.append(np.flatnonzero(ok))
        jj.append(j[ok])
        vi.append(np.full(int(ok.sum()), k))
    i, j, vk = np.concatenate(ii), np.concatenate(jj), np.concatenate(vi)
    if len(i) < min_pairs:
        return None
    step = max(8.0, float(knot_rows or spacing_px))
    knots = np.linspace(0.0, n_rows - 1.0, max(3, int(np.ceil((n_rows - 1) / step)) + 1))
    a = _hat(pts[j, 0], n_rows, len(knots)) - _hat(pts[i, 0], n_rows, len(knots))
    diff = pts[j] - pts[i]
    # the lattice vectors as the pairs measure them (their mean): the linear part of the warp
    counts = np.bincount(vk, minlength=len(vecs))
    vhat = np.stack([np.bincount(vk, diff[:, q], len(vecs)) for q in range(2)], 1) / np.maximum(counts, 1)[:, None]
    y = diff - vhat[vk]
    g = np.stack([np.ones(len(knots)), knots - knots.mean()])   # gauge: no constant, no linear part
    keep = np.ones(len(y), bool)
    for _ in range(2):   # least squares, then again without the outlier pairs (defects, mislinks)
        ak = a[keep]
        ata = (ak.T @ ak).toarray()
        ata = ata + ridge * np.eye(len(knots)) + 1e3 * (g.T @ g) / len(knots)
        e = np.linalg.solve(ata, ak.T @ y[keep])
        res = np.linalg.norm(y - a @ e, axis=1)
        keep = res <= 3.0 * 1.4826 * np.median(res) + 1e-9
    out = np.full(ref.shape, np.nan)
    out[good] = eval_row_offsets(e, pts[:, 0], 0.0, n_rows - 1.0)
    return out
