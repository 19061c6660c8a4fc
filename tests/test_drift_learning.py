"""Drift GP hyperparameters and mains frequency learnt from the stream (issue 30)."""
import threading
import time

import numpy as np
import pytest

from stem_live.distortion import Observations, OnlineDriftGP, hyperfit
from stem_live.distortion.gp import BOUNDS, HYPER_NAMES
from stem_live.distortion.hyperfit import HyperLearner
from stem_live.distortion.mains import detect_mains

ROWS = COLS = 256
DWELL, FLYBACK, GAP = 2e-6, 100e-6, 0.02


def stream(n_frames, *, v=(0.2, -0.1), ou_sigma=0.035, ou_tau=1.5, mains_amp=0.0, mains_hz=50.0,
           mains_axes=(1,), noise=0.005, outliers=0.0, seed=0):
    """Drift samples of a 256 x 256 px scan (2 us dwell, 100 us flyback, 20 ms between frames,
    a column every 7 px): velocity + an exact OU wander + a mains sinusoid (along x by default)
    + white noise of the stated sigma; ``outliers``: fraction of samples off by ~0.5 nm."""
    rng = np.random.default_rng(seed)
    line = COLS * DWELL + FLYBACK
    ft = ROWS * line + GAP
    pos = []
    for i, r in enumerate(np.arange(3, ROWS - 3, 7.0)):
        c = np.arange(3 + (i % 2) * 3.5, COLS - 3, 7.0)
        pos.append(np.stack([np.full(len(c), r), c], 1))
    pos = np.concatenate(pos) + rng.normal(0, 0.3, (len(np.concatenate(pos)), 2))
    n = len(pos)
    T = np.concatenate([k * ft + pos[:, 0] * line + pos[:, 1] * DWELL for k in range(n_frames)])
    order = np.argsort(T)
    a = np.exp(-np.diff(T[order], prepend=T[order][0]) / ou_tau)
    ou = np.zeros((len(T), 2))
    x = rng.normal(0, ou_sigma, 2)
    xi = rng.normal(size=(len(T), 2))
    for i in range(len(T)):
        x = x * a[i] + ou_sigma * np.sqrt(1 - a[i] ** 2) * xi[i]
        ou[order[i]] = x
    d = ou + np.asarray(v)[None] * T[:, None]
    for ax in mains_axes:
        d[:, ax] += mains_amp * np.sin(2 * np.pi * mains_hz * T + 0.7)
    d += rng.normal(0, noise, d.shape)
    bad = rng.random(len(d)) < outliers
    d[bad] += rng.normal(0, 0.5, (int(bad.sum()), 2))
    return [Observations(t_s=T[k * n:(k + 1) * n], pos_px=pos, disp_nm=d[k * n:(k + 1) * n],
                         sigma_nm=np.full(n, noise), frame=np.full(n, k), t_line_s=pos[:, 1] * DWELL,
                         pixel_size_nm=(0.02, 0.02)) for k in range(n_frames)]


def _learner(frames, **kw):
    # a one-frame prediction window: cheap conditioning; the fit uses the 12 s history
    gp = OnlineDriftGP(window_frames=1, max_samples=2000, min_groups=256, max_groups=256,
                       mains_hz=kw.pop("gp_mains_hz", 50.0))
    learner = HyperLearner(gp, every_frames=10 ** 9, background=False, **kw)
    for o in frames:
        gp.add(o)
    return gp, learner


def test_ou_amplitude_time_scale_and_noise_recovered():
    gp, learner = _learner(stream(70, ou_sigma=0.035, ou_tau=1.5, seed=3), mains=0)
    start = gp.learnt_hyperparameters()
    for _ in range(5):
        assert learner.run_once()["ok"]
    h = gp.learnt_hyperparameters()
    assert learner.n_accepted >= 3
    # started from the defaults (20 pm, 5 s): factors 1.75 and 3.3 off
    assert start["sigma_long_nm"] == pytest.approx(0.02) and start["ell_long_s"] == pytest.approx(5.0)
    assert 0.035 / 1.5 < h["sigma_long_nm"] < 0.035 * 1.5, h
    assert 1.5 / 1.5 < h["ell_long_s"] < 1.5 * 1.5, h
    # the samples' own sigma (5 pm) is all the noise there is: no extra white or line noise
    assert h["sigma_white_nm"] < 0.002 and h["sigma_line_nm"] < 0.002, h
    assert h["sigma_short_nm"] < 0.005, h     # no fast wander in the truth
    assert gp.mains_hz is None or not gp.mains_on


@pytest.mark.parametrize("hz, axes", [(50.0, (0, 1)), (60.0, (1,))])
def test_mains_detected(hz, axes):
    det = detect_mains(Observations.concat(stream(60, mains_amp=0.02, mains_hz=hz, mains_axes=axes, seed=4)))
    assert det.hz == hz, det
    other = 60.0 if hz == 50.0 else 50.0
    assert det.ratio[hz] > 100 and det.ratio[other] < 8, det
    assert abs(det.peak_hz[hz] - hz) < 0.1


def test_no_mains_detected_without_mains():
    for seed in (5, 6, 7):
        det = detect_mains(Observations.concat(stream(60, mains_amp=0.0, seed=seed)))
        assert det.hz is None and max(det.ratio.values()) < 8, det


def test_60_hz_learnt_and_modelled():
    gp, learner = _learner(stream(70, ou_sigma=0.02, ou_tau=2.0, mains_amp=0.02, mains_hz=60.0, seed=8))
    assert gp.mains_hz == pytest.approx(50.0)          # the warm start
    for _ in range(3):
        learner.run_once()
    assert gp.mains_hz == pytest.approx(60.0) and gp.mains_on
    assert learner.summary()["mains_hz"] == pytest.approx(60.0)
    # the new frequency is used by the next conditioning, and the mains terms carry the 20 pm
    # line on x (the coherent sine and cosine per axis, the quasi-periodic term what is left)
    gp.add(stream(71, ou_sigma=0.02, ou_tau=2.0, mains_amp=0.02, mains_hz=60.0, seed=8)[-1])
    assert gp.snapshot.omega == pytest.approx(2 * np.pi * 60.0)
    coherent = np.hypot(*gp.snapshot.beta[5:7])            # (y, x) amplitude, nm
    assert coherent[1] == pytest.approx(0.02, rel=0.25) and coherent[0] < 0.005


def test_mains_switched_off_on_a_stream_without_it():
    gp, learner = _learner(stream(70, seed=9))
    for _ in range(2):
        learner.run_once()
    assert not gp.mains_on and learner.summary()["mains_hz"] is None
    assert gp.learnt_hyperparameters()["sigma_mains_nm"] == pytest.approx(BOUNDS["sigma_mains_nm"][0])


def test_bad_window_moves_hyperparameters_a_bounded_step_within_bounds():
    gp, learner = _learner(stream(70, outliers=0.1, seed=10), mains=0, max_step=0.5)
    lo = np.log([BOUNDS[k][0] for k in HYPER_NAMES])
    hi = np.log([BOUNDS[k][1] for k in HYPER_NAMES])
    moved = 0.0
    for _ in range(4):
        before = gp.learnt_theta
        learner.run_once()
        after = gp.learnt_theta
        assert np.all(np.abs(after - before) <= 0.5 + 1e-9)
        assert np.all(after >= lo - 1e-12) and np.all(after <= hi + 1e-12)
        moved = max(moved, float(np.max(np.abs(after - before))))
    assert moved > 0.1     # the outliers did pull (the bound is what held them)


def test_a_running_fit_never_blocks_a_frame(monkeypatch):
    frames = stream(20, seed=11)
    gp = OnlineDriftGP(window_frames=2, max_samples=2000, min_groups=256, max_groups=256)
    release, entered = threading.Event(), threading.Event()

    def slow_refit(*a, **kw):
        entered.set()
        release.wait(20)
        return {"ok": True, "accepted": False}

    monkeypatch.setattr(hyperfit, "refit", slow_refit)
    learner = HyperLearner(gp, every_frames=2, mains=50.0, min_history_s=0.0)
    for o in frames[:2]:
        gp.add(o)
        learner.after_frame()
    assert entered.wait(10) and learner.running
    try:
        for o in frames[2:6]:             # frames go on while the fit "runs"
            t0 = time.perf_counter()
            gp.add(o)
            learner.after_frame()
            gp.predict(o.t_s[:16])
            assert time.perf_counter() - t0 < 2.0
            assert learner.running
    finally:
        release.set()
    assert learner.wait(10) and learner.n_fits == 1


def test_the_de_skew_leaves_the_mains_line_out_along_y():
    """The tracker's reference is de-skewed with the model's drift less its mains line along y
    (``drift_without_mains`` with ``DESKEW_MAINS_KEEP``): on a stream with a 30 pm 50 Hz line on
    both axes the model carries the line on both; the de-skew's drift keeps it along x only, and
    keeps the rest of the model (velocity, wander) on both."""
    from stem_live.column_model import DESKEW_MAINS_KEEP, drift_without_mains

    frames = stream(8, ou_sigma=0.02, ou_tau=2.0, mains_amp=0.03, mains_hz=50.0, mains_axes=(0, 1), seed=5)
    gp = OnlineDriftGP(window_frames=4, max_samples=4000, min_groups=256, max_groups=256, mains_hz=50.0)
    for o in frames:
        gp.add(o)
    t = np.sort(frames[-1].t_s)
    full, _ = gp.predict(t)
    deskew, _ = drift_without_mains(gp, t, keep=DESKEW_MAINS_KEEP)

    def at_50_hz(d):   # amplitude (nm) of the 50 Hz sinusoid in d, and d without it (offset and slope fitted too)
        a = np.stack([np.sin(2 * np.pi * 50 * t), np.cos(2 * np.pi * 50 * t), np.ones_like(t), t - t.mean()], 1)
        c = np.linalg.lstsq(a, d, rcond=None)[0]
        return np.hypot(c[0], c[1]), d - a[:, :2] @ c[:2]

    for axis, kept in ((0, False), (1, True)):
        amp_full, rest_full = at_50_hz(full[:, axis])
        amp, rest = at_50_hz(deskew[:, axis])
        assert amp_full == pytest.approx(0.03, rel=0.3)          # the model follows the line ...
        if kept:
            assert amp == pytest.approx(amp_full, rel=1e-6)      # ... the de-skew along x too
        else:
            assert amp < 0.002                                   # ... along y not
        # the rest of the model is kept (a one-period average of a wander on seconds: < 1 pm off)
        assert np.sqrt(np.mean((rest - rest_full) ** 2)) < 0.001
    assert np.ptp(deskew[:, 1]) > 0.02                           # the frame's drift itself is there


def _with_smear(frames, smear_s, attenuation):
    """The frames as columns that average over ``smear_s`` (s, rms) of scan time: their mains
    line (the stream's 50 Hz along x) reaches the samples times ``attenuation``."""
    out = []
    for o in frames:
        d = np.array(o.disp_nm, copy=True)
        d[:, 1] -= (1.0 - attenuation) * 0.02 * np.sin(2 * np.pi * 50.0 * o.t_s + 0.7)
        out.append(Observations(t_s=o.t_s, pos_px=o.pos_px, disp_nm=d, sigma_nm=o.sigma_nm, frame=o.frame,
                                t_line_s=o.t_line_s, pixel_size_nm=o.pixel_size_nm,
                                smear_s=np.full(len(o.t_s), smear_s)))
    return out


def _line_50hz_nm(mean, t):
    """(y, x) amplitude (nm) of the 50 Hz line in a drift ``mean`` (n, 2) nm at times ``t`` (s)."""
    a = np.stack([np.sin(2 * np.pi * 50 * t), np.cos(2 * np.pi * 50 * t), np.ones_like(t), t - t.mean()], 1)
    coef = np.linalg.lstsq(a, mean, rcond=None)[0]
    return np.hypot(coef[0], coef[1])


def test_slow_lines_leave_the_mains_line_to_the_locator():
    """Samples that see less than ``MIN_MAINS_ATTENUATION`` of the mains line (a column spans a
    large part of its period: slow lines) leave it to the locator's line-by-line pick-up: the
    per-line drift (``column_model.line_drift``) carries no 50 Hz on either axis (the model's
    terms would follow the samples' noise there). Fast lines: the model follows the 20 pm line
    on x, none on y."""
    from stem_live.column_model import line_drift
    from stem_live.distortion.gp import MIN_MAINS_ATTENUATION

    base = stream(12, ou_sigma=0.01, ou_tau=2.0, mains_amp=0.02, mains_hz=50.0, seed=11)
    omega = 2 * np.pi * 50.0
    for smear, follows in ((0.5e-3, True), (4e-3, False)):
        att = float(np.exp(-0.5 * (omega * smear) ** 2))
        assert (att >= MIN_MAINS_ATTENUATION) == follows
        gp = OnlineDriftGP(window_frames=3, max_samples=3000, min_groups=256, max_groups=256, mains_hz=50.0)
        for o in _with_smear(base, smear, att):
            gp.add(o)
        assert gp.follows_mains(smear) == follows
        assert gp.mains_hidden(gp._window_data()) == (not follows)
        t = np.linspace(base[-1].t_s.min(), base[-1].t_s.max(), 2000)
        amp = _line_50hz_nm(*line_drift(gp, t, smear)[:1], t)
        if follows:
            assert amp[1] == pytest.approx(0.02, rel=0.2) and amp[0] < 0.002, amp
        else:
            assert amp.max() < 0.0005, amp
            # what the model alone would give the lines: the samples' leftover line on x
            assert _line_50hz_nm(gp.predict(t)[0], t)[1] > 0.002
