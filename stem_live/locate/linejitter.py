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
(Jacobi preconditioner, sparse matrix-vector products), not by alternating weighted means:
those are not converged after 3 passes (slow line-shift patterns such as 50 Hz pick-up trade
off against the column offsets): on a noise-free frame with 50 Hz jitter they leave 0.071 px,
the converged solution 0.046 px. The prior variance s**2 is estimated from the frame
(empirical Bayes: the spread of the shifts less their noise), so a frame without jitter keeps
its positions (d ~ 0) and a sparse frame, where lines cannot be told apart from columns, is
shrunk towards no correction. A column centred on row y then sits at x + X_c + d_rint(y)
(``refine._line_at``: averaged over the lines y may round to, by its uncertainty).

Periodic pick-up (mains hum, 50 / 60 Hz) is a sinusoid in scan time, not a random offset per
line: one amplitude and phase for the whole frame, and it moves on along a line too (by
2 pi / 18.6 rad across a line on the simulator, so a column at the left edge and one at the
right see it up to 0.17 px apart). With ``col_x`` given, the solution above is searched for
a periodogram peak (``pickup_min_chi2``; a frame without pick-up finds none and keeps that
solution exactly); where there is one, the model gains the pick-up p(t) (``LineShifts``: a
sinusoid whose amplitude and phase may drift linearly over the frame, which also takes up a
small error in the peak's frequency) at every column's window line, t = row + pixel_lines *
x the scan time in line periods. Its four coefficients are solved with the rest (offsets and
line shifts for five right-hand sides in one conjugate-gradient run, then a 4 x 4 system),
and the line prior holds only the random part. A column then sits at
x + X_c + d_rint(y) + p(y + pixel_lines * x). Free column offsets absorb most of the
pick-up's share of a column's window on their own; the model pays where a prior holds them
(``refine_fixed_width`` uses it only then).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np


@dataclass(frozen=True)
class LineShifts:
    """The de-jitter of one frame (px, along x).

    col_dx (N,): each column's offset X_c: add to its fitted x, with ``line_dx`` of its
        centre's line and the pick-up at its centre (``pickup_at``);
    line_dx (n_rows,): the random shift of every line (0 where no column informs it);
    jitter_px: the estimated rms of ``line_dx`` (the prior std used);
    pixel_lines: the scan time of one pixel, in line periods;
    pickup_rad_per_line, pickup_coef: the periodic pick-up, ``(a + c tau) cos(w u) + (b + d
        tau) sin(w u)`` with ``pickup_coef`` = (a, b, c, d), w = ``pickup_rad_per_line``,
        u = t - n_rows / 2 the scan time from the frame's middle line (line periods) and
        tau = u / n_rows: a sinusoid whose amplitude and phase may drift linearly over the
        frame, which also absorbs a small error in w (w = 0: no pick-up);
    n_rows: lines in the frame.
    """

    col_dx: np.ndarray
    line_dx: np.ndarray
    jitter_px: float
    pixel_lines: float = 0.0
    pickup_rad_per_line: float = 0.0
    pickup_coef: np.ndarray = field(default_factory=lambda: np.zeros(4))
    n_rows: int = 0

    def _basis(self, t: np.ndarray) -> np.ndarray:
        u = t - 0.5 * self.n_rows
        tau = u / max(self.n_rows, 1)
        c, s = np.cos(self.pickup_rad_per_line * u), np.sin(self.pickup_rad_per_line * u)
        return np.stack([c, s, tau * c, tau * s], axis=-1)

    def _basis_at(self, row: np.ndarray, col: np.ndarray) -> np.ndarray:
        """``_basis(row + pixel_lines * col)`` for integer lines ``row`` (N, S) and columns at
        ``col`` (N,), basis first: (4, N, S), by angle addition from a table per line and one
        per column (two sines and cosines per line and column instead of per window line)."""
        w = self.pickup_rad_per_line
        lines = np.arange(self.n_rows) - 0.5 * self.n_rows
        cl, sl = np.cos(w * lines)[row], np.sin(w * lines)[row]
        cx, sx = np.cos(w * self.pixel_lines * col)[:, None], np.sin(w * self.pixel_lines * col)[:, None]
        out = np.empty((4,) + row.shape)
        np.subtract(cl * cx, sl * sx, out=out[0])
        np.add(sl * cx, cl * sx, out=out[1])
        tau = (lines[row] + self.pixel_lines * col[:, None]) / max(self.n_rows, 1)
        np.multiply(tau, out[0], out=out[2])
        np.multiply(tau, out[1], out=out[3])
        return out

    def pickup_at(self, row: np.ndarray, col: np.ndarray) -> np.ndarray:
        """The pick-up's x shift (px) where the beam was at (row, col) (px, broadcast)."""
        row, col = np.asarray(row, np.float64), np.asarray(col, np.float64)
        if not self.pickup_rad_per_line:
            return np.zeros(np.broadcast(row, col).shape)
        return self._basis(row + self.pixel_lines * col) @ self.pickup_coef

    def line_total(self, col: float) -> np.ndarray:
        """(n_rows,) every line's whole x shift (random + pick-up) at column ``col`` (px)."""
        return self.line_dx + self.pickup_at(np.arange(len(self.line_dx)), col)

    def pickup_model(self) -> tuple[float, ...]:
        """The pick-up as plain floats (``pickup_shift`` evaluates it): (rad per line, a, b, c,
        d, pixel_lines, n_rows)."""
        return (float(self.pickup_rad_per_line), *(float(v) for v in self.pickup_coef),
                float(self.pixel_lines), float(self.n_rows))

    @property
    def pickup_px(self) -> float:
        """The pick-up's amplitude at the frame's middle line (px; 0 where none)."""
        return float(np.hypot(self.pickup_coef[0], self.pickup_coef[1]))

    @property
    def pickup_period_lines(self) -> float:
        """The pick-up's period (line periods; 0 where none), its frequency corrected by the
        linear phase drift the fit found."""
        if not self.pickup_rad_per_line:
            return 0.0
        # a cos((w + dw) u) + b sin((w + dw) u) ~ ... + tau n dw (b cos(w u) - a sin(w u))
        a, b, c, d = self.pickup_coef
        dw = (c * b - d * a) / (max(self.n_rows, 1) * max(a * a + b * b, 1e-30))
        return float(2.0 * np.pi / (self.pickup_rad_per_line + dw))


def pickup_shift(model: tuple[float, ...], row, col) -> np.ndarray:
    """The pick-up's x shift (px) at (row, col) (px, broadcast) from ``LineShifts.pickup_model()``."""
    w, a, b, c, d, pixel_lines, n_rows = model
    ls = LineShifts(np.zeros(0), np.zeros(int(n_rows)), 0.0, pixel_lines=pixel_lines, pickup_rad_per_line=w,
                    pickup_coef=np.array([a, b, c, d]), n_rows=int(n_rows))
    return ls.pickup_at(row, col)


def _sinusoids(y: np.ndarray, r: np.ndarray, w: np.ndarray):
    """Least-squares ``ca cos(w r) + sa sin(w r)`` to ``y`` (at lines ``r``) for every angular
    frequency in ``w`` (rad per line): (ca, sa, gain), gain the fit's share of sum(y**2)."""
    rr = r.astype(np.float64)
    c, s = np.cos(w[:, None] * rr[None, :]), np.sin(w[:, None] * rr[None, :])
    cc, ss, cs = (c * c).sum(1), (s * s).sum(1), (c * s).sum(1)
    yc, ys = c @ y, s @ y
    det = cc * ss - cs * cs
    ca, sa = (ss * yc - cs * ys) / det, (cc * ys - cs * yc) / det
    return ca, sa, ca * yc + sa * ys


def _pickup(d: np.ndarray, seen: np.ndarray, *, min_period: float, min_cycles: float,
            min_chi2: float, oversample: int = 4, n_refine: int = 9) -> tuple[float, float]:
    """The strongest sinusoid in the per-line values ``d`` (seen lines only): its angular
    frequency (rad per line; 0 where the peak is not significant) and the peak's chi**2
    (its least-squares gain against the residual scatter)."""
    r = np.flatnonzero(seen)
    n = len(d)
    if len(r) < 4 * min_cycles:
        return 0.0, 0.0
    v = np.where(seen, d - d[r].mean(), 0.0)
    m = oversample * n
    power = np.abs(np.fft.rfft(v, m)) ** 2
    f = np.arange(len(power)) / m  # cycles per line
    band = (f >= min_cycles / n) & (f <= 1.0 / min_period)
    if not band.any():
        return 0.0, 0.0
    k = np.flatnonzero(band)[np.argmax(power[band])]
    y = v[r]
    yy = float(y @ y)

    def chi2_of(gain: float) -> float:  # a sinusoid's gain against the scatter left about it
        return float(gain) / max((yy - float(gain)) / max(len(r) - 3, 1), 1e-12)

    # the periodogram's peak as a least-squares gain (2 |F|**2 / n for evenly seen lines):
    # far below the threshold, the frame has no pick-up (no refinement needed)
    chi2 = chi2_of(2.0 * power[k] / len(r))
    if chi2 < 0.5 * min_chi2:
        return 0.0, chi2
    # refine around the FFT bin by least squares, then a parabola through the best three
    # (bins 1 / (4 n) cycles per line apart are still ~0.8 rad of phase over the frame)
    w = 2.0 * np.pi * (f[k] + np.linspace(-1.0, 1.0, n_refine) / m)
    _, _, gain = _sinusoids(y, r, w)
    j = int(np.clip(np.argmax(gain), 1, n_refine - 2))
    g0, g1, g2 = gain[j - 1 : j + 2]
    curv = g0 - 2.0 * g1 + g2
    step = 0.5 * (g0 - g2) / curv if curv < 0 else 0.0
    w_best = np.array([w[j] + np.clip(step, -1.0, 1.0) * (w[1] - w[0])])
    _, _, gain = _sinusoids(y, r, w_best)
    chi2 = chi2_of(gain[0])
    if not np.isfinite(chi2) or chi2 < min_chi2:
        return 0.0, chi2
    return float(w_best[0]), chi2


def _cg(matvec, rhs: np.ndarray, diag: np.ndarray, n_iter: int) -> np.ndarray:
    """Conjugate gradients for (n,) or (n, m) right-hand sides (columns solved together),
    Jacobi-preconditioned by ``diag``."""
    rhs = rhs.reshape(len(rhs), -1)
    d = np.zeros_like(rhs)
    r = rhs.copy()
    z = r / diag[:, None]
    p = z.copy()
    rz = rz0 = np.einsum("ij,ij->j", r, z)
    for _ in range(max(1, int(n_iter))):
        done = (rz <= 1e-12 * rz0) | (rz <= 1e-30)  # converged (residual down 1e6 in this norm)
        if done.all():
            break
        q = matvec(p)
        pq = np.einsum("ij,ij->j", p, q)
        alpha = np.where(done, 0.0, rz / np.where(pq > 0, pq, 1.0))
        d += alpha * p
        r -= alpha * q
        z = r / diag[:, None]
        rz_new = np.einsum("ij,ij->j", r, z)
        p = z + np.where(done, 0.0, rz_new / np.where(rz > 0, rz, 1.0)) * p
        rz = rz_new
    return d


def line_shifts(row_b: np.ndarray, row_a: np.ndarray, first_row: np.ndarray, n_rows: int, *,
                n_iter: int = 10, start_px: float = 0.5, floor_px: float = 0.01,
                prior_dx: np.ndarray | None = None, prior_prec: np.ndarray | None = None,
                col_x: np.ndarray | None = None, pixel_lines: float = 0.0, pickup_min_chi2: float = 60.0,
                pickup_min_period: float = 2.1, pickup_min_cycles: float = 4.0,
                pickup_prior_px: float = 1.0) -> LineShifts:
    """Per-column offsets, per-line x shifts and the periodic pick-up (px) from the fit's sums.

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
    col_x : (N,) the columns' x (px): with it, periodic pick-up is looked for and modelled
        (without it, none is).
    pixel_lines : the scan time of one pixel in line periods (dwell / line time; 1 / width
        for a flyback short against the line): how far the pick-up moves on along a line.
    pickup_min_chi2 : the periodogram peak's chi**2 (against the lines' scatter about it)
        needed to model a pick-up (a frame of white line jitter peaks at ~20 by chance).
    pickup_min_period, pickup_min_cycles : the pick-up's period is looked for between
        ``pickup_min_period`` lines and ``n_rows / pickup_min_cycles`` lines.
    pickup_prior_px : prior std of each pick-up coefficient (px; loose).
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
        return LineShifts(np.zeros(n), np.zeros(n_rows), 0.0, float(pixel_lines), n_rows=int(n_rows))
    # the prior from the first, loosely regularised pass (the fit already centred every
    # column: b sums to ~0 over its lines, so X = 0 is the first column estimate)
    prec0 = 1.0 / start_px**2
    d0 = bsum / (den + prec0)
    noise = np.mean(1.0 / (den[seen] + prec0))
    var = max(float(np.mean(d0[seen] ** 2) - noise), floor_px**2)
    # X eliminated: (diag(den + 1/var) - A^T diag(1/a_col) A) d = bsum - A^T (b_col / a_col)
    # (a_col, b_col with the prior's pi and pi mu added)

    def system(diag: np.ndarray):
        return lambda p: diag[:, None] * p - At @ (inv[:, None] * (A @ p))

    diag = den + 1.0 / var
    d = _cg(system(diag), bsum - At @ (b_col * inv), diag, n_iter)[:, 0]
    x = np.where(a_col > 0, (b_col - A @ d) * inv, 0.0)
    plain = LineShifts(x, d, float(np.sqrt(var)), float(pixel_lines), n_rows=int(n_rows))
    # the pick-up's frequency from these line shifts (the loose pass's are biased by the
    # column offsets they leave in: 18.52 for 18.6 lines on a synthetic frame, 18.59 from these)
    w_pk = 0.0
    if col_x is not None:
        w_pk, _ = _pickup(d, seen, min_period=pickup_min_period, min_cycles=pickup_min_cycles,
                          min_chi2=pickup_min_chi2)
    if not w_pk:
        return plain
    # the line prior then holds the random part only: from the loose pass less its sinusoid
    r_seen = np.flatnonzero(seen)
    ca, sa, _ = _sinusoids(d0[r_seen], r_seen, np.array([w_pk]))
    white = d0[r_seen] - ca[0] * np.cos(w_pk * r_seen) - sa[0] * np.sin(w_pk * r_seen)
    var = max(float(np.mean(white**2) - noise), floor_px**2)
    diag = den + 1.0 / var
    # with the pick-up p = g . theta (``LineShifts._basis``, four functions of scan time) at
    # every column's window line: the offsets and line shifts for y and for each g (five
    # right-hand sides), then theta from the 4 x 4 normal equations of the profiled objective
    out = LineShifts(np.zeros(n), np.zeros(n_rows), float(np.sqrt(var)), float(pixel_lines), w_pk, np.zeros(4),
                     int(n_rows))
    g = out._basis_at(idx, np.nan_to_num(np.asarray(col_x, np.float64)))  # (k, N, S)
    k = len(g)
    ag = a[None] * g
    gsum = np.stack([np.bincount(idx.ravel(), ag[j].ravel(), n_rows) for j in range(k)], axis=1)  # (n_rows, k)
    gcol = ag.sum(axis=2).T  # (N, k)
    g, ag = g.reshape(k, -1), ag.reshape(k, -1)
    bs, bc = np.column_stack([bsum, gsum]), np.column_stack([b_col, gcol])
    D = _cg(system(diag), bs - At @ (bc * inv[:, None]), diag, n_iter)  # (n_rows, 1 + k)
    X = np.where(a_col[:, None] > 0, (bc - A @ D) * inv[:, None], 0.0)  # (N, 1 + k)
    # H_jk = sum a g_j g_k - sum_c gcol_j X^(k) - sum_r gsum_j D^(k); the right side likewise for y
    H = g @ ag.T - gcol.T @ X[:, 1:] - gsum.T @ D[:, 1:]
    rhs = g @ b.ravel() - gcol.T @ X[:, 0] - gsum.T @ D[:, 0]
    theta = np.linalg.solve(H + np.eye(k) / pickup_prior_px**2, rhs)
    d = D[:, 0] - D[:, 1:] @ theta
    x = X[:, 0] - X[:, 1:] @ theta
    return replace(out, col_dx=np.where(a_col > 0, x, 0.0), line_dx=d, pickup_coef=theta)
