"""Fitting a known lattice to located columns: the in-plane rotation, the origin and every
column's site, with the fast-scan (x) axis taken as exact.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from stem_live.lattices import Lattice


def _rot(phi: float) -> np.ndarray:
    """2x2 matrix on (y, x) column vectors turning atan2(y, x) by +phi (simulator.specimen.rot)."""
    c, s = math.cos(phi), math.sin(phi)
    return np.array([[c, s], [-s, c]])


@dataclass(frozen=True)
class LatticeFit:
    """The known lattice placed on the first frame (nominal nm, (y, x)).

    ``affine`` (2, 2) and ``offset_nm``: apparent offset from ``origin_nm`` ~= affine @ (ideal
    offset in the given lattice's frame) + offset_nm; it includes the distortion and the drift
    during the first frame, and is used only to find each column's site. ``rotation_rad``: the
    in-plane rotation of the crystal against the given vectors (fast-scan axis exact).
    ``k0``: basis index of the column at ``origin_nm``."""

    lattice: Lattice
    origin_nm: np.ndarray
    k0: int
    affine: np.ndarray
    offset_nm: np.ndarray
    rotation_rad: float
    rms_nm: float
    n_inliers: int
    guess_rad: float = 0.0

    @property
    def total_rotation_rad(self) -> float:
        """The crystal's rotation against the lattice as given (the guess plus the fit)."""
        return self.guess_rad + self.rotation_rad

    def _nearest(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nearest site to ideal offsets u (n, 2): (site offset nm (n, 2), residual nm (n,), key (n,))."""
        cell = self.lattice.cell
        fb = np.asarray(self.lattice.basis, float).reshape(-1, 2)
        rel = fb - fb[self.k0]                                   # (K, 2) fractional
        f = np.linalg.solve(cell, u.T).T                         # (n, 2) fractional
        r = f[:, None, :] - rel[None, :, :]                      # (n, K, 2)
        n = np.rint(r)
        res = (r - n) @ cell.T                                   # (n, K, 2) nm
        d = np.hypot(res[..., 0], res[..., 1])
        k = np.argmin(d, axis=1)
        i = np.arange(len(u))
        nn = n[i, k].astype(np.int64)
        site = (nn + rel[k]) @ cell.T
        key = ((nn[:, 0] + (1 << 20)) << 24) | ((nn[:, 1] + (1 << 20)) << 3) | k.astype(np.int64)
        return site, d[i, k], key

    def assign(self, q_nm: np.ndarray, *, tol_frac: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sites of columns at first-frame positions ``q_nm`` (n, 2) nm (the frame's positions
        minus its tracked shift): (ideal position nm (n, 2), site key (n,), ok (n,)). The ideal
        position is the undistorted lattice, turned by ``rotation_rad``, placed at the origin;
        ``ok``: within ``tol_frac`` x the smallest column distance of a site."""
        q = np.asarray(q_nm, float).reshape(-1, 2)
        u = np.linalg.solve(self.affine, (q - self.origin_nm - self.offset_nm).T).T
        site, d, key = self._nearest(u)
        ideal = self.origin_nm + self.offset_nm + site @ _rot(self.rotation_rad).T
        return ideal, key, d < tol_frac * self.lattice.min_distance_nm


def fit_lattice(points_nm: np.ndarray, lattice: Lattice, *, rotation_guess_rad: float = 0.0,
                fit_rotation: bool = True, start_radius_frac: float = 3.0, grow: float = 1.6,
                tol_frac: float = 0.3, max_iter: int = 30) -> LatticeFit:
    """Place ``lattice`` on one frame's columns ``points_nm`` (n, 2) (nominal nm, (y, x)).

    Starting from the column nearest the centre, sites are assigned in a disc that grows by
    ``grow`` per step (from ``start_radius_frac`` x the smallest column distance), with an
    affine map refitted on the inliers each time, so scale errors of several % and rotations
    of a few degrees still find the right sites. ``rotation_guess_rad``: the crystal's known
    orientation (e.g. minus the scan rotation); ``fit_rotation``: fit the rest (LQ
    decomposition of the affine map: fast-scan axis exact), else take the guess as exact."""
    pts = np.asarray(points_nm, float).reshape(-1, 2)
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    if len(pts) < 8:
        raise ValueError(f"the first frame has {len(pts)} columns: too few to place the lattice on")
    lat = replace(lattice, a_nm=tuple(_rot(rotation_guess_rad) @ np.asarray(lattice.a_nm, float)),
                  b_nm=tuple(_rot(rotation_guess_rad) @ np.asarray(lattice.b_nm, float)))
    dmin = lat.min_distance_nm
    centre = np.median(pts, axis=0)
    origin = pts[np.argmin(np.hypot(*(pts - centre).T))]
    rel = pts - origin
    dist = np.hypot(*rel.T)
    radius = start_radius_frac * dmin
    # which basis column sits at the origin: the best match in the starting disc
    eye, zero = np.eye(2), np.zeros(2)
    inside = dist <= radius
    scores = [np.median(LatticeFit(lat, origin, k, eye, zero, 0.0, 0.0, 0)._nearest(rel[inside])[1])
              for k in range(len(lat.basis))]
    k0 = int(np.argmin(scores))
    fit = LatticeFit(lat, origin, k0, eye, zero, 0.0, np.inf, 0)
    good = np.zeros(len(pts), bool)
    last = False
    for _ in range(max_iter):
        inside = dist <= radius
        u = np.linalg.solve(fit.affine, (rel - fit.offset_nm).T).T
        site, d, _ = fit._nearest(u)
        good = inside & (d < tol_frac * dmin)
        if good.sum() >= 6:
            X = np.column_stack([site[good], np.ones(good.sum())])
            coef, *_ = np.linalg.lstsq(X, rel[good], rcond=None)
            res = rel[good] - X @ coef
            fit = replace(fit, affine=coef[:2].T, offset_nm=coef[2],
                          rms_nm=float(np.sqrt(np.mean(np.sum(res ** 2, axis=1)))), n_inliers=int(good.sum()))
        if last:
            break
        if radius > dist.max():
            last = True                                           # one more pass over everything
        radius *= grow
    if fit.n_inliers < 8 or fit.n_inliers < 0.5 * len(pts):
        raise ValueError(f"the lattice {lattice.name or 'given'} does not fit the first frame's columns "
                         f"({fit.n_inliers} of {len(pts)} on a site): check the lattice and the pixel size")
    theta = float(np.arctan2(fit.affine[0, 1], fit.affine[0, 0])) if fit_rotation else 0.0
    return replace(fit, rotation_rad=theta, guess_rad=float(rotation_guess_rad))
