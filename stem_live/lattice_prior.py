"""Where each column is expected in a new frame, from the frames before it (a lattice prior).

The columns of a specimen stay put while the frame drifts over them: a column seen in K
frames is known to ~sigma / sqrt(K) in the specimen's coordinates, far better than one
frame can measure it. ``LatticePrior`` keeps that reference (one site per column) and, for
every new frame (called by the locator with the frame's fitted columns):

1. links the fitted columns to the sites: where the last frame's offsets, carried on by its
   motion, put them, then the median nearest-neighbour offset (a whole-lattice registration,
   ``track.estimate_shift``, when fewer than half link: a jump, a stage move), then one-to-one
   nearest neighbours within ``link_frac`` x the spacing;
2. fits the frame's offset from the sites as a function of the scan row, per axis (the
   drift during the frame: piecewise linear in the row, a knot every ``knot_rows`` rows;
   the drift's random walk kinks on that scale: 16 knots over 512 rows left 0.064 px in y
   after 10 graphene frames, 64 knots 0.048 px);
3. predicts each linked column at site + offset(row), with the site's standard error.

``update(columns)`` then learns from the frame's *fitted* positions (not the combined ones,
so no frame is counted twice). A column far from its prediction (it hopped, a vacancy
filled, the beam moved an atom) gets no prior and starts a new site; columns that enter
the field become new sites; sites not seen for ``memory_frames`` frames are dropped, and
older frames are down-weighted by exp(-1 / ``memory_frames``) per frame, so a slowly
changing specimen is followed and memory stays bounded.

``locate_stack`` does the same for a recorded stack with all the other frames as each frame's
prior (two passes, leave-one-out).

Positions px (row, col). The offsets are smooth in the row, so the prediction is where the
column would be without the frame's scan-line jitter; the locator measures that jitter
against the prediction (``linejitter.line_shifts`` with a column prior).
"""

from __future__ import annotations

import numpy as np

from stem_live.locate.columns import Columns


def hat_weights(rows: np.ndarray, lo: float, hi: float, n_knots: int) -> tuple[np.ndarray, np.ndarray]:
    """The piecewise-linear ("hat") basis in the row, knots evenly over [lo, hi], in sparse
    form: every row is between knots k and k + 1 with weights (1 - f, f). Returns (k (N,), f (N,))."""
    step = (hi - lo) / max(n_knots - 1, 1)
    t = (np.clip(np.nan_to_num(np.asarray(rows, np.float64), nan=lo), lo, hi) - lo) / max(step, 1e-9)
    k = np.minimum(np.floor(t).astype(np.intp), n_knots - 2)
    return k, t - k


def eval_row_offsets(coef: np.ndarray, rows: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """The piecewise-linear offset with knot values ``coef`` (n_knots, 2) at ``rows`` (N,): (N, 2)."""
    k, f = hat_weights(rows, lo, hi, len(coef))
    return coef[k] * (1.0 - f)[:, None] + coef[k + 1] * f[:, None]


def fit_row_offsets(rows: np.ndarray, resid: np.ndarray, weight: np.ndarray, lo: float, hi: float, *,
                    n_knots: int = 16, smooth: float = 1.0) -> np.ndarray:
    """Knot values (n_knots, 2) px of the smooth offset ``resid`` (N, 2) as a function of the
    row: weighted least squares on the hat basis, with a penalty ``smooth`` (in units of
    one column's weight) on the difference of neighbouring knots, so knots with few columns
    follow their neighbours instead of the noise. The normal matrix is tridiagonal."""
    from scipy.linalg import solveh_banded

    n_knots = max(int(n_knots), 2)
    k, f = hat_weights(rows, lo, hi, n_knots)
    w = np.asarray(weight, np.float64)
    r = np.asarray(resid, np.float64)
    a0, a1 = w * (1.0 - f), w * f
    diag = np.bincount(k, a0 * (1.0 - f), n_knots) + np.bincount(k + 1, a1 * f, n_knots)
    off = np.bincount(k, a0 * f, n_knots)[: n_knots - 1]  # (k, k + 1)
    rhs = np.stack([np.bincount(k, a0 * r[:, i], n_knots) + np.bincount(k + 1, a1 * r[:, i], n_knots)
                    for i in range(2)], axis=1)
    lam = smooth * float(np.median(w) if len(w) else 1.0)
    pen = np.full(n_knots, 2.0 * lam)
    pen[[0, -1]] = lam
    diag = diag + pen + 1e-9
    off = off - lam
    ab = np.zeros((2, n_knots))
    ab[0, 1:] = off
    ab[1] = diag
    return solveh_banded(ab, rhs, lower=False)


class LatticePrior:
    """Reference lattice of the columns seen so far, and the prior it gives the next frame.

    spacing_px : nearest-neighbour column spacing (px): the link radius scales with it.
    knot_rows : rows between the knots of each frame's piecewise-linear offset in the row.
    link_frac : link radius, fraction of the spacing.
    memory_frames : frames after which an observation's weight has dropped by e, and after
        which an unseen site is forgotten.
    floor_px : added in quadrature to every prior's standard error (the frame offset's own
        error and what the smooth model leaves out).
    outlier_sigma : a fitted column further than this many combined standard errors from
        its prediction (in either axis) gets no prior, and starts a new site.
    min_links : fewer linked columns than this: no prior for the frame (too few to fit the
        offsets); the reference then restarts from the frame if it has at least this many
        usable columns (another area), and the frame is skipped otherwise (a bad frame).
    record : keep every frame's observations in ``history`` (site ids, reference-coordinate
        positions, weights), for ``locate_stack``; unbounded, so not for a live stream.
    fit_flyback : measure the scan's flyback from the frames (for a session without a
        calibration): the left quarter's observations of the last ``flyback_frames`` frames
        are kept, and ``flyback.fit_from_sites`` is tried on them every ``flyback_every``
        frames. Once it is significant (chi**2 >= ``flyback_min_chi2``), ``flyback_px`` holds
        it from then on, for the locator to fit the left edge on (``locate_classical(...,
        flyback_px=lattice.flyback_px)``); the sites learnt so far move to their scanned x, and
        the log is dropped. It needs drift along x: a session held still by the drift
        correction cannot show it.
    """

    def __init__(self, spacing_px: float, *, knot_rows: float = 8.0, link_frac: float = 0.3,
                 memory_frames: float = 50.0, floor_px: float = 0.02, outlier_sigma: float = 4.0,
                 min_links: int = 32, record: bool = False, fit_flyback: bool = False, flyback_frames: int = 20,
                 flyback_every: int = 4, flyback_min_chi2: float = 100.0) -> None:
        if not np.isfinite(spacing_px) or spacing_px <= 0:
            raise ValueError(f"LatticePrior needs a positive column spacing, got {spacing_px}")
        if not knot_rows >= 1:
            raise ValueError(f"knot_rows must be >= 1, got {knot_rows}")
        self.spacing_px = float(spacing_px)
        self.knot_rows = float(knot_rows)
        self.link_frac = float(link_frac)
        self.memory_frames = float(memory_frames)
        self.floor_px = float(floor_px)
        self.outlier_sigma = float(outlier_sigma)
        self.min_links = int(min_links)
        self.record = bool(record)
        self.fit_flyback = bool(fit_flyback)
        self.flyback_frames = max(int(flyback_frames), 2)
        self.flyback_every = max(int(flyback_every), 1)
        self.flyback_min_chi2 = float(flyback_min_chi2)
        self.flyback_px: tuple[float, float] | None = None  # measured (fit_flyback): a property of the scan
        self.reset()

    def reset(self) -> None:
        """Forget every site (a new specimen area, a stage move)."""
        self._ref = np.zeros((0, 2))  # site positions, reference coordinates (px)
        self._info = np.zeros(0)  # their information (sum of down-weighted 1 / std**2)
        self._seen = np.zeros(0, np.int64)  # frame each was last seen in
        self._ids = np.zeros(0, np.int64)  # persistent site ids (a hop starts a new one)
        self._next_id = 0
        self._frame = 0
        self._learned = 0  # the last frame whose observations were learnt
        self.history: list[dict] = []  # with ``record``: every frame's observations (``locate_stack``)
        self._last: dict | None = None  # the last frame's offsets (the linking guess)
        self._step = np.zeros(2)  # the mean offset's change between the last two frames (px)
        self._pending: dict | None = None
        self._fb_log: list[dict] = []  # fit_flyback: the left quarter's observations of the last frames

    def forget_flyback(self) -> None:
        """Drop the measured flyback and measure it again (the scan's dwell or pixel size changed)."""
        self.flyback_px = None
        self._fb_log = []

    @property
    def n_sites(self) -> int:
        return len(self._ref)

    def _offsets(self, pending: dict, rows: np.ndarray) -> np.ndarray:
        if pending["coef"] is None:
            return np.zeros((len(rows), 2))
        return eval_row_offsets(pending["coef"], rows, pending["lo"], pending["hi"])

    def __call__(self, positions: np.ndarray, pos_std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Prior for a frame's fitted columns: ``positions`` (N, 2) px (line-averaged fits) and
        their standard errors ``pos_std`` (N,) px. Returns the predicted positions (N, 2) and
        their standard errors (N,), inf where there is no prior."""
        from scipy.spatial import cKDTree

        from stem_live.track import _refine_shift_points, estimate_shift

        pos = np.asarray(positions, np.float64).reshape(-1, 2)
        std = np.asarray(pos_std, np.float64).reshape(-1)
        n = len(pos)
        prior_pos = np.full((n, 2), np.nan)
        prior_std = np.full(n, np.inf)
        site = np.full(n, -1, np.intp)
        moved = np.zeros(n, bool)
        good = np.isfinite(pos).all(axis=1) & np.isfinite(std) & (std > 0)
        lo, hi = (float(pos[good, 0].min()), float(pos[good, 0].max())) if good.any() else (0.0, 1.0)
        pending = {"pos": pos, "std": std, "site": site, "moved": moved, "coef": None, "lo": lo, "hi": max(hi, lo + 1.0)}
        self._pending = pending
        # the sites seen in the last frame learnt from (frames skipped as bad in between)
        recent = np.flatnonzero(self._seen >= self._learned) if self.n_sites else np.zeros(0, np.intp)
        if len(recent) < self.min_links or good.sum() < self.min_links:
            return prior_pos, prior_std
        # the sites where the last frame's offsets put them, then the global shift since
        if self._last is not None:  # and the frame moves on as the last one did
            o = self._offsets(self._last, self._ref[:, 0] + self._last["mean"][0] + self._step[0])
            guess_all = self._ref + o + self._step
        else:
            guess_all = self._ref.copy()
        gi = np.flatnonzero(good)
        radius = self.link_frac * self.spacing_px
        tree = cKDTree(guess_all, balanced_tree=False, compact_nodes=False)  # faster to build, as fast to query
        # the frame moved little since the last one (the usual case): the median offset of
        # nearest neighbours; otherwise (a jump, a stage move) register the whole lattice
        shift, frac = _refine_shift_points(guess_all, pos[gi], (0.0, 0.0), radius, n_iter=1, tree=tree)
        if frac < 0.5:
            shift = np.asarray(estimate_shift(guess_all[recent], pos[gi], spacing_px=self.spacing_px))
        # one-to-one: each fitted column takes its nearest site; a site claimed twice goes to
        # the closer column
        d, j = tree.query(pos[gi] - shift, distance_upper_bound=radius, workers=-1)
        ok = np.flatnonzero(np.isfinite(d))
        order = ok[np.lexsort((d[ok], j[ok]))]
        first = np.ones(len(order), bool)
        first[1:] = j[order][1:] != j[order][:-1]
        linked = gi[order[first]]
        if len(linked) < self.min_links:
            return prior_pos, prior_std
        s = j[order[first]]
        site[linked] = s
        use, pred, pstd = self._predict(pending, pos, std, linked, self._ref[s], self._info[s])
        moved[linked[~use]] = True
        prior_pos[linked[use]] = pred[use]
        prior_std[linked[use]] = pstd[use]
        return prior_pos, prior_std

    def _predict(self, pending: dict, pos: np.ndarray, std: np.ndarray, linked: np.ndarray, ref: np.ndarray,
                 info: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The frame's offsets from its ``linked`` columns' sites (``ref``, ``info``), fitted
        twice, the second time without the outliers; sets ``pending["coef"]``. Returns, per
        linked column, (not an outlier (M,), prediction (M, 2), its standard error (M,))."""
        n_knots = max(2, int(np.ceil((pending["hi"] - pending["lo"]) / self.knot_rows)) + 1)
        ref_std2 = 1.0 / np.maximum(info, 1e-12) + self.floor_px**2
        w = 1.0 / (std[linked] ** 2 + ref_std2)
        resid = pos[linked] - ref
        keep = np.ones(len(linked), bool)
        for _ in range(2):
            pending["coef"] = fit_row_offsets(pos[linked[keep], 0], resid[keep], w[keep], pending["lo"],
                                              pending["hi"], n_knots=n_knots)
            pred = ref + self._offsets(pending, pos[linked, 0])
            z = np.abs(pos[linked] - pred) / np.sqrt(std[linked] ** 2 + ref_std2)[:, None]
            keep = (z <= self.outlier_sigma).all(axis=1)
        return keep, pred, np.sqrt(ref_std2)

    def update(self, columns: Columns) -> None:
        """Learn from the frame last passed to ``__call__``: its fitted columns that ``columns``
        (the frame's final result) kept. Sites are moved to the information-weighted mean of
        their observations in reference coordinates; a moved column starts a new site (the old one is forgotten in time)."""
        from scipy.spatial import cKDTree

        pend, self._pending = self._pending, None
        decay = np.exp(-1.0 / self.memory_frames)
        self._info = self._info * decay
        kept = None
        if pend is not None and len(pend["pos"]) and len(columns):
            pos, std = pend["pos"], pend["std"]
            d, i = cKDTree(np.nan_to_num(pos, nan=-1e9), balanced_tree=False, compact_nodes=False).query(
                columns.positions, distance_upper_bound=0.25 * self.spacing_px, workers=-1)
            kept = np.zeros(len(pos), bool)
            kept[i[np.isfinite(d)]] = True
            kept &= np.isfinite(std) & (std > 0) & np.isfinite(pos).all(axis=1)
            if pend["coef"] is None and self.n_sites and kept.sum() < self.min_links:
                kept = None  # too little to link or to start a new reference from: a bad frame, skipped
        if kept is not None:
            self._learned = self._frame
            if pend["coef"] is None and self.n_sites:  # not linked: this frame starts a new reference
                self._ref, self._info = np.zeros((0, 2)), np.zeros(0)
                self._seen, self._ids = np.zeros(0, np.int64), np.zeros(0, np.int64)
            r = pos - self._offsets(pend, pos[:, 0])  # in reference coordinates
            w = 1.0 / std**2
            site = pend["site"]
            old = kept & (site >= 0) & ~pend["moved"]
            s = site[old]
            tot = self._info[s] + w[old]
            self._ref[s] = (self._info[s, None] * self._ref[s] + w[old, None] * r[old]) / tot[:, None]
            self._info[s] = tot
            self._seen[s] = self._frame
            ids = np.full(len(pos), -1, np.int64)
            ids[old] = self._ids[s]
            # new sites: columns that link to none, and columns that moved (their old site is
            # left to be forgotten: the frames before the move keep their own site)
            new = kept & ((site < 0) | pend["moved"])
            n_new = int(new.sum())
            ids[new] = self._next_id + np.arange(n_new)
            self._next_id += n_new
            self._ref = np.concatenate([self._ref, r[new]])
            self._info = np.concatenate([self._info, w[new]])
            self._seen = np.concatenate([self._seen, np.full(n_new, self._frame, np.int64)])
            self._ids = np.concatenate([self._ids, ids[new]])
            if self.record:
                self.history.append({"pos": pos, "ids": ids, "r": r, "w": np.where(ids >= 0, w, 0.0)})
            if self.fit_flyback and self.flyback_px is None:
                self._log_flyback(pos, r, w, ids)
            if pend["coef"] is not None and kept.any():
                pend["mean"] = np.mean(self._offsets(pend, pos[kept, 0]), axis=0)
                self._step = pend["mean"] - self._last["mean"] if self._last is not None else np.zeros(2)
                self._last = pend
            elif pend["coef"] is None:
                self._last, self._step = None, np.zeros(2)
        elif self.record:
            self.history.append({"pos": np.zeros((0, 2)), "ids": np.zeros(0, np.int64), "r": np.zeros((0, 2)),
                                 "w": np.zeros(0)})
        # bounded memory: forget sites not seen for memory_frames frames
        alive = self._frame - self._seen <= self.memory_frames
        self._ref, self._info = self._ref[alive], self._info[alive]
        self._seen, self._ids = self._seen[alive], self._ids[alive]
        self._frame += 1

    def _log_flyback(self, pos: np.ndarray, r: np.ndarray, w: np.ndarray, ids: np.ndarray) -> None:
        """Keep this frame's left-quarter observations and, every ``flyback_every`` frames, fit
        the flyback to the log (``flyback.fit_from_sites``); where it is significant, take it."""
        from stem_live.locate.flyback import shift

        x = pos[:, 1]
        width = float(np.nanmax(x)) + 1.0 if np.isfinite(x).any() else 0.0
        sel = (ids >= 0) & np.isfinite(x) & (x < 0.25 * width)
        self._fb_log.append({"x": x[sel], "r": r[sel, 1], "w": w[sel], "ids": ids[sel], "width": width})
        self._fb_log = self._fb_log[-self.flyback_frames:]
        if len(self._fb_log) < 3 or self._frame % self.flyback_every:
            return
        cat = {k: np.concatenate([e[k] for e in self._fb_log]) for k in ("x", "r", "w", "ids")}
        width = max(e["width"] for e in self._fb_log)
        # a coarser search than a stack's (32 decays, 2 rounds: ~11 ms on 28,000 observations,
        # 1024 px frames; the full one gives the same result), every ``flyback_every`` frames only
        fb, _ = _left_edge_flyback(cat["x"], cat["r"], cat["w"], cat["ids"], self.spacing_px, width,
                                   self.flyback_min_chi2, decays=32, n_iter=2)
        if fb is None:
            return
        self.flyback_px = fb
        # the sites were learnt from pixel x: from now on the locator gives the lattice the
        # columns near the left edge at their scanned x, so each logged site moves by its
        # observations' mean flyback shift (nothing for the sites beyond the left quarter)
        uid, inv = np.unique(cat["ids"], return_inverse=True)
        move = np.bincount(inv, cat["w"] * shift(cat["x"], fb)) / np.maximum(np.bincount(inv, cat["w"]), 1e-300)
        slot = np.searchsorted(uid, self._ids)
        have = (slot < len(uid)) & (uid[np.minimum(slot, len(uid) - 1)] == self._ids)
        self._ref[have, 1] += move[slot[have]]
        self._fb_log = []


class _LeaveOneOut:
    """The prior for frame ``k`` of a recorded stack from every *other* frame: the sites'
    information-weighted means over the whole stack, less frame k's own observation."""

    def __init__(self, lattice: LatticePrior, k: int, totals: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        self.lattice, self.k = lattice, k
        self.ids, self.sum_wr, self.sum_w = totals

    def __call__(self, positions: np.ndarray, pos_std: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        from scipy.spatial import cKDTree

        pos = np.asarray(positions, np.float64).reshape(-1, 2)
        std = np.asarray(pos_std, np.float64).reshape(-1)
        prior_pos, prior_std = np.full((len(pos), 2), np.nan), np.full(len(pos), np.inf)
        rec = self.lattice.history[self.k]
        if not len(rec["pos"]) or not len(pos):
            return prior_pos, prior_std
        # the same fit as in the first pass: each column is the one recorded there
        d, j = cKDTree(np.nan_to_num(rec["pos"], nan=-1e9)).query(np.nan_to_num(pos, nan=1e9),
                                                                    distance_upper_bound=0.05)
        ok = np.isfinite(d) & np.isfinite(std) & (std > 0)
        jj = np.minimum(j, len(rec["ids"]) - 1)  # j = len where nothing matched
        ids = np.where(ok, rec["ids"][jj], -1)
        slot = np.searchsorted(self.ids, ids)
        slot = np.clip(slot, 0, max(len(self.ids) - 1, 0))
        ok &= (ids >= 0) & (len(self.ids) > 0)
        ok[ok] &= self.ids[slot[ok]] == ids[ok]
        own_w = np.where(ok, rec["w"][jj], 0.0)
        w_rest = np.where(ok, self.sum_w[slot], 0.0) - own_w
        ok &= w_rest > 1e-12 * np.maximum(own_w, 1e-300)
        linked = np.flatnonzero(ok)
        if len(linked) < self.lattice.min_links:
            return prior_pos, prior_std
        sl = slot[linked]
        ref = (self.sum_wr[sl] - own_w[linked, None] * rec["r"][jj[linked]]) / w_rest[linked, None]
        good = np.isfinite(pos).all(axis=1) & np.isfinite(std)
        lo, hi = float(pos[good, 0].min()), float(pos[good, 0].max())
        pending = {"coef": None, "lo": lo, "hi": max(hi, lo + 1.0)}
        use, pred, pstd = self.lattice._predict(pending, pos, std, linked, ref, w_rest[linked])
        prior_pos[linked[use]] = pred[use]
        prior_std[linked[use]] = pstd[use]
        return prior_pos, prior_std


def locate_stack(images, spacing_px: float, locate, *, fit_flyback: bool = False, flyback_min_chi2: float = 60.0,
                 knot_rows: float = 8.0, link_frac: float = 0.3, floor_px: float = 0.02, outlier_sigma: float = 4.0,
                 min_links: int = 32, progress=None) -> list[Columns]:
    """Every frame of a recorded stack of one area, located with all the *other* frames as its
    prior (the smoother a recording allows; a live session has only the frames before).

    ``locate(image, prior=...)`` -> ``Columns`` is the locator (``locate_classical`` or
    ``locate_unet`` with their options bound). Pass 1 locates the frames in order with a
    recording ``LatticePrior`` (no forgetting within the stack); pass 2 locates each frame
    again with its sites' means over the stack less its own observation. A column that
    moved is two sites, each with the frames on its side of the move.

    ``fit_flyback``: the scan's flyback is measured from pass 1 (the columns near the left
    edge drift across the flyback's displacement from frame to frame: ``flyback.fit_from_sites``,
    significant at chi**2 >= ``flyback_min_chi2``); where it is found, pass 1 is run again and
    pass 2 follows with ``locate(image, prior=..., flyback_px=...)`` (so ``locate`` must take
    it). For a stack whose flyback is not calibrated; every frame's ``meta["flyback_px"]`` then
    holds the one used (None where none was found). ``progress(k, n)`` is called after each of
    the 2 x n (3 x n with ``fit_flyback``; pass 1 again is skipped where none is found) locate
    calls. Returns one ``Columns`` per frame.
    """
    images = list(images)
    n = len(images)
    total = (3 if fit_flyback else 2) * n
    done = 0

    def tick() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total)

    def first_pass(options: dict) -> LatticePrior:
        lattice = LatticePrior(spacing_px, knot_rows=knot_rows, link_frac=link_frac, memory_frames=max(50.0, 2.0 * n),
                               floor_px=floor_px, outlier_sigma=outlier_sigma, min_links=min_links, record=True)
        for img in images:
            lattice.update(locate(img, prior=lattice, **options))
            tick()
        return lattice

    lattice = first_pass({})
    options: dict = {}
    fb = None
    if fit_flyback and n:
        fb, _ = _stack_flyback(lattice, spacing_px, np.shape(images[0])[-1], flyback_min_chi2)
        if fb is not None:
            options = {"flyback_px": fb}
            lattice = first_pass(options)
        else:
            done += n
    # every site's sums over the whole stack (each frame's observations in its reference
    # coordinates; a reference restart gives new ids, so sums never mix two references)
    all_ids = np.concatenate([h["ids"] for h in lattice.history]) if n else np.zeros(0, np.int64)
    all_w = np.concatenate([h["w"] for h in lattice.history]) if n else np.zeros(0)
    all_r = np.concatenate([h["r"] for h in lattice.history]) if n else np.zeros((0, 2))
    keep = all_ids >= 0
    ids, inverse = np.unique(all_ids[keep], return_inverse=True)
    sum_w = np.bincount(inverse, all_w[keep], len(ids))
    sum_wr = np.stack([np.bincount(inverse, all_w[keep] * all_r[keep, i], len(ids)) for i in range(2)], axis=1)
    out = []
    for k, img in enumerate(images):
        cols = locate(img, prior=_LeaveOneOut(lattice, k, (ids, sum_wr, sum_w)), **options)
        if fit_flyback:
            cols.meta["flyback_px"] = fb
        out.append(cols)
        tick()
    return out


def _stack_flyback(lattice: LatticePrior, spacing_px: float, width: int, min_chi2: float):
    """The flyback (amplitude, decay) px from a recording lattice's history (``locate_stack``'s
    pass 1, fitted without one), or None; and its chi**2."""
    hist = [h for h in lattice.history if len(h["ids"])]
    if not hist:
        return None, 0.0
    cat = {key: np.concatenate([h[key] for h in hist]) for key in ("pos", "r", "w", "ids")}
    return _left_edge_flyback(cat["pos"][:, 1], cat["r"][:, 1], cat["w"], cat["ids"], spacing_px, width, min_chi2)


def _left_edge_flyback(x, r, w, ids, spacing_px: float, width: float, min_chi2: float, *, decays: int = 64,
                       n_iter: int = 3):
    """``flyback.fit_from_sites`` on a lattice's observations (pixel x, reference x, weight,
    site id): only windows the left edge does not cut (radius ~ spacing / 2,
    ``classical._refine_fixed``), decays up to a quarter of the frame ``width`` (px)."""
    from stem_live.locate.flyback import fit_from_sites

    return fit_from_sites(x, r, w, ids, min_x=0.5 * spacing_px + 1.0, max_decay=0.25 * width, min_chi2=min_chi2,
                          decays=decays, n_iter=n_iter)
