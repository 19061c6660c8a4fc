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

    def __init__(self, speed: float = 4.0, *, engine: Engine | None = None, size: int = SIZE,
                 drift_nm_per_min: float = 30.0) -> None:
        self.ctx = zmq.Context()
        cfg = MicroscopeConfig(preset="graphene", size=size, seed=3,
                               drift=DriftConfig(drift_nm_per_min=drift_nm_per_min))
        self.inst = SimulatedInstrument(cfg, speed=speed)
        self.bridge = Bridge(self.inst, frames_endpoint=ANY, corrections_endpoint=ANY, context=self.ctx)
        self.engine = Engine() if engine is None else engine
        self.svc = self.new_service(ANY, ANY)

    def new_service(self, maps: str, commands: str) -> EngineService:
        return EngineService(self.engine, frames_endpoint=self.bridge.frames_endpoint,
                             corrections_endpoint=self.bridge.corrections_endpoint, maps_endpoint=maps,
                             commands_endpoint=commands, context=self.ctx)

    def __enter__(self) -> Loop:
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


def _open_window(loop, *, stale_s: float, command_timeout_s: float):
    """A shown monitor window on ``loop``'s engine; yields it, then shuts it down."""
    from stem_live.monitor.window import MonitorWindow

    win = MonitorWindow(loop.svc.maps_endpoint, loop.svc.commands_endpoint, context=loop.ctx,
                        stale_s=stale_s, command_timeout_s=command_timeout_s)
    win.resize(1200, 800)
    win.show()
    yield win
    win.shutdown()  # before the context is terminated
    win.close()


@pytest.fixture
def window(qtbot, loop):
    yield from _open_window(loop, stale_s=1.0, command_timeout_s=1.5)


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
    qtbot.waitUntil(lambda: window.last_maps.metrics.get("fps", 0) > 0, timeout=5000)
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

    qtbot.mouseClick(ctl.train_button, Qt.LeftButton)  # this (rigid) engine has nothing to train: the refusal is shown
    qtbot.waitUntil(lambda: window.last_reply.cmd == "train", timeout=3000)
    if not window.last_reply.ok:
        assert "train" in window.reply_label.text() and window.last_reply.message in ctl.log.toPlainText()
    assert ctl.rvae_label.text().startswith("rVAE: none")  # a rigid engine has no rVAE stage

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


# ----------------------------------------------------------------------------- gp model + rVAE

GP_SIZE = 136  # about 70 columns: the rVAE's 64/256 buckets and the locator's padded sizes hold them
# 10 frames of 136 lines are about 400 GP sample groups: within the GP's smallest padded size, so
# nothing recompiles mid-test (a recompilation stalls the frame loop for 10-20 s on this CPU)
GP_CONFIG = dict(model="gp", gp_window_frames=10)


@pytest.fixture(scope="module")
def rvae_params():
    """Small random rVAE params; the gp pipeline at GP_SIZE and the small model's training step
    compiled once beforehand (the first gp frame of a process compiles for 20-40 s on 2 cores)."""
    from simulator import Microscope
    from stem_live.engine import EngineConfig
    from stem_live.lab.evaluate import frame_from_sim
    from stem_live.rvae.live import LiveEncoder, OnlineTrainer
    from stem_live.rvae.model import RVAEConfig, init_params

    eng = Engine(EngineConfig(**GP_CONFIG))
    scope = Microscope(MicroscopeConfig(preset="graphene", size=GP_SIZE, seed=5))
    for _ in range(2):
        image, meta, _truth = scope.acquire()
        eng.process(frame_from_sim(image, meta))
    cfg = RVAEConfig(patch_size=16, latent_dim=2, encoder_features=(8, 16), encoder_dense=32,
                     decoder_hidden=(32, 64), canvas_size=16)
    params = init_params(cfg, seed=0)
    trainer = OnlineTrainer(LiveEncoder(params, (64, 256)), params, capacity=64, batch_size=32)
    trainer.add(np.random.default_rng(0).normal(size=(64, 16, 16)))
    trainer.fine_tune(1, block=True)
    return params


@pytest.fixture
def gp_loop(rvae_params):
    from stem_live.engine import EngineConfig
    from stem_live.rvae.stage import RvaeStage

    stage = RvaeStage(rvae_params, buckets=(64, 256), batch_size=32, min_patches=64, steps=30)
    assert stage.wait_ready(30)
    engine = Engine(EngineConfig(**GP_CONFIG), rvae=stage)
    with Loop(speed=1.0, engine=engine, size=GP_SIZE, drift_nm_per_min=1.5) as lp:
        lp.results = {}  # seq -> FrameResult, the newest 200
        lp.first_truth = None

        def keep(frame, result) -> None:
            if lp.first_truth is None:
                lp.first_truth = lp.inst.truth_for(lp.svc.first_seq)  # the first frame received
            lp.results[frame.seq] = result
            for s in sorted(lp.results)[:-200]:
                del lp.results[s]

        lp.svc.on_result = keep
        lp.encoded = {}  # seq -> FrameResult with latents (the service encodes in its own thread)
        encode = engine.encode

        def keep_encoded(frame, result, *, between=None):
            out = encode(frame, result, between=between)
            lp.encoded[frame.seq] = out
            for s in sorted(lp.encoded)[:-200]:
                del lp.encoded[s]
            return out

        engine.encode = keep_encoded
        yield lp
    stage.close()


@pytest.fixture
def gp_window(qtbot, gp_loop):
    yield from _open_window(gp_loop, stale_s=3.0, command_timeout_s=3.0)


def _spacing(pos: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    return float(np.median(cKDTree(pos).query(pos, 2)[0][:, 1]))


def test_gp_engine_fills_columns_gp_band_distortion_and_latents(qtbot, gp_loop, gp_window):
    from stem_live.lab.evaluate import match_columns

    win, lp = gp_window, gp_loop
    qtbot.waitUntil(lambda: win.distortion_panel.has_data and win.drift_panel.gp is not None
                    and len(win.drift_panel) >= 5 and win.frame_panel.n_columns > 0, timeout=20000)

    # live frame: the columns drawn are the engine's columns of that frame, and the true ones
    m = win.last_maps
    res = lp.results[m.seq]
    truth = lp.inst.truth_for(m.seq)
    assert win.frame_panel.last_seq == m.seq and win.frame_panel.n_columns == len(res.columns.positions)
    xy = [item.getData() for item in win.frame_panel.column_items]
    drawn = np.concatenate([np.column_stack([y, x]) for x, y in xy if len(x)]) - 0.5  # (row, col)
    assert len(drawn) == win.frame_panel.n_columns
    tp = truth.columns_px
    ti, fi = match_columns(tp, drawn, 0.3 * _spacing(tp))
    rmse = float(np.sqrt(np.mean(np.sum((tp[ti] - drawn[fi]) ** 2, axis=1))))
    print(f"columns drawn {len(drawn)}, true {len(tp)}, matched {len(ti)}, rmse {rmse:.2f} px")
    assert len(ti) >= 0.9 * len(tp) and len(fi) >= 0.85 * len(drawn) and rmse < 0.6

    # drift trace: GP mean +- 2 sigma, finite widths, in the same origin as the rigid drift trace
    gt, gm, gs = win.drift_panel.gp
    assert len(gt) == len(gm) == len(gs) == min(128, GP_SIZE) and np.all(np.diff(gt) > 0)
    assert np.isfinite(gm).all() and np.isfinite(gs).all() and np.all(gs > 0) and np.all(gs < 0.2), gs.max()
    t0 = win.drift_panel.t0
    for k in range(2):
        lo, hi, _ = win.drift_panel.bands[k]
        tl, yl = lo.getData()
        th, yh = hi.getData()
        np.testing.assert_allclose(tl, gt - t0)
        np.testing.assert_allclose(yh - yl, 4 * gs[:, k])
        np.testing.assert_allclose(win.drift_panel.gp_curves[k].getData()[1], gm[:, k])
    # the GP mean at the frame's middle agrees with the rigid estimate of the same frame (the
    # service shifts the GP's beam-shift-space mean by the first frame's beam shift)
    t_mid = m.info["t_mid"]
    gp_at_mid = np.array([np.interp(t_mid, gt, gm[:, k]) for k in range(2)])
    rigid = m.arrays["drift_nm"]
    true_motion = truth.drift_nm.mean(0) - lp.first_truth.drift_nm.mean(0)
    print(f"drift at t_mid: GP {gp_at_mid} rigid {rigid} true motion since the first frame {true_motion} nm")
    assert np.abs(gp_at_mid - rigid).max() < 0.03
    assert np.abs(gp_at_mid - true_motion).max() < 0.03  # 1.5 nm/min: far from a lattice alias

    # distortion: the modelled drift at every line of the frame minus its mean
    dist = m.arrays["line_distortion_nm"]
    assert dist.shape == (GP_SIZE, 2) and np.abs(dist.mean(0)).max() < 1e-9
    for k in range(2):
        rows, v = win.distortion_panel.curves[k].getData()
        np.testing.assert_allclose(rows, np.arange(GP_SIZE))
        np.testing.assert_allclose(v, dist[:, k])
    true_lines = truth.drift_nm - truth.drift_nm.mean(0)
    err = dist - true_lines
    print(f"per-line: rms true {np.sqrt((true_lines ** 2).mean(0)) * 1e3} pm, rms error "
          f"{np.sqrt((err ** 2).mean(0)) * 1e3} pm")
    assert np.sqrt((err ** 2).mean()) < 0.003  # measured 0.8 pm (the true x motion: 3.5 pm rms, 50 Hz)

    # latents: the tab draws when it is brought forward; maps of the preview's size, the scatter
    win.tabs.setCurrentWidget(win.latent_panel)
    qtbot.waitUntil(lambda: win.latent_panel.has_data, timeout=5000)
    lpan = win.latent_panel
    m = win.last_maps
    # the latents come from the rVAE thread (maps painted at most 2 a second): of this frame or
    # of one encoded a little before
    seq = lpan.shown_seq
    assert lpan.info.text().startswith(f"seq {seq}") and seq <= m.seq and seq in lp.encoded
    res = lp.encoded[seq]
    assert set(lpan.images) == {"latent_angle", "latent_0", "latent_1"}
    cols = res.columns.positions
    n = len(cols)
    sx, sy = lpan.scatter.getData()
    np.testing.assert_allclose(np.column_stack([sx, sy]), res.latents["content"][:, :2], rtol=1e-5, atol=1e-6)
    assert len(sx) == n and abs(n - len(lp.inst.truth_for(seq).columns_px)) <= 0.15 * n
    for name, img in lpan.images.items():
        a = img.image
        assert a.shape == m.arrays["preview"].shape
        covered = np.isfinite(a).mean()
        assert 0.3 < covered < 0.95, (name, covered)
    ang = lpan.images["latent_angle"].image
    assert np.nanmin(ang) >= -np.pi - 1e-6 and np.nanmax(ang) <= np.pi + 1e-6
    # at every column's own pixel each map shows that column's value
    r = np.rint(cols / m.info["preview_step"]).astype(int)
    inside = (r[:, 0] >= 0) & (r[:, 0] < GP_SIZE) & (r[:, 1] >= 0) & (r[:, 1] < GP_SIZE)
    for j, name in enumerate(("latent_0", "latent_1")):
        got = lpan.images[name].image[r[inside, 0], r[inside, 1]]
        np.testing.assert_allclose(got, res.latents["content"][inside, j], rtol=1e-5, atol=1e-6)
    got = ang[r[inside, 0], r[inside, 1]]
    np.testing.assert_allclose(got, res.latents["angle"][inside], rtol=1e-5, atol=1e-6)


def test_train_control_reaches_the_gp_engine_and_status_shows_the_rvae(qtbot, gp_loop, gp_window):
    win, lp = gp_window, gp_loop
    ctl = win.controls
    stage = lp.engine.rvae
    qtbot.waitUntil(lambda: len(stage.trainer) >= stage.min_patches, timeout=20000)
    qtbot.waitUntil(lambda: win.last_reply is not None and win.last_reply.cmd == "status", timeout=5000)
    assert "rVAE v0: encoding" in ctl.rvae_label.text() and "given params" in ctl.rvae_label.text()
    qtbot.mouseClick(ctl.train_button, Qt.LeftButton)
    qtbot.waitUntil(lambda: win.last_reply.cmd == "train", timeout=5000)
    rep = win.last_reply
    assert rep.ok and "fine-tuning started: 30 steps" in rep.message, rep.message
    assert rep.message in ctl.log.toPlainText() and "train" in win.reply_label.text()
    st = rep.state["rvae"]
    assert st["origin"] == "given params" and (st["training"] or st["version"] == 1)
    qtbot.waitUntil(lambda: stage.version == 1, timeout=15000)
    n = lp.svc.counters.processed
    ctl.status_button.click()
    qtbot.waitUntil(lambda: win.last_reply.cmd == "status" and win.last_reply.state["rvae"]["version"] == 1,
                    timeout=5000)
    st = win.last_reply.state["rvae"]
    assert st["steps_done"] == 30 and not st["training"] and st["available"] and np.isfinite(st["last_loss"])
    assert ctl.rvae_label.text().startswith("rVAE v1: encoding · 30 steps, loss")
    qtbot.waitUntil(lambda: lp.svc.counters.processed > n + 2, timeout=5000)  # the stream went on


def test_drift_model_text_shows_what_the_engine_learnt():
    from stem_live.monitor.window import drift_model_text

    st = {"values": {"sigma_long_nm": 0.0331, "ell_long_s": 3.03, "sigma_short_nm": 0.005, "ell_short_s": 0.03,
                     "sigma_mains_nm": 0.012}, "mains_hz": 60.0, "mains_mode": "auto", "fits": 5, "accepted": 4}
    text = drift_model_text(st)
    assert "wander 33 pm / 3 s" in text and "mains 60 Hz 12 pm (auto)" in text and "4/5 fits" in text
    assert "no mains" in drift_model_text({**st, "mains_hz": None})
    assert drift_model_text(None) == "drift model: rigid (no GP)"
