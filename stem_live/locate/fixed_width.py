"""The fixed-width Gaussian fit of every column with its neighbours' model subtracted
(:func:`refine_fixed_width`), on the plain or the flyback-distorted scan, with the lattice prior
and the line de-jitter where they are given.
"""

from __future__ import annotations

import functools
import warnings

import numpy as np

from stem_live.locate import flyback
from stem_live.locate.buckets import count_trace, fit_chunk, note_bucket, side_fit_ready, stream_bucket
from stem_live.locate.refine import solve_sym

#: headroom of the side fits' padded sizes (the columns near the left edge, those beside columns
#: outside the frame): a few hundred columns at most, so a generous size costs little and spares
#: the compilations a count wandering over a bucket edge would make (1.1: 5 in 14 frames at 1024 px)
SIDE_HEADROOM = 1.5

# ----------------------------------------------------------------------------- fixed width
@functools.cache
def _build_fixed(window: int, n_iter: int, fit_b: bool, line_sums: bool = False, warped: bool = False):
    """Jit'd pass of the fixed-width Gaussian fit with the neighbours' model subtracted (see
    ``refine_fixed_width``); windows are the discs inscribed in (window x window). Every column
    is independent given its neighbours' (pre-gathered) start parameters, so the columns can go
    in chunks. The normal equations are assembled from moments (one matmul per iteration) rather
    than one reduction per entry: about 1.6 ms per 1024 columns on 2 CPU cores (2.5 ms one
    reduction per entry), the same fit to 1e-5 px. With ``line_sums`` it also returns, per
    window line, the sums ``linejitter.line_shifts`` needs to measure the line jitter. With
    ``warped`` it takes each window pixel's x coordinate per column (the flyback-distorted scan:
    ``xs`` (C, K), px) instead of the regular grid; slower (moments per column), so used only
    for the columns near the left edge."""
    import jax
    import jax.numpy as jnp

    r = window // 2
    oy, ox = np.mgrid[-r : r + 1, -r : r + 1]
    disc = ((oy**2 + ox**2) <= (r + 0.5) ** 2).ravel()
    oy = oy.ravel()[disc].astype(np.int32)
    ox = ox.ravel()[disc].astype(np.int32)
    yy = jnp.asarray(oy, jnp.float32)[None, :]
    xx = jnp.asarray(ox, jnp.float32)[None, :]
    ry = jnp.arange(-r, r + 1, dtype=jnp.float32)  # the window's row (= column) offsets
    half = [int(np.sum((oy == i) & (ox > 0))) for i in range(-r, r + 1)]  # disc row i: x in -half..half

    def on_disc(gy, gx):
        """(..., window) row and column profiles of a separable function -> its values on the
        disc's pixels (..., K): each disc row is a run of the column profile times one row
        value (slices and a concatenation: no gather, which is slow on XLA:CPU)."""
        return jnp.concatenate([gy[..., i : i + 1] * gx[..., r - half[i] : r + half[i] + 1]
                                for i in range(window)], axis=-1)

    # monomials 1, y, x, y^2, x^2, y x of the window pixels: every sum of the normal
    # equations is a moment of one of six weighted arrays, so one matmul gives them all
    mono = jnp.asarray(np.stack([np.ones_like(oy), oy, ox, oy * oy, ox * ox, oy * ox], axis=1), jnp.float32)
    line_of = jnp.asarray(oy[:, None] + r == np.arange(window)[None, :], jnp.float32)  # (K, window) one-hot

    def run(img, corner, centers, p0, nb_off, nb_amp, sigma, var_c, shape, xs=None):
        """img: the frame padded by ``window // 2`` NaN pixels (``_nan_padded``); corner (C, 2)
        int: each window's top-left pixel in it (the centre clipped to the frame); centers
        (C, 2) int; p0 (C, 4) start (amp, dy, dx, bg); nb_off (C, k, 2) neighbour centres
        relative to the column's integer centre (px); nb_amp (C, k) their amplitudes; with
        ``warped``, xs (C, K) the x coordinate of every window pixel relative to the centre's
        (px; dx, nb_off and p0 in the same coordinates)."""
        count_trace()
        # the disc pixels of every window: slices of the frame (fast on XLA:CPU, unlike a
        # gather of single pixels), each disc row a run of its square's row
        square = jax.vmap(lambda c: jax.lax.dynamic_slice(img, (c[0], c[1]), (window, window)))(corner)
        z = jnp.concatenate([square[:, i, r - half[i] : r + half[i] + 1] for i in range(window)], axis=1)
        if warped:
            xx_ = xs
            ones = jnp.ones_like(xs)
            yy_ = yy * ones
            mono_ = jnp.stack([ones, yy_, xs, yy_ * yy_, xs * xs, yy_ * xs], axis=-1)  # (C, K, 6)
        else:
            xx_, mono_ = xx, mono
        rr = centers[:, 0:1] + oy[None, :]
        cc = centers[:, 1:2] + ox[None, :]
        in_frame = (rr >= 0) & (rr < shape[0]) & (cc >= 0) & (cc < shape[1])
        inside = in_frame & jnp.isfinite(z)
        z = jnp.where(inside, z, 0.0)
        w0 = inside.astype(jnp.float32)
        q = 1.0 / (sigma * sigma)
        # model of the k neighbours at every window pixel: (C, K)
        if warped:
            ndy = yy[:, None, :] - nb_off[:, :, 0:1]
            ndx = xx_[:, None, :] - nb_off[:, :, 1:2]
            oth = jnp.sum(nb_amp[:, :, None] * jnp.exp(-0.5 * q * (ndy * ndy + ndx * ndx)), axis=1)
        else:  # a Gaussian is the product of its row and column profiles: 2 x window exponentials
            # per neighbour instead of K (one per pixel cost more than the iterations together)
            prof_y = nb_amp[:, :, None] * jnp.exp(-0.5 * q * (ry - nb_off[:, :, 0:1]) ** 2)  # (C, k, window)
            prof_x = jnp.exp(-0.5 * q * (ry - nb_off[:, :, 1:2]) ** 2)
            oth = jnp.sum(on_disc(prof_y, prof_x), axis=1)

        n_w = jnp.sum(w0, axis=1)
        n = 4 if fit_b else 3

        def gn(p, lines: bool = False):
            a, y0, x0, b = p
            dy = yy - y0[:, None]
            dx = xx_ - x0[:, None]
            g = jnp.exp(-0.5 * q * (dy * dy + dx * dx))
            m = b[:, None] + a[:, None] * g
            # Poisson-like weights: variance ~ expected signal + a floor
            w = w0 / (jnp.maximum(m + oth, 0.0) + var_c)
            res = z - oth - m
            wg = w * g
            f = jnp.stack([wg * g, wg, wg * res, w, w * res, w * res * res], axis=1)  # (C, 6, K)
            mom = jnp.einsum("cfk,ckm->cfm" if warped else "cfk,km->cfm", f, mono_)
            s, t, u = mom[:, 0], mom[:, 1], mom[:, 2]  # moments of w g^2, w g, w g res
            # centred on the column: sum f dy = sum f y - y0 sum f, and so on
            sy, sx = s[:, 1] - y0 * s[:, 0], s[:, 2] - x0 * s[:, 0]
            syy = s[:, 3] - 2.0 * y0 * s[:, 1] + y0 * y0 * s[:, 0]
            sxx = s[:, 4] - 2.0 * x0 * s[:, 2] + x0 * x0 * s[:, 0]
            syx = s[:, 5] - x0 * s[:, 1] - y0 * s[:, 2] + x0 * y0 * s[:, 0]
            aq = a * q
            mm = {(0, 0): s[:, 0], (0, 1): aq * sy, (0, 2): aq * sx,
                  (1, 1): aq * aq * syy, (1, 2): aq * aq * syx, (2, 2): aq * aq * sxx}
            v = [u[:, 0], aq * (u[:, 1] - y0 * u[:, 0]), aq * (u[:, 2] - x0 * u[:, 0])]
            if fit_b:
                mm[(0, 3)] = t[:, 0]
                mm[(1, 3)] = aq * (t[:, 1] - y0 * t[:, 0])
                mm[(2, 3)] = aq * (t[:, 2] - x0 * t[:, 0])
                mm[(3, 3)] = mom[:, 3, 0]
                v.append(mom[:, 4, 0])
            for i in range(n):
                mm[(i, i)] = mm[(i, i)] * (1.0 + 1e-3) + 1e-12
            d = solve_sym(mm, v, n)
            lim = jnp.maximum(sigma, 1.0)  # at most one probe sigma per step
            a = a + d[0]
            y0 = y0 + jnp.clip(d[1], -lim, lim)
            x0 = x0 + jnp.clip(d[2], -lim, lim)
            if fit_b:
                b = b + d[3]
            chi2 = mom[:, 5, 0] / jnp.maximum(n_w - n, 1.0)
            sums = ()
            if lines:  # each window line's x-step (its b / a) and information, after this step
                dm = aq[:, None] * dx * g  # d model / d x0
                wdm = w * dm
                la = wdm * dm @ line_of
                lb = (wdm * res) @ line_of - la * jnp.clip(d[2], -lim, lim)[:, None]
                # only converged fits (the last step small) measure the lines
                done = ((jnp.abs(d[0]) < 0.05 * jnp.abs(a)) & (jnp.abs(d[1]) < 0.05)
                        & (jnp.abs(d[2]) < 0.05))
                scale = jnp.where(done, 1.0 / jnp.maximum(chi2, 1e-30), 0.0)[:, None]
                sums = (lb * scale, la * scale)
            return (a, y0, x0, b), (mm, chi2, sums)

        p = (p0[:, 0], p0[:, 1], p0[:, 2], p0[:, 3])
        for it in range(n_iter):
            p, (mm, chi2, sums) = gn(p, line_sums and it == n_iter - 1)
        # position standard error from the weighted normal matrix, scaled by the reduced
        # chi^2 (so that it does not depend on the units of the noise model)
        pos_std = jnp.sqrt(0.5 * (1.0 / mm[(1, 1)] + 1.0 / mm[(2, 2)]) * chi2)
        amp_snr = p[0] / jnp.sqrt(chi2 / mm[(0, 0)])
        border = jnp.any(~in_frame, axis=1)
        return (jnp.stack(p, axis=-1), border, pos_std, amp_snr) + sums

    return jax.jit(run)


@functools.cache
def _nan_padded(r: int):
    """Jit'd: a (H, W) frame padded by ``r`` NaN pixels on every side (the fit's input)."""
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda img: jnp.pad(img, r, constant_values=jnp.nan))


def refine_fixed_width(
    image: np.ndarray,
    positions: np.ndarray,
    amplitudes: np.ndarray,
    sigma_px: float,
    window_px: int,
    *,
    background: np.ndarray | float | None = None,
    n_neighbours: int = 4,
    n_iter: int = 3,
    n_pass: int = 1,
    var_floor: float | None = None,
    line_jitter: bool = True,
    line_min_amp_snr: float = 3.0,
    line_pickup: bool = True,
    pixel_lines: float | None = None,
    flyback_px: tuple[float, float] | None = None,
    prior=None,
):
    """Sub-pixel positions from a Gaussian of fixed, known width ``sigma_px`` fitted to each
    column with its neighbours' model subtracted, Poisson-weighted: the (near) maximum-
    likelihood estimate for shot-noise-limited frames, within ~10 % of the Cramer-Rao bound
    on the simulator (the free-width fit loses 40-60 %: the width and background trade off
    against the position on dim, overlapping columns).

    Pass 1 fits amplitude, position and a constant background per column (neighbours from
    ``positions`` / ``amplitudes``); pass 2 re-renders the neighbours from pass 1, fixes the
    background to the median over the column and its ``n_neighbours`` nearest neighbours
    and fits amplitude and position only. Weights 1 / (model + ``var_floor``); the floor
    defaults to a quarter of the image median (scale-invariant). The columns with a neighbour
    centred outside the frame (a tail on the edge, started as a peak on the edge pixel) are
    fitted once more with that neighbour's model where its fit put it (``_refit_beside_outside``).

    With ``line_jitter`` the last pass also measures every scan line's x offset from the columns
    crossing it (``linejitter.line_shifts``) and puts each column where it appears on the line
    through its centre (x + column offset + that line's shift): RMSE about 0.21 px on the
    simulated graphene with its default jitter (0.29 px without the de-jitter); a frame without
    jitter is unchanged. Only columns whose fitted amplitude is at least ``line_min_amp_snr``
    standard errors measure the lines (not the ghosts a lattice denoiser leaves in vacancies).
    With ``line_pickup`` and a ``prior``, periodic pick-up (mains hum) is modelled too, as a
    sinusoid in scan time that moves on along each line (``linejitter``; ``pixel_lines``, the
    scan time of one pixel in line periods, defaults to 1 / width: a flyback short against the
    line). Without a prior it is not modelled: the free column offsets absorb most of it, and
    the model makes the columns cut by the top and bottom edges worse (cause unknown; SrTiO3
    single frames 0.200 px with it, 0.196 px without, while 10-frame stacks gain: 0.090 px with
    it, 0.097 px without).

    ``flyback_px`` = (amplitude, decay), px: the scan's x displacement at the start of every
    line, ``amplitude * exp(-j / decay)`` at fast-scan pixel j (``stem-live calibrate``
    measures it: ``flyback_amp_nm`` / pixel size, ``flyback_tau_us`` / dwell). Columns near
    the left edge are then fitted on the distorted pixel grid, and their positions are where
    they appear on it; without it, a column cut by the left edge is fitted ~0.5 px to the right
    of where it appears (simulator default flyback, 1 px), and one centred just outside is
    taken for one inside.

    ``prior``: a callable ``(positions (N, 2), pos_std (N,)) -> (prior_pos (N, 2), prior_std (N,))``
    (px; inf where it knows nothing), e.g. a ``lattice_prior.LatticePrior``: where each column
    is expected from the earlier frames, with the scan jitter left out. It is given the fit's
    line-averaged positions; each column then gets the precision-weighted mean of its fit and
    the prior in y, and in x the prior enters the line de-jitter (``line_shifts``' column
    prior), which then measures the lines absolutely (on the flyback grid in scanned x).

    Returns positions (N, 2), amplitudes (N,), border (N,) bool (the window crosses the
    frame edge) and a dict: ``background`` (N,), ``pos_std`` (position standard error, px,
    from the weighted normal matrix and the reduced chi^2), ``amp_snr`` (amplitude over its
    standard error: ~0 where nothing is there), ``ok``, ``neighbours`` (N, k) (the indices of
    each column's ``n_neighbours`` nearest start positions within reach of its window, whose
    models were subtracted; -1 where fewer are), and with ``line_jitter``
    ``line_shift_px`` (H,) (the x shift of the image content on every line at the frame's
    middle column, px), ``line_jitter_px`` (the estimated rms of its random part), ``line_dx``
    (N,) (the x shift added to each column) and, where the pick-up was modelled,
    ``line_pickup_px`` (its amplitude; 0 where none was found), ``line_pickup_period_lines`` and
    ``line_pickup_model`` (``linejitter.pickup_shift``'s model: the shift anywhere in the frame).
    A fit that fails keeps its start position (amplitude NaN, pos_std inf, amp_snr 0).
    """
    from scipy.spatial import cKDTree

    if flyback_px is not None:
        flyback_px = flyback.check(flyback_px)
    if int(n_pass) < 1:
        raise ValueError(f"n_pass must be >= 1, got {n_pass}")
    image = np.asarray(image)
    pos = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    n = len(pos)
    h, w = image.shape
    window = max(int(window_px) | 1, 3)
    r = window // 2
    if n == 0:
        z0 = np.zeros(0)
        return np.zeros((0, 2)), z0, np.zeros(0, bool), {
            "background": z0, "pos_std": z0, "amp_snr": z0, "ok": np.zeros(0, bool),
            "neighbours": np.zeros((0, 0), np.intp)}
    img32 = np.ascontiguousarray(image, dtype=np.float32)
    finite = np.isfinite(img32)
    if not finite.all():
        img32 = np.where(finite, img32, np.nan).astype(np.float32)
    if var_floor is None:
        sub = np.abs(img32[:: max(1, h // 128), :: max(1, w // 128)])
        var_floor = max(0.25 * float(np.nanmedian(sub)), 1e-6 * float(np.nanmax(sub)) + 1e-12)
    k = int(max(1, min(n_neighbours, n - 1))) if n > 1 else 0
    chunk = fit_chunk()
    if n > chunk:  # whole chunks of one compiled size: no compile as the count wanders
        nb = -(-n // chunk) * chunk
        note_bucket((window, int(n_iter), h, w), chunk)
    else:  # a count just below a chunk reuses the chunk's compiled size
        nb = stream_bucket(n, (window, int(n_iter), h, w), cap=chunk)
        chunk = nb
    centers = np.rint(pos)
    centers[:, 0] = np.clip(centers[:, 0], 0, h - 1)
    centers[:, 1] = np.clip(centers[:, 1], 0, w - 1)
    c_pad = np.zeros((nb, 2), np.int32)
    c_pad[:n] = centers
    c_pad[n:] = (-10 * window, -10 * window)  # far away: outside the frame, never a neighbour
    p = np.zeros((nb, 4), np.float32)  # amp, dy, dx, bg relative to the integer centre
    p[:n, 0] = np.nan_to_num(np.asarray(amplitudes, np.float64))
    p[:n, 1:3] = pos - centers
    if background is None:
        background = 0.0
    p[:n, 3] = np.broadcast_to(np.asarray(background, np.float64), (n,))
    # the fit cuts its windows from the NaN-padded frame; a window's top-left corner there is
    # its centre clipped to the frame
    imgp = _nan_padded(r)(img32)
    cc = np.clip(c_pad, 0, None)
    cc[:, 0] = np.minimum(cc[:, 0], h - 1)
    cc[:, 1] = np.minimum(cc[:, 1], w - 1)
    oy, ox = np.mgrid[-r : r + 1, -r : r + 1]
    disc = (oy**2 + ox**2) <= (r + 0.5) ** 2
    tree = cKDTree(pos, balanced_tree=False, compact_nodes=False) if k else None
    # neighbours whose model reaches the window: within its radius + 4 sigma (beyond that less
    # than exp(-8) of their amplitude falls on it); a bounded query is a third faster
    reach = r + 0.5 + 4.0 * float(sigma_px)
    nbr = np.zeros((n, k), np.intp)
    warp = flyback.reaching_columns(centers, ox[disc], r, flyback_px)
    kk = max(k, 1)
    for ps in range(int(n_pass)):
        fit_b = ps == 0
        if not fit_b:  # background fixed to the median over the column and its neighbours
            nb_bg = np.where(nbr < n, p[np.minimum(nbr, n - 1), 3], np.nan)
            with warnings.catch_warnings():  # a failed fit with no neighbour stays NaN
                warnings.simplefilter("ignore", RuntimeWarning)
                p[:n, 3] = np.nanmedian(np.concatenate([p[:n, 3:4], nb_bg], axis=1), axis=1)
        sums = bool(line_jitter) and ps == int(n_pass) - 1
        fn = _build_fixed(window, int(n_iter), fit_b, sums)
        nb_off = np.full((nb, kk, 2), -1e4, np.float32)
        nb_amp = np.zeros((nb, kk), np.float32)
        out = []
        for c0 in range(0, nb, chunk):
            # each chunk's inputs are made while XLA fits the chunks before it (on its own
            # threads): the numpy work uses the core the fit leaves idle
            cs, real = slice(c0, c0 + chunk), slice(c0, min(c0 + chunk, n))
            if ps == 0 and k and c0 < n:
                nbr[real] = tree.query(pos[real], k=k + 1, distance_upper_bound=reach)[1][:, 1:]
            if k and c0 < n:  # the neighbours' model from this pass's start parameters
                nb_off[real], nb_amp[real] = _neighbour_models(np.arange(c0, real.stop), nbr, centers, p, n)
            out.append(fn(imgp, cc[cs], c_pad[cs], p[cs], nb_off[cs], nb_amp[cs], np.float32(sigma_px),
                          np.float32(var_floor), (h, w)))
        res = [np.concatenate([np.asarray(o[i]) for o in out]) for i in range(len(out[0]))]
        if warp is not None:  # the columns near the left edge again, on the flyback-distorted grid
            _fit_warped(res, warp, flyback_px, imgp, cc, c_pad, p, nb_off, nb_amp, centers, window, int(n_iter),
                        fit_b, sums, np.float32(sigma_px), np.float32(var_floor), (h, w))
        if k and ps == int(n_pass) - 1:  # beside the columns outside the frame, with their fitted models
            _refit_beside_outside(res, nbr, n, centers, warp, flyback_px, imgp, cc, c_pad, window, int(n_iter), fit_b,
                                  sums, np.float32(sigma_px), np.float32(var_floor), (h, w))
        p, border, pos_std, amp_snr = res[:4]
    if line_jitter:
        row_b, row_a = res[4][:n], res[5][:n]
    p = p.astype(np.float64)[:n]
    border = border[:n]
    pos_std = pos_std.astype(np.float64)[:n]
    amp_snr = amp_snr.astype(np.float64)[:n]
    amp, dy, dx, bg = p.T
    ok = np.isfinite(p).all(axis=1) & (np.abs(dy) <= r) & (np.abs(dx) <= r) & (amp > 0)
    out = np.where(ok[:, None], centers + np.stack([dy, dx], axis=1), pos)
    info = {"background": bg, "pos_std": np.where(ok, pos_std, np.inf),
            "amp_snr": np.where(ok, np.nan_to_num(amp_snr), 0.0), "ok": ok,
            "neighbours": np.where(nbr < n, nbr, -1)}
    prior_dx = prior_prec = None
    if prior is not None:
        prior_dx, prior_prec = _apply_prior(prior, out, info, warp, flyback_px)
    if line_jitter:
        from stem_live.locate.linejitter import line_shifts

        use = ok & (amp_snr >= line_min_amp_snr)
        # the pick-up model only where a prior holds the column offsets (see the docstring)
        pickup = line_pickup and prior_prec is not None and bool(np.any(prior_prec > 0))
        ls = line_shifts(row_b, np.where(use[:, None], row_a, 0.0), centers[:, 0].astype(np.intp) - r, h,
                         prior_dx=prior_dx, prior_prec=prior_prec, col_x=out[:, 1] if pickup else None,
                         pixel_lines=1.0 / w if pixel_lines is None else float(pixel_lines))
        info["line_dx"] = np.where(use, ls.col_dx + _line_at(ls.line_dx, out[:, 0], info.get("y_std", pos_std))
                                   + ls.pickup_at(out[:, 0], out[:, 1]), 0.0)
        if warp is not None:  # the line shifts are of the scanned x: in pixels where the scan is distorted
            info["line_dx"][warp[0]] = flyback.pixel_shift(out[warp[0], 1], info["line_dx"][warp[0]], flyback_px)
        out[:, 1] += info["line_dx"]
        info["line_shift_px"] = ls.line_total(0.5 * w)  # at the frame's middle column
        info["line_jitter_px"] = ls.jitter_px
        if pickup:
            info["line_pickup_px"] = ls.pickup_px
            info["line_pickup_period_lines"] = ls.pickup_period_lines
            info["line_pickup_model"] = ls.pickup_model()
    elif prior_prec is not None:  # no line model: the prior is a second measurement of x
        pi, s2 = prior_prec, 1.0 / np.maximum(info["pos_std"], 1e-6) ** 2
        if warp is not None:  # the prior is in scanned x there (``_apply_prior``): the fit's too
            s2[warp[0]] /= (1.0 + flyback.slope(out[warp[0], 1], flyback_px)) ** 2
        dx = np.where(pi > 0, pi * prior_dx / np.where(pi > 0, pi + s2, 1.0), 0.0)
        if warp is not None:
            dx[warp[0]] = flyback.pixel_shift(out[warp[0], 1], dx[warp[0]], flyback_px)
        out[:, 1] += dx
    return out, np.where(ok, amp, np.nan), border, info


def _apply_prior(prior, out: np.ndarray, info: dict, warp, flyback_px=None) -> tuple[np.ndarray, np.ndarray]:
    """Ask ``prior`` where the fitted columns ``out`` (line-averaged, px) are expected; move
    each y to the precision-weighted mean of fit and prior (in place) and return the x prior
    as ``line_shifts`` takes it: (offset from the fitted x (px), precision (1 / px**2)).
    Columns that failed get none. ``info`` gains ``prior_used`` (N,).

    The prior is given, and so learns, the columns on the flyback grid (``warp``) at their
    scanned x, u(x) = x + flyback shift: the specimen's coordinate, which the columns inside
    the frame give unchanged (a column's site is learnt mostly there: in pixels it would be
    predicted ~1 px right of where the flyback shows it at the left edge). Their offsets are
    then in scanned x, as the line de-jitter takes them there."""
    seen = out.copy()
    if warp is not None:
        x = out[warp[0], 1]
        seen[warp[0], 1] = x + flyback.shift(x, flyback_px)
    ppos, pstd = prior(seen.copy(), info["pos_std"].copy())
    ppos = np.asarray(ppos, np.float64).reshape(out.shape)
    pstd = np.asarray(pstd, np.float64).reshape(len(out))
    use = info["ok"] & np.isfinite(pstd) & (pstd > 0) & np.isfinite(ppos).all(axis=1) & np.isfinite(info["pos_std"])
    pi = np.where(use, 1.0 / np.where(use, pstd, 1.0) ** 2, 0.0)
    s2 = 1.0 / np.maximum(info["pos_std"], 1e-6) ** 2  # the fit's y information (pos_std: its rms of y, x)
    tot = np.where(use, s2 + pi, 1.0)
    out[:, 0] = np.where(use, (s2 * out[:, 0] + pi * np.nan_to_num(ppos[:, 0])) / tot, out[:, 0])
    info["prior_used"] = use
    info["y_std"] = np.where(use, 1.0 / np.sqrt(tot), info["pos_std"])  # the combined y's error
    return np.where(use, np.nan_to_num(ppos[:, 1]) - seen[:, 1], 0.0), pi


def _neighbour_models(rows: np.ndarray, nbr: np.ndarray, centers: np.ndarray, p: np.ndarray,
                      n: int) -> tuple[np.ndarray, np.ndarray]:
    """The fixed-width fit's neighbour model for the columns ``rows``: each neighbour's centre
    relative to the column's window centre (``rows``, k, 2) px and its amplitude (``rows``, k),
    from the parameters ``p`` (amp, dy, dx, bg per column). Slots with no neighbour in reach
    (``nbr`` >= ``n``) or whose parameters are not finite (a failed fit) get amplitude 0, far away."""
    nj = np.where(nbr[rows] < n, nbr[rows], 0)
    have = (nbr[rows] < n) & np.isfinite(p[nj]).all(axis=2)
    off = np.where(have[:, :, None], centers[nj] + np.nan_to_num(p[nj, 1:3]) - centers[rows, None, :], -1e4)
    amp = np.where(have, np.maximum(np.nan_to_num(p[nj, 0]), 0.0), 0.0)
    return off, amp


def _pad_rows(a, b: int, fill) -> np.ndarray:
    """``a`` padded along its first axis to ``b`` rows of ``fill`` (a compiled bucket size)."""
    out = np.full((b,) + np.shape(a)[1:], fill, np.asarray(a).dtype)
    out[: len(a)] = a
    return out


def _refit_beside_outside(res, nbr, n, centers, warp, flyback_px, imgp, corner, c_pad, window, n_iter, fit_b, sums,
                          sigma, var_floor, shape) -> None:
    """Fit again, in place in ``res`` (the last pass's outputs), the columns that have a column
    centred outside the frame among their neighbours, with every neighbour's model where this
    pass's fit put it. A column outside shows only its tail, which the band-pass puts on the
    edge pixel: its model there, from that start, is a whole column on the edge (its tail on the
    inside neighbour up to ~7x too bright), and pushed the row of columns along the edge away
    from it (graphene: the bottom row 0.18 px up)."""
    h, w = shape
    fit = np.asarray(res[0][:n], np.float64)
    cy, cx = centers[:, 0] + fit[:, 1], centers[:, 1] + fit[:, 2]
    outside = (np.isfinite(fit).all(axis=1) & (fit[:, 0] > 0)
               & ((cy < -0.5) | (cy > h - 0.5) | (cx < -0.5) | (cx > w - 0.5)))
    if not outside.any():
        return
    valid = nbr < n
    idx = np.flatnonzero(~outside & (valid & outside[np.where(valid, nbr, 0)]).any(axis=1))
    if not len(idx):
        return
    nb = len(res[0])
    p = np.asarray(res[0]).copy()
    nb_off = np.full((nb, nbr.shape[1], 2), -1e4, np.float32)
    nb_amp = np.zeros((nb, nbr.shape[1]), np.float32)
    nb_off[idx], nb_amp[idx] = _neighbour_models(idx, nbr, centers, p, n)
    on_grid = np.zeros(n, bool)
    if warp is not None:  # the ones on the flyback grid are fitted there
        wmask = np.isin(warp[0], idx)
        on_grid[warp[0][wmask]] = True
        if wmask.any():
            _fit_warped(res, (warp[0][wmask], warp[1][wmask]), flyback_px, imgp, corner, c_pad, p, nb_off, nb_amp,
                        centers, window, n_iter, fit_b, sums, sigma, var_floor, shape)
    idx = idx[~on_grid[idx]]
    if not len(idx):
        return
    m = len(idx)
    b = stream_bucket(m, (window, n_iter, h, w, "outside"), headroom=SIDE_HEADROOM, max_overpad=2.0)
    fn = _build_fixed(window, n_iter, fit_b, sums)
    far = np.full(2, -10 * window, np.int32)
    args = (imgp, _pad_rows(corner[idx], b, 0), _pad_rows(c_pad[idx], b, far), _pad_rows(p[idx], b, 0.0),
            _pad_rows(nb_off[idx], b, -1e4), _pad_rows(nb_amp[idx], b, 0.0), sigma, var_floor, shape)
    out = _side_fit("outside", fn, args, window, n_iter, fit_b, sums)
    if out is None:
        return
    for r_, o in zip(res, out):
        r_[idx] = np.asarray(o)[:m]


def _side_fit(kind: str, fn, args: tuple, *static):
    """``fn(*args)`` for a side fit, or None while a fit of these argument shapes compiles in the
    background (``buckets.side_fit_ready``; the image's padded shape stands for the frame's)."""
    key = (kind, *static, *(np.shape(a) for a in args))
    if not side_fit_ready(key, lambda: fn(*args)):
        return None
    return fn(*args)


def _fit_warped(res, warp, flyback_px, imgp, corner, c_pad, p, nb_off, nb_amp, centers, window, n_iter, fit_b,
                sums, sigma, var_floor, shape) -> None:
    """Refit the columns ``warp[0]`` on the flyback-distorted grid ``warp[1]`` and write their
    results (positions back on the pixel grid) into ``res`` (the pass's outputs) in place."""
    idx, xs = warp
    m = len(idx)
    b = stream_bucket(m, (window, n_iter, shape[0], shape[1], "flyback"), headroom=SIDE_HEADROOM,
                      max_overpad=2.0)
    cx = centers[idx, 1].astype(np.float64)
    u0 = cx + flyback.shift(cx, flyback_px)  # the scanned x at each window centre

    def pad(a, fill):
        return _pad_rows(a, b, fill)

    pw = p[idx].copy()
    xa = cx + pw[:, 2]
    pw[:, 2] = xa + flyback.shift(xa, flyback_px) - u0
    nbo = nb_off[idx].copy()
    nxa = cx[:, None] + nbo[:, :, 1]
    nbo[:, :, 1] = nxa + flyback.shift(nxa, flyback_px) - u0[:, None]
    fn = _build_fixed(window, n_iter, fit_b, sums, warped=True)
    far = np.full(2, -10 * window, np.int32)
    args = (imgp, pad(corner[idx], 0), pad(c_pad[idx], far), pad(pw, 0.0), pad(nbo, -1e4), pad(nb_amp[idx], 0.0),
            sigma, var_floor, shape, pad(xs, 0.0))
    out = _side_fit("flyback", fn, args, window, n_iter, fit_b, sums)
    if out is None:
        return
    out = [np.asarray(o)[:m] for o in out]
    fit = out[0].copy()
    fit[:, 2] = flyback.to_pixels(u0 + fit[:, 2], flyback_px) - cx  # back on the pixel grid
    out[0] = fit
    # the x error too: one scanned px is 1 / (1 + slope) pixels there (the y error is unchanged;
    # pos_std mixes them as sqrt((var_y + var_x) / 2), and a column's two are about equal)
    stretch = 1.0 / (1.0 + flyback.slope(cx + fit[:, 2], flyback_px))
    out[2] = (out[2] * np.sqrt(0.5 * (1.0 + stretch**2))).astype(out[2].dtype)
    for r_, o in zip(res, out):
        r_[idx] = o


def _line_at(line_dx: np.ndarray, y: np.ndarray, y_std: np.ndarray) -> np.ndarray:
    """The shift of the scan line through each column's centre, ``line_dx[rint(y_true)]``,
    averaged over where the true centre may lie (y known to ``y_std`` px): near a half-pixel
    row boundary the two lines share the weight instead of the nearer one taking it all
    (the mean-square-error estimate; graphene RMSE -0.007 px against plain rounding)."""
    from scipy.special import ndtr

    s = np.clip(np.nan_to_num(np.asarray(y_std, dtype=np.float64), nan=0.5, posinf=0.5), 0.02, 0.5)
    base = np.floor(y).astype(np.intp)
    out = np.zeros(len(y))
    for k in (-1, 0, 1, 2):  # the lines within 1.5 px of y: all the weight for s <= 0.5
        row = base + k
        p = ndtr((row + 0.5 - y) / s) - ndtr((row - 0.5 - y) / s)
        out += p * line_dx[np.clip(row, 0, len(line_dx) - 1)]
    return out
