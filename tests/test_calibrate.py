"""The calibration session against simulator truth: planted scan scale and shear, drift
velocity, a rotated crystal, the engine started from a calibration (closed loop), the report
folder and the JSON file's format and errors.

One module fixture runs the session; the GP is sized like the engine's (``max_samples=4000``)
and keeps its default hyperparameters (``refit_steps=0``), so everything compiles once."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from simulator import DriftConfig, MicroscopeConfig, ScanConfig
from stem_live.calibration import Calibration, load_cached
from stem_live.io.report import write_report
from stem_live.lab.calibration import calibrate_simulator
from stem_live.lattices import LATTICES, lattice_by_name, parse_lattice_vectors

SCAN = ScanConfig(scale_error=(0.012, -0.015), shear=0.02)           # flyback 10 pm / 20 us, jitter: defaults
CFG = MicroscopeConfig(preset="srtio3", size=256, seed=1, scan=SCAN, drift=DriftConfig(drift_nm_per_min=6.0))
FAST = dict(max_samples=4000, refit_steps=0)


def test_lattice_table_matches_the_simulator():
    from simulator.specimen import _LATTICES

    for name, lat in LATTICES.items():
        sim = _LATTICES[name]
        assert np.allclose(lat.a_nm, sim.a1) and np.allclose(lat.b_nm, sim.a2), name
        assert np.allclose(lat.basis, sim.basis), name
    assert lattice_by_name("SrTiO3").min_distance_nm == pytest.approx(0.3905 / 2)
    assert lattice_by_name("graphene").min_distance_nm == pytest.approx(0.142, abs=0.001)
    with pytest.raises(ValueError, match="choose one of"):
        lattice_by_name("gold")
    with pytest.raises(ValueError, match="parallel"):
        parse_lattice_vectors("0,0.3,0,0.6")


def test_fit_lattice_on_one_frame():
    """The known lattice placed on the located columns of one frame (no drift): the affine map
    is the scan's (I + D)^-1, the rotation of a turned crystal is found, every column on a site."""
    from simulator import Microscope
    from stem_live.calibration import fit_lattice
    from stem_live.locate import locate_classical

    for rot in (0.0, 0.03):
        cfg = replace(CFG, drift=DriftConfig.none(), specimen_kwargs={"lattice_rotation_rad": rot})
        image, meta, _ = Microscope(cfg).acquire()
        cols = locate_classical(np.asarray(image, np.float32), 16.0)
        fit = fit_lattice(cols.positions * np.asarray(meta.pixel_size_nm), LATTICES["srtio3"])
        assert fit.n_inliers >= 0.98 * len(cols) and fit.rms_nm < 0.01
        assert fit.rotation_rad == pytest.approx(rot, abs=5e-4)
        d = np.array([[SCAN.scale_error[0], 0.0], [SCAN.shear, SCAN.scale_error[1]]])
        lower = fit.affine @ np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])  # rotation out
        assert np.allclose(lower, np.linalg.inv(np.eye(2) + d), atol=1.5e-3), lower


def test_calibrated_gp_predicts_the_known_drift_from_one_frame():
    """The engine's GP wrapped with a known velocity: after one frame of samples (no drift visible
    within it: the reference frame) it predicts the next frame's drift; the bare GP cannot."""
    from stem_live.calibration import CalibratedGP
    from stem_live.distortion import OnlineDriftGP, observations_from_columns

    v = np.array([0.05, 0.08])                                      # nm/s
    rows, _cols, dwell, line = 256, 256, 2e-6, 256 * 2e-6 + 50e-6
    ft = rows * line
    ij = np.stack(np.meshgrid(np.arange(8, 256, 16.0), np.arange(8, 256, 16.0), indexing="ij"), -1).reshape(-1, 2)

    def frame(k):                                                   # columns seen exactly at their reference
        return observations_from_columns(ij, ij, None, t_start=k * ft, line_time_s=line, dwell_s=dwell,
                                         pixel_size_nm=(0.012, 0.012), beam_shift_nm=(0.0, 0.0), frame=k)

    kw = dict(max_samples=4000, min_groups=512)                     # the engine's sizes
    bare = OnlineDriftGP(**kw)
    wrapped = CalibratedGP(OnlineDriftGP(**kw), v, velocity_sd_nm_per_s=0.005)
    for gp in (bare, wrapped):
        gp.add(frame(0))
    t_next = np.array([1.5 * ft])
    step = v * ft                                                   # true drift from frame 0 to frame 1
    m_w, s_w = wrapped.predict(t_next)
    m_b, _ = bare.predict(t_next)
    assert np.allclose(m_w[0] - wrapped.predict([0.5 * ft])[0][0], step, atol=0.002)
    assert np.all(np.abs(m_b[0] - bare.predict([0.5 * ft])[0][0]) < 0.3 * np.abs(step))
    assert np.all(s_w[0] < 0.05)                                    # confident enough for the policy
    assert wrapped.frames == bare.frames == (0,)                   # the rest is the wrapped GP's


@pytest.fixture(scope="module")
def run():
    return calibrate_simulator(config=CFG, frames=10, **FAST)


@pytest.fixture(scope="module")
def cal_path(run, tmp_path_factory) -> Path:
    return run.calibration.save(tmp_path_factory.mktemp("cal") / "calibration.json")


def test_scale_and_shear_recovered(run):
    c = run.calibration
    assert c.scale_error[0] == pytest.approx(SCAN.scale_error[0], rel=0.1)
    assert c.scale_error[1] == pytest.approx(SCAN.scale_error[1], rel=0.1)
    assert c.shear == pytest.approx(SCAN.shear, rel=0.1)
    # the rotation convention (fast-scan axis exact) leaves no y-per-x term and no rotation here
    assert abs(c.shear_yx) < 0.05 * SCAN.shear and abs(c.rotation_rad) < 1e-3
    assert c.flyback_amp_nm == pytest.approx(SCAN.flyback_amp_nm, rel=0.3)
    # the reported uncertainties are honest: the errors are within a few sigma
    assert abs(c.shear - SCAN.shear) < 5 * c.shear_sd + 2e-4
    assert c.meta["relative_error"]["shear"] < 0.1


def test_drift_velocity_against_truth(run):
    c = run.calibration
    v_true = CFG.drift.velocity_nm_per_s                            # 6 nm/min at 0.6 rad: (0.056, 0.083) nm/s
    err = np.subtract(c.velocity_nm_per_s, v_true)
    # the OU wander (15 pm, 8 s) over a 1.4 s session is most of the error, and in the sd
    assert np.all(np.abs(err) < 3 * np.asarray(c.velocity_sd_nm_per_s)), (c.velocity_nm_per_s, v_true)
    assert np.hypot(*err) < 0.25 * np.hypot(*v_true)
    # the GP trace follows the true drift (one constant offset removed)
    d = np.stack([np.interp(run.truth_t, run.trace_t, run.trace_mean[:, i]) for i in range(2)], axis=1)
    e = d - run.truth_d
    assert np.sqrt(np.mean(np.sum((e - e.mean(0)) ** 2, axis=1))) < 0.006      # nm


def test_rotated_crystal_and_given_vectors():
    """A crystal turned by 30 mrad on the grid, given as two vectors: the rotation is fitted, the
    shear and scale are still the scan's."""
    cfg = replace(CFG, seed=5, specimen_kwargs={"lattice_rotation_rad": 0.03})
    lat = parse_lattice_vectors("0,0.19525,0.19525,0")            # SrTiO3 [001]: every column, a / 2
    c = calibrate_simulator(config=cfg, frames=6, lattice=lat, **FAST).calibration
    assert c.rotation_rad == pytest.approx(0.03, abs=1e-3)
    assert c.shear == pytest.approx(SCAN.shear, rel=0.1)
    assert c.scale_error[0] == pytest.approx(SCAN.scale_error[0], rel=0.1)
    assert c.scale_error[1] == pytest.approx(SCAN.scale_error[1], rel=0.1)


def test_engine_starts_with_a_smaller_residual(cal_path):
    """Closed loop on a new session (another seed, same microscope): with the calibration the
    gp model corrects the drift from the first frame on."""
    from stem_live.engine import EngineConfig
    from stem_live.lab.evaluate import run_session

    cfg = replace(CFG, seed=2)
    n = 5
    res = {}
    for name, ec in (("without", EngineConfig(model="gp")),
                     ("with", EngineConfig(model="gp", calibration=str(cal_path)))):
        r = run_session(cfg, n, armed=True, engine_config=ec)
        res[name] = np.hypot(*r.residual_nm[1:4].T)                 # frames 1-3 vs frame 0, true image motion
    rms = {k: float(np.sqrt(np.mean(v ** 2))) for k, v in res.items()}
    one_frame = float(np.hypot(*CFG.drift.velocity_nm_per_s)) * 0.144    # drift in one 256 px frame, nm
    assert res["without"][0] > 0.7 * one_frame                     # uncorrected until it has seen the drift
    assert res["with"][0] < 0.4 * one_frame                        # corrected already
    assert rms["with"] < 0.6 * rms["without"], rms


def test_save_load_round_trip(run, cal_path, tmp_path):
    c = Calibration.load(cal_path)
    ref = run.calibration
    for k in ("velocity_nm_per_s", "velocity_sd_nm_per_s", "scale_error", "scale_error_sd", "shear", "shear_sd",
              "shear_yx", "rotation_rad", "flyback_amp_nm", "flyback_tau_us", "line_jitter_nm"):
        assert getattr(c, k) == getattr(ref, k), k
    assert c.pca["explained_variance_ratio"] == pytest.approx(ref.pca["explained_variance_ratio"])
    assert c.truth["shear"] == SCAN.shear
    again = c.save(tmp_path / "again.json")
    assert again.read_text() == cal_path.read_text()
    # the cache re-reads a file that changed, and keeps a good value if it disappears
    moved = tmp_path / "moved.json"
    moved.write_text(cal_path.read_text())
    assert load_cached(moved).shear == c.shear
    replace(c, shear=0.03).save(moved)
    assert load_cached(moved).shear == 0.03
    moved.unlink()
    assert load_cached(moved).shear == 0.03
    assert np.allclose(c.distortion_matrix, [[0.012, 0.0], [0.02, -0.015]], atol=0.002)


def test_bad_calibration_files_give_one_line(tmp_path, cal_path):
    good = json.loads(cal_path.read_text())
    cases = {"missing": None, "notjson": "{oops", "schema": {**good, "schema": "other/9"},
             "field": {k: v for k, v in good.items() if k != "shear"},
             "pair": {**good, "scale_error": [0.01, "big"]}, "huge": {**good, "shear": 0.9}}
    expect = {"missing": "does not exist", "notjson": "not valid JSON", "schema": "'schema'", "field": "'shear'",
              "pair": "'scale_error'", "huge": "'scale_error' or 'shear'"}
    for name, content in cases.items():
        p = tmp_path / f"{name}.json"
        if content is not None:
            p.write_text(content if isinstance(content, str) else json.dumps(content))
        with pytest.raises(ValueError) as exc:
            Calibration.load(p)
        msg = str(exc.value)
        assert expect[name] in msg and "\n" not in msg, msg
    # the engine refuses it at start, in one line; the calibration needs the gp model
    from stem_live.engine import Engine, EngineConfig

    with pytest.raises(ValueError, match="'shear'"):
        Engine(EngineConfig(model="gp", calibration=str(tmp_path / "field.json")))
    with pytest.raises(ValueError, match="gp model"):
        Engine(EngineConfig(model="rigid", calibration=str(cal_path)))


def test_cli_errors_are_one_line(tmp_path):
    def cli(*args):
        return subprocess.run([sys.executable, "-m", "stem_live.cli", *args], capture_output=True, text=True,
                              timeout=60)

    for args, text in ((("run", "--model", "gp", "--calibration", str(tmp_path / "nope.json")), "does not exist"),
                       (("calibrate", str(tmp_path / "nope.tif"), "--lattice", "srtio3", "--out", str(tmp_path)),
                        "does not exist"),
                       (("calibrate", "--out", str(tmp_path)), "neither"),
                       (("calibrate", "--preset", "srtio3", "--lattice-vectors", "1,2,3", "--out", str(tmp_path)),
                        "four numbers")):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("stem-live: error:") and text in lines[0], r.stderr


def _png_pixels(path: Path) -> np.ndarray:
    """Decode the 8-bit RGB, filter-0 PNGs the report writes."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    idat, i = b"", 8
    while i < len(data):
        n = struct.unpack(">I", data[i:i + 4])[0]
        if data[i + 4:i + 8] == b"IDAT":
            idat += data[i + 8:i + 8 + n]
        i += 12 + n
    raw = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + 3 * w)
    return raw[:, 1:].reshape(h, w, 3)


def test_report_folder_and_cli(run, tmp_path):
    paths = write_report(run, tmp_path / "rep")
    names = {p.name for p in paths}
    assert {"calibration.json", "drift_trace.png", "distortion_field.png", "pca_modes.png"} <= names
    for p in paths:
        if p.suffix == ".png":
            img = _png_pixels(p)
            ink = np.any(img < 200, axis=2).mean()                  # drawn, not blank or black
            assert 0.005 < ink < 0.5, (p.name, ink)
            assert len(np.unique(img.reshape(-1, 3), axis=0)) >= 4  # several colours (bands, lines, text)
    rep = json.loads((tmp_path / "rep" / "calibration.json").read_text())
    for key in ("velocity_nm_per_s", "velocity_sd_nm_per_s", "scale_error", "shear", "flyback_amp_nm",
                "flyback_tau_us", "line_jitter_nm", "pca"):
        assert key in rep
    assert rep["pca"]["explained_variance_ratio"][0] > 0.5          # mode 1: the rigid drift
    assert rep["pca"]["modes"][0]["translation_fraction"] > 0.9
    trace = np.loadtxt(tmp_path / "rep" / "drift_trace.csv", delimiter=",", skiprows=1)
    assert trace.shape[1] == 5 and np.all(trace[:, 3:] > 0)
    # the command, in this process (the compiled GP is shared with the fixture)
    from stem_live.cli import main

    out = tmp_path / "cli"
    assert main(["calibrate", "--preset", "srtio3", "--size", "256", "--frames", "6", "--seed", "4",
                 "--refit-steps", "0", "--max-samples", "4000", "--out", str(out)]) == 0
    cal = Calibration.load(out / "calibration.json")
    assert cal.meta["frames"] == 6 and cal.truth["shear"] == 0.02
    assert cal.shear == pytest.approx(0.02, rel=0.15)
    assert all((out / n).stat().st_size > 1000 for n in ("drift_trace.png", "distortion_field.png", "pca_modes.png"))


def test_calibrate_a_recorded_stack(tmp_path):
    """The same session recorded to a TIFF stack (pixel size and timing in its metadata) and
    calibrated from the file, the lattice given by name."""
    from simulator import Microscope
    from stem_live.cli import main
    from stem_live.io import StackWriter
    from stem_live.lab.evaluate import frame_from_sim

    scope = Microscope(replace(CFG, seed=6))
    tif = tmp_path / "session.tif"
    with StackWriter(tif) as w:
        for _ in range(8):
            image, meta, _ = scope.acquire()
            w.write(frame_from_sim(image, meta))
    out = tmp_path / "cal"
    assert main(["calibrate", str(tif), "--lattice", "srtio3", "--refit-steps", "0", "--max-samples", "4000",
                 "--out", str(out)]) == 0
    c = Calibration.load(out / "calibration.json")
    assert c.truth is None and c.meta["source"] == str(tif) and c.meta["frames"] == 8
    assert c.shear == pytest.approx(SCAN.shear, rel=0.1)
    assert c.scale_error[0] == pytest.approx(SCAN.scale_error[0], rel=0.1)
    assert c.scale_error[1] == pytest.approx(SCAN.scale_error[1], rel=0.1)
    # the wrong lattice is refused in one line
    with pytest.raises(ValueError, match="does not fit"):
        from stem_live.calibration import calibrate_frames
        from stem_live.io import read_frames

        calibrate_frames(read_frames(tif), lattice_by_name("graphene"), max_frames=3, **FAST)


def test_engine_fits_the_left_edge_with_the_calibrated_flyback(run, cal_path, monkeypatch):
    """A calibration's flyback reaches the locator in fast-scan pixels of each frame (amplitude /
    pixel size, tau / dwell); without a calibration the locator assumes a regular scan."""
    import stem_live.locate as locate_pkg
    from stem_live.engine import EngineConfig
    from stem_live.lab.evaluate import run_session

    c = run.calibration
    amp, decay = c.flyback_px(0.012, 2.0)
    assert amp == pytest.approx(c.flyback_amp_nm / 0.012) and decay == pytest.approx(c.flyback_tau_us / 2.0)
    assert amp == pytest.approx(SCAN.flyback_amp_nm / 0.012, rel=0.3)  # 0.83 px on this scan
    assert c.flyback_px(0.012, 0.0) is None  # timing unknown
    assert replace(c, flyback_amp_nm=1e-5).flyback_px(0.012, 2.0) is None  # negligible
    seen = []
    real = locate_pkg.locate_classical

    def spy(*args, **kwargs):
        seen.append(kwargs.get("flyback_px"))
        return real(*args, **kwargs)

    monkeypatch.setattr(locate_pkg, "locate_classical", spy)
    for cal in (str(cal_path), ""):
        seen.clear()
        run_session(replace(CFG, seed=2), 1, armed=False, engine_config=EngineConfig(model="gp", calibration=cal))
        assert seen, "the engine did not locate"
        if cal:
            assert all(s == pytest.approx((amp, decay)) for s in seen)  # 0.012 nm pixels, 2 us dwell
        else:
            assert all(s is None for s in seen)


def test_engine_warns_once_when_the_calibrated_flyback_cannot_be_used(run, cal_path, caplog):
    """A calibration with a measured flyback, frames whose dwell makes it unusable (no dwell
    time, or so long that the flyback's decay is shorter than its amplitude in pixels): the
    locator falls back to a regular scan and the engine says so, once per scan setting."""
    import logging
    from types import SimpleNamespace

    from stem_live.engine import Engine, EngineConfig

    c = run.calibration
    model = Engine(EngineConfig(model="gp", calibration=str(cal_path)))._columns
    good = SimpleNamespace(pixel_size_nm=(0.012, 0.012), dwell_us=2.0)
    slow = SimpleNamespace(pixel_size_nm=(0.012, 0.012), dwell_us=4.0 * c.flyback_tau_us / (c.flyback_amp_nm / 0.012))
    untimed = SimpleNamespace(pixel_size_nm=(0.012, 0.012), dwell_us=0.0)
    with caplog.at_level(logging.WARNING, logger="stem_live.engine"):
        assert model._flyback(good) == pytest.approx(c.flyback_px(0.012, 2.0))
        assert not caplog.records
        for frame in (slow, slow, untimed, untimed):
            assert model._flyback(frame) is None
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 2 and all("regular scan" in m for m in msgs)
    assert all(len(m.splitlines()) == 1 for m in msgs)


def test_short_session_velocity_is_the_drift_traces_slope():
    """A 16-frame session with the hyperparameters fitted (the CLI's default): the GP's
    long-scale kernel, as long as the session, trades off against its own linear term (0.91
    nm/s measured, against a true 0.016); the calibration's velocity is the slope of the drift
    trace, which follows the true drift's."""
    r = calibrate_simulator("srtio3", 16, size=256)  # 1 nm/min, refit_steps=60
    c = r.calibration
    assert c.meta["refit_ok"]
    true_slope = np.linalg.lstsq(np.stack([np.ones_like(r.truth_t), r.truth_t], axis=1), r.truth_d,
                                 rcond=None)[0][1]
    err = np.subtract(c.velocity_nm_per_s, true_slope)
    assert np.hypot(*err) < 0.1 * np.hypot(*true_slope), (c.velocity_nm_per_s, true_slope)  # measured 0.5 %
    assert np.hypot(*err) < 3 * c.velocity_sd_nm_per_s[0]
    assert 15.0 < c.flyback_tau_us < 26.0  # the planted 20 us; measured 20.6


def test_fitted_flyback_decay_against_truth():
    """The fitted hyperparameters include the flyback's decay: a planted 40 us is told from the
    20 us default (measured 46 us and 20.6 us; with refit_steps=0, as in the other tests here,
    it stays at the default by construction)."""
    slow = MicroscopeConfig(preset="srtio3", size=256, seed=0,  # calibrate_simulator's session, tau doubled
                            scan=ScanConfig(scale_error=(0.01, -0.015), shear=0.02, flyback_tau_us=40.0))
    tau = calibrate_simulator(config=slow, frames=16).calibration.flyback_tau_us
    assert 30.0 < tau < 52.0, tau


def test_line_jitter_reads_as_the_columns_see_it(run):
    """``line_jitter_nm`` is the per-line offset as line-averaged column positions carry it: a
    column spans ~8 lines of SrTiO3 at 12 pm/px, so the planted 2 pm per line reads ~0.4 pm;
    none reads none, and more reads more."""
    assert 0.1 * 0.002 < run.calibration.line_jitter_nm < 0.5 * 0.002  # measured 0.44 pm
    est = {j: calibrate_simulator(config=replace(CFG, scan=replace(SCAN, line_jitter_nm=j)), frames=10,
                                  **FAST).calibration.line_jitter_nm for j in (0.0, 0.006)}
    assert est[0.0] < 1e-4
    assert est[0.006] > 1.5 * run.calibration.line_jitter_nm  # measured 0.84 pm


def test_evaluate_scores_the_columns_on_the_calibrated_flyback(run, cal_path):
    """`stem-live evaluate --calibration`: the columns block locates as the engine then does, on
    the calibration's flyback (reported as ``flyback_px``); fewer columns centred outside the
    frame are taken for ones inside it."""
    from simulator import Microscope
    from stem_live.lab.evaluate import column_metrics

    scope = Microscope(replace(CFG, seed=3))
    frames = [scope.acquire() for _ in range(4)]
    plain = column_metrics(frames)
    fitted = column_metrics(frames, calibration=str(cal_path))
    assert "flyback_px" not in plain
    assert fitted["flyback_px"] == pytest.approx(run.calibration.flyback_px(0.012, 2.0), abs=1e-3)
    assert fitted["precision"] > plain["precision"]  # measured 0.9929, 0.9899 without the flyback
    assert fitted["recall"] >= plain["recall"] - 0.005
