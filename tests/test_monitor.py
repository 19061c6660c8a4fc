"""The Qt monitor against a real engine fed by the simulator, over loopback sockets (offscreen Qt)."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")

import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("pyqtgraph")
pytest.importorskip("qtpy")
pytest.importorskip("pytestqt")

import zmq  # noqa: E402
from qtpy.QtCore import Qt  # noqa: E402
from qtpy.QtGui import QImage  # noqa: E402

from instrument_adapters.bridge import Bridge  # noqa: E402
from instrument_adapters.simulated import SimulatedInstrument  # noqa: E402
from simulator import DriftConfig, MicroscopeConfig  # noqa: E402
from stem_live.engine import Engine  # noqa: E402
from stem_live.protocol import Maps  # noqa: E402
from stem_live.service import EngineService  # noqa: E402

ANY = "tcp://127.0.0.1:*"
SIZE = 128


class Loop:
    """Simulator bridge + engine service on free loopback ports (as in test_service), own context."""

    def __init__(self, speed: float = 4.0) -> None:
        self.ctx = zmq.Context()
        cfg = MicroscopeConfig(preset="graphene", size=SIZE, seed=3, drift=DriftConfig(drift_nm_per_min=30.0))
        self.inst = SimulatedInstrument(cfg, speed=speed)
        self.bridge = Bridge(self.inst, frames_endpoint=ANY, corrections_endpoint=ANY, context=self.ctx)
        self.engine = Engine()
        self.svc = self.new_service(ANY, ANY)

    def new_service(self, maps: str, commands: str) -> EngineService:
        return EngineService(self.engine, frames_endpoint=self.bridge.frames_endpoint,
                             corrections_endpoint=self.bridge.corrections_endpoint, maps_endpoint=maps,
                             commands_endpoint=commands, context=self.ctx)

    def __enter__(self) -> "Loop":
        self.svc.start()
        time.sleep(0.2)  # let the SUB connect before the first frame
        self.bridge.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bridge.stop(restore=True)
        self.svc.stop()
        self.ctx.term()


@pytest.fixture(autouse=True)
def no_panel_errors(caplog):
    """Panels log and swallow their exceptions (the window must survive); in tests, any is a failure."""
    yield
    errors = [r for r in caplog.records if r.name.startswith("stem_live.monitor") and r.levelname == "ERROR"]
    assert not errors, [r.getMessage() for r in errors]


@pytest.fixture
def loop():
    with Loop() as lp:
        yield lp


@pytest.fixture
def window(qtbot, loop):
    from stem_live.monitor.window import MonitorWindow

    win = MonitorWindow(loop.svc.maps_endpoint, loop.svc.commands_endpoint, context=loop.ctx,
                        stale_s=1.0, command_timeout_s=1.5)
    win.resize(1200, 800)
    win.show()
    yield win
    win.shutdown()  # before the context is terminated
    win.close()


def _wait_frames(qtbot, win, n: int, timeout_ms: int = 15000) -> None:
    start = win.frame_panel.frames_shown
    qtbot.waitUntil(lambda: win.frame_panel.frames_shown >= start + n, timeout=timeout_ms)


def _grey(img: QImage) -> np.ndarray:
    img = img.convertToFormat(QImage.Format_Grayscale8)
    w, h, bpl = img.width(), img.height(), img.bytesPerLine()
    return np.frombuffer(img.constBits(), np.uint8, count=h * bpl).reshape(h, bpl)[:, :w].astype(float)


# ----------------------------------------------------------------------------- tests


def test_panels_fill_from_a_live_engine(qtbot, loop, window):
    _wait_frames(qtbot, window, 3)
    qtbot.waitUntil(lambda: len(window.drift_panel) >= 8, timeout=10000)
    m = window.last_maps
    img = window.frame_panel.image.image
    assert img.shape == m.arrays["preview"].shape == (SIZE, SIZE)
    assert np.std(img) > 0
    assert window.frame_panel.has_data and window.drift_panel.has_data
    # nothing sends these yet: their panels wait instead of failing
    assert not window.distortion_panel.has_data and not window.latent_panel.has_data
    t, d = window.drift_panel.curves[0].getData()
    assert len(t) >= 8 and np.isfinite(d).all() and np.all(np.diff(t) >= 0)
    qtbot.waitUntil(lambda: (m := window.last_maps).metrics.get("fps", 0) > 0, timeout=5000)
    fps = float(window.fps_label.text().split()[0])
    assert fps > 0
    assert "live" in window.conn_label.text() and "p50" in window.latency_label.text()


def test_controls_change_engine_state(qtbot, loop, window, tmp_path):
    ctl = window.controls
    _wait_frames(qtbot, window, 2)
    qtbot.mouseClick(ctl.arm_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: loop.engine.armed, timeout=3000)
    qtbot.waitUntil(lambda: window.armed_label.text() == "ARMED", timeout=3000)
    qtbot.mouseClick(ctl.disarm_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not loop.engine.armed, timeout=3000)

    ctl.gain_spin.setValue(0.35)
    qtbot.mouseClick(ctl.gain_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: loop.engine.config.gain == pytest.approx(0.35), timeout=3000)

    qtbot.waitUntil(lambda: loop.engine.frames >= 5, timeout=10000)
    before = loop.engine.frames
    qtbot.mouseClick(ctl.reset_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: window.last_reply is not None and window.last_reply.cmd == "reset", timeout=3000)
    assert window.last_reply.ok and window.last_reply.state["frames"] < min(before, 3)

    ctl.record_path.setText(str(tmp_path / "rec.tif"))
    qtbot.mouseClick(ctl.record_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: loop.svc.recorder.active, timeout=3000)
    qtbot.waitUntil(lambda: loop.svc.recorder.frames >= 2, timeout=5000)
    qtbot.mouseClick(ctl.stop_record_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: not loop.svc.recorder.active, timeout=3000)
    assert (tmp_path / "rec.tif").stat().st_size > 0

    qtbot.mouseClick(ctl.train_button, Qt.LeftButton)  # not in this engine version: the refusal is shown
    qtbot.waitUntil(lambda: window.last_reply.cmd == "train", timeout=3000)
    if not window.last_reply.ok:
        assert "train" in window.reply_label.text() and window.last_reply.message in ctl.log.toPlainText()

    # closing the window sends nothing and never stops acquisition
    qtbot.mouseClick(ctl.arm_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: loop.engine.armed, timeout=3000)
    window.close()
    n = loop.svc.counters.processed
    time.sleep(0.3)
    assert loop.engine.armed and loop.svc.counters.processed > n


def test_window_survives_engine_restart(qtbot, loop, window):
    _wait_frames(qtbot, window, 2)
    maps_ep, cmd_ep = loop.svc.maps_endpoint, loop.svc.commands_endpoint
    loop.svc.stop()
    old_seq = window.client.last_seq
    qtbot.waitUntil(lambda: not window.responding, timeout=5000)
    assert "not responding" in window.conn_label.text()
    # a command to a dead engine times out; the REQ socket is recreated
    window.controls.status_button.click()
    qtbot.waitUntil(lambda: window.last_reply is not None and "no reply" in window.last_reply.message, timeout=5000)
    assert not window.last_reply.ok and window.client.timeouts == 1

    t0 = time.monotonic()
    while True:  # the old sockets' ports are released asynchronously
        try:
            loop.svc = loop.new_service(maps_ep, cmd_ep)
            break
        except RuntimeError:
            assert time.monotonic() - t0 < 5, "could not rebind the engine's endpoints"
            time.sleep(0.1)
    loop.svc.start()
    qtbot.waitUntil(lambda: window.responding and window.client.last_seq > old_seq, timeout=10000)
    assert "live" in window.conn_label.text()
    window.controls.status_button.click()
    qtbot.waitUntil(lambda: window.last_reply.ok and window.last_reply.cmd == "status", timeout=5000)


def test_screenshot_shows_the_lattice(qtbot, loop, window, tmp_path):
    _wait_frames(qtbot, window, 4)
    path = tmp_path / "monitor.png"
    assert window.grab().save(str(path))
    shot = _grey(QImage(str(path)))
    assert shot.shape[0] >= 700 and shot.std() > 20

    # the frame panel's image, cropped from the saved PNG by where the image sits on screen
    fp = window.frame_panel
    rect = fp.view.mapFromScene(fp.image.sceneBoundingRect()).boundingRect().intersected(fp.view.viewport().rect())
    top_left = fp.view.viewport().mapTo(window, rect.topLeft())
    crop = shot[top_left.y() + 2: top_left.y() + rect.height() - 2, top_left.x() + 2: top_left.x() + rect.width() - 2]
    side = min(crop.shape)
    assert side > 200, crop.shape
    crop = crop[:side, :side]
    g = (crop - crop.mean()) * np.outer(np.hanning(side), np.hanning(side))
    spec = np.abs(np.fft.fftshift(np.fft.fft2(g)))
    yy, xx = np.indices(spec.shape) - side // 2
    r = np.hypot(yy, xx)
    ring = (r > 3) & (r < side // 4)
    peak = spec[ring].max()
    assert peak > 20 * np.median(spec[ring]), (peak, np.median(spec[ring]))
    # the strongest peak sits at the graphene {100} spacing, d = a*sqrt(3)/2 with a = 0.246 nm
    m = window.last_maps
    field_nm = m.arrays["preview"].shape[1] * m.info["preview_step"] * m.info["pixel_size_nm"][1]
    expected = field_nm / (0.246 * np.sqrt(3) / 2)  # cycles across the image
    r_peak = r[ring][np.argmax(spec[ring])]
    assert abs(r_peak - expected) < 0.2 * expected, (r_peak, expected)


def test_contrast_levels_persist_until_auto(qtbot, loop, window):
    fp = window.frame_panel
    _wait_frames(qtbot, window, 1)
    fp.hist.setLevels(5.0, 17.0)  # what dragging the histogram's region does
    assert fp.levels() == pytest.approx((5.0, 17.0))
    _wait_frames(qtbot, window, 3)
    assert fp.levels() == pytest.approx((5.0, 17.0))
    qtbot.mouseClick(fp.auto_button, Qt.LeftButton)
    lo, hi = fp.levels()
    assert (lo, hi) != pytest.approx((5.0, 17.0)) and hi > lo


def test_panels_tolerate_missing_unknown_and_malformed_data(qtbot):
    """No engine at all: the window starts, waits, and digests whatever maps it is given."""
    from stem_live.monitor.window import MonitorWindow

    ctx = zmq.Context()
    win = MonitorWindow("tcp://127.0.0.1:9", "tcp://127.0.0.1:9", context=ctx)
    win.show()

    def feed(batch):
        win.on_maps(batch)
        win.flush()

    try:
        panels = (win.frame_panel, win.drift_panel, win.distortion_panel, win.latent_panel)
        feed([Maps(seq=1)])
        assert not any(p.has_data for p in panels)
        assert "waiting for" in win.frame_panel.waiting.text()
        bad = {"preview": np.zeros(5, np.float32), "drift_nm": np.zeros(3), "columns": np.zeros((4,), np.float32),
               "line_distortion_nm": np.zeros((4, 3)), "latent_2": np.zeros(3), "gp_t": np.zeros(2)}
        feed([Maps(seq=2, arrays=bad, metrics={"fps": None}, info={"t_mid": "soon"})])
        assert not any(p.has_data for p in panels)

        rng = np.random.default_rng(0)
        n = 40
        arrays = {
            "preview": rng.random((64, 80)).astype(np.float32),
            "columns": np.c_[rng.random((30, 2)) * 60, rng.integers(0, 3, 30)].astype(np.float32),
            "drift_nm": np.array([0.1, -0.2]), "correction_nm": np.array([0.05, -0.1]),
            "gp_t": np.linspace(0, 1, n), "gp_mean_nm": rng.random((n, 2)), "gp_sigma_nm": np.full((n, 2), 0.01),
            "line_distortion_nm": rng.normal(size=(64, 2)) * 0.01,
            "latent_angle": rng.random((16, 20)), "latent_0": rng.random((16, 20)), "latent_1": rng.random((16, 20)),
            "latent_scatter": rng.normal(size=(200, 2)),
            "something_new": np.zeros((2, 2, 2)),
        }
        info = {"t_mid": 1.0, "preview_step": 2, "pixel_size_nm": [0.01, 0.01]}
        feed([Maps(seq=3 + k, arrays=arrays, info={**info, "t_mid": 1.0 + k}, metrics={"fps": 9.5, "armed": 1.0})
              for k in range(3)])
        assert all(p.has_data for p in panels[:3])
        assert not win.latent_panel.has_data  # a background tab draws when it is brought forward
        win.tabs.setCurrentWidget(win.latent_panel)
        assert win.latent_panel.has_data
        assert len(win.drift_panel) == 3 and win.frame_panel.n_columns == 30
        assert set(win.latent_panel.images) == {"latent_angle", "latent_0", "latent_1"}
        assert win.latent_panel.scatter is not None
        assert win.armed_label.text() == "ARMED" and win.fps_label.text().startswith("9.5")
        feed([Maps(seq=9, arrays={"drift_nm": np.zeros(2)}, info={"t_mid": 0.5})])  # time went back
        assert len(win.drift_panel) == 1
    finally:
        win.shutdown()
        win.close()
        ctx.term()


def test_entry_points():
    from stem_live.monitor import main

    assert main(["--maps", "not-an-endpoint", "--commands", "tcp://127.0.0.1:9"]) == 2
    # `import stem_live` (and the monitor package itself) pulls in no Qt
    code = ("import sys, stem_live, stem_live.monitor; "
            "sys.exit(any(m.split('.')[0] in ('PySide6', 'qtpy', 'pyqtgraph') for m in sys.modules))")
    assert subprocess.run([sys.executable, "-c", code], timeout=30).returncode == 0
