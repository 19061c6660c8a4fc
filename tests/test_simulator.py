"""Tests of the virtual STEM (simulator/): geometry, drift, actuator, noise, presets.

Every test checks numbers against analytic truth; frames are kept small so each test
runs in well under a few seconds on a 2-core CPU.
"""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

from simulator import (
    PRESETS,
    ActuatorConfig,
    DriftConfig,
    FrameMeta,
    FrameTruth,
    Microscope,
    MicroscopeConfig,
    ScanConfig,
    Specimen,
    make_specimen,
)
from simulator.drift import DriftModel


# ----------------------------------------------------------------------------- helpers
def find_peaks(img: np.ndarray, size: int = 9, rel_threshold: float = 0.05) -> np.ndarray:
    """Local maxima refined by a 3-point Gaussian (log-parabola) fit per axis: (n, 2) (row, col)."""
    f = img.astype(float)
    mx = ndi.maximum_filter(f, size=size, mode="constant")
    thr = f.min() + rel_threshold * (f.max() - f.min())
    r, c = np.nonzero((f == mx) & (f > thr))
    ok = (r > 0) & (r < f.shape[0] - 1) & (c > 0) & (c < f.shape[1] - 1)
    r, c = r[ok], c[ok]
    lf = np.log(np.maximum(f, 1e-3))

    def delta(lm, l0, lp):
        den = lm - 2 * l0 + lp
        return np.where(den < 0, 0.5 * (lm - lp) / np.where(den < 0, den, -1.0), 0.0)

    dr = delta(lf[r - 1, c], lf[r, c], lf[r + 1, c])
    dc = delta(lf[r, c - 1], lf[r, c], lf[r, c + 1])
    return np.stack([r + dr, c + dc], axis=1)


def match(found: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each truth point: index of the nearest found point and its distance (px)."""
    d2 = ((truth[:, None, :] - found[None, :, :]) ** 2).sum(-1)
    idx = d2.argmin(axis=1)
    return idx, np.sqrt(d2[np.arange(len(truth)), idx])


def interior(p: np.ndarray, shape, margin: float) -> np.ndarray:
    return ((p[:, 0] > margin) & (p[:, 0] < shape[0] - 1 - margin)
            & (p[:, 1] > margin) & (p[:, 1] < shape[1] - 1 - margin))


def quiet(**kw) -> MicroscopeConfig:
    """No noise, no drift, no scan distortion, ideal actuator, no background."""
    base = dict(noise=False, background_counts=0.0, drift=DriftConfig.none(), scan=ScanConfig.none(),
                actuator=ActuatorConfig.ideal())
    base.update(kw)
    return MicroscopeConfig(**base)


# ----------------------------------------------------------------------------- 1. geometry
def test_static_maxima_match_truth_subpixel():
    cfg = quiet(preset="srtio3", size=256, dose_e_per_A2=1e7)
    img, meta, truth = Microscope(cfg).acquire()
    assert img.dtype == np.uint16 and img.shape == (256, 256)
    found = find_peaks(img, size=9, rel_threshold=0.02)
    sel = interior(truth.columns_px, img.shape, 8)
    assert sel.sum() > 150
    _, dist = match(found, truth.columns_px[sel])
    assert dist.max() < 0.05, dist.max()
    # with no drift / shift / distortion: pixel = specimen position / pixel size
    np.testing.assert_allclose(truth.columns_px, truth.specimen_nm / 0.012, atol=1e-9)


def test_distorted_drifting_rotated_maxima_match_truth():
    scan = ScanConfig(scale_error=(0.02, -0.01), shear=0.03, flyback_amp_nm=0.02, flyback_tau_us=20.0,
                      line_jitter_nm=0.0)
    drift = DriftConfig(drift_nm_per_min=40.0, direction_rad=0.7, ou_sigma_nm=0.02, ou_tau_s=0.3,
                        ou_dt_s=0.005, jitter_amp_nm=0.002)
    cfg = quiet(preset="srtio3", size=256, dose_e_per_A2=1e7, scan=scan, drift=drift,
                scan_rotation_rad=0.4)
    scope = Microscope(cfg)
    scope.set_beam_shift((0.3, -0.2))
    img, meta, truth = scope.acquire()
    found = find_peaks(img, size=9, rel_threshold=0.02)
    sel = interior(truth.columns_px, img.shape, 8)
    assert sel.sum() > 150
    _, dist = match(found, truth.columns_px[sel])
    assert np.median(dist) < 0.03 and dist.max() < 0.1, (np.median(dist), dist.max())


def test_scale_shear_flyback_follow_formula():
    py = px = 0.012
    sy, sx, shear, amp, tau = 0.03, -0.02, 0.05, 0.03, 20.0
    scan = ScanConfig(scale_error=(sy, sx), shear=shear, flyback_amp_nm=amp, flyback_tau_us=tau,
                      line_jitter_nm=0.0)
    cfg = quiet(preset="srtio3", size=200, scan=scan)
    tr = Microscope(cfg).acquire()[2]
    p = tr.specimen_nm
    i = p[:, 0] / ((1 + sy) * py)
    np.testing.assert_allclose(tr.columns_px[:, 0], i, atol=1e-9)
    # x = (1+sx) px j + shear y + A exp(-j dwell / tau)  ->  check the residual of the formula
    j = tr.columns_px[:, 1]
    x_model = (1 + sx) * px * j + shear * p[:, 0] + amp * np.exp(-np.maximum(j, 0) * 2.0 / tau)
    np.testing.assert_allclose(x_model, p[:, 1], atol=1e-6)


def test_line_jitter_moves_whole_lines():
    cfg = quiet(preset="graphene", size=128, scan=replace(ScanConfig.none(), line_jitter_nm=0.01))
    tr = Microscope(cfg).acquire()[2]
    assert tr.line_jitter_nm.shape == (128,)
    assert 0.006 < tr.line_jitter_nm.std() < 0.014
    r = np.rint(tr.columns_px[:, 0]).astype(int)
    x_model = tr.columns_px[:, 1] * 0.010 + tr.line_jitter_nm[r]
    np.testing.assert_allclose(x_model, tr.specimen_nm[:, 1], atol=1e-6)


@settings(max_examples=12, deadline=None, database=None)
@given(v=st.tuples(st.floats(-100, 100), st.floats(-100, 100)),
       b=st.tuples(st.floats(-2, 2), st.floats(-2, 2)),
       phi=st.floats(-np.pi, np.pi), scale=st.tuples(st.floats(-0.05, 0.05), st.floats(-0.05, 0.05)),
       shear=st.floats(-0.05, 0.05), seed=st.integers(0, 2 ** 31 - 1))
def test_truth_satisfies_forward_model(v, b, phi, scale, shear, seed):
    """p + d(t) - b(t) = scan(i, j) for every reported column, at its own scan time."""
    amp, tau = 0.01, 20.0
    scan = ScanConfig(scale_error=scale, shear=shear, flyback_amp_nm=amp, flyback_tau_us=tau, line_jitter_nm=0)
    drift = DriftConfig(velocity_nm_per_min=v, ou_sigma_nm=0.02, ou_tau_s=1.0, jitter_amp_nm=0.005)
    scope = Microscope(quiet(preset="graphene", size=48, drift=drift, scan=scan, scan_rotation_rad=phi,
                             seed=seed, actuator=ActuatorConfig(gain=0.95, noise_nm=0.01)))
    scope.set_beam_shift(b)
    _, meta, tr = scope.acquire()
    i, j = tr.columns_px.T
    d = scope.drift_at(tr.column_times_s)
    bb = tr.beam_shift_nm[np.clip(np.rint(i), 0, 47).astype(int)]
    y = (1 + scale[0]) * 0.010 * i
    x = (1 + scale[1]) * 0.010 * j + shear * y + amp * np.exp(-np.maximum(j, 0) * 2.0 / tau)
    np.testing.assert_allclose(tr.specimen_nm + d - bb, np.stack([y, x], 1), atol=1e-7)


# ----------------------------------------------------------------------------- 2. constant drift
def test_constant_drift_gives_shear_of_velocity_times_line_time():
    v_nm_min = 60.0
    cfg = quiet(preset="srtio3", size=256, dose_e_per_A2=1e7, drift=DriftConfig.linear(v_nm_min, 0.0))
    scope = Microscope(cfg)
    img, meta, tr = scope.acquire()
    px = meta.pixel_size_nm[1]
    expected = v_nm_min / 60.0 * scope.line_time_s / px          # px per row
    assert expected > 0.02
    # truth: col - x_specimen/px against row
    resid = tr.columns_px[:, 1] - tr.specimen_nm[:, 1] / px
    slope_truth = np.polyfit(tr.columns_px[:, 0], resid, 1)[0]
    assert slope_truth == pytest.approx(expected, rel=0.02)
    np.testing.assert_allclose(tr.columns_px[:, 0], tr.specimen_nm[:, 0] / px, atol=1e-9)
    # image: refined maxima matched to truth give the same shear
    found = find_peaks(img, size=9, rel_threshold=0.02)
    sel = interior(tr.columns_px, img.shape, 8)
    idx, dist = match(found, tr.columns_px[sel])
    assert dist.max() < 0.1
    f = found[idx]
    slope_img = np.polyfit(f[:, 0], f[:, 1] - tr.specimen_nm[sel, 1] / px, 1)[0]
    assert slope_img == pytest.approx(expected, rel=0.02)
    # and the truth drift is exactly v * t
    np.testing.assert_allclose(tr.drift_nm[:, 1], v_nm_min / 60.0 * tr.line_times_s, atol=1e-12)
    np.testing.assert_allclose(tr.drift_nm[:, 0], 0.0, atol=1e-12)


# ----------------------------------------------------------------------------- 3. actuator
def test_actuator_latency_lines_and_gain_in_truth_and_image():
    gain, L, shift = 0.9, 100, 0.1
    cfg = quiet(preset="srtio3", size=256, dose_e_per_A2=1e7,
                actuator=ActuatorConfig(gain=gain, latency_lines=L, noise_nm=0.0))
    scope = Microscope(cfg)
    img0, meta0, tr0 = scope.acquire()
    applied = scope.set_beam_shift((0.0, shift))
    np.testing.assert_allclose(scope.beam_shift_nm, [0.0, shift])
    np.testing.assert_allclose(applied, [0.0, gain * shift])
    img1, meta1, tr1 = scope.acquire()
    assert meta1.beam_shift_nm == (0.0, 0.0)       # setpoint in effect at line 0
    np.testing.assert_allclose(tr1.beam_shift_nm[:L], 0.0)
    np.testing.assert_allclose(tr1.beam_shift_nm[L:], [[0.0, gain * shift]] * (256 - L))
    # image: rows >= L shifted by -gain * shift / px along x; rows < L unchanged
    px = meta1.pixel_size_nm[1]
    found = find_peaks(img1, size=9, rel_threshold=0.02)
    ref = tr0.columns_px
    sel_lo = interior(ref, img1.shape, 8) & (ref[:, 0] < L - 6)
    sel_hi = interior(ref - [0, gain * shift / px], img1.shape, 8) & (ref[:, 0] > L + 6)
    _, d_lo = match(found, ref[sel_lo])
    _, d_hi = match(found, ref[sel_hi] - [0, gain * shift / px])
    assert d_lo.max() < 0.05 and d_hi.max() < 0.05
    # next frame: the new setpoint is reported from line 0 and applies on every line
    _, meta2, tr2 = scope.acquire()
    assert meta2.beam_shift_nm == (0.0, shift)
    np.testing.assert_allclose(tr2.beam_shift_nm, [[0.0, gain * shift]] * 256)


def test_actuator_latency_frames_and_spill_over():
    cfg = quiet(preset="graphene", size=32, actuator=ActuatorConfig(gain=1.0, latency_frames=1,
                                                                    latency_lines=40, noise_nm=0.0))
    scope = Microscope(cfg)
    scope.set_beam_shift((0.2, 0.0))   # before frame 0: frame 0 + 1 + 40 // 32 = 2, line 8
    trs = [scope.acquire()[2] for _ in range(4)]
    np.testing.assert_allclose(trs[0].beam_shift_nm, 0.0)
    np.testing.assert_allclose(trs[1].beam_shift_nm, 0.0)
    np.testing.assert_allclose(trs[2].beam_shift_nm[:8], 0.0)
    np.testing.assert_allclose(trs[2].beam_shift_nm[8:, 0], 0.2)
    np.testing.assert_allclose(trs[3].beam_shift_nm[:, 0], 0.2)


def test_a_beam_path_is_followed_line_by_line_with_gain_and_latency():
    """``set_beam_path``: each line of the next frame gets the path's target from its start
    time on (the line latency added, the gain applied to every change); the frame reports the
    commanded shift per line; a frame after the path holds its last point and reports no lines."""
    gain, L, rows = 0.9, 5, 32
    cfg = quiet(preset="graphene", size=rows, actuator=ActuatorConfig(gain=gain, latency_lines=L, noise_nm=0.0))
    scope = Microscope(cfg)
    _, meta0, _ = scope.acquire()
    assert meta0.beam_shift_lines_nm is None
    t0, line = scope.time_s, scope.line_time_s
    k = np.arange(rows)
    path = np.stack([0.01 * k, -0.005 * k], axis=1)   # a ramp of 10 pm a line along y
    scope.set_beam_path(t0 + k * line, path)
    _, meta1, tr1 = scope.acquire()
    want = np.zeros((rows, 2))
    want[L:] = path[:rows - L]                       # commanded, L lines late
    np.testing.assert_allclose(meta1.beam_shift_lines_nm, want, atol=1e-12)
    np.testing.assert_allclose(tr1.beam_shift_nm, gain * want, atol=1e-12)
    assert meta1.beam_shift_nm == (0.0, 0.0)
    _, meta2, tr2 = scope.acquire()                  # the path's last L points, then its end held
    np.testing.assert_allclose(meta2.beam_shift_lines_nm[:L], path[rows - L:], atol=1e-12)
    np.testing.assert_allclose(tr2.beam_shift_nm[L:], gain * np.tile(path[-1], (rows - L, 1)), atol=1e-12)
    _, meta3, tr3 = scope.acquire()
    assert meta3.beam_shift_lines_nm is None and meta3.beam_shift_nm == tuple(path[-1])
    # a plain command replaces what is left of a path
    scope.set_beam_path(scope.time_s + k * line, path)
    scope.set_beam_shift((1.0, 1.0))
    _, _, tr4 = scope.acquire()
    np.testing.assert_allclose(tr4.beam_shift_nm[:L], gain * np.tile(path[-1], (L, 1)), atol=1e-12)
    np.testing.assert_allclose(tr4.beam_shift_nm[L:], gain * np.tile([1.0, 1.0], (rows - L, 1)), atol=1e-12)


def test_actuator_noise_statistics():
    noise, gain = 0.01, 0.97
    cfg = quiet(preset="graphene", size=16, actuator=ActuatorConfig(gain=gain, noise_nm=noise))
    scope = Microscope(cfg)
    rng = np.random.default_rng(5)
    targets = rng.normal(0.0, 0.5, size=(400, 2))
    applied = []
    for k, t in enumerate(targets):
        applied.append(scope.set_beam_shift(t))
        if k < 20:
            tr = scope.acquire()[2]
            np.testing.assert_allclose(tr.beam_shift_nm, np.tile(applied[-1], (16, 1)))
    applied = np.array(applied)
    err = np.diff(applied, axis=0) - gain * np.diff(targets, axis=0)
    assert abs(err.mean()) < 0.002
    assert err.std() == pytest.approx(noise, rel=0.1)


# ----------------------------------------------------------------------------- 4. reproducibility
def _run(seed: int, n: int = 3):
    scope = Microscope(MicroscopeConfig(preset="graphene", size=96, seed=seed, dynamics=True,
                                        hop_rate_per_s=5.0, si_fraction=0.02))
    out = []
    for k in range(n):
        out.append(scope.acquire())
        scope.set_beam_shift((0.01 * k, -0.02 * k))
    return out


def test_same_seed_identical_different_seed_different():
    a, b, c = _run(3), _run(3), _run(4)
    for (ia, ma, ta), (ib, mb, tb) in zip(a, b):
        np.testing.assert_array_equal(ia, ib)
        assert ma == mb
        for f in ("line_times_s", "drift_nm", "beam_shift_nm", "columns_px", "column_ids", "species",
                  "specimen_nm", "line_jitter_nm"):
            np.testing.assert_array_equal(getattr(ta, f), getattr(tb, f))
    assert not np.array_equal(a[0][0], c[0][0])
    assert not np.allclose(a[-1][2].drift_nm, c[-1][2].drift_nm)


# ----------------------------------------------------------------------------- 5. drift truth
def test_drift_at_matches_truth_and_is_continuous():
    scope = Microscope(MicroscopeConfig(preset="graphene", size=64, seed=2))
    for _ in range(3):
        _, meta, tr = scope.acquire()
        np.testing.assert_allclose(scope.drift_at(tr.line_times_s), tr.drift_nm, atol=1e-12)
    t = np.linspace(0.0, 30.0, 300001)                 # 100 us steps
    d = scope.drift_at(t)
    step = np.abs(np.diff(d, axis=0)).max()
    cfg = scope.config.drift
    bound = (cfg.drift_nm_per_min / 60 + 2 * np.pi * cfg.jitter_hz * cfg.jitter_amp_nm) * 1e-4 + 1e-4
    assert step < bound
    assert d.shape == (300001, 2)


def test_drift_at_independent_of_query_order_and_extends_far():
    cfg = DriftConfig()                                   # defaults, OU on
    a, b = DriftModel(cfg, seed=7), DriftModel(cfg, seed=7)
    t_far = np.array([1100.0, 3.0, 550.5])
    da = a(t_far)                                         # far future first
    b(np.linspace(0, 100, 1000))
    db = b(np.array([3.0, 550.5, 1100.0]))
    np.testing.assert_array_equal(da, db[[2, 0, 1]])
    # the linear part dominates far out: 1 nm/min for 1100 s
    assert np.hypot(*da[0]) == pytest.approx(1100 / 60, abs=0.1)
    # OU stationary std close to ou_sigma (loose: finite sample of a correlated walk)
    ou = a.ou_at(np.arange(0, 1100, 0.5))
    assert 0.5 * cfg.ou_sigma_nm < ou.std() < 1.5 * cfg.ou_sigma_nm


def test_drift_jump_appears_at_jump_time():
    t_jump = 0.2
    cfg = MicroscopeConfig(preset="graphene", size=128, noise=False, scan=ScanConfig.none(),
                           drift=replace(DriftConfig.none(), jump_nm=0.3, jump_time_s=t_jump,
                                         jump_direction_rad=np.pi / 2))
    scope = Microscope(cfg)
    _, meta, tr = scope.acquire()
    k = np.searchsorted(tr.line_times_s, t_jump)         # first line starting after the jump
    np.testing.assert_allclose(tr.drift_nm[:k - 1], 0.0, atol=1e-12)
    np.testing.assert_allclose(tr.drift_nm[k:, 0], 0.3)
    np.testing.assert_allclose(tr.drift_nm[k:, 1], 0.0, atol=1e-12)
    np.testing.assert_allclose(scope.drift_at([t_jump - 1e-9, t_jump]), [[0, 0], [0.3, 0]], atol=1e-12)
    # columns scanned after the jump appear 0.3 nm / px lower
    after = tr.column_times_s > t_jump
    shift = tr.columns_px[:, 0] - tr.specimen_nm[:, 0] / 0.010
    np.testing.assert_allclose(shift[after], 30.0, atol=1e-6)
    np.testing.assert_allclose(shift[~after], 0.0, atol=1e-6)


@pytest.mark.parametrize("ou_dt, dwell_us", [(0.01, 2.0), (0.0004, 5.0)])
def test_per_pixel_frame_drift_equals_drift_at(ou_dt, dwell_us):
    cfg = DriftConfig(drift_nm_per_min=3.0, ou_sigma_nm=0.02, ou_tau_s=0.5, ou_dt_s=ou_dt,
                      jitter_amp_nm=0.01, jitter_axis_rad=0.3, settle_nm=0.5, settle_tau_s=2.0,
                      jumps=((0.0123, (0.1, -0.2)),))
    m = DriftModel(cfg, seed=1)
    rows, cols, dwell, line = 40, 300, dwell_us * 1e-6, (300 * dwell_us + 50) * 1e-6
    t0 = 0.0051
    ry, rx, dy, dx = m.frame_xy(t0, line, dwell, rows, cols)
    t = t0 + np.arange(rows)[:, None] * line + np.arange(cols)[None, :] * dwell
    ey, ex = m.xy(t)
    np.testing.assert_allclose(ry[:, None] + dy, ey, atol=2e-6)
    np.testing.assert_allclose(rx[:, None] + dx, ex, atol=2e-6)


def test_large_open_loop_drift_never_runs_out_of_specimen():
    # 3 nm/min for 2000 frames of 0.55 s = 55 nm: the second frame is 1100 s later
    cfg = MicroscopeConfig(preset="graphene", size=256, frame_gap_s=1100.0,
                           drift=DriftConfig.linear(3.0, 0.3))
    scope = Microscope(cfg)
    n0 = len(scope.acquire()[2].columns_px)
    img, meta, tr = scope.acquire()
    assert meta.t_start == pytest.approx(1100.0 + scope.frame_time_s)
    assert abs(len(tr.columns_px) - n0) < 0.06 * n0
    assert np.hypot(*tr.drift_nm[0]) == pytest.approx(55.0, rel=0.01)
    assert img[img > 0].size > 0.9 * img.size


# ----------------------------------------------------------------------------- 6. presets
@pytest.mark.parametrize("preset, density_per_nm2", [
    ("graphene", 4 / (np.sqrt(3) * 0.246 ** 2)),
    ("srtio3", 4 / 0.3905 ** 2),
    ("mos2", 2 / (np.sqrt(3) / 2 * 0.316 ** 2)),
    ("particles", 0.95 / 2.0 ** 2),
])
def test_presets_render_with_plausible_counts(preset, density_per_nm2):
    scope = Microscope(MicroscopeConfig(preset=preset, size=256, seed=1))
    img, meta, tr = scope.acquire()
    area = (256 * meta.pixel_size_nm[0]) * (256 * meta.pixel_size_nm[1])
    tol = 0.15 if preset == "particles" else 0.05
    assert len(tr.columns_px) == pytest.approx(density_per_nm2 * area, rel=tol)
    assert img.dtype == np.uint16 and 20 < img.max() < 5000
    n = len(tr.columns_px)
    for f in ("column_ids", "species", "weight", "column_times_s"):
        assert getattr(tr, f).shape == (n,)
    assert tr.specimen_nm.shape == (n, 2) and len(np.unique(tr.column_ids)) == n
    assert (tr.orientation_rad is None) == (preset != "particles")


@pytest.mark.parametrize("preset, order", [
    ("graphene", ["Si", "C"]),
    ("srtio3", ["Sr", "TiO", "O"]),
    ("mos2", ["W", "Mo", "S2", "S"]),
])
def test_z_contrast_ordering(preset, order):
    cfg = quiet(preset=preset, size=192, si_fraction=0.1, vacancy_fraction=0.05, seed=3)
    img, meta, tr = Microscope(cfg).acquire()
    r = np.rint(tr.columns_px).astype(int)
    peak = img[r[:, 0], r[:, 1]].astype(float)
    means = []
    for name in order:
        k = tr.species_names.index(name)
        assert (tr.species == k).sum() > 0, name
        means.append(peak[tr.species == k].mean())
    assert all(a > 1.2 * b for a, b in zip(means, means[1:])), dict(zip(order, means))


def test_default_snr_counts():
    img, meta, tr = Microscope(MicroscopeConfig(preset="graphene", size=256, seed=0)).acquire()
    r = np.rint(tr.columns_px).astype(int)
    c = img[r[:, 0], r[:, 1]][tr.species == 0].astype(float)
    assert 15 < c.mean() < 80                            # C: a few tens of counts
    assert 0.5 * np.sqrt(c.mean()) < c.std() < 2.0 * np.sqrt(c.mean()) + 2   # shot-noise-like


def test_graphene_defaults_have_dopants_and_vacancies_in_a_512_frame():
    spec = make_specimen("graphene", seed=0, extent_nm=(5.12, 5.12))
    cols = spec.columns_in(((0, 5.12), (0, 5.12)), include_vacancies=True)
    n_si = (cols.species == 1).sum()
    n_vac = (cols.species == -1).sum()
    assert 1 <= n_si <= 12 and 1 <= n_vac <= 10, (n_si, n_vac)
    assert len(spec.positions_nm) == len(spec.species) == len(spec.z)
    assert set(np.unique(spec.species)) <= {0, 1}


def test_particles_orientation_convention_and_asymmetry():
    cfg = quiet(preset="particles", size=256, seed=2, specimen_kwargs={"rot_diffusion_rad2_per_s": 0.0})
    img, meta, tr = Microscope(cfg).acquire()
    assert tr.symmetry_order == 1
    th = tr.orientation_rad
    assert th.shape == (len(tr.columns_px),) and np.all(np.abs(th) <= np.pi)
    # intensity-weighted centroid of each particle (relative to its reference blob) points
    # along orientation + a fixed template angle (mirrored for the mirror species)
    from simulator.specimen import _BLOBS
    w = _BLOBS[:, 2]
    cy = (w * _BLOBS[:, 0]).sum() / w.sum()
    cx = (w * _BLOBS[:, 1]).sum() / w.sum()
    offset = np.arctan2(cy, cx)
    f = img.astype(float)
    yy, xx = np.mgrid[-14:15, -14:15]
    disk = yy ** 2 + xx ** 2 <= 14 ** 2
    errs = []
    sel = interior(tr.columns_px, img.shape, 16)
    for (r, c), t, s in zip(tr.columns_px[sel], th[sel], tr.species[sel]):
        ri, ci = int(round(r)), int(round(c))
        patch = f[ri - 14:ri + 15, ci - 14:ci + 15] * disk
        my = (patch * (yy + ri - r)).sum() / patch.sum()
        mx = (patch * (xx + ci - c)).sum() / patch.sum()
        want = t + (offset if s == 0 else -offset)
        errs.append(np.angle(np.exp(1j * (np.arctan2(my, mx) - want))))
    errs = np.abs(errs)
    assert len(errs) > 5 and np.median(errs) < 0.1, errs


def test_particles_rotate_slowly_between_frames():
    D = 0.01
    cfg = MicroscopeConfig(preset="particles", size=128, seed=4, frame_gap_s=1.0,
                           drift=DriftConfig.none(), specimen_kwargs={"rot_diffusion_rad2_per_s": D})
    scope = Microscope(cfg)
    t1 = scope.acquire()[2]
    t2 = scope.acquire()[2]
    common, i1, i2 = np.intersect1d(t1.column_ids, t2.column_ids, return_indices=True)
    assert len(common) > 10
    dth = np.angle(np.exp(1j * (t2.orientation_rad[i2] - t1.orientation_rad[i1])))
    dt = scope.frame_time_s + 1.0
    assert np.all(dth != 0)
    assert np.sqrt(np.mean(dth ** 2)) == pytest.approx(np.sqrt(2 * D * dt), rel=0.5)


# ----------------------------------------------------------------------------- dynamics
def test_dynamics_hops_conserve_defects_and_move_them():
    spec = make_specimen("graphene", seed=1, dopant_fraction=0.02, vacancy_fraction=0.02, hop_rate_per_s=1.0)
    box = ((0.0, 4.0), (0.0, 4.0))
    before = spec.columns_in(box, include_vacancies=True)
    n = spec.advance(5.0, box, rng=np.random.default_rng(0), hops=True)
    after = spec.columns_in(box, include_vacancies=True)
    assert n > 3
    np.testing.assert_array_equal(before.ids, after.ids)
    for k in (1, -1):
        assert (before.species == k).sum() == (after.species == k).sum()
    assert not np.array_equal(before.species, after.species)
    # every moved defect went to a nearest-neighbour site (C-C 0.142 nm)
    moved_from = before.positions_nm[(before.species == 1) & (after.species != 1)]
    moved_to = after.positions_nm[(after.species == 1) & (before.species != 1)]
    if len(moved_from):
        d = np.sqrt(((moved_from[:, None] - moved_to[None]) ** 2).sum(-1)).min(axis=1)
        assert np.all(d < 0.15)
    # no hops without the flag
    frozen = spec.columns_in(box, include_vacancies=True)
    assert spec.advance(5.0, box, rng=np.random.default_rng(1), hops=False) == 0
    np.testing.assert_array_equal(frozen.species, spec.columns_in(box, include_vacancies=True).species)


def test_microscope_dynamics_flag():
    base = dict(preset="graphene", size=128, seed=5, si_fraction=0.05, hop_rate_per_s=2.0,
                drift=DriftConfig.none(), frame_gap_s=2.0)
    for dyn in (False, True):
        scope = Microscope(MicroscopeConfig(dynamics=dyn, **base))
        a = scope.acquire()[2]
        b = scope.acquire()[2]
        np.testing.assert_array_equal(a.column_ids, b.column_ids)
        assert np.array_equal(a.species, b.species) != dyn


# ----------------------------------------------------------------------------- API, meta, misc
def test_meta_clock_and_api():
    cfg = MicroscopeConfig(preset="mos2", size=64, cols=80, dwell_us=1.5, flyback_us=20.0,
                           frame_gap_s=0.1, scan_rotation_rad=0.2)
    scope = Microscope(cfg)
    assert scope.line_time_s == pytest.approx((80 * 1.5 + 20.0) * 1e-6)
    assert scope.frame_time_s == pytest.approx(64 * scope.line_time_s)
    for k in range(3):
        img, meta, tr = scope.acquire()
        assert isinstance(meta, FrameMeta) and isinstance(tr, FrameTruth)
        assert img.shape == (64, 80) and (meta.rows, meta.cols) == (64, 80)
        assert meta.seq == k and meta.detector == "HAADF"
        assert meta.t_start == pytest.approx(k * (scope.frame_time_s + 0.1))
        assert meta.pixel_size_nm == (0.012, 0.012) and meta.scan_rotation_rad == 0.2
        np.testing.assert_allclose(tr.line_times_s, meta.t_start + np.arange(64) * scope.line_time_s)
        assert tr.drift_nm.shape == (64, 2) and tr.beam_shift_nm.shape == (64, 2)
        assert np.all((tr.columns_px >= -0.5) & (tr.columns_px < [63.5, 79.5]))
        # the column's scan time is that of its (fractional) pixel
        np.testing.assert_allclose(tr.column_times_s, meta.t_start + tr.columns_px[:, 0] * scope.line_time_s
                                   + tr.columns_px[:, 1] * 1.5e-6)
    assert scope.time_s == pytest.approx(3 * (scope.frame_time_s + 0.1))
    json.dumps(meta.to_dict())
    assert PRESETS == ("graphene", "srtio3", "mos2", "particles", "nanoparticle", "perovskite")


def test_scan_rotation_rotates_specimen():
    phi = 0.5
    a = Microscope(quiet(preset="srtio3", size=64)).acquire()[2]
    spec = make_specimen("srtio3", 0)
    cols = spec.columns_in(((-5, 5), (-5, 5)), scan_rotation_rad=phi)
    ref = spec.columns_in(((-8, 8), (-8, 8)))
    common, i1, i2 = np.intersect1d(cols.ids, ref.ids, return_indices=True)
    c, s = np.cos(-phi), np.sin(-phi)
    y, x = ref.positions_nm[i2].T
    np.testing.assert_allclose(cols.positions_nm[i1], np.stack([c * y + s * x, c * x - s * y], 1), atol=1e-12)
    assert len(a.column_ids) > 0


def test_bad_config_is_a_clear_value_error():
    with pytest.raises(ValueError, match="preset"):
        Microscope(MicroscopeConfig(preset="gold"))
    with pytest.raises(ValueError, match="dwell"):
        Microscope(MicroscopeConfig(dwell_us=0.0))
    with pytest.raises(ValueError):
        make_specimen("unobtainium")
    scope = Microscope(MicroscopeConfig(size=16))
    with pytest.raises(ValueError):
        scope.set_beam_shift((np.nan, 0.0))


def test_noise_is_poisson_plus_readout():
    cfg = MicroscopeConfig(preset="graphene", size=128, drift=DriftConfig.none(), scan=ScanConfig.none(),
                           readout_noise=2.0, seed=9)
    img, _, _ = Microscope(cfg).acquire()
    clean, _, _ = Microscope(replace(cfg, noise=False)).acquire()
    resid = img.astype(float) - clean
    lam = clean.astype(float)
    var = ((resid ** 2) - (lam + 4.0 + 1 / 12)).mean()
    assert abs(resid.mean()) < 0.1
    assert abs(var) < 0.05 * (lam.mean() + 4)


def test_specimen_is_stable_across_windows():
    spec = make_specimen("mos2", seed=11, vacancy_fraction=0.1)
    a = spec.columns_in(((0, 3), (0, 3)))
    b = spec.columns_in(((-1, 5), (1, 6)))
    common, ia, ib = np.intersect1d(a.ids, b.ids, return_indices=True)
    assert len(common) > 50
    np.testing.assert_array_equal(a.species[ia], b.species[ib])
    np.testing.assert_allclose(a.positions_nm[ia], b.positions_nm[ib])
    assert isinstance(spec, Specimen) and spec.symmetry_order == 1


def test_position_crlb_matches_the_isolated_gaussian_and_rises_with_neighbours():
    """``simulator.crlb``: one column alone on a noise-free background has the textbook bound
    sigma * sqrt(2 / N) (N its counts, Poisson only); a neighbour's counts, a background and
    readout noise raise it, a 4x dose halves it."""
    from types import SimpleNamespace

    from simulator.crlb import position_crlb_px
    from simulator.render import fwhm_to_sigma

    cfg = MicroscopeConfig(preset="graphene", size=64, background_counts=0.0, readout_noise=0.0)
    alone = SimpleNamespace(columns_px=np.array([[31.3, 30.6]]), weight=np.array([6.0**1.7]))
    s = fwhm_to_sigma(cfg.probe_fwhm) / cfg.pixel_size[0]
    n = cfg.dose * cfg.haadf_cross_section_A2 * alone.weight[0]
    assert position_crlb_px(cfg, alone)[0] == pytest.approx(s * np.sqrt(2.0 / n), rel=0.01)
    pair = SimpleNamespace(columns_px=np.array([[31.3, 30.6], [31.3, 30.6 + 1.2 * s]]), weight=np.full(2, 6.0**1.7))
    assert position_crlb_px(cfg, pair)[0] > 1.1 * position_crlb_px(cfg, alone)[0]
    noisy = replace(cfg, background_counts=2.0, readout_noise=1.0)
    assert position_crlb_px(noisy, alone)[0] > 1.05 * position_crlb_px(cfg, alone)[0]
    bright = replace(cfg, dose_e_per_A2=4 * cfg.dose)
    assert position_crlb_px(bright, alone)[0] == pytest.approx(0.5 * position_crlb_px(cfg, alone)[0], rel=1e-6)


# ----------------------------------------------------------------------------- drift presets and ranges
def test_drift_defaults_are_unchanged():
    """Existing results depend on the defaults: 1 nm/min, OU 15 pm / 8 s, 5 pm of 50 Hz mains."""
    d = DriftConfig()
    assert (d.drift_nm_per_min, d.ou_sigma_nm, d.ou_tau_s, d.jitter_amp_nm, d.jitter_hz, d.settle_nm) == \
        (1.0, 0.015, 8.0, 0.005, 50.0, 0.0)


def test_drift_presets_differ_as_documented_and_sit_inside_the_ranges():
    """settled: slowest and quietest; fresh: fastest, with settling; noisy-room: the largest, fastest
    wander and mains. Every value inside simulator.ranges.RANGES (fresh's rate at t = 0 with its
    settling too); 60 Hz by override; an unknown name is a clear error."""
    from simulator.drift import DRIFT_PRESETS
    from simulator.ranges import RANGES

    p = {name: DriftConfig.preset(name) for name in ("settled", "fresh", "noisy-room")}
    assert set(DRIFT_PRESETS) == set(p)
    s, f, n = p["settled"], p["fresh"], p["noisy-room"]
    assert s.drift_nm_per_min < n.drift_nm_per_min < f.drift_nm_per_min
    assert f.settle_nm > 0 and s.settle_nm == n.settle_nm == 0
    assert s.ou_sigma_nm < f.ou_sigma_nm < n.ou_sigma_nm and s.ou_tau_s > f.ou_tau_s > n.ou_tau_s
    assert s.jitter_amp_nm < f.jitter_amp_nm < n.jitter_amp_nm
    for d in p.values():
        assert d.jitter_hz == 50.0
        v0 = d.drift_nm_per_min + 60.0 * d.settle_nm / d.settle_tau_s        # nm/min at t = 0
        assert RANGES["drift_nm_per_min"].contains(d.drift_nm_per_min) and RANGES["drift_nm_per_min"].contains(v0)
        assert RANGES["ou_sigma_pm"].contains(d.ou_sigma_nm * 1e3) and RANGES["ou_tau_s"].contains(d.ou_tau_s)
        assert RANGES["mains_pm"].contains(d.jitter_amp_nm * 1e3)
    assert DriftConfig.preset("noisy-room", jitter_hz=60.0).jitter_hz == 60.0
    # the settling shows: fresh moves faster in its first seconds than its constant velocity alone
    m = DriftModel(replace(f, ou_sigma_nm=0.0, jitter_amp_nm=0.0), seed=0)
    assert np.hypot(*m(np.array([6.0]))[0]) > 1.4 * f.drift_nm_per_min / 10.0
    with pytest.raises(ValueError, match="unknown drift preset"):
        DriftConfig.preset("windy")


def test_ranges_cover_every_listed_parameter_with_a_source():
    """The issue's list (velocity 0.3-20 nm/min, OU 5-60 pm / 0.3-10 s, mains 0-30 pm, flyback
    0-30 pm / 5-100 us, frame gap 0-0.5 s, dwell 0.5-20 us, pixel 5-30 pm, dose 0.3-3x), each with
    a source; log-uniform exactly where a range spans a decade or more; the defaults inside."""
    from simulator.ranges import CHOICES, RANGES

    expect = {"drift_nm_per_min": (0.3, 20), "ou_sigma_pm": (5, 60), "ou_tau_s": (0.3, 10), "mains_pm": (0, 30),
              "flyback_pm": (0, 30), "flyback_tau_us": (5, 100), "frame_gap_s": (0, 0.5), "dwell_us": (0.5, 20),
              "pixel_pm": (5, 30), "dose_factor": (0.3, 3)}
    for name, (lo, hi) in expect.items():
        assert (RANGES[name].low, RANGES[name].high) == (lo, hi), name
    assert "line_jitter_pm" in RANGES and set(CHOICES["mains_hz"].options) == {50.0, 60.0}
    assert set(CHOICES["specimen"].options) == {"graphene", "srtio3", "mos2"}
    assert min(CHOICES["size"].options) == 256 and max(CHOICES["size"].options) == 1024
    for name, r in RANGES.items():
        assert r.source and r.low < r.high, name
        assert r.log_uniform == (r.low > 0 and r.high / r.low >= 10.0), name
    d, sc, m = DriftConfig(), ScanConfig(), MicroscopeConfig()
    assert RANGES["drift_nm_per_min"].contains(d.drift_nm_per_min)
    assert RANGES["ou_sigma_pm"].contains(d.ou_sigma_nm * 1e3) and RANGES["ou_tau_s"].contains(d.ou_tau_s)
    assert RANGES["flyback_pm"].contains(sc.flyback_amp_nm * 1e3) and RANGES["flyback_tau_us"].contains(sc.flyback_tau_us)
    assert RANGES["line_jitter_pm"].contains(sc.line_jitter_nm * 1e3) and RANGES["dwell_us"].contains(m.dwell_us)
    assert RANGES["flyback_time_us"].contains(m.flyback_us)


def test_range_draws_are_log_uniform_where_stated():
    """Kolmogorov-Smirnov: log of a log-uniform range's draws is uniform, a uniform range's draws are."""
    from scipy import stats

    from simulator.ranges import RANGES

    rng = np.random.default_rng(0)
    for name in ("drift_nm_per_min", "ou_tau_s", "dwell_us", "mains_pm", "pixel_pm"):
        r = RANGES[name]
        v = np.array([r.draw(rng) for _ in range(2000)])
        assert v.min() >= r.low and v.max() <= r.high
        if r.log_uniform:
            u = (np.log(v) - np.log(r.low)) / (np.log(r.high) - np.log(r.low))
            assert stats.kstest((v - r.low) / (r.high - r.low), "uniform").pvalue < 1e-6, name
        else:
            u = (v - r.low) / (r.high - r.low)
        assert stats.kstest(u, "uniform").pvalue > 1e-3, name


def test_scenarios_are_seeded_and_inside_the_ranges():
    """Same (seed, index), same scenario; another seed, other scenarios; scenario i of a long
    matrix is scenario i of a short one; every drawn value inside its range or choice; the dwell
    cap keeps a frame under MAX_FRAME_S; the config carries the scenario's values."""
    from dataclasses import fields

    from simulator.ranges import CHOICES, MAX_FRAME_S, RANGES, draw_scenarios

    a, b = draw_scenarios(60, 11), draw_scenarios(60, 11)
    assert a == b and draw_scenarios(3, 11) == a[:3] and draw_scenarios(60, 12) != a
    names = {f.name for f in fields(a[0])}
    for s in a:
        for n in names & set(RANGES):
            v = getattr(s, n)
            assert RANGES[n].contains(v) or (n in ("jump_nm",) and v == 0.0), (n, v)
        assert s.specimen in CHOICES["specimen"].options and s.size in CHOICES["size"].options
        assert s.mains_hz in (50.0, 60.0)
        assert s.size**2 * s.dwell_us * 1e-6 <= MAX_FRAME_S + 1e-9
    assert {s.specimen for s in a} == {"graphene", "srtio3", "mos2"} and {s.mains_hz for s in a} == {50.0, 60.0}
    assert any(s.mains_pm == 0 for s in a) and any(s.jump_nm > 0 for s in a)
    s = a[0]
    cfg = s.config(20)
    assert cfg.preset == s.specimen and cfg.shape == (s.size, s.size) and cfg.seed == s.seed
    assert cfg.pixel_size[0] == pytest.approx(s.pixel_pm * 1e-3) and cfg.dwell_us == s.dwell_us
    assert cfg.drift.jitter_hz == s.mains_hz and cfg.drift.jitter_amp_nm == pytest.approx(s.mains_pm * 1e-3)
    assert cfg.drift.ou_sigma_nm == pytest.approx(s.ou_sigma_pm * 1e-3) and cfg.frame_gap_s == s.frame_gap_s
    assert cfg.scan.flyback_amp_nm == pytest.approx(s.flyback_pm * 1e-3)
    assert cfg.dose == pytest.approx(s.dose_factor * MicroscopeConfig(preset=s.specimen).dose)


def _mains_fit_pm(t: np.ndarray, x_nm: np.ndarray, hz: float) -> float:
    """Amplitude (pm) of a sinusoid at ``hz`` in x(t), fitted with a cubic trend per frame."""
    segs = np.cumsum(np.r_[0, np.diff(t) > 1e-3])                 # frames: a gap or new frame splits
    cols = [np.sin(2 * np.pi * hz * t), np.cos(2 * np.pi * hz * t)]
    for k in np.unique(segs):
        m = segs == k
        tc = np.where(m, t - t[m].mean(), 0.0)
        cols += [m * tc**p for p in range(4)]
    coef = np.linalg.lstsq(np.stack(cols, 1), x_nm, rcond=None)[0]
    return float(np.hypot(coef[0], coef[1])) * 1e3


def test_drawn_scenarios_plant_their_mains_in_the_truth():
    """A drawn scenario without mains has none in the truth; a 60 Hz one has its spectral peak
    at 60 Hz (not 50) on the fast axis only, with the drawn amplitude. Tall narrow frames, so
    that a few frames span several mains periods."""
    from simulator.ranges import draw_scenarios

    drawn = draw_scenarios(60, 3)
    quiet_ = next(s for s in drawn if s.mains_pm == 0)
    loud = next(s for s in drawn if s.mains_hz == 60.0 and s.mains_pm > 10)

    def truth_xy(s):
        cfg = replace(s.config(3), rows=1500, cols=16, dwell_us=2.0, flyback_us=100.0)
        scope = Microscope(cfg)
        ts, ds = [], []
        for _ in range(3):
            _, _, tr = scope.acquire()
            ts.append(tr.line_times_s)
            ds.append(tr.drift_nm)
        return np.concatenate(ts), np.concatenate(ds)

    freqs = np.arange(30.0, 100.0, 1.0)
    t, d = truth_xy(quiet_)
    band = np.array([_mains_fit_pm(t, d[:, 1], f) for f in freqs])    # the OU wander's level
    for hz in (50.0, 60.0):                                            # no line above its neighbours
        near = band[(np.abs(freqs - hz) <= 8) & (freqs != hz)]
        assert band[freqs == hz][0] < min(3.0 * np.median(near) + 0.5, 3.0), (hz, band[freqs == hz], near)
    t, d = truth_xy(loud)
    assert _mains_fit_pm(t, d[:, 1], 60.0) == pytest.approx(loud.mains_pm, rel=0.1)
    assert _mains_fit_pm(t, d[:, 1], 50.0) < 0.2 * loud.mains_pm and _mains_fit_pm(t, d[:, 0], 60.0) < 3.0
    peak = freqs[np.argmax([_mains_fit_pm(t, d[:, 1], f) for f in freqs])]
    assert abs(peak - 60.0) <= 1.0
