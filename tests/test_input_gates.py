"""Issue 26, items 1-4: input gates, lost frames, truncated files, memory estimates, waits that
say what they wait for, silence that disarms, one-line errors, --help defaults, outputs in the
current folder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from stem_live import cli
from stem_live.engine import Engine, EngineConfig, FrameRefused, frame_problem
from stem_live.protocol import Command, Frame, Maps

ENV = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}


def _port() -> str:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"tcp://127.0.0.1:{port}"


def _lattice(shift=(0.0, 0.0), size: int = 96, seed: int = 0) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size].astype(np.float64)
    img = 100 + 50 * (np.cos(2 * np.pi * (yy - shift[0]) / 8) + np.cos(2 * np.pi * (xx - shift[1]) / 8))
    return np.random.default_rng(seed).poisson(img).astype(np.float32)


def _frame(seq: int, image: np.ndarray) -> Frame:
    return Frame(seq=seq, image=image, t_start=seq * 0.1, pixel_size_nm=(0.02, 0.02), dwell_us=1.0, flyback_us=10.0)


def _stderr_lines(capsys) -> list[str]:
    return [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]


# ----------------------------------------------------------------------------- done-when


def test_replay_of_an_rgb_npy_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.save("rgb.npy", np.random.default_rng(0).integers(0, 255, (400, 380, 3)).astype(np.uint8))
    rc = cli.main(["replay", "rgb.npy", "--pixel-size-nm", "0.01", "--dwell-us", "2", "--flyback-us", "50"])
    lines = _stderr_lines(capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert lines[0].startswith("stem-live: error: rgb.npy") and "colour (RGB)" in lines[0] and "(400, 380, 3)" in lines[0]


def test_record_with_nothing_publishing_is_one_line_and_leaves_no_file(tmp_path, capsys):
    out = tmp_path / "out.tif"
    t0 = time.monotonic()
    rc = cli.main(["record", str(out), "--timeout", "1", "--frames-endpoint", _port()])
    lines = _stderr_lines(capsys)
    assert rc == 2 and len(lines) == 1, lines
    assert "no frame arrived from tcp://127.0.0.1:" in lines[0] and "in 1 s" in lines[0] and "stem-live serve" in lines[0]
    assert not out.exists()
    assert time.monotonic() - t0 < 5


def test_run_with_nothing_publishing_says_it_is_waiting_within_3_s():
    frames, maps, commands = _port(), _port(), _port()
    p = subprocess.Popen([sys.executable, "-m", "stem_live.cli", "run", "--frames-endpoint", frames,
                          "--maps-endpoint", maps, "--commands-endpoint", commands],
                         stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        start_line = p.stderr.readline()  # after the imports: the engine's start line
        t0 = time.monotonic()
        waiting = p.stderr.readline()
        assert start_line.startswith("engine: frames from"), start_line
        assert waiting.startswith(f"waiting for frames from {frames} ("), waiting
        assert time.monotonic() - t0 < 3.0
    finally:
        p.send_signal(signal.SIGINT)
        p.communicate(timeout=30)
    assert p.returncode == 0


# ----------------------------------------------------------------------------- input gates


@pytest.mark.parametrize("image, words", [
    (np.zeros((64, 64, 3), np.uint8), "not a 2-D image"),
    (np.ones((16, 64), np.uint16), "smaller than 32 px"),
    (np.full((64, 64), np.nan, np.float32), "NaN"),
    (np.full((64, 64), 7, np.uint16), "constant (every pixel 7)"),
])
def test_frame_problem_names_the_reason(image, words):
    assert words in frame_problem(image)


def test_engine_refuses_bad_frames_and_goes_on():
    eng = Engine(EngineConfig())
    with pytest.raises(FrameRefused, match="frame 0 refused: constant"):
        eng.process(_frame(0, np.zeros((64, 64), np.float32)))
    assert eng.frames == 0
    assert frame_problem(_lattice()) is None
    r = eng.process(_frame(1, _lattice()))
    assert eng.frames == 1 and not r.lost


def test_a_registration_without_a_significant_match_is_a_lost_frame():
    eng = Engine(EngineConfig(min_peak=0.3))
    eng.arm()
    eng.process(_frame(0, _lattice()))
    good = eng.process(_frame(1, _lattice((0.5, 0.0), seed=1)))
    assert not good.lost and good.drift_nm[0] == pytest.approx(0.5 * 0.02, abs=0.004)
    samples = len(eng._hist)
    noise = np.random.default_rng(5).poisson(100, (96, 96)).astype(np.float32)
    lost = eng.process(_frame(2, noise))
    assert lost.lost and not lost.locked and lost.peak < 0.3
    assert lost.correction is None
    assert np.array_equal(lost.drift_nm, good.drift_nm)  # the last measurement, not a new one
    assert len(eng._hist) == samples


def test_small_frames_and_stacks_of_images_are_refused_by_the_readers(tmp_path):
    from stem_live.io import RecordError, read_frames, read_images
    from stem_live.io.metadata import MIN_ANALYSIS_SIDE

    p = tmp_path / "small.npy"
    np.save(p, np.ones((3, 16, 16), np.uint16))
    with pytest.raises(RecordError, match=r"frame sides must be in \[32, 16384\] px, got \(16, 16\)"):
        read_images(p, min_side=MIN_ANALYSIS_SIDE)
    assert read_images(p).shape == (3, 16, 16)  # plain reading keeps small frames
    rgb = tmp_path / "rgba.npy"
    np.save(rgb, np.zeros((2, 40, 40, 4), np.uint16))
    with pytest.raises(RecordError, match="colour"):
        read_frames(rgb, pixel_size_nm=0.1, dwell_us=1, flyback_us=0)


def _recording(path, n: int = 20) -> None:
    from stem_live.io import StackWriter

    with StackWriter(path) as w:
        for i in range(n):
            w.write(_frame(i, _lattice((0.1 * i, 0.0), size=64, seed=i).astype(np.uint16)))


def test_a_truncated_recording_says_where_it_ends(tmp_path, caplog):
    from stem_live.io import read_frames

    full = tmp_path / "rec.tif"
    _recording(full)
    cut = tmp_path / "cut.tif"
    data = full.read_bytes()
    cut.write_bytes(data[:len(data) // 2])
    said: list[str] = []
    n = sum(1 for _ in read_frames(cut, on_truncated=said.append))
    assert 5 <= n < 20 and len(said) == 1
    assert said[0].startswith(f"cut.tif is truncated: it ends after {n} complete frame(s) (page {n + 1} is cut off")
    assert not said.clear() and sum(1 for _ in read_frames(full, on_truncated=said.append)) == 20 and not said

    caplog.clear()
    assert cli.main(["replay", str(cut)]) == 0  # the warning is logged (stderr: "stem-live: WARNING: ...")
    warn = [r for r in caplog.records if "truncated" in r.getMessage()]
    assert len(warn) == 1 and warn[0].levelname == "WARNING" and f"ends after {n} complete frame(s)" in warn[0].getMessage()


# ----------------------------------------------------------------------------- memory


def test_work_that_cannot_fit_is_refused_with_the_estimate(tmp_path, capsys, monkeypatch):
    from stem_live.cli import common
    from stem_live.cli.common import UserError, check_memory

    with pytest.raises(UserError, match=r"x needs about 2\.0 GB of memory, 1\.0 GB is available: do less"):
        check_memory(2 * 10**9, "x", "do less", available=10**9)
    check_memory(10**9, "x", "do less", available=2 * 10**9)
    assert common.available_bytes() > 10**8

    monkeypatch.setattr(common, "available_bytes", lambda: 10**9)
    assert cli.main(["evaluate", "--size", "8192", "--frames", "2"]) == 2
    (line,) = _stderr_lines(capsys)
    assert "evaluate --size 8192 needs about 6.7 GB of memory, 1.0 GB is available: use a smaller --size" in line

    monkeypatch.chdir(tmp_path)
    np.save("lat.npy", _lattice(size=256).astype(np.uint16))
    assert cli.main(["locate", "lat.npy", "--spacing-px", "5000"]) == 2
    (line,) = _stderr_lines(capsys)
    assert "--spacing-px 5000 leaves fewer than 2 columns across the 256 px image" in line
    assert not list(tmp_path.glob("*.csv"))


# ----------------------------------------------------------------------------- messages and outputs


def test_argparse_errors_are_one_line():
    r = subprocess.run([sys.executable, "-m", "stem_live.cli", "replay", "x.npy", "--dwell-us", "-1"],
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip() == ("stem-live replay: error: argument --dwell-us: -1 must be positive "
                                "(see stem-live replay --help)")


def test_help_shows_the_defaults_and_units(capsys):
    for argv, wanted in [(["serve", "--help"], ["NM", "safety limit: largest beam move per correction, nm (default: 0.5)",
                                                "(default: 10.0)"]),
                         (["record", "--help"], ["(default: wait until Ctrl-C)"]),
                         (["demo", "--help"], ["(default: 1.0)", "electrons per square angstrom (default: the preset's"]),
                         (["bench", "--help"], ["in seconds", "(default: 10.0)"])]:
        with pytest.raises(SystemExit):
            cli.main(argv)
        text = " ".join(capsys.readouterr().out.split())
        for w in wanted:
            assert w in text, (argv, w)


def test_locate_writes_into_the_current_folder(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "lat.npy", _lattice(size=128).astype(np.uint16))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    import stem_live.locate
    from stem_live.locate.columns import Columns

    def fake_locate(img, spacing, **kw):  # where the files go is the question here, not the fit (compiling takes 20 s)
        n = 3
        return Columns(positions=np.full((n, 2), 10.0), klass=np.zeros(n), intensity=np.ones(n),
                       confidence=np.ones(n), border=np.zeros(n, bool))

    monkeypatch.setattr(stem_live.locate, "locate_classical", fake_locate)
    assert cli.main(["locate", str(data / "lat.npy"), "--spacing-px", "8"]) == 0
    assert (work / "lat_columns.csv").is_file() and (work / "lat_columns.png").is_file()
    assert sorted(p.name for p in data.iterdir()) == ["lat.npy"]
    assert cli.main(["locate", str(data / "lat.npy"), "--locator", "unet", "--weights", "nope.msgpack"]) == 2
    line = _stderr_lines(capsys)[-1]
    assert "stem-live train-locator" in line and "python -m" not in line


# ----------------------------------------------------------------------------- the live service


@pytest.fixture
def service():
    from stem_live.service import EngineService

    svc = EngineService(Engine(EngineConfig()), frames_endpoint=_port(), corrections_endpoint=_port(),
                        maps_endpoint="tcp://127.0.0.1:*", commands_endpoint="tcp://127.0.0.1:*")
    yield svc
    svc.stop()


def test_a_refused_live_frame_is_counted_and_the_stream_goes_on(service):
    service._work_on(None, _frame(0, np.zeros((64, 64, 3), np.uint8)[..., 0]), time.perf_counter())
    assert service.counters.refused == 1 and service.counters.processed == 0
    assert "frame 0 refused: constant" in service.counters.as_dict()["last_refused"]


def test_silence_disarms_says_so_and_rearms_only_on_command(service):
    assert service.waiting().startswith(f"waiting for frames from {service.frames_endpoint} (")
    service.engine.arm()
    service._last_frame_at = time.monotonic() - 1.0
    service._check_silence()
    assert service.waiting() is None and service.engine.armed  # 1 s: not yet
    service._last_frame_at = time.monotonic() - 2.2
    service._check_silence()
    assert not service.engine.armed and "DISARMED" in service.banner
    assert service.waiting().startswith(f"no frames from {service.frames_endpoint} for 2 s; correction DISARMED")
    assert service.status()["banner"] == service.banner
    service._last_frame_at = time.monotonic()  # frames are back: still disarmed
    service._check_silence()
    assert not service.engine.armed and service.banner
    reply = service.handle(Command("arm"))
    assert reply.ok and service.engine.armed and service.banner == "" and reply.state["banner"] == ""


def test_silence_limit_is_3_frame_times_for_slow_frames(service):
    service._frame_interval_s = 1.5
    assert service.silence_limit_s() == pytest.approx(4.5)
    service._frame_interval_s = 0.1
    assert service.silence_limit_s() == 2.0


def test_the_monitor_shows_the_banner(qtbot):
    pytest.importorskip("pytestqt")
    import zmq

    from stem_live.monitor.window import MonitorWindow

    ctx = zmq.Context()
    win = MonitorWindow("tcp://127.0.0.1:9", "tcp://127.0.0.1:9", context=ctx)
    win.show()
    try:
        assert not win.banner.isVisible()
        win.on_maps([Maps(seq=3, metrics={"armed": 0.0}, info={"heartbeat": True, "banner": "frames stopped"})])
        assert win.banner.isVisible() and win.banner.text() == "frames stopped"
        assert win.armed_label.text() == "disarmed" and not win._pending
        win.on_maps([Maps(seq=4, info={"banner": ""})])
        assert not win.banner.isVisible()
    finally:
        win.shutdown()
        win.close()
        ctx.term()
