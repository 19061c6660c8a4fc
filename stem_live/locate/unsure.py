"""Is a locator sure of its column list? Two checks beyond the quality gate (``quality.py``).

- ``column_density``: the columns found per spacing^2 of the area they occupy (the pixels
  within one spacing of a found column). Every lattice the simulator and real labs show
  fills that area at 0.75 (honeycomb: graphene, MoS2; SrTiO3 with its O columns) to 1.15
  (triangular, an fcc [110] particle) columns per spacing^2; a list that misses a large
  share of the columns (a locator that sees only every other column, a network whose map
  has few peaks) falls well below, since the columns left still occupy nearly the same area
  (half of them missing at random: 0.47-0.61). Below ``MIN_DENSITY`` the list is unsure; above
  ``MAX_DENSITY`` the spacing it was found with is too large for its columns (twice the true
  spacing: 1.4-2.1).
- ``agreement``: the F1 of two locators' lists (one-to-one within 0.3 x spacing). Below
  ``MIN_AGREEMENT`` at least one of them is poor on that frame.

``unsure_reason(columns, shape, spacing_px, other=None)`` combines them into "" (sure) or a
one-line reason.
"""

from __future__ import annotations

import numpy as np

#: columns per spacing^2 of the occupied area below which a list is unsure (complete lattices of the
#: simulator's presets and detectors 0.76-1.02, the real graphene grain boundary 0.75, real SrTiO3
#: ADF 0.73; a 3 nm particle with its band of one spacing ~0.7; half the columns missing 0.47-0.61)
MIN_DENSITY = 0.6
#: ... above which the spacing is too large for the columns found (complete lattices <= 1.15)
MAX_DENSITY = 1.4
#: F1 between two locators' lists below which they disagree strongly (the presets: >= 0.97)
MIN_AGREEMENT = 0.8


def column_density(positions: np.ndarray, shape: tuple[int, int], spacing_px: float) -> float:
    """Columns per spacing^2 (dimensionless) of the area within ``spacing_px`` of any of the (N, 2)
    (row, col) px ``positions`` inside the (H, W) frame ``shape``. 0 for no columns."""
    from scipy import ndimage

    pos = np.asarray(positions, np.float64).reshape(-1, 2)
    pos = pos[np.isfinite(pos).all(axis=1)]
    if len(pos) == 0:
        return 0.0
    h, w = int(shape[0]), int(shape[1])
    ij = np.clip(np.rint(pos).astype(int), 0, [h - 1, w - 1])
    empty = np.ones((h, w), bool)
    empty[ij[:, 0], ij[:, 1]] = False
    occupied = float(np.count_nonzero(ndimage.distance_transform_edt(empty) <= spacing_px))
    return len(pos) * float(spacing_px) ** 2 / max(occupied, 1.0)


def agreement(a: np.ndarray, b: np.ndarray, spacing_px: float) -> float:
    """F1 (0-1) of two (N, 2) / (M, 2) px column lists, matched one to one (mutual nearest
    neighbours) within 0.3 x ``spacing_px``; 1 when both are empty, 0 when one is."""
    from scipy.spatial import cKDTree

    a = np.asarray(a, np.float64).reshape(-1, 2)
    b = np.asarray(b, np.float64).reshape(-1, 2)
    if len(a) == 0 or len(b) == 0:
        return float(len(a) == len(b))
    tol = 0.3 * float(spacing_px)
    d_ab, j = cKDTree(b).query(a)
    _, i = cKDTree(a).query(b)
    n = int(np.count_nonzero((d_ab <= tol) & (i[j] == np.arange(len(a)))))
    return 2.0 * n / (len(a) + len(b))


def unsure_reason(positions: np.ndarray, shape: tuple[int, int], spacing_px: float, *,
                  other: np.ndarray | None = None, other_name: str = "the other locator",
                  min_density: float = MIN_DENSITY, max_density: float = MAX_DENSITY,
                  min_agreement: float = MIN_AGREEMENT) -> str:
    """"" where the (N, 2) px column ``positions`` of one frame look complete, else a one-line
    reason: too few (or too many) columns for the area they occupy (``column_density``), or (``other``: a
    second locator's columns of the same frame) the two lists disagree (``agreement``)."""
    dens = column_density(positions, shape, spacing_px)
    if dens < min_density:
        return (f"few columns for the area: {dens:.2f} per spacing^2 where they lie (a lattice fills it at >= "
                f"{min_density:g}); columns may be missing, or the spacing {spacing_px:.3g} px is wrong")
    if dens > max_density:
        return (f"many columns for the spacing: {dens:.2f} per spacing^2 where they lie (a lattice: <= "
                f"{max_density:g}); the spacing {spacing_px:.3g} px may be too large (give --spacing-px)")
    if other is not None:
        f1 = agreement(positions, other, spacing_px)
        if f1 < min_agreement:
            return (f"the locators disagree: {len(positions)} columns here, {len(other)} by {other_name}, "
                    f"F1 {f1:.2f} between them (< {min_agreement:g})")
    return ""
