"""Per-scan-line x offsets (line jitter) from the fixed-width fit's residuals.

A column's image spans several scan lines, and every line of the fast scan can be displaced
along x on its own (random line jitter, mains pick-up). The fit of a column measures the
information-weighted mean offset of the lines it spans; where the column's centre appears,
on the line through it, differs from that by the jitter of that line (0.2 px rms on the
simulated graphene). Every line crosses many columns, so its offset can be measured.

Input, for every column c and each line i of its fit window: ``b_ci / a_ci``, the Gauss-Newton
x-step that line alone asks for (relative to the fitted centre), and ``a_ci``, its Fisher
information (1 / px**2). The estimate minimises

    sum_ci a_ci (b_ci / a_ci - X_c - d_row(c, i))**2  +  sum_r d_r**2 / s**2

over per-column offsets X_c and per-line shifts d_r (px, the image content's x shift on line
r), by alternating weighted means. The prior variance s**2 is estimated from the frame
(empirical Bayes: the spread of the shifts less their noise), so a frame without jitter keeps
its positions (d ~ 0) and a sparse frame, where lines cannot be told apart from columns, is
shrunk towards no correction. A column centred on row y then sits at x + X_c + d_rint(y)
(``refine._line_at``: averaged over the lines y may round to, by its uncertainty).
"""

from __future__ import annotations

import numpy as np


def line_shifts(row_b: np.ndarray, row_a: np.ndarray, first_row: np.ndarray, n_rows: int, *,
                n_iter: int = 3, start_px: float = 0.5, floor_px: float = 0.01):
    """Per-column offsets and per-line x shifts (px) from the fit's per-line sums.

    Parameters
    ----------
    row_b, row_a : (N, S) per column and window line (top to bottom): sum of w r dm/dx and of
        w (dm/dx)**2 over the line's window pixels (w the weights, r the residuals, m the
        model), both divided by the column's reduced chi**2 (so ``row_a`` is information).
        Columns that are not to be used have ``row_a`` = 0.
    first_row : (N,) int, the frame row of each window's first line.
    n_rows : lines in the frame.
    n_iter : alternating iterations (>= 1), after a first pass with the loose prior
        ``start_px`` (px) that estimates the prior from the frame.
    floor_px : smallest prior std (a frame without jitter is shrunk to ~0 correction).

    Returns
    -------
    col_dx (N,) px: add to each column's fitted x, with the shift of its centre's line;
    line_dx (n_rows,) px: x shift of the image content on every line (0 where no column
    informs it); jitter_px: the estimated rms line shift (the prior std used).
    """
    rows = first_row[:, None].astype(np.intp) + np.arange(row_a.shape[1])[None, :]
    usable = (rows >= 0) & (rows < n_rows) & (row_a > 0) & np.isfinite(row_a) & np.isfinite(row_b)
    a = np.where(usable, row_a, np.float32(0.0)).astype(np.float32)
    b = np.where(a > 0, row_b, np.float32(0.0)).astype(np.float32)
    idx = np.clip(rows, 0, n_rows - 1).ravel()
    den = np.bincount(idx, a.ravel(), n_rows)
    bsum = np.bincount(idx, b.ravel(), n_rows)
    a_col = a.sum(axis=1)
    b_col = b.sum(axis=1)
    safe = np.maximum(a_col, 1e-30)

    def solve(prec: float, x: np.ndarray, n: int):
        for _ in range(n):
            d = (bsum - np.bincount(idx, (a * x[:, None]).ravel(), n_rows)) / (den + prec)
            x = (b_col - np.einsum("ij,ij->i", a, np.take(d, idx).reshape(a.shape))) / safe
        return np.where(a_col > 0, x, 0.0), d

    seen = den > 0
    if not seen.any():
        return np.zeros(len(a)), np.zeros(n_rows), 0.0
    # the prior from the first, loosely regularised pass (the fit already centred every
    # column: b sums to ~0 over its lines, so X = 0 is the first column estimate)
    prec0 = 1.0 / start_px**2
    d0 = bsum / (den + prec0)
    noise = np.mean(1.0 / (den[seen] + prec0))
    var = max(float(np.mean(d0[seen] ** 2) - noise), floor_px**2)
    x, d = solve(1.0 / var, np.zeros(len(a)), max(1, int(n_iter)))
    return x, d, float(np.sqrt(var))
