"""The ``stem-live`` command as a user runs it: subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ENV = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}


def stem_live(*args: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stem_live.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=cwd)


def _free_endpoints(n: int) -> list[str]:
    import socket

    out = []
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        out.append(f"tcp://127.0.0.1:{s.getsockname()[1]}")
    for s in socks:
        s.close()
    return out


def test_demo_headless_runs_n_frames_and_summarises():
    maps, commands = _free_endpoints(2)
    # 2x the scan rate: the engine keeps up with every 128 px frame on 2 quiet cores; at 8x it
    # skips 2-5 of 12 (latest-frame-only live mode), 7 under a parallel load
    # the rigid model: the gp model (the demo's default) compiles for longer than a test may take
    # a drift well above the few pm of noise, so closed < open loop is a test of the correction
    r = stem_live("demo", "--frames", "12", "--size", "128", "--speed", "2", "--model", "rigid",
                  "--drift-nm-per-min", "10", "--maps-endpoint",
                  maps, "--commands-endpoint", commands)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("frame ")]
    summary = [ln for ln in r.stdout.splitlines() if ln.startswith("summary:")]
    assert len(summary) == 1
    processed, skipped = (int(summary[0].split()[i]) for i in (1, 4))
    assert processed + skipped == 12  # every frame accounted for (live mode may skip under load)
    assert len(lines) == processed >= 6  # one progress line per processed frame (no terminal: one line each)
    assert all("beam -> " in ln and "rvae off" in ln and "open loop" in ln for ln in lines)
    m = re.search(r"RMS ([\d.]+) pm closed loop .* the open-loop ([\d.]+) pm", summary[0])
    closed, opened = float(m[1]), float(m[2])
    assert 0 <= closed < opened  # the closed-loop image motion beside the open-loop drift, from the truth
    assert "Traceback" not in r.stderr


def test_demo_stops_cleanly_on_ctrl_c():
    maps, commands = _free_endpoints(2)
    p = subprocess.Popen([sys.executable, "-m", "stem_live.cli", "demo", "--size", "128", "--speed", "4",
                          "--model", "rigid", "--maps-endpoint", maps, "--commands-endpoint", commands],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        t0 = time.monotonic()
        first = p.stdout.readline()
        while not first.startswith("frame "):
            assert time.monotonic() - t0 < 30, "demo printed no progress"
            first = p.stdout.readline()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "summary:" in out and "Traceback" not in err


def test_evaluate_writes_the_report(tmp_path):
    out = tmp_path / "r.json"
    r = stem_live("evaluate", "--preset", "srtio3", "--size", "128", "--frames", "25", "--drift-nm-per-min", "20",
                  "--seed", "4", "--json", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep == json.loads(r.stdout)
    assert rep["frames_processed"] == 25 and rep["frames_dropped"] == 0 and rep["engine_fps"] > 0
    assert rep["open_loop"]["residual_rms_nm"] > 0.05
    assert rep["closed_loop"]["residual_rms_nm"] < 0.25 * rep["open_loop"]["residual_rms_nm"]
    for loop in ("open_loop", "closed_loop", "baseline"):   # the lines hold the frame means and more
        assert rep[loop]["residual_line_rms_nm"] >= rep[loop]["residual_rms_nm"] - 1e-5
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("image motion RMS"))  # the human summary
    assert f"closed loop {rep['closed_loop']['residual_rms_nm'] * 1e3:.1f} pm" in line
    assert "open loop" in line and "baseline tracker" in line and "oracle floor" in line


@pytest.mark.parametrize("args, needle", [
    (["replay", "/nonexistent/file.tif"], "file.tif"),
    (["evaluate", "--size", "-5"], "must be positive"),
    (["sim", "--frames-endpoint", "tcp://0.0.0.0:5555"], "loopback"),
    (["evaluate", "--preset", "unobtainium"], "invalid choice"),
])
def test_user_errors_are_one_line(args, needle):
    r = stem_live(*args)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if "error" in ln]) == 1


def test_port_in_use_is_a_one_line_error():
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PUB)
    s.bind("tcp://127.0.0.1:*")
    busy = s.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        r = stem_live("sim", "--frames-endpoint", busy, "--corrections-endpoint", _free_endpoints(1)[0])
        assert r.returncode == 2 and "cannot bind" in r.stderr and "Traceback" not in r.stderr
    finally:
        s.close(0)
        ctx.term()


def test_recorded_stream_replays_to_identical_pixels(tmp_path):
    """stem-live sim -> stem-live record -> stem-live replay; pixels checked against a re-render."""
    from instrument_adapters.replay import ReplayInstrument
    from simulator import DriftConfig, Microscope, MicroscopeConfig

    frames_ep, corr_ep = _free_endpoints(2)
    out = tmp_path / "session.tif"
    rec = subprocess.Popen([sys.executable, "-m", "stem_live.cli", "record", str(out), "--frames", "6",
                            "--frames-endpoint", frames_ep], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=ENV)
    sim = subprocess.Popen([sys.executable, "-m", "stem_live.cli", "sim", "--size", "128", "--seed", "7",
                            "--drift-nm-per-min", "5", "--speed", "4", "--frames-endpoint", frames_ep,
                            "--corrections-endpoint", corr_ep], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           text=True, env=ENV)
    try:
        _, rec_err = rec.communicate(timeout=40)
    finally:
        sim.send_signal(signal.SIGINT)
        sim.communicate(timeout=20)
        if rec.poll() is None:
            rec.kill()
    assert rec.returncode == 0, rec_err
    inst = ReplayInstrument(out)
    got = [inst.acquire() for _ in range(len(inst))]
    assert len(got) == 6
    seqs = [f.seq for f in got]
    assert seqs == sorted(seqs)
    # the simulator is seeded and nobody corrected it: re-render the same frames and compare pixels
    scope = Microscope(MicroscopeConfig(preset="graphene", size=128, seed=7, drift=DriftConfig(drift_nm_per_min=5)))
    truth = {}
    for _ in range(max(seqs) + 1):
        img, meta, _t = scope.acquire()
        truth[meta.seq] = (img, meta)
    for f in got:
        img, meta = truth[f.seq]
        assert np.array_equal(f.image, img)
        assert f.t_start == pytest.approx(meta.t_start)
    r = stem_live("replay", str(out))
    assert r.returncode == 0, r.stderr
    assert "replayed 6 frames" in r.stderr


def test_locate_writes_positions_and_overlay(tmp_path):
    """stem-live locate on the real graphene image: positions close to the published reference."""
    from stem_live.lab.evaluate import match_columns

    src = Path(__file__).parent / "data" / "graphene_gb_6nm.npy"
    img = tmp_path / "g.npy"
    img.write_bytes(src.read_bytes())
    work = tmp_path / "work"  # the outputs go into the current folder, not beside the input
    work.mkdir()
    r = stem_live("locate", str(img), "--spacing-px", "12.1", cwd=work)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.npy", "work"]
    csv = work / "g_columns.csv"
    assert csv.read_text().splitlines()[0] == "frame,row_px,col_px,class,intensity,confidence,border,line_dx_px,unsure"
    table = np.loadtxt(csv, delimiter=",", skiprows=1)
    assert table.shape[1] == 9 and np.abs(table[:, 7]).max() < 1.0  # the line de-jitter's shifts, px
    assert not table[:, 8].any()  # a complete lattice: the locator is sure
    ref = np.load(Path(__file__).parent / "data" / "graphene_gb_6nm_reference_columns.npy")
    ti, fi = match_columns(ref, table[:, 1:3], 3.0)
    f1 = 2 * len(ti) / (len(ref) + len(table))
    assert f1 > 0.9
    png = (work / "g_columns.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_locate_with_own_weights_uses_their_calibrated_threshold(tmp_path):
    """`stem-live locate --locator unet --weights W` detects at the threshold calibrated for W
    (the metrics.json that train_unet writes beside them), not at the committed weights' one;
    without a metrics.json it says so and uses the committed weights' threshold."""
    from simulator import Microscope, MicroscopeConfig
    from stem_live.locate.unet import WEIGHTS, calibrated_threshold

    img, _, truth = Microscope(MicroscopeConfig(preset="graphene", size=128, seed=3)).acquire()
    frame = tmp_path / "g.npy"
    np.save(frame, img)
    counts = {}
    for name, best in (("plain", None), ("strict", 0.999)):
        w = tmp_path / name / "unet.msgpack"
        w.parent.mkdir()
        w.write_bytes(WEIGHTS.read_bytes())
        if best is not None:
            (w.parent / "metrics.json").write_text(json.dumps({"eval": {"threshold_calibration": {"best": best}}}))
        assert calibrated_threshold(w) == best
        out = tmp_path / f"{name}.csv"
        # the quality gate would refuse the strict threshold's near-empty list: this compares thresholds
        r = stem_live("locate", str(frame), "--locator", "unet", "--weights", str(w), "--out", str(out),
                      "--no-quality-gate")
        assert r.returncode == 0, r.stderr
        assert ("no metrics.json" in r.stderr) == (best is None)
        counts[name] = len(out.read_text().splitlines()) - 1  # a header, then one row per column
    assert counts["plain"] >= 0.95 * len(truth.columns_px)
    assert counts["strict"] < 0.5 * counts["plain"]


def test_train_locator_eval_only_needs_weights_and_their_record(tmp_path):
    """--eval-only re-evaluates existing weights; without them (or without the metrics.json
    written with them) it is one line that says what is missing, not a traceback."""
    from stem_live.locate.unet import WEIGHTS

    w = tmp_path / "unet.msgpack"
    r = stem_live("train-locator", "--out", str(w), "--eval-only")
    assert r.returncode == 2 and "no U-Net weights" in r.stderr and "Traceback" not in r.stderr
    w.write_bytes(WEIGHTS.read_bytes())
    (tmp_path / "metrics.json").write_text(json.dumps({"seed": 0}))
    r = stem_live("train-locator", "--out", str(w), "--eval-only")
    assert r.returncode == 2 and "lacks n_params" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_train_locator_steps_reach_the_trainer(monkeypatch, tmp_path):
    """--steps N trains N steps (the committed weights' reproducible length), --minutes a budget;
    a step count that is not a positive integer is refused before anything runs."""
    import stem_live.lab.train_unet as T
    from stem_live.cli import app

    seen = []
    monkeypatch.setattr(T, "train", lambda out, **kw: seen.append(kw) or {})
    assert app.main(["train-locator", "--out", str(tmp_path / "w.msgpack"), "--steps", "7", "--seed", "3"]) == 0
    assert app.main(["train-locator", "--out", str(tmp_path / "w.msgpack"), "--minutes", "2"]) == 0
    assert (seen[0]["max_steps"], seen[0]["seed"]) == (7, 3) and (seen[1]["max_steps"], seen[1]["minutes"]) == (None, 2.0)
    r = stem_live("train-locator", "--out", str(tmp_path / "w.msgpack"), "--steps", "0")
    assert r.returncode == 2 and "must be positive" in r.stderr


def test_locate_bad_file_is_one_line(tmp_path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"II*\x00garbage")
    r = stem_live("locate", str(bad))  # the same reader and message as replay's
    assert r.returncode == 2 and "holds no complete frame" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_match_columns_is_one_to_one():
    from stem_live.lab.evaluate import match_columns

    truth = np.array([[0.0, 0.0], [0.0, 10.0], [0.0, 20.0]])
    found = np.array([[0.1, 0.0], [0.0, 0.5], [0.0, 10.2], [5.0, 5.0]])  # two candidates near the first
    ti, fi = match_columns(truth, found, 3.0)
    assert sorted(zip(ti, fi)) == [(0, 0), (1, 2)]


def test_locate_takes_a_known_flyback(tmp_path):
    """`--flyback-px AMP DECAY` reaches the fit: the columns at the left edge of a frame scanned
    with a 1 px / 10 px flyback move left (towards where they appear) or, centred outside the
    frame, go; the rest stay; nonsense is one line."""
    from scipy.spatial import cKDTree

    from simulator import Microscope, MicroscopeConfig

    img, _, truth = Microscope(MicroscopeConfig(preset="graphene", size=128, seed=3)).acquire()
    frame = tmp_path / "g.npy"
    np.save(frame, img)
    tables = {}
    for name, extra in (("plain", ()), ("flyback", ("--flyback-px", "1", "10"))):
        out = tmp_path / f"{name}.csv"
        r = stem_live("locate", str(frame), "--out", str(out), *extra)
        assert r.returncode == 0, r.stderr
        tables[name] = np.loadtxt(out, delimiter=",", skiprows=1)[:, 1:3]
    left = tables["plain"][:, 1] < 3.0
    d, i = cKDTree(tables["flyback"]).query(tables["plain"][left])
    kept = d < 1.0  # the others are centred outside the frame: dropped with the flyback
    assert left.sum() >= 2 and kept.any()
    assert np.all(tables["flyback"][i[kept], 1] - tables["plain"][left][kept, 1] < -0.1)
    far = tables["plain"][:, 1] > 60
    d, _ = cKDTree(tables["flyback"]).query(tables["plain"][far])
    assert np.all(d < 0.05)
    r = stem_live("locate", str(frame), "--flyback-px", "12", "10")
    assert r.returncode == 2 and "decay must be" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_demo_line_says_columns_correction_and_latents():
    from types import SimpleNamespace

    from stem_live.cli.run import TrueMotion, demo_line, rvae_status

    r = SimpleNamespace(seq=7, drift_nm=np.array([0.0123, -0.0456]), correction=SimpleNamespace(beam_shift_nm=(0.1, -0.2)))
    line = demo_line(r, {"fps": 1.5, "skipped": 2}, 1003, "latents v1")
    assert line.startswith("frame     7  columns 1003  drift [+0.012, -0.046] nm  beam -> [+0.100, -0.200] nm")
    assert "latents v1" in line and "skipped 2" in line

    def stage(**st):
        base = {"error": None, "available": False, "ready": True, "training": False, "version": 0,
                "steps_done": 0, "buffered": 0}
        return SimpleNamespace(rvae=SimpleNamespace(status=lambda: {**base, **st}))

    assert rvae_status(SimpleNamespace(rvae=None), asked=False) == "rvae off"
    assert rvae_status(SimpleNamespace(rvae=None), asked=True) == "rvae building"
    assert rvae_status(stage(ready=False), asked=True) == "rvae compiling"
    assert rvae_status(stage(buffered=300), asked=True) == "rvae buffering (300 patches)"
    assert rvae_status(stage(training=True, steps_done=40), asked=True) == "rvae training (40 steps)"
    assert rvae_status(stage(available=True, version=2), asked=True) == "latents v2"
    m = TrueMotion()  # closed loop: drift less beam shift; open loop: the drift alone; vs the first frame
    m.add(np.zeros((4, 2)), np.zeros((4, 2)))
    closed, opened = m.add(np.full((4, 2), [0.3, 0.4]), np.full((4, 2), [0.3, 0.39]))
    assert np.isclose(closed, 0.01) and np.isclose(opened, 0.5)
    assert np.allclose(m.rms(), [np.sqrt(0.01**2 / 2), np.sqrt(0.5**2 / 2)])


def _results(path: Path) -> Path:
    """A small results file (3 frames of 4 lines, the keys `replay --results` writes) at ``path``."""
    rng = np.random.default_rng(1)
    drift = np.full((3, 5, 2), np.nan, np.float32)
    drift[:, :4] = np.cumsum(rng.normal(0, 0.01, (3, 4, 2)), axis=1) + np.arange(3)[:, None, None] * 0.05
    arrays = {"drift_nm": drift, "drift_sigma_nm": np.where(np.isnan(drift), np.nan, 0.004).astype(np.float32),
              "rows": np.array([4, 4, 4]), "t_start": np.array([0.0, 1.0, 2.0]), "t_mid": np.array([0.5, 1.5, 2.5]),
              "line_time_s": np.full(3, 0.25), "beam_shift_nm": np.zeros((3, 2)),
              "correction_nm": np.array([[np.nan, np.nan], [0.06, 0.05], [0.11, 0.1]]),
              "correction_sent": np.array([False, True, True]), "col_offsets": np.array([0, 120, 250, 371]),
              "info": np.array(json.dumps({"source": "s.tif", "drift_hyperparameters": {
                  "values": {"sigma_nm": 0.0123, "tau_s": 4.5}, "mains_hz": 50.0, "mains_mode": "auto",
                  "fits": 2, "accepted": 1}}))}
    np.savez(path, **arrays)
    return path


def test_replay_report_draws_the_results_drift(tmp_path):
    from stem_live.io.figures import replay_figure
    from stem_live.io.results import load_results

    res = load_results(_results(tmp_path / "r.npz"))
    drawn = replay_figure(res, tmp_path / "r.png")
    png = (tmp_path / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5_000
    # the drift drawn is the file's, line by line (rows beyond a frame's own dropped), with its sigma
    assert np.array_equal(drawn["drift_nm"], res["drift_nm"][:, :4].reshape(-1, 2))
    assert np.array_equal(drawn["sigma_nm"], res["drift_sigma_nm"][:, :4].reshape(-1, 2))
    assert np.allclose(drawn["t_s"], np.repeat([0.0, 1.0, 2.0], 4) + np.tile(np.arange(4) * 0.25, 3))
    assert np.allclose(drawn["correction_nm"], [[0.06, 0.05], [0.11, 0.1]])
    assert drawn["columns"].tolist() == [120, 130, 121] and drawn["latents"] is False


def test_replay_report_needs_results_and_a_png(tmp_path):
    r = stem_live("replay", "x.tif", "--report", str(tmp_path / "r.png"))
    assert r.returncode == 2 and "--results" in r.stderr and "Traceback" not in r.stderr
    r = stem_live("replay", "x.tif", "--results", str(tmp_path / "r.npz"), "--report", str(tmp_path / "r.jpg"))
    assert r.returncode == 2 and ".png" in r.stderr and "Traceback" not in r.stderr

