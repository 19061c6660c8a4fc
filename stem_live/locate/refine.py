"""Sub-pixel refinement of column positions: a vectorised 2-D Gaussian fit in JAX.

Every column gets a square (by default disc-shaped) window of ``window_px`` pixels centred
on the integer pixel nearest its start position, and the model

    m(y, x) = B + A * exp(-((y - y0)**2 + (x - x0)**2) / (2 s**2))

is fitted by weighted least squares with a few Levenberg-Marquardt iterations, all columns
at once (``jax.vmap``; no Python loop over columns). The image is padded with zeros and a
validity mask, so a window that crosses the image border only fits the pixels inside the
image; such columns are flagged (``border``), never dropped.

The number of columns is padded up to a bucket size (:mod:`.buckets`), so a frame with a
different number of columns does not recompile the fit unless it falls into a new bucket.
"""

from __future__ import annotations

import functools

import numpy as np

from stem_live.locate.buckets import bucket_size, count_trace


def window_for_spacing(spacing_px: float) -> int:
    """A good odd window size for a nearest-neighbour column spacing (about 0.7 spacing)."""
    r = max(2, int(round(0.35 * float(spacing_px))))
    return 2 * r + 1


def solve_sym(m, v, n: int):
    """Solve the batched symmetric positive n x n systems ``m @ x = v`` (n small) by an unrolled
    Cholesky factorisation; ``m`` is a dict {(i, j): (N,) array} for i <= j, ``v`` a list."""
    import jax.numpy as jnp

    low = {}
    for j in range(n):
        s = m[(j, j)]
        for k in range(j):
            s = s - low[(j, k)] ** 2
        d = jnp.sqrt(jnp.maximum(s, 1e-30))
        low[(j, j)] = d
        for i in range(j + 1, n):
            s = m[(j, i)]
            for k in range(j):
                s = s - low[(i, k)] * low[(j, k)]
            low[(i, j)] = s / d
    y = []
    for i in range(n):
        s = v[i]
        for k in range(i):
            s = s - low[(i, k)] * y[k]
        y.append(s / low[(i, i)])
    x = [None] * n
    for i in reversed(range(n)):
        s = y[i]
        for k in range(i + 1, n):
            s = s - low[(k, i)] * x[k]
        x[i] = s / low[(i, i)]
    return x


@functools.cache
def _build(window: int, n_iter: int, circular: bool):
    import jax
    import jax.numpy as jnp

    r = window // 2
    oy, ox = np.mgrid[-r : r + 1, -r : r + 1]
    if circular:
        shape_w = ((oy**2 + ox**2) <= (r + 0.5) ** 2).ravel()
    else:
        shape_w = np.ones(window * window, bool)
    oy = oy.ravel().astype(np.int32)
    ox = ox.ravel().astype(np.int32)
    yy = jnp.asarray(oy, jnp.float32)[None, :]
    xx = jnp.asarray(ox, jnp.float32)[None, :]
    center_k = int(np.flatnonzero((oy == 0) & (ox == 0))[0])
    lam = 1e-3

    def run(z, centers, frac, sigma0, shape):
        count_trace()  # runs at trace time only: counts compilations
        rr = centers[:, 0:1] + oy[None, :]
        cc = centers[:, 1:2] + ox[None, :]
        inside = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
        inside = inside & shape_w[None, :]
        border = jnp.any(~inside & shape_w[None, :], axis=1)
        inside = inside & jnp.isfinite(z)
        z = jnp.where(inside, z, 0.0)
        w = inside.astype(jnp.float32)
        b0 = jnp.min(jnp.where(inside, z, jnp.float32(3e38)), axis=1)
        a0 = jnp.maximum(z[:, center_k] - b0, 1e-6)
        s0 = jnp.full_like(b0, sigma0)
        p0 = (a0, frac[:, 0], frac[:, 1], s0, b0)

        def linearise(p, damping):
            a, y0, x0, s, b = p
            dy = yy - y0[:, None]
            dx = xx - x0[:, None]
            r2 = dy * dy + dx * dx
            q = 1.0 / (s * s)
            g = jnp.exp(-0.5 * r2 * q[:, None])
            ag = a[:, None] * g
            res = w * (z - b[:, None] - ag)
            agq = ag * q[:, None]
            jac = [g, agq * dy, agq * dx, agq * r2 / s[:, None]]
            # materialise the Jacobian once; otherwise XLA recomputes the exp in every sum
            jac, res = jax.lax.optimization_barrier((jac, res))
            wj = [w * j for j in jac] + [w]
            jac = jac + [None]
            m = {}
            for i in range(5):
                for k in range(i, 5):
                    if jac[k] is None:
                        m[(i, k)] = jnp.sum(wj[i], axis=1)
                    else:
                        m[(i, k)] = jnp.sum(wj[i] * jac[k], axis=1)
                m[(i, i)] = m[(i, i)] * (1.0 + damping) + 1e-12
            v = [jnp.sum(res * j, axis=1) if j is not None else jnp.sum(res, axis=1) for j in jac]
            return m, v, res

        def step(p):
            a, y0, x0, s, b = p
            m, v, res = linearise(p, lam)
            d = solve_sym(m, v, 5)
            lim = jnp.float32(1.0)
            y0n = y0 + jnp.clip(d[1], -lim, lim)
            x0n = x0 + jnp.clip(d[2], -lim, lim)
            sn = jnp.clip(s + jnp.clip(d[3], -0.5 * s, 0.5 * s), 0.3, 2.0 * r + 1.0)
            return (a + d[0], y0n, x0n, sn, b + d[4]), m, res

        p = p0
        m = res = None
        for _ in range(n_iter):  # unrolled: a few iterations, lets XLA fuse across them
            p, m, res = step(p)
        if m is None:
            m, _, res = linearise(p, 0.0)
        # statistics from the last linearisation (one step before the final parameters,
        # which is close enough for a quality measure): R^2 and the position standard error
        # from the diagonal of the normal matrix (x0, y0 are nearly uncorrelated with the
        # other parameters for a centred, symmetric peak)
        c = jnp.sum(res * res, axis=1)
        nw = jnp.maximum(jnp.sum(w, axis=1), 1.0)
        mean = jnp.sum(w * z, axis=1) / nw
        tot = jnp.sum(w * (z - mean[:, None]) ** 2, axis=1)
        r2 = 1.0 - c / jnp.maximum(tot, 1e-12)
        var = c / jnp.maximum(nw - 5.0, 1.0)
        pos_std = jnp.sqrt(var * 0.5 * (1.0 / m[(1, 1)] + 1.0 / m[(2, 2)]))
        return jnp.stack(p, axis=-1), border, r2, pos_std

    return jax.jit(run)


def refine_positions(
    image: np.ndarray,
    positions: np.ndarray,
    window_px: int,
    *,
    sigma_px: float | None = None,
    n_iter: int = 4,
    circular: bool = True,
    return_info: bool = False,
):
    """Refine column positions to sub-pixel accuracy with a 2-D Gaussian fit per column.

    Parameters
    ----------
    image : (H, W) array, the raw (or background-flattened) frame.
    positions : (N, 2) start positions (row, col) in pixels; sub-pixel allowed.
    window_px : fit window size in pixels (made odd); about 0.7 x the nearest-neighbour
        spacing is a good choice (``window_for_spacing``).
    sigma_px : start value for the Gaussian width (default window_px / 5).
    n_iter : Levenberg-Marquardt iterations.
    circular : fit only the disc inscribed in the window (keeps neighbours out).
    return_info : also return a dict with ``sigma``, ``background``, ``r2`` (fit R^2),
        ``ok`` and ``pos_std`` (position standard error from the fit covariance, px).

    Returns
    -------
    positions (N, 2) float64, intensity (N,) float64 (fitted peak height above the local
    background), border (N,) bool [, info].
    A fit that fails (non-finite, moved out of its window, non-positive peak) keeps its start
    position and gets ``ok = False``.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"refine_positions needs a 2-D image, got shape {image.shape}")
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    n = len(pos)
    window = int(window_px)
    if window % 2 == 0:
        window += 1
    window = max(window, 3)
    r = window // 2
    if sigma_px is None:
        sigma_px = window / 5.0
    h, w = image.shape

    if n == 0:
        out = (np.zeros((0, 2)), np.zeros(0), np.zeros(0, bool))
        if return_info:
            return out + ({"sigma": np.zeros(0), "background": np.zeros(0), "r2": np.zeros(0),
                           "ok": np.zeros(0, bool), "pos_std": np.zeros(0)},)
        return out

    img32 = np.asarray(image, dtype=np.float32)
    fn = _build(window, int(n_iter), bool(circular))

    centers = np.rint(pos)
    centers[:, 0] = np.clip(centers[:, 0], 0, h - 1)
    centers[:, 1] = np.clip(centers[:, 1], 0, w - 1)
    frac = pos - centers
    nb = bucket_size(n)
    c_pad = np.zeros((nb, 2), np.int32)
    f_pad = np.zeros((nb, 2), np.float32)
    c_pad[:n] = centers
    c_pad[n:] = (h // 2, w // 2)
    f_pad[:n] = frac
    # gather the square windows (indices clipped to the frame: the fit masks the pixels
    # outside it, and non-finite ones, itself)
    off = np.arange(-r, r + 1)
    rows = np.clip(c_pad[:, 0:1] + off, 0, h - 1)
    cols = np.clip(c_pad[:, 1:2] + off, 0, w - 1)
    z = img32[rows[:, :, None], cols[:, None, :]].reshape(nb, window * window)
    p, border, r2, pos_std = fn(z, c_pad, f_pad, np.float32(sigma_px), (h, w))
    pos_std = np.asarray(pos_std, dtype=np.float64)[:n]
    p = np.asarray(p, dtype=np.float64)[:n]
    border = np.asarray(border)[:n]
    r2 = np.asarray(r2, dtype=np.float64)[:n]

    amp, dy, dx, sig, bg = p.T
    ok = (
        np.isfinite(p).all(axis=1)
        & (np.abs(dy) <= r)
        & (np.abs(dx) <= r)
        & (amp > 0)
    )
    out_pos = np.where(ok[:, None], centers + np.stack([dy, dx], axis=1), pos)
    intensity = np.where(ok, amp, np.nan_to_num(amp))
    if return_info:
        info = {"sigma": sig, "background": bg, "r2": np.clip(np.nan_to_num(r2), 0.0, 1.0), "ok": ok,
                "pos_std": np.where(np.isfinite(pos_std), pos_std, np.inf)}
        return out_pos, intensity, border, info
    return out_pos, intensity, border
