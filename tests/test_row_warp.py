"""The reference's warp along the rows (``row_warp``): a displacement that repeats in every
frame as a function of the row (a mains line phase-locked to the frames) is measured on the
lattice and taken out of the drift samples' reference."""

from __future__ import annotations

import numpy as np

from simulator.drift import DriftConfig
from simulator.microscope import MicroscopeConfig
from stem_live.lab.synthetic import honeycomb
from stem_live.row_warp import row_warp
from tests.engine_sessions import line_drift_errors


def _without_line(e: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return e - np.polyval(np.polyfit(rows, e, 1), rows)


def test_a_sinusoidal_warp_along_x_is_recovered_from_the_lattice():
    rng = np.random.default_rng(3)
    pts = honeycomb((256, 256), 9.0, angle_rad=0.3)
    warp = 0.8 * np.sin(2 * np.pi * pts[:, 0] / 67.0)           # px along x, a function of the row
    seen = pts + np.stack([np.zeros(len(pts)), warp], 1) + 0.03 * rng.standard_normal(pts.shape)
    e = row_warp(seen, 9.0, 256)
    assert e is not None
    inner = (pts[:, 0] > 10) & (pts[:, 0] < 245)
    err = _without_line(e[:, 1] - warp, pts[:, 0])[inner]
    assert np.sqrt(np.mean(err ** 2)) < 0.08       # of 0.57 px rms
    assert np.sqrt(np.mean(_without_line(e[:, 0], pts[:, 0]) ** 2)) < 0.05   # nothing along y


def test_no_lattice_no_warp():
    pts = np.random.default_rng(0).uniform(0, 256, (600, 2))
    assert row_warp(pts, 9.0, 256) is None


def test_a_mains_line_locked_to_the_frames_is_followed():
    """SrTiO3, 1 us dwell, a 29 pm mains line at 50 Hz and a frame period of exactly 17 mains
    periods: every frame shows the same line, so the tracker's reference holds it and the drift
    samples against it do not (per-line x error ~ 29 / sqrt 2 = 20.5 pm without the warp). With
    the lattice's row warp taken out the drift model follows it."""
    lt = (256 * 1.0 + 50.0) * 1e-6
    gap = 17 * 0.02 - 256 * lt
    cfg = MicroscopeConfig(preset="srtio3", size=256, dwell_us=1.0, seed=2, frame_gap_s=gap,
                           drift=DriftConfig(drift_nm_per_min=2.0, ou_sigma_nm=0.005, jitter_amp_nm=0.029,
                                             jitter_hz=50.0))
    e = line_drift_errors(cfg, 8, skip=3)[0][:, 1]
    rms = np.sqrt(np.mean((e - e.mean()) ** 2))
    print(f"per-line x error {rms * 1e3:.1f} pm")
    assert rms < 0.006
