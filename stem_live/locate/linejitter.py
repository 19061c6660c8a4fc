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
r). Each X_c is eliminated (it is the weighted mean of its lines' steps less their shifts),
which leaves a banded, positive-definite system in the d_r, solved by conjugate gradients
(Jacobi preconditioner, sparse matrix-vector products). Alternating weighted means, used
before, were not converged after 3 passes (slow line-shift patterns such as 50 Hz pick-up
trade off against the column offsets): on a noise-free frame with 50 Hz jitter they left
0.071 px, the converged solution 0.046 px. The prior variance s**2 is estimated from the frame
(empirical Bayes: the spread of the shifts less their noise), so a frame without jitter keeps
its positions (d ~ 0) and a sparse frame, where lines cannot be told apart from columns, is
shrunk towards no correction. A column centred on row y then sits at x + X_c + d_rint(y)
(``refine._line_at``: averaged over the lines y may round to, by its uncertainty).
"""

from __future__ import annotations

import numpy as np


def line_shifts(row_b: np.ndarray, row_a: np.ndarray, first_row: np.ndarray, n_rows: int, *,
                n_iter: int = 10, start_px: float = 0.5, floor_px: float = 0.01,
                prior_dx: np.ndarray | None = None, prior_prec: np.ndarray | None = None):
    """Per-column offsets and per-line x shifts (px) from the fit's per-line sums.

    Parameters
    ----------
    row_b, row_a : (N, S) per column and window line (top to bottom): sum of w r dm/dx and of
        w (dm/dx)**2 over the line's window pixels (w the weights, r the residuals, m the
        model), both divided by the column's reduced chi**2 (so ``row_a`` is information).
        Columns that are not to be used have ``row_a`` = 0.
    first_row : (N,) int, the frame row of each window's first line.
    n_rows : lines in the frame.
    n_iter : conjugate-gradient iterations (>= 1; 10 reach ~1e-3 px of the exact minimum on
        a 1024 px frame), after a first pass with the loose prior ``start_px`` (px) that
        estimates the prior from the frame.
    floor_px : smallest prior std (a frame without jitter is shrunk to ~0 correction).
    prior_dx, prior_prec : (N,) optional Gaussian prior on each column's offset X_c: its mean
        (px, relative to the fitted centre) and precision (1 / px**2; 0 = none), e.g. where
        the tracked lattice predicts the column (``lattice_prior``). A column known a priori
        no longer trades off against the lines it spans, so they are measured absolutely.

    Returns
    -------
    col_dx (N,) px: add to each column's fitted x, with the shift of its centre's line;
    line_dx (n_rows,) px: x shift of the image content on every line (0 where no column
    informs it); jitter_px: the estimated rms line shift (the prior std used).
    """
    import scipy.sparse as sp

    n, n_win = row_a.shape
    rows = first_row[:, None].astype(np.intp) + np.arange(n_win)[None, :]
    usable = (rows >= 0) & (rows < n_rows) & (row_a > 0) & np.isfinite(row_a) & np.isfinite(row_b)
    a = np.where(usable, row_a, 0.0).astype(np.float64)
    b = np.where(a > 0, row_b, 0.0).astype(np.float64)
    idx = np.clip(rows, 0, n_rows - 1)
    # A: (N, n_rows), column c's information on each line of its window (one CSR row each)
    A = sp.csr_matrix((a.ravel(), idx.ravel(), np.arange(0, n * n_win + 1, n_win)), shape=(n, n_rows))
    At = A.T  # CSC: its matrix-vector product is the scatter-add over columns
    den = np.bincount(idx.ravel(), a.ravel(), n_rows)
    bsum = np.bincount(idx.ravel(), b.ravel(), n_rows)
    a_col = a.sum(axis=1)
    b_col = b.sum(axis=1)
    if prior_prec is not None:  # the prior adds pi (X - mu)**2: pi to X's information, pi mu to its sum
        pi = np.where(a_col > 0, np.nan_to_num(np.asarray(prior_prec, np.float64), posinf=0.0), 0.0)
        pi = np.maximum(pi, 0.0)
        b_col = b_col + pi * np.where(pi > 0, np.nan_to_num(np.asarray(prior_dx, np.float64)), 0.0)
        a_col = a_col + pi
    inv = np.where(a_col > 0, 1.0 / np.maximum(a_col, 1e-300), 0.0)
    seen = den > 0
    if not seen.any():
        return np.zeros(n), np.zeros(n_rows), 0.0
    # the prior from the first, loosely regularised pass (the fit already centred every
    # column: b sums to ~0 over its lines, so X = 0 is the first column estimate)
    prec0 = 1.0 / start_px**2
    d0 = bsum / (den + prec0)
    noise = np.mean(1.0 / (den[seen] + prec0))
    var = max(float(np.mean(d0[seen] ** 2) - noise), floor_px**2)
    # X eliminated: (diag(den + 1/var) - A^T diag(1/a_col) A) d = bsum - A^T (b_col / a_col)
    # (a_col, b_col with the prior's pi and pi mu added)
    diag = den + 1.0 / var
    rhs = bsum - At @ (b_col * inv)
    d = np.zeros(n_rows)
    r = rhs.copy()
    z = r / diag
    p = z.copy()
    rz = rz0 = float(r @ z)
    for _ in range(max(1, int(n_iter))):
        if rz <= 1e-12 * rz0 or rz <= 1e-30:  # converged (residual down 1e6 in this norm)
            break
        q = diag * p - At @ (inv * (A @ p))
        alpha = rz / float(p @ q)
        d += alpha * p
        r -= alpha * q
        z = r / diag
        rz_new = float(r @ z)
        p = z + (rz_new / rz) * p
        rz = rz_new
    x = np.where(a_col > 0, (b_col - A @ d) * inv, 0.0)
    return x, d, float(np.sqrt(var))
