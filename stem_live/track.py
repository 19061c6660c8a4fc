"""Linking atomic columns across frames to a reference lattice.

Every frame is first registered globally (``estimate_shift``: phase correlation of images,
or cross-correlation of rendered point maps, with a prior on the expected shift), so a
lattice that moved by more than half a column spacing still links correctly; then each
column is linked to the nearest reference site within ``max_link_frac`` x the spacing.
Sites that are not seen stay in the reference (vacancies, columns that left the field);
columns that link to nothing become new sites with new track ids. The reference position
of a site is the running mean of its shift-corrected positions.

Memory is bounded: per-frame records are kept for the last ``history`` frames, and sites not
seen for ``history`` frames are dropped.

Conventions: positions in pixels (row, col); a shift ``(dy, dx)`` means
``position_in_frame = position_in_reference + shift``.
"""

from __future__ import annotations

from collections import deque

import numpy as np


# ----------------------------------------------------------------------------- shifts
def _as_points(obj) -> np.ndarray | None:
    pos = getattr(obj, "positions", None)
    if pos is not None:
        return np.asarray(pos, np.float64).reshape(-1, 2)
    arr = np.asarray(obj)
    if arr.ndim == 2 and arr.shape[1] == 2:  # (N, 2) points; images are wider than 2 px
        return arr.astype(np.float64)
    return None


def _parabolic_peak(c: np.ndarray, i: int, j: int) -> tuple[float, float]:
    h, w = c.shape
    v0 = c[i, j]
    ym, yp = c[(i - 1) % h, j], c[(i + 1) % h, j]
    xm, xp = c[i, (j - 1) % w], c[i, (j + 1) % w]
    dy_den = ym - 2 * v0 + yp
    dx_den = xm - 2 * v0 + xp
    dy = 0.5 * (ym - yp) / dy_den if dy_den < 0 else 0.0
    dx = 0.5 * (xm - xp) / dx_den if dx_den < 0 else 0.0
    return float(np.clip(dy, -0.5, 0.5)), float(np.clip(dx, -0.5, 0.5))


def _prior_weight(shape, cell: float, prior, prior_sigma: float | None):
    """Gaussian prior on the shift for every (wrapped) correlation lag."""
    h, w = shape
    ly = np.fft.fftfreq(h, 1.0 / h)[:, None] * cell
    lx = np.fft.fftfreq(w, 1.0 / w)[None, :] * cell
    if prior_sigma is None or not np.isfinite(prior_sigma):
        return None
    return np.exp(-((ly - prior[0]) ** 2 + (lx - prior[1]) ** 2) / (2.0 * prior_sigma**2))


def _shift_images(ref: np.ndarray, img: np.ndarray, prior, prior_sigma) -> tuple[float, float]:
    from scipy import fft

    a = np.asarray(ref, np.float64)
    b = np.asarray(img, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"estimate_shift: image shapes differ: {a.shape} vs {b.shape}")
    win = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1]))
    fa = fft.rfft2((a - a.mean()) * win)
    fb = fft.rfft2((b - b.mean()) * win)
    cross = fb * np.conj(fa)
    cross /= np.maximum(np.abs(cross), 1e-12)  # phase correlation
    c = fft.irfft2(cross, s=a.shape)
    wgt = _prior_weight(c.shape, 1.0, prior, prior_sigma)
    score = c * wgt if wgt is not None else c
    i, j = np.unravel_index(int(np.argmax(score)), c.shape)
    dy, dx = _parabolic_peak(c, i, j)
    h, w = c.shape
    sy = i if i <= h // 2 else i - h
    sx = j if j <= w // 2 else j - w
    return float(sy + dy), float(sx + dx)


def _render(points: np.ndarray, origin, cell: float, shape) -> np.ndarray:
    g = np.zeros(shape, np.float64)
    q = (points - origin) / cell
    i0 = np.floor(q).astype(int)
    f = q - i0
    for di in (0, 1):
        for dj in (0, 1):
            wgt = (f[:, 0] if di else 1 - f[:, 0]) * (f[:, 1] if dj else 1 - f[:, 1])
            ii, jj = i0[:, 0] + di, i0[:, 1] + dj
            ok = (ii >= 0) & (ii < shape[0]) & (jj >= 0) & (jj < shape[1])
            np.add.at(g, (ii[ok], jj[ok]), wgt[ok])
    return g


def _nn_spacing(points: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    if len(points) < 2:
        return float("nan")
    d, _ = cKDTree(points).query(points, k=2)
    return float(np.median(d[:, 1]))


def _refine_shift_points(ref: np.ndarray, pts: np.ndarray, shift, radius: float, n_iter: int = 3, tree=None):
    """Median offset of nearest-neighbour pairs within ``radius``; returns (shift, fraction
    of ``pts`` matched). ``tree``: a cKDTree of ``ref`` already built."""
    from scipy.spatial import cKDTree

    s = np.asarray(shift, np.float64)
    if len(ref) == 0 or len(pts) == 0:
        return s, 0.0
    tree = cKDTree(ref) if tree is None else tree
    frac = 0.0
    for _ in range(n_iter):
        d, idx = tree.query(pts - s, distance_upper_bound=radius, workers=-1)
        ok = np.isfinite(d)
        frac = float(ok.mean())
        if ok.sum() < 3:
            break
        s = np.median(pts[ok] - ref[idx[ok]], axis=0)
    return s, frac


#: a band's shift follows on from its neighbour's where this share of its points link with it
#: (among those that land on the reference): on a lattice a band a fraction of a spacing off
#: still links part of its points to the neighbouring sites, and a chain that takes such a band
#: walks off (a 1024 px MoS2 stream with a 53 pm / 0.43 s wander: 10 px over one frame)
CHAIN_MIN_LINKED = 0.8


def _band_shifts(ref: np.ndarray, pts: np.ndarray, linked: np.ndarray, shift, radius: float, spacing: float,
                 tree, *, min_frac: float = 0.9, band_spacings: float = 2.0) -> np.ndarray | None:
    """Per-point link shift ((N, 2) px) where one shift for the whole frame leaves a band of
    rows unlinked (``linked``: (N,) bool, each point linked with ``shift``); None where it links
    every band (``min_frac`` of its points).

    Rows are times: drift the prediction did not expect moves a band of rows away from the
    reference, by more than the link radius where it is fast (an Ornstein-Uhlenbeck wander of
    tens of pm within a slow frame). Bands of ``band_spacings`` x the spacing in rows, each
    refined (:func:`_refine_shift_points`) from its neighbour's shift outwards from the band
    the frame's shift links best: the drift moves little from one band to the next. A band
    that does not link (fewer than ``CHAIN_MIN_LINKED`` of its points that land on the
    reference: a jump, a band that links only in part) keeps its neighbour's shift."""
    rows = pts[:, 0]
    lo, hi = float(rows.min()), float(rows.max())
    nb = int(np.clip((hi - lo) / (band_spacings * spacing), 1, 64))
    if nb < 2:
        return None
    band = np.minimum(((rows - lo) / (hi - lo) * nb).astype(int), nb - 1)
    count = np.bincount(band, minlength=nb)
    frac = np.bincount(band, linked, nb) / np.maximum(count, 1)
    if np.all(frac[count >= 3] >= min_frac):
        return None
    box = (ref.min(axis=0) + radius, ref.max(axis=0) - radius)   # where the reference has sites around

    def links(q: np.ndarray, s: np.ndarray) -> float:
        """The share of ``q``'s points that link with shift ``s`` among those that land where
        the reference has sites (not the rows the drift brought in)."""
        inside = np.all((q - s >= box[0]) & (q - s <= box[1]), axis=1)
        if not inside.any():
            return 0.0
        return float(np.isfinite(tree.query(q[inside] - s, distance_upper_bound=radius)[0]).mean())

    out = np.zeros((nb, 2))
    start = int(np.argmax(np.where(count >= 3, frac, -1.0)))
    out[start] = _refine_shift_points(ref, pts[band == start], shift, radius, tree=tree)[0]
    for order in (range(start + 1, nb), range(start - 1, -1, -1)):
        prev = out[start]
        for b in order:   # a few bands, not atoms
            m = band == b
            if m.sum() >= 3:
                s, _ = _refine_shift_points(ref, pts[m], prev, radius, tree=tree)
                if np.hypot(*(s - prev)) < radius and links(pts[m], s) >= CHAIN_MIN_LINKED:
                    prev = s
            out[b] = prev
    return out[band]


def _shift_points(ref: np.ndarray, pts: np.ndarray, spacing: float, prior, prior_sigma) -> tuple[float, float]:
    from scipy import fft

    cell = max(spacing / 4.0, 0.5)
    lo = np.minimum(ref.min(0), pts.min(0))
    hi = np.maximum(ref.max(0), pts.max(0))
    extent = hi - lo
    # pad so that lags up to the full extent do not wrap onto each other
    shape = tuple(int(fft.next_fast_len(int(np.ceil(2 * e / cell)) + 8)) for e in extent)
    origin = lo - 2 * cell
    ga = _render(ref, origin, cell, shape)
    gb = _render(pts, origin, cell, shape)
    fa = fft.rfft2(ga)
    fb = fft.rfft2(gb)
    fy = np.fft.fftfreq(shape[0])[:, None]
    fx = np.fft.rfftfreq(shape[1])[None, :]
    blur = 0.15 * spacing / cell  # kernel sigma in cells (both maps)
    tf = np.exp(-2 * np.pi**2 * (2 * blur**2) * (fy**2 + fx**2))
    c = fft.irfft2(fb * np.conj(fa) * tf, s=shape)
    wgt = _prior_weight(c.shape, cell, prior, prior_sigma)
    score = c * wgt if wgt is not None else c
    i, j = np.unravel_index(int(np.argmax(score)), c.shape)
    dy, dx = _parabolic_peak(c, i, j)
    h, w = c.shape
    sy = (i if i <= h // 2 else i - h) + dy
    sx = (j if j <= w // 2 else j - w) + dx
    s0 = np.array([sy * cell, sx * cell])
    s, _ = _refine_shift_points(ref, pts, s0, 0.35 * spacing)
    return float(s[0]), float(s[1])


def estimate_shift(ref_image_or_points, image_or_points, *, spacing_px: float | None = None,
                   prior: tuple[float, float] = (0.0, 0.0), prior_sigma: float | None = None):
    """Global shift ``(dy, dx)`` of the second frame relative to the first, in pixels.

    Accepts two images (phase correlation) or two point sets / ``Columns`` (cross-
    correlation of point maps rendered at a quarter spacing, then refined by the median
    offset of nearest-neighbour pairs). On a lattice the correlation has a peak at every
    lattice translation; ``prior`` (the expected shift, e.g. from the drift so far) and
    ``prior_sigma`` (default: one nearest-neighbour spacing for points, none for images)
    pick the right one, so moves larger than half a spacing are recovered whenever they
    are closer to the prior than any other lattice translation.
    """
    pa = _as_points(ref_image_or_points)
    pb = _as_points(image_or_points)
    if (pa is None) != (pb is None):
        raise ValueError("estimate_shift needs two images or two point sets, not one of each")
    if pa is None:
        return _shift_images(ref_image_or_points, image_or_points, prior, prior_sigma)
    if len(pa) == 0 or len(pb) == 0:
        return float(prior[0]), float(prior[1])
    if spacing_px is None:
        spacing_px = _nn_spacing(pa if len(pa) > 1 else pb)
        if not np.isfinite(spacing_px):
            return float(prior[0]), float(prior[1])
    if prior_sigma is None:
        prior_sigma = float(spacing_px)
    return _shift_points(pa, pb, float(spacing_px), prior, prior_sigma)


# ----------------------------------------------------------------------------- tracker
class Tracker:
    """Links columns to a reference lattice across frames.

    Parameters
    ----------
    spacing_px : nearest-neighbour column spacing; measured on the first frame if None.
    max_link_frac : link radius as a fraction of the spacing.
    history : frames kept for ``trajectories()``; sites unseen for this many frames are
        dropped from the reference (bounded memory).
    prior_sigma_frac : width of the prior on the frame-to-frame shift (around the shift
        predicted from the last two frames), in spacings.
    """

    def __init__(self, max_link_frac: float = 0.3, history: int = 512, *,
                 spacing_px: float | None = None, prior_sigma_frac: float = 1.0):
        if history < 1:
            raise ValueError(f"history must be >= 1 frame, got {history}")
        if not 0 < max_link_frac < 1:
            raise ValueError(f"max_link_frac must be in (0, 1), got {max_link_frac}")
        self.max_link_frac = float(max_link_frac)
        self.history = int(history)
        self.spacing_px = None if spacing_px is None else float(spacing_px)
        self.prior_sigma_frac = float(prior_sigma_frac)
        self.reset()

    # -- state
    def reset(self) -> None:
        self._ref_sum = np.zeros((0, 2))
        self._ref_n = np.zeros(0, np.int64)
        self._site_ids = np.zeros(0, np.int64)
        self._last_seen = np.zeros(0, np.int64)
        self._next_id = 0
        self.frame_index = -1
        self._frames: deque = deque(maxlen=self.history)
        self._prev_points: np.ndarray | None = None
        self._shifts: deque = deque(maxlen=3)

    @property
    def reference(self) -> np.ndarray:
        """(M, 2) reference positions of the current sites (reference-frame pixels)."""
        if len(self._ref_n) == 0:
            return np.zeros((0, 2))
        return self._ref_sum / self._ref_n[:, None]

    def move_reference(self, delta_px: np.ndarray) -> None:
        """Move every reference site by ``delta_px`` ((M, 2) px, in ``reference`` order): e.g.
        to take out of a reference the skew of the drift during the frame it was built from."""
        d = np.asarray(delta_px, np.float64).reshape(-1, 2)
        if len(d) != len(self._ref_n):
            raise ValueError(f"move_reference needs one shift per site ({len(self._ref_n)}), got {len(d)}")
        self._ref_sum = self._ref_sum + d * self._ref_n[:, None]

    @property
    def reference_ids(self) -> np.ndarray:
        """(M,) track id of every reference site."""
        return self._site_ids.copy()

    @property
    def shift(self) -> tuple[float, float]:
        """Shift of the last frame relative to the reference."""
        if not self._shifts:
            return (0.0, 0.0)
        return tuple(float(v) for v in self._shifts[-1])

    # -- per frame
    def _add_sites(self, q: np.ndarray) -> np.ndarray:
        n = len(q)
        ids = np.arange(self._next_id, self._next_id + n, dtype=np.int64)
        self._next_id += n
        self._ref_sum = np.concatenate([self._ref_sum, q])
        self._ref_n = np.concatenate([self._ref_n, np.ones(n, np.int64)])
        self._site_ids = np.concatenate([self._site_ids, ids])
        self._last_seen = np.concatenate([self._last_seen, np.full(n, self.frame_index, np.int64)])
        return np.arange(len(self._ref_n) - n, len(self._ref_n))

    def _predict(self) -> np.ndarray:
        if not self._shifts:
            return np.zeros(2)
        last = np.asarray(self._shifts[-1])
        if len(self._shifts) >= 2:
            return last + (last - np.asarray(self._shifts[-2]))
        return last

    def update(self, columns, shift_hint: tuple[float, float] | None = None) -> np.ndarray:
        """Link one frame's columns; returns the (N,) track id of every column.

        ``shift_hint``: the expected shift of this frame relative to the reference (e.g.
        from the drift model), used instead of the constant-velocity prediction.
        """
        from scipy.spatial import cKDTree

        pts = _as_points(columns)
        if pts is None:
            raise ValueError("Tracker.update needs Columns or an (N, 2) array of positions")
        klass = np.asarray(getattr(columns, "klass", np.zeros(len(pts), np.int32)))
        intensity = np.asarray(getattr(columns, "intensity", np.full(len(pts), np.nan)), np.float64)
        finite = np.isfinite(pts).all(axis=1)
        self.frame_index += 1
        ids = np.full(len(pts), -1, np.int64)

        if self.spacing_px is None and finite.sum() >= 2:
            self.spacing_px = _nn_spacing(pts[finite])
        first = len(self._ref_n) == 0
        if first or self.spacing_px is None or not np.isfinite(self.spacing_px):
            shift = np.zeros(2) if shift_hint is None else np.asarray(shift_hint, np.float64)
            rows = self._add_sites(pts[finite] - shift)
            ids[finite] = self._site_ids[rows]
        else:
            spacing = self.spacing_px
            radius = self.max_link_frac * spacing
            ref = self.reference
            tree = cKDTree(ref)
            p = pts[finite]
            refined = False
            if shift_hint is not None:
                shift, frac = _refine_shift_points(ref, p, np.asarray(shift_hint, np.float64), radius, tree=tree)
                refined = frac >= 0.5
            if not refined:
                # frame-to-frame shift from the previous frame's points (same field of view),
                # with the hint as prior (it knows where the beam moved the image), else the
                # constant-velocity prediction; then refine on the reference
                pred = self._predict() if shift_hint is None else np.asarray(shift_hint, np.float64)
                last = np.asarray(self._shifts[-1]) if self._shifts else np.zeros(2)
                if self._prev_points is not None and len(self._prev_points) and len(p):
                    inc = estimate_shift(self._prev_points, p, spacing_px=spacing, prior=tuple(pred - last),
                                         prior_sigma=self.prior_sigma_frac * spacing)
                    coarse = last + np.asarray(inc)
                else:
                    coarse = pred
                shift, _ = _refine_shift_points(ref, p, coarse, radius, tree=tree)
            q = p - shift
            # linked band by band where the frame's one shift leaves rows out; the reference
            # still averages q (its errors average out over the frames, a band's shift would not)
            d, site = tree.query(q, distance_upper_bound=radius)
            local = _band_shifts(ref, p, np.isfinite(d), shift, radius, spacing, tree) if len(p) >= 8 else None
            if local is not None:
                d, site = tree.query(p - local, distance_upper_bound=radius)
            linked = np.isfinite(d)
            # one column per site: the closest wins, the others become new sites
            if linked.any():
                order = np.argsort(d[linked])
                cand = np.flatnonzero(linked)[order]
                _, first_idx = np.unique(site[cand], return_index=True)
                keep = np.zeros(len(q), bool)
                keep[cand[first_idx]] = True
                linked &= keep
            fid = np.flatnonzero(finite)
            s_l = site[linked]
            np.add.at(self._ref_sum, s_l, q[linked])
            np.add.at(self._ref_n, s_l, 1)
            self._last_seen[s_l] = self.frame_index
            ids[fid[linked]] = self._site_ids[s_l]
            new_rows = self._add_sites(q[~linked])
            ids[fid[~linked]] = self._site_ids[new_rows]
            self._prune()
        self._shifts.append(np.asarray(shift, np.float64))
        self._prev_points = pts[finite]
        self._frames.append((self.frame_index, ids.copy(), pts.copy(), klass.copy(), intensity.copy(),
                             np.asarray(shift, np.float64).copy()))
        return ids

    def _prune(self) -> None:
        stale = self._last_seen <= self.frame_index - self.history
        if stale.any():
            keep = ~stale
            self._ref_sum = self._ref_sum[keep]
            self._ref_n = self._ref_n[keep]
            self._site_ids = self._site_ids[keep]
            self._last_seen = self._last_seen[keep]

    # -- output
    def trajectories(self) -> dict:
        """Dense arrays over the kept frames (at most ``history``):

        ``frames`` (F,), ``track_ids`` (T,), ``positions`` (F, T, 2) NaN where a track
        was not seen, ``klass`` (F, T) -1 where missing, ``intensity`` (F, T) NaN where
        missing, ``shifts`` (F, 2).
        """
        if not self._frames:
            return {"frames": np.zeros(0, np.int64), "track_ids": np.zeros(0, np.int64),
                    "positions": np.zeros((0, 0, 2)), "klass": np.zeros((0, 0), np.int32),
                    "intensity": np.zeros((0, 0)), "shifts": np.zeros((0, 2))}
        all_ids = np.unique(np.concatenate([f[1][f[1] >= 0] for f in self._frames]))
        nf, nt = len(self._frames), len(all_ids)
        pos = np.full((nf, nt, 2), np.nan)
        kl = np.full((nf, nt), -1, np.int32)
        inten = np.full((nf, nt), np.nan)
        frames = np.zeros(nf, np.int64)
        shifts = np.zeros((nf, 2))
        for k, (fi, ids, p, c, i, s) in enumerate(self._frames):
            ok = ids >= 0
            col = np.searchsorted(all_ids, ids[ok])
            pos[k, col] = p[ok]
            kl[k, col] = c[ok]
            inten[k, col] = i[ok]
            frames[k] = fi
            shifts[k] = s
        return {"frames": frames, "track_ids": all_ids, "positions": pos, "klass": kl,
                "intensity": inten, "shifts": shifts}

    def export(self, path) -> None:
        """Save trajectories, shifts and the reference lattice to an ``.npz`` file."""
        tr = self.trajectories()
        np.savez_compressed(path, **tr, reference=self.reference, reference_ids=self.reference_ids,
                            spacing_px=np.float64(np.nan if self.spacing_px is None else self.spacing_px))
