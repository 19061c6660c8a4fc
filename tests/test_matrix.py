"""``stem-live evaluate --matrix``: scoring functions on planted sessions, the drift bound, the
contract keys of a tiny matrix, and the CLI flag. Each test well under 30 s on 2 cores."""
from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest

from stem_live.lab.evaluate import SessionResult
from stem_live.lab.matrix import (
    RELOCK_FRAMES,
    STARTUP_FRAMES,
    drift_bound,
    false_jumps,
    frames_for,
    line_drift_rmse_pm,
    residual_outside_jumps_nm,
    run_matrix,
    summarise,
)


def session(*, frames: int = 8, rows: int = 4, err_pm=None, detected=(), true_jumps=(), residual_nm=None) -> SessionResult:
    """A planted SessionResult: ``err_pm(frame, line)`` -> (dy, dx) pm drift error."""
    err = np.array([err_pm(k, i) for k in range(frames) for i in range(rows)], float) * 1e-3 \
        if err_pm is not None else np.zeros((frames * rows, 2))
    flags = np.zeros(frames, bool)
    flags[list(detected)] = True
    res = np.zeros((frames, 2)) if residual_nm is None else np.asarray(residual_nm, float)
    return SessionResult(residual_nm=res, engine_ms=np.ones(frames), drift_err_nm=err, gp_ms=np.ones(frames),
                         jump_frame=true_jumps[0] if true_jumps else None, corrections=0, clamped=0,
                         drift_err_frame=np.repeat(np.arange(frames), rows), jump_detected=flags,
                         true_jump_frames=tuple(true_jumps))


def test_line_drift_rmse_leaves_out_frame_0_and_jump_frames_and_one_offset_per_stretch():
    """Frame 0 and the jump frame carry huge errors (left out); before and after the jump the
    estimate has different constant offsets (removed per stretch); what is left is +-3 pm along x."""
    def err(k, i):
        if k in (0, 4):
            return (500.0, 500.0)
        return (40.0 if k < 4 else -70.0, 3.0 if i % 2 else -3.0)

    assert line_drift_rmse_pm(session(err_pm=err, true_jumps=(4,))) == pytest.approx(3.0)
    # without a jump, one offset for the whole run: the offsets of the two stretches count
    no_jump = session(err_pm=lambda k, i: (0.0, 3.0 if i % 2 else -3.0) if k else (900.0, 0.0))
    assert line_drift_rmse_pm(no_jump) == pytest.approx(3.0)
    empty = replace(no_jump, drift_err_nm=np.zeros((0, 2)), drift_err_frame=np.zeros(0, int))
    assert math.isnan(line_drift_rmse_pm(empty))                 # rigid model: no per-line drift


def test_false_jumps_allow_the_relock_frames_after_a_true_jump():
    true = (3,)
    allowed = [3 + k for k in range(RELOCK_FRAMES + 1)]
    assert false_jumps(session(detected=allowed, true_jumps=true)) == 0
    assert false_jumps(session(detected=(1, 3 + RELOCK_FRAMES + 1), true_jumps=true)) == 2
    assert false_jumps(session(detected=(2, 5))) == 2                # no true jump at all


def test_residual_outside_jumps_leaves_out_the_jump_relock_and_startup_frames():
    r = np.zeros((10, 2))
    r[:, 1] = 0.01
    r[4:4 + RELOCK_FRAMES + 1] = 5.0                                 # the jump and the re-lock
    r[1:STARTUP_FRAMES] = 3.0                                        # before the velocity is known
    s = session(frames=10, true_jumps=(4,), residual_nm=r)
    assert residual_outside_jumps_nm(s) == pytest.approx(0.01)
    assert s.residual_rms_nm > 1.0


def test_drift_bound_follows_dose_and_wander():
    """4x the dose halves the frame bound (Poisson-limited: readout and background off); a larger
    OU wander raises the line-by-line part; the parts add in quadrature."""
    from simulator import DriftConfig, Microscope, MicroscopeConfig

    cfg = MicroscopeConfig(preset="srtio3", size=96, seed=1, noise=False, background_counts=0.0, readout_noise=0.0,
                           drift=DriftConfig(ou_sigma_nm=0.02, ou_tau_s=1.0))
    _, _, truth = Microscope(cfg).acquire()
    b = drift_bound(cfg, truth)
    assert b.columns > 30 and 0 < b.frame_pm < b.column_pm
    assert b.bound_pm == pytest.approx(math.sqrt(b.frame_pm ** 2 + b.ou_pm ** 2 + b.mains_pm ** 2))
    assert 0 < b.mains_pm < 5.0 / math.sqrt(2)          # the default 5 pm line, never more than unmodelled
    bright = drift_bound(replace(cfg, dose_e_per_A2=4 * cfg.dose), truth)
    assert bright.frame_pm == pytest.approx(0.5 * b.frame_pm, rel=1e-6)
    wild = drift_bound(replace(cfg, drift=DriftConfig(ou_sigma_nm=0.08, ou_tau_s=1.0)), truth)
    assert wild.ou_pm == pytest.approx(2.0 * b.ou_pm, rel=1e-6)            # sqrt(sqrt(q)) with q ~ sigma^2
    none = drift_bound(replace(cfg, drift=DriftConfig(ou_sigma_nm=0.0, jitter_amp_nm=0.0)), truth)
    assert none.ou_pm == 0.0 and none.mains_pm == 0.0 and none.bound_pm == pytest.approx(b.frame_pm)
    # a slow scan: a column spans a good part of a mains period, the line reaches the samples
    # attenuated and costs more to follow
    slow = drift_bound(replace(cfg, dwell_us=20 * cfg.dwell_us), truth)
    assert slow.mains_pm > b.mains_pm
    # ... but never more than the scan lines' own x shifts tell: one frame's columns, unattenuated
    crawl = drift_bound(replace(cfg, dwell_us=200 * cfg.dwell_us), truth)
    assert crawl.mains_pm == pytest.approx(crawl.column_pm / math.sqrt(2 * crawl.columns), rel=1e-6)
    assert crawl.mains_pm < 5.0 / math.sqrt(2)


def test_summary_medians_worst_and_nulls():
    rows = [{"drift_rmse_pm": 2.0, "drift_over_bound": 3.0, "false_jumps": 1, "closed_over_floor": 1.2,
             "closed_over_baseline": 0.8},
            {"drift_rmse_pm": 6.0, "drift_over_bound": None, "false_jumps": 0, "closed_over_floor": 2.0,
             "closed_over_baseline": 1.0},
            {"drift_rmse_pm": 4.0, "drift_over_bound": 5.0, "false_jumps": 2, "closed_over_floor": 1.5,
             "closed_over_baseline": 0.9}]
    s = summarise(rows)
    assert s["drift_rmse_pm"] == {"median": 4.0, "worst": 6.0} and s["false_jumps"] == 3
    assert s["drift_over_bound"] == {"median": 4.0, "worst": 5.0}
    assert s["closed_over_floor"] == {"median": 1.5, "worst": 2.0} and s["closed_over_baseline"] == {"median": 0.9}
    assert frames_for(256) >= 20 and frames_for(1024) < frames_for(512) <= frames_for(256)


def test_tiny_matrix_has_every_contract_key_finite():
    """N = 2, 128 px, 5 frames, gp model: every contract key present and finite; each scenario
    carries its parameters, the per-scenario evaluate keys and its bound."""
    lines: list[str] = []
    rep = run_matrix(2, 7, model="gp", frames=5, size=128, progress=lines.append)
    m = rep["matrix"]
    assert len(lines) == 2 and lines[0].startswith("scenario 1/2")
    assert len(m["scenarios"]) == 2 and m["n"] == 2 and m["seed"] == 7
    for key in ("drift_rmse_pm", "closed_over_floor"):
        assert set(m[key]) == {"median", "worst"} and all(math.isfinite(v) for v in m[key].values()), (key, m[key])
    assert math.isfinite(m["closed_over_baseline"]["median"])
    assert isinstance(m["false_jumps"], int) and m["false_jumps"] >= 0
    for s in m["scenarios"]:
        for key in ("specimen", "size", "pixel_pm", "dwell_us", "drift_nm_per_min", "ou_sigma_pm", "mains_hz",
                    "frames", "drift_rmse_pm", "drift_bound_pm", "drift_over_bound", "false_jumps",
                    "closed_over_floor", "closed_over_baseline"):
            assert s[key] is not None, key
        assert s["size"] == 128 and s["frames"] == 5
        assert s["closed_loop"]["oracle_floor_nm"] > 0 and "residual_rms_nm" in s["baseline"]
        assert s["drift"]["rmse_pm"] >= 0 and s["drift_bound_pm"] > 0
        assert s["drift_over_bound"] == pytest.approx(s["drift_rmse_pm"] / s["drift_bound_pm"], rel=1e-2)
    json.dumps(rep, allow_nan=False)                                 # strict JSON: no NaN anywhere


def test_cli_matrix_flag_writes_the_report(tmp_path, monkeypatch):
    import stem_live.lab.matrix as matrix
    from stem_live.cli.app import main

    seen = {}

    def fake(n, seed, *, model, progress, strips=0):
        seen.update(n=n, seed=seed, model=model, strips=strips)
        progress("scenario 1/1: ...")
        return {"matrix": {"n": n, "seed": seed, "drift_rmse_pm": {"median": 1.0, "worst": 2.0}}}

    monkeypatch.setattr(matrix, "run_matrix", fake)
    out = tmp_path / "m.json"
    assert main(["evaluate", "--matrix", "3", "--seed", "11", "--model", "gp", "--strips", "64", "--json", str(out)]) == 0
    assert seen == {"n": 3, "seed": 11, "model": "gp", "strips": 64}
    assert json.loads(out.read_text())["matrix"]["drift_rmse_pm"]["median"] == 1.0


def test_interframe_shift_in_column_spacings():
    """Frames 0.1 nm apart, one step of 0.213 nm: graphene's column spacing is 0.142 nm -> 1.5."""
    from stem_live.lab.matrix import interframe_shift_spacings

    res = np.array([[0.0, 0.0], [0.0, 0.1], [0.0, 0.2], [0.213, 0.2]])
    assert interframe_shift_spacings(session(frames=4, residual_nm=res), "graphene") == pytest.approx(1.5, rel=1e-3)
    assert math.isnan(interframe_shift_spacings(session(frames=4, residual_nm=res), "particles"))


def test_interframe_shift_leaves_out_true_jumps():
    from stem_live.lab.matrix import interframe_shift_spacings

    res = np.array([[0.0, 0.0], [0.0, 0.0142], [0.0, 1.0142], [0.0, 1.0284]])   # a 1 nm jump into frame 2
    assert interframe_shift_spacings(session(frames=4, residual_nm=res, true_jumps=(2,)), "graphene") == \
        pytest.approx(0.1, rel=1e-3)


def test_the_per_line_residual_is_the_truth_at_every_line():
    """``residual_line_rms_nm``: every line's true ``d - b`` against frame 0's mean (what the
    frame mean hides stays in). Recomputed from the kept truth of a rigid open-loop session with
    a fast 50 Hz line along x (frame means nearly flat, lines not)."""
    from simulator import DriftConfig, MicroscopeConfig
    from stem_live.lab.evaluate import run_session

    cfg = MicroscopeConfig(preset="graphene", size=64, seed=5,
                           drift=DriftConfig(drift_nm_per_min=2.0, jitter_amp_nm=0.03, jitter_hz=50.0))
    res = run_session(cfg, 4, armed=False, keep_frames=4)
    lines = np.concatenate([np.asarray(t.drift_nm) - np.asarray(t.beam_shift_nm) for _, _, t in res.kept])
    want = lines - lines[:64].mean(axis=0)
    np.testing.assert_allclose(res.line_residual_nm, want, atol=1e-12)
    assert res.residual_line_rms_nm == pytest.approx(float(np.sqrt(np.mean(np.sum(want**2, axis=1)))))
    # the 30 pm line is in the lines (rms 21 pm along x), not in the frame means
    assert res.residual_line_rms_nm > 0.015 > res.residual_rms_nm
