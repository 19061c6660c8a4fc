"""Tracking: global shift, linking across large moves, entering/leaving columns,
vacancies, dopant hops, bounded memory."""

from __future__ import annotations

import numpy as np
import pytest

from stem_live.locate import Columns
from stem_live.track import Tracker, estimate_shift


def honeycomb_sites(extent, bond, angle=0.25):
    """Specimen sites of a honeycomb lattice covering [-extent, extent]^2."""
    a = np.sqrt(3) * bond
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    a1 = rot @ [0.0, a]
    a2 = rot @ [a * np.sqrt(3) / 2, a / 2]
    n = int(2 * extent / a) + 2
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    lat = i.reshape(-1, 1) * a1 + j.reshape(-1, 1) * a2
    pts = np.concatenate([lat, lat + rot @ [bond, 0.0]])
    return pts[np.all(np.abs(pts) <= extent, axis=1)]


def make_sequence(n_frames=24, shape=(200, 200), bond=12.0, step_frac=0.7, seed=0):
    """Columns of a drifting honeycomb seen through a fixed field of view.

    The lattice moves by ``step_frac`` x bond per frame (direction turning slowly, so it
    also comes back), with 0.15 px position noise; one vacancy appears at frame 6, a dopant
    (class 1) hops to a neighbouring site at frame 10.
    Returns a list of (Columns, true site index per column).
    """
    rng = np.random.default_rng(seed)
    sites = honeycomb_sites(400, bond)
    h, w = shape
    centre = np.array([h / 2, w / 2])
    # the vacancy and the dopant sites: near the field centre at frame 0
    d0 = np.linalg.norm(sites + 0.0 - np.array([0.0, 0.0]), axis=1)
    order = np.argsort(d0)
    vacancy = order[3]
    dop_a = order[0]
    nb = np.linalg.norm(sites - sites[dop_a], axis=1)
    nb[dop_a] = np.inf
    dop_b = int(np.argmin(nb))
    seq = []
    shift = np.zeros(2)
    for f in range(n_frames):
        ang = 0.6 + 0.25 * f
        if f:
            shift = shift + step_frac * bond * np.array([np.sin(ang), np.cos(ang)])
        pos = sites + centre + shift
        vis = np.flatnonzero((pos[:, 0] >= 0) & (pos[:, 0] < h) & (pos[:, 1] >= 0) & (pos[:, 1] < w))
        if f >= 6:
            vis = vis[vis != vacancy]
        p = pos[vis] + rng.normal(0, 0.15, (len(vis), 2))
        klass = np.zeros(len(vis), int)
        klass[vis == (dop_a if f < 10 else dop_b)] = 1
        perm = rng.permutation(len(vis))  # the locator's order is arbitrary
        cols = Columns(p[perm], klass[perm], np.where(klass[perm] == 1, 3.0, 1.0),
                       np.ones(len(vis)), np.zeros(len(vis), bool))
        seq.append((cols, vis[perm]))
    return seq, dict(vacancy=vacancy, dop_a=dop_a, dop_b=dop_b)


def test_tracker_large_moves_enter_leave_vacancy_dopant():
    seq, info = make_sequence()
    tr = Tracker(max_link_frac=0.3, history=512)
    site_to_id: dict[int, int] = {}
    id_to_site: dict[int, int] = {}
    n_obs = 0
    for f, (cols, sites) in enumerate(seq):
        ids = tr.update(cols)
        assert ids.shape == (len(cols),) and np.all(ids >= 0)
        assert len(np.unique(ids)) == len(ids)
        for s, i in zip(sites.tolist(), ids.tolist()):
            # a site keeps its id for good, and an id never moves to another site
            assert site_to_id.setdefault(s, i) == i, f"frame {f}: site {s} changed id"
            assert id_to_site.setdefault(i, s) == s, f"frame {f}: id {i} reused"
            n_obs += 1
    assert n_obs > 3000
    # the field moved by many spacings: plenty of columns entered and left
    assert len(site_to_id) > 1.5 * len(seq[0][0])
    traj = tr.trajectories()
    assert traj["positions"].shape == (len(seq), len(site_to_id), 2)
    col = {i: k for k, i in enumerate(traj["track_ids"])}
    # vacancy: its track has data up to frame 5 and NaN after
    v = col[site_to_id[info["vacancy"]]]
    assert np.all(np.isfinite(traj["positions"][:6, v, 0]))
    assert np.all(np.isnan(traj["positions"][6:, v, 0]))
    # dopant hop: class 1 on site a until frame 9, then on site b; both keep their ids
    a, b = col[site_to_id[info["dop_a"]]], col[site_to_id[info["dop_b"]]]
    assert np.all(traj["klass"][:10, a] == 1) and np.all(traj["klass"][10:, a] == 0)
    assert np.all(traj["klass"][:10, b] == 0) and np.all(traj["klass"][10:, b] == 1)
    # the estimated shifts follow the true drift (0.7 bond per frame) up to a constant
    true = np.cumsum([[0, 0]] + [[0.7 * 12 * np.sin(0.6 + 0.25 * f), 0.7 * 12 * np.cos(0.6 + 0.25 * f)]
                                 for f in range(1, len(seq))], axis=0)
    err = traj["shifts"] - true
    assert np.abs(err - err[0]).max() < 0.2


def test_tracker_memory_is_bounded(tmp_path):
    seq, _ = make_sequence(n_frames=30, step_frac=0.4, seed=1)
    tr = Tracker(history=8)
    for cols, _ in seq:
        tr.update(cols)
    traj = tr.trajectories()
    assert traj["positions"].shape[0] == 8
    assert traj["frames"].tolist() == list(range(22, 30))
    assert len(tr._frames) == 8
    # sites unseen for `history` frames are dropped from the reference: it holds exactly the
    # sites seen in the last 8 frames (257 here; 301 if nothing were dropped)
    seen = set(np.concatenate([site for _, site in seq[-8:]]).tolist())
    every = set(np.concatenate([site for _, site in seq]).tolist())
    assert len(every) > len(seen) + 20
    assert len(tr.reference) == len(seen)
    path = tmp_path / "tracks.npz"
    tr.export(path)
    with np.load(path) as z:
        assert z["positions"].shape == traj["positions"].shape
        assert z["reference"].shape == (len(tr.reference), 2)


def test_tracker_uses_shift_hint():
    seq, _ = make_sequence(n_frames=2, step_frac=0.0)
    cols0, s0 = seq[0]
    tr = Tracker()
    ids0 = tr.update(cols0)
    # a jump of 2.4 spacings that no prior could guess: the hint resolves it
    jump = np.array([20.0, 17.0])
    moved = Columns(cols0.positions + jump, cols0.klass, cols0.intensity, cols0.confidence, cols0.border)
    keep = np.all((moved.positions >= 0) & (moved.positions < 200), axis=1)
    ids1 = tr.update(moved.subset(keep), shift_hint=tuple(jump + 0.5))
    assert np.array_equal(ids1, ids0[keep])
    assert np.allclose(tr.shift, jump, atol=0.1)


def test_a_hint_a_little_off_still_beats_the_constant_velocity_guess():
    """The image moved 60 px and then stopped (a beam shift held it): the constant-velocity
    guess says 120 px, five spacings on. A hint 5 px off (past the link radius, less than half a
    spacing) is the prior of the frame-to-frame match, not the guess: the tracker finds the
    stop; with the guess as the prior, 115 px (and in a stream of 5 s frames scanned under a
    path, frames linked two spacings off and a drift model that ran away)."""
    seq, _ = make_sequence(n_frames=1, step_frac=0.0)
    cols0, _ = seq[0]
    rng = np.random.default_rng(3)
    drop = rng.random(len(cols0)) < 0.08          # vacancies: the lattice's aliases differ
    base = cols0.subset(~drop)
    tr = Tracker()
    tr.update(base)
    shift = np.array([60.0, 0.0])
    for hint in (shift, shift + [5.0, 0.0]):
        moved = Columns(base.positions + shift, base.klass, base.intensity, base.confidence, base.border)
        keep = np.all((moved.positions >= 0) & (moved.positions < 200), axis=1)
        tr.update(moved.subset(keep), shift_hint=tuple(hint))
    assert np.allclose(tr.shift, [60.0, 0.0], atol=0.3)


def test_tracker_links_rows_the_drift_moved_within_the_frame():
    """Rows are times: drift that the prediction missed moves the last third of the rows by
    0.45 of a spacing, beyond the link radius (0.3) for one shift per frame. Every column
    still links to its own site, and the reference averages the frame's one shift (a band's
    shift would freeze the drift into it)."""
    seq, _ = make_sequence(n_frames=1, step_frac=0.0)
    cols0, _ = seq[0]
    tr = Tracker()
    ids0 = tr.update(cols0)
    ref0 = tr.reference.copy()
    p = cols0.positions.copy()
    spacing = tr.spacing_px
    ramp = np.clip((p[:, 0] - 100.0) / 33.0, 0.0, 1.0)[:, None] * np.array([0.0, 0.45 * spacing])  # rows 100-133 ramp up
    moved = Columns(p + ramp, cols0.klass, cols0.intensity, cols0.confidence, cols0.border)
    ids1 = tr.update(moved, shift_hint=(0.0, 0.0))
    assert (ramp[:, 1] > 0.3 * spacing).sum() > 50
    assert np.array_equal(ids1, ids0)   # before band linking, the moved rows became new sites
    assert len(tr.reference) == len(ref0)
    # each site's reference: the mean of its two sightings less the frame's one shift
    order = np.argsort(tr.reference_ids)
    shift = np.asarray(tr.shift)
    exp = 0.5 * (p + (p + ramp - shift))
    got = tr.reference[order][np.searchsorted(tr.reference_ids[order], ids0)]
    assert np.allclose(got, exp, atol=1e-9)


def test_a_band_that_links_only_partly_does_not_move_the_chain_but_new_rows_do_not_stop_it():
    """Band by band linking: a band of which only 60 % of the points link (the rest fall between
    the sites) at a shift 2 px off its neighbour's keeps the neighbour's shift (taking it lets the
    chain walk off the lattice: 10 px over one 1024 px MoS2 frame); a band whose points link but
    for those the drift brought in from beyond the reference follows its own shift."""
    from scipy.spatial import cKDTree

    from stem_live.track import _band_shifts

    bond = 12.0
    radius = 0.3 * bond
    ref = honeycomb_sites(100.0, bond) + 100.0                  # sites in [0, 200]^2, px
    lo, hi = ref[:, 0].min(), ref[:, 0].max() + 2.0
    nb = int((hi - lo) / (2.0 * bond))                           # the bands _band_shifts cuts
    band = np.minimum(((ref[:, 0] - lo) / (hi - lo) * nb).astype(int), nb - 1)
    pts = ref.copy()
    part = band == 3                                             # an interior band
    stray = part & (np.random.default_rng(0).random(len(ref)) < 0.4)
    pts[part] += (0.0, 2.0)
    # the strays between the sites: of 12 points half a bond around each, the farthest from any site
    ang = np.linspace(0.0, 2 * np.pi, 12, endpoint=False)
    cand = pts[stray][:, None, :] + 0.5 * bond * np.stack([np.cos(ang), np.sin(ang)], axis=1)[None]
    far = cKDTree(ref).query(cand.reshape(-1, 2))[0].reshape(len(cand), len(ang))
    pts[stray] = cand[np.arange(len(cand)), np.argmax(far, axis=1)]
    last = band == nb - 1                                        # the bottom band follows a new shift
    pts[last] += (2.0, 0.0)
    new = pts[last & (ref[:, 1] > 100)] + (0.0, 110.0)            # rows the drift brought in: beyond the reference
    pts = np.concatenate([pts, new])
    pad = np.zeros(len(new), bool)
    assert np.min(np.max(far, axis=1)) > radius + 0.5
    linked = np.isfinite(cKDTree(ref).query(pts, distance_upper_bound=radius)[0])
    out = _band_shifts(ref, pts, linked, np.zeros(2), radius, bond, cKDTree(ref))
    assert out is not None and part.sum() > 20 and len(new) > 0.25 * last.sum()
    assert np.allclose(out[np.r_[band <= 2, pad]], 0.0, atol=0.05)
    assert np.allclose(out[np.r_[part, pad]], 0.0, atol=0.05)     # not (0, 2): 60 % linked
    assert np.allclose(out[np.r_[last, pad]], (2.0, 0.0), atol=0.05)


def test_estimate_shift_images_and_points():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(128, 128))
    from scipy import ndimage as ndi

    img = ndi.gaussian_filter(img, 2.0)
    moved = ndi.shift(img, (3.4, -5.7), order=3, mode="wrap")
    dy, dx = estimate_shift(img, moved)
    assert dy == pytest.approx(3.4, abs=0.15) and dx == pytest.approx(-5.7, abs=0.15)
    pts = honeycomb_sites(80, 10.0) + 100
    s = np.array([6.5, -3.1])  # 0.72 x spacing: beyond half a spacing
    dy, dx = estimate_shift(pts, pts[::-1] + s, spacing_px=10.0)
    assert (dy, dx) == pytest.approx(tuple(s), abs=0.05)
    with pytest.raises(ValueError):
        estimate_shift(img, pts)
