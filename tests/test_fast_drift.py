"""Drift that is fast for the scan (issue 30): frames that move by more than half a lattice
period between them, frames skewed by the drift during their own scan, the mains line on
one axis, and the gap between frames. Each test well under 30 s on 2 cores."""
from __future__ import annotations

import numpy as np
import pytest

from simulator.drift import DriftConfig
from simulator.microscope import Microscope, MicroscopeConfig
from stem_live.distortion import CorrectionPolicy, Observations, OnlineDriftGP
from stem_live.engine import Engine, EngineConfig
from stem_live.protocol import Frame
from stem_live.register import aperiodic_shift, make_reference, register_resolved
from tests.engine_sessions import line_drift_errors

STILL = DriftConfig(drift_nm_per_min=0.0, ou_sigma_nm=0.0, jitter_amp_nm=0.0)


def _pair(preset: str, shift_nm: float, *, seed: int = 1, **kw) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two frames of one field, the second with the beam moved by ``shift_nm`` along (0.6, 0.8);
    returns them and the true image shift (px, from the beam shift the actuator applied)."""
    px = 0.02
    frames, beams = [], []
    for k, b in enumerate((0.0, shift_nm)):
        m = Microscope(MicroscopeConfig(preset=preset, size=256, pixel_size_nm=px, dwell_us=2, seed=seed,
                                        drift=STILL, **kw))
        m._seq = k                      # independent shot noise in the two frames
        m.set_beam_shift([0.6 * b, 0.8 * b])
        image, _, truth = m.acquire()
        frames.append(image)
        beams.append(np.mean(truth.beam_shift_nm, axis=0))   # as applied (the actuator's gain error)
    return frames[0], frames[1], -(beams[1] - beams[0]) / px


@pytest.mark.parametrize("preset", ["graphene", "mos2"])
def test_defects_tell_lattice_aliases_apart(preset):
    """0.8 nm between frames is several lattice periods: the band-passed search around the
    prediction (zero) would lock onto an alias; the notched correlation of the defects finds
    the true shift and the search moves there."""
    a, b, expect = _pair(preset, 0.8)
    ref = make_reference(a)
    coarse, z = aperiodic_shift(ref, b)
    assert coarse is not None and z > 8
    assert np.allclose(coarse, expect, atol=1.5)
    shift, peak, moved = register_resolved(ref, b, predicted=(0.0, 0.0))
    assert moved and np.allclose(shift, expect, atol=0.4) and peak > 0.3


def test_a_perfect_crystal_stays_ambiguous():
    """SrTiO3 without dopants or vacancies: nothing but the lattice, so no aperiodic answer
    (the search stays at the prediction rather than guess a lattice translation)."""
    a, b, _ = _pair("srtio3", 0.8, si_fraction=0.0)
    coarse, _ = aperiodic_shift(make_reference(a), b)
    assert coarse is None


def test_slow_scan_with_fast_drift_is_followed_line_by_line():
    """25 nm/min over 0.66 s frames (40 us dwell, 128 px): 0.27 nm per frame (1.1 lattice
    periods, 1.9 C-C spacings) and as much skew within each frame; 1 % Si. Frames 2-5: the
    per-line drift within 15 pm of the truth (one offset removed); without the alias search and
    the first frames' de-skew it is off by hundreds of pm."""
    cfg = MicroscopeConfig(preset="graphene", size=128, pixel_size_nm=0.025, dwell_us=40.0, seed=4,
                           si_fraction=0.01,
                           drift=DriftConfig(drift_nm_per_min=25.0, direction_rad=0.4, ou_sigma_nm=0.003,
                                             jitter_amp_nm=0.0))
    e, jumps = line_drift_errors(cfg, 6, skip=2)
    e -= e.mean(axis=0)
    assert not any(jumps)
    assert np.sqrt(np.mean(np.sum(e ** 2, axis=1))) < 0.015


def _mains_gp() -> OnlineDriftGP:
    """A GP conditioned on three 0.1 s frames of a 20 pm, 60 Hz line along x, nothing else."""
    rng = np.random.default_rng(3)
    line, rows = 0.3e-3, 256
    rows_px = np.arange(2.0, rows, 6.0)
    cols_px = np.arange(2.0, rows, 6.0)
    pos = np.array([(r, c) for r in rows_px for c in cols_px])
    frames = []
    for k in range(3):
        t = k * 0.1 + pos[:, 0] * line + pos[:, 1] * 1e-6
        d = np.zeros((len(t), 2))
        d[:, 1] = 0.02 * np.sin(2 * np.pi * 60.0 * t + 0.4)
        d += rng.normal(0, 0.002, d.shape)
        frames.append(Observations(t_s=t, pos_px=pos, disp_nm=d, sigma_nm=np.full(len(t), 0.002),
                                   frame=np.full(len(t), k), t_line_s=pos[:, 1] * 1e-6, pixel_size_nm=(0.02, 0.02)))
    gp = OnlineDriftGP(window_frames=3, mains_hz=60.0, fit_distortion=False)
    for f in frames:
        gp.add(f)
    return gp


def test_mains_on_one_axis_gets_its_own_amplitude():
    """A 60 Hz line of 20 pm along x only: the coherent mains terms find ~20 pm on x and ~0 on y
    (one shared kernel amplitude would give both axes the same)."""
    gp = _mains_gp()
    amp = np.hypot(*gp.snapshot.beta[5:7])           # (y, x) amplitude of the coherent mains, nm
    assert amp[1] == pytest.approx(0.02, rel=0.1)
    assert amp[0] < 0.003


def test_the_next_frame_starts_after_the_gap():
    """The engine takes the frame period from the frames' start times (scan + gap), not the scan
    time alone: a correction aimed at the next frame's middle is aimed there."""
    engine = Engine(EngineConfig())
    img = np.random.default_rng(0).poisson(5.0, (64, 64)).astype(np.float32)

    def frame(seq, t):
        return Frame(seq=seq, image=img, t_start=t, pixel_size_nm=(0.02, 0.02), dwell_us=10.0)

    f0 = frame(0, 0.0)
    scan = f0.frame_time_s
    assert engine._period_s(f0.t_start, f0.frame_time_s) == pytest.approx(scan)            # nothing to go by yet
    engine.process(f0)
    f1 = frame(1, scan + 0.3)
    assert engine._period_s(f1.t_start, f1.frame_time_s) == pytest.approx(scan + 0.3)
    engine.process(f1)
    assert engine._period_s(2 * scan + 0.6 + 10.0, scan) == pytest.approx(scan)   # a pause is no period


def test_a_correction_holds_the_frames_mean_not_a_mains_phase():
    """The next frame's target is the drift averaged over its scan: with nothing but a 20 pm
    mains line the target stays within 2 pm of zero, though the line's value at mid-frame is
    anywhere in +-20 pm."""
    gp = _mains_gp()
    t_next, scan = 0.3, 256 * 0.3e-3
    decision = CorrectionPolicy(deadband_nm=0.0).correction(gp, t_next, scan, (0.0, 0.0))
    assert decision.predicted_nm is not None
    assert np.all(np.abs(decision.predicted_nm) < 0.002)
    mid, _ = gp.predict(np.array([t_next + 0.5 * scan]))
    assert abs(mid[0, 1]) > 0.005                      # the instant would have been a poor target


def _slow_line_mains_errors(pickup: bool, monkeypatch) -> np.ndarray:
    """Per-line x drift error (nm, frames 2-5, one offset removed) on a slow scan (40 us dwell,
    5.2 ms lines) with a 20 pm, 60 Hz mains line along x: a column spans a mains period there,
    so its fitted position averages the line away."""
    from stem_live import column_model

    if not pickup:
        monkeypatch.setattr(column_model.ColumnModel, "_pickup_model", lambda self, cols, frame: None)
    cfg = MicroscopeConfig(preset="graphene", size=128, pixel_size_nm=0.025, dwell_us=40.0, seed=5,
                           drift=DriftConfig(drift_nm_per_min=1.0, ou_sigma_nm=0.002, jitter_amp_nm=0.02,
                                             jitter_hz=60.0))
    e = line_drift_errors(cfg, 6, skip=2)[0][:, 1]
    return e - e.mean()


def test_mains_on_slow_lines_is_taken_from_the_scan_lines(monkeypatch):
    """On slow lines the columns cannot see the mains line (each spans a period); the locator's
    per-line x shifts can: the engine adds its 50/60 Hz pick-up to the GP's lines. Without it
    the per-line x error is the line itself (~20 pm / sqrt 2)."""
    with_pickup = np.sqrt(np.mean(_slow_line_mains_errors(True, monkeypatch) ** 2))
    without = np.sqrt(np.mean(_slow_line_mains_errors(False, monkeypatch) ** 2))
    print(f"per-line x error: {with_pickup * 1e3:.1f} pm with the pick-up, {without * 1e3:.1f} pm without")
    assert without > 0.010  # the mains line is there and the GP alone misses it
    assert with_pickup < 0.5 * without and with_pickup < 0.008


@pytest.mark.parametrize("hz,dwell_us,used,gp_hz", [(60.0, 1.0, False, 60.0), (60.0, 20.0, True, 60.0),
                                                  (50.0, 20.0, True, 50.0), (178.0, 1.0, False, 50.0)])
def test_a_mains_pick_up_sets_the_frequency_and_is_added_where_the_gp_cannot_follow(hz, dwell_us, used, gp_hz):
    """The scan lines' pick-up at 60 Hz moves the GP (starting at 50 Hz) to 60 Hz; on fast lines
    (1 us dwell: a column spans a small part of a period) the GP then follows the line itself
    and the pick-up is not added; on slow lines (20 us) it is. 178 Hz is no mains frequency:
    not drift, and the GP keeps its 50 Hz."""
    from types import SimpleNamespace

    from stem_live.column_model import ColumnModel

    cm = ColumnModel(EngineConfig(model="gp"))
    cm._probe_sigma_px = 1.5  # as the locator measures it
    frame = Frame(seq=0, image=np.zeros((256, 256), np.float32), dwell_us=dwell_us, flyback_us=20.0)
    assert cm.gp.mains_on and cm.gp.mains_hz == 50.0
    w = 2.0 * np.pi * hz * frame.line_time_s  # rad per line
    cols = SimpleNamespace(meta={"line_pickup_model": (w, 0.5, 0.0, 0.0, 0.0, 0.0, 256.0)})
    assert (cm._pickup_model(cols, frame) is not None) == used
    assert cm.gp.mains_hz == pytest.approx(gp_hz)
