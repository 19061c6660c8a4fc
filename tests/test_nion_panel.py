"""The stem-live panel in Nion Swift, headless: Nion's TestContext document window, nionswift-usim as the
scan device, and a minimal engine speaking the protocol on loopback ports.

The panel is registered the way Swift does it (the plug-in's ``run()`` before the window opens) and
driven through its own widgets; the engine side is real sockets: SUB on the frames, DEALER on the
corrections, REP on its commands endpoint.
"""

from __future__ import annotations

import asyncio
import json
import math
import pkgutil
import queue
import threading
import time

import numpy as np
import pytest
import zmq

pytest.importorskip("nion.usim_device", reason="needs the nion extra (nionswift-instrumentation, nionswift-usim)")
TestContext = pytest.importorskip("nion.swift.test.TestContext", reason="needs Nion Swift (installed with the nion extra)")

from nion.swift.Panel import Panel  # noqa: E402

import nionswift_plugin.stem_live as plugin  # noqa: E402
from instrument_adapters.base import InstrumentError  # noqa: E402
from instrument_adapters.nion import start_usim  # noqa: E402
from instrument_adapters.nion_panel import PanelController, PanelSettings, engine_text  # noqa: E402
from nionswift_plugin.stem_live.panel import PANEL_ID, StemLivePanel, status_lines  # noqa: E402
from stem_live import protocol  # noqa: E402
from stem_live.protocol import Ack, Command, Correction, Frame, Reply  # noqa: E402

START_CSH_M = (0.1e-9, -0.05e-9)  # (y, x): the beam shift the session starts from
THREADS = ("bridge-acquire", "bridge-sockets", "stem-live-engine-link")


class FakeEngine:
    """The engine's end of the protocol: counts frames, answers commands, sends corrections, collects acks."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.ctx = ctx
        self.rep = ctx.socket(zmq.REP)
        self.rep.setsockopt(zmq.LINGER, 0)
        self.rep.bind("tcp://127.0.0.1:*")
        self.commands_endpoint = self.rep.getsockopt_string(zmq.LAST_ENDPOINT)
        self.frames: list[Frame] = []
        self.commands: list[str] = []
        self.acks: dict[int, Ack] = {}
        self.armed = False
        self._out: queue.Queue[Correction] = queue.Queue()
        self._connect: queue.Queue[tuple[str, str]] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-engine", daemon=True)
        self._thread.start()

    def connect(self, frames_endpoint: str, corrections_endpoint: str) -> None:
        self._connect.put((frames_endpoint, corrections_endpoint))

    def correct(self, corr: Correction, timeout_s: float = 5.0) -> Ack:
        self._out.put(corr)
        t_end = time.monotonic() + timeout_s
        while corr.id not in self.acks:
            assert time.monotonic() < t_end, f"no ack for correction {corr.id}"
            time.sleep(0.005)
        return self.acks[corr.id]

    def wait(self, what, timeout_s: float = 10.0) -> None:
        t_end = time.monotonic() + timeout_s
        while not what():
            assert time.monotonic() < t_end, "the engine side waited in vain"
            time.sleep(0.01)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        sub = dealer = None
        poller = zmq.Poller()
        poller.register(self.rep, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                if sub is None and not self._connect.empty():
                    frames_ep, corrections_ep = self._connect.get()
                    sub = self.ctx.socket(zmq.SUB)
                    sub.setsockopt(zmq.LINGER, 0)
                    sub.setsockopt(zmq.SUBSCRIBE, b"")
                    sub.connect(frames_ep)
                    dealer = self.ctx.socket(zmq.DEALER)
                    dealer.setsockopt(zmq.LINGER, 0)
                    dealer.connect(corrections_ep)
                    poller.register(sub, zmq.POLLIN)
                    poller.register(dealer, zmq.POLLIN)
                while dealer is not None and not self._out.empty():
                    protocol.send(dealer, self._out.get())
                ready = dict(poller.poll(10))
                if sub is not None and sub in ready:
                    msg = protocol.recv(sub)
                    if isinstance(msg, Frame):
                        self.frames.append(msg)
                if dealer is not None and dealer in ready:
                    msg = protocol.recv(dealer)
                    if isinstance(msg, Ack):
                        self.acks[msg.id] = msg
                if self.rep in ready:
                    cmd = protocol.recv(self.rep)
                    assert isinstance(cmd, Command)
                    self.commands.append(cmd.cmd)
                    if cmd.cmd in ("arm", "disarm"):
                        self.armed = cmd.cmd == "arm"
                    protocol.send(self.rep, Reply(cmd=cmd.cmd, ok=True, message="ok", state={
                        "armed": self.armed, "frames": len(self.frames), "counters": {"skipped": 0}}))
        finally:
            for s in (sub, dealer, self.rep):
                if s is not None:
                    s.close(0)


@pytest.fixture(scope="module")
def usim():
    session = start_usim(sample_index=1)
    hs = session.scan_hardware_source
    fp = hs.get_current_frame_parameters()
    from nion.utils import Geometry

    fp.size = Geometry.IntSize(height=96, width=96)
    fp.pixel_time_us = 2.0
    fp.fov_nm = 16.0
    hs.set_current_frame_parameters(fp)
    yield session
    session.close()


@pytest.fixture
def swift(usim):
    """A headless Swift document window with the stem-live plug-in loaded; yields (document controller, panel)."""
    usim.instrument.SetVal("CSH.y", START_CSH_M[0])
    usim.instrument.SetVal("CSH.x", START_CSH_M[1])
    previous_loop = asyncio.get_event_loop_policy().get_event_loop()  # usim's scan device made one
    setup = TestContext.TestSetup()  # Nion's test application, with an event loop of its own
    profile = TestContext.MemoryProfileContext()
    panels = Panel.count
    plugin.run()  # as Swift does when it loads plug-ins, before any window opens
    dc = profile.create_document_controller(auto_close=False)
    panel = dc.find_dock_panel(PANEL_ID)
    try:
        yield dc, panel
    finally:
        dc.close()  # closes the panel, which stops a bridge left running
        profile.close()
        assert Panel.count == panels
        plugin.stop()
        del setup  # closes its event loop
        asyncio.set_event_loop(previous_loop)
        usim.instrument.SetVal("CSH.y", 0.0)
        usim.instrument.SetVal("CSH.x", 0.0)


@pytest.fixture
def engine():
    ctx = zmq.Context()
    eng = FakeEngine(ctx)
    yield eng
    eng.close()
    ctx.term()


def _csh_nm(usim) -> np.ndarray:
    """usim's beam shift in stem-live's (y, x) nm (no scan rotation)."""
    return np.array([usim.instrument.GetVal("CSH.y"), usim.instrument.GetVal("CSH.x")]) * 1e9


def _until(dc, what, timeout_s: float = 10.0) -> None:
    """Run Swift's periodic (the panel refreshes in it) until ``what()``."""
    t_end = time.monotonic() + timeout_s
    while not what():
        assert time.monotonic() < t_end, "timed out"
        dc.periodic()
        time.sleep(0.02)
    dc.periodic()


def _assert_ports_free(*endpoints: str) -> None:
    """The bridge let go of its ports: binding them again works (raises otherwise)."""
    probe = zmq.Context.instance().socket(zmq.PUB)
    try:
        probe.setsockopt(zmq.LINGER, 0)
        for ep in endpoints:
            probe.bind(ep)
    finally:
        probe.close(0)


def _fill(panel: StemLivePanel, commands_endpoint: str) -> None:
    panel.frames_edit.text = "tcp://127.0.0.1:*"  # free ports, read back from the bridge
    panel.corrections_edit.text = "tcp://127.0.0.1:*"
    panel.commands_edit.text = commands_endpoint
    panel.max_step_edit.text = "0.5"
    panel.max_excursion_edit.text = "2"


def test_the_plug_in_adds_the_panel_to_swift(swift, usim):
    import nionswift_plugin

    assert "stem_live" in {m.name for m in pkgutil.iter_modules(nionswift_plugin.__path__)}  # how Swift finds plug-ins
    dc, panel = swift
    assert isinstance(panel, StemLivePanel)
    assert panel.display_name == "stem-live"
    assert "usim_scan_device" in panel.device_combo.items  # the scan devices of this Swift, after "current"
    assert panel.device_combo.current_item == ""
    assert panel.start_button.text == "Start" and not panel.arm_button.enabled
    assert panel.state_label.text == "stopped"
    s = panel.settings()
    assert (s.frames_endpoint, s.corrections_endpoint, s.commands_endpoint) == (
        "tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556", "tcp://127.0.0.1:5558")
    assert s.restore_on_stop and s.correction_mode == "beam_shift"


def test_start_arm_correct_disarm_stop_through_the_panel(swift, usim, engine):
    dc, panel = swift
    _fill(panel, engine.commands_endpoint)
    panel.device_combo.current_item = "usim_scan_device"
    panel.start_button.on_clicked()
    ctl = panel.controller
    assert ctl.running, panel.error_label.text
    bridge = ctl.bridge
    frames_ep, corrections_ep = bridge.frames_endpoint, bridge.corrections_endpoint
    engine.connect(frames_ep, corrections_ep)
    start = _csh_nm(usim)
    np.testing.assert_allclose(start, np.array(START_CSH_M) * 1e9, atol=1e-9)

    # frames from usim reach the engine; the panel shows them and the engine's status
    engine.wait(lambda: len(engine.frames) >= 3)
    f = engine.frames[-1]
    assert f.image.shape == (96, 96) and f.pixel_size_nm == pytest.approx((16 / 96, 16 / 96))
    _until(dc, lambda: "frames processed" in panel.engine_label.text)
    assert panel.state_label.text == "running on usim_scan_device, correction disarmed"
    assert panel.start_button.text == "Stop" and panel.arm_button.enabled and not panel.frames_edit.enabled
    sent = int(panel.frames_label.text.split()[2].rstrip(","))
    assert sent >= 3

    # disarmed: a correction is refused and the beam stays
    ack = engine.correct(Correction(id=1, beam_shift_nm=tuple(start + [0.3, -0.2]), for_seq=engine.frames[-1].seq))
    assert "disabled" in ack.error
    np.testing.assert_allclose(_csh_nm(usim), start, atol=1e-9)

    # armed: the engine is armed too, and its correction moves usim's CSH by the step
    panel.arm_button.on_clicked()
    engine.wait(lambda: engine.commands.count("arm") == 1 and engine.armed)
    _until(dc, lambda: ctl.status().engine_armed is True)
    assert panel.arm_button.text == "Disarm" and "ARMED" in panel.state_label.text
    step = np.array([0.3, -0.2])
    ack = engine.correct(Correction(id=2, beam_shift_nm=tuple(start + step), for_seq=engine.frames[-1].seq))
    assert ack.error == "" and not ack.clamped
    np.testing.assert_allclose(_csh_nm(usim), start + step, atol=1e-6)
    np.testing.assert_allclose(ack.applied_nm, start + step, atol=1e-9)
    st = ctl.status()
    assert st.corrections_applied == 1 and st.corrections_refused == 1
    assert st.excursion_nm == pytest.approx(math.hypot(*step), abs=1e-6)
    assert st.excursion_budget_nm == 2.0
    np.testing.assert_allclose(st.last_correction_nm, step, atol=1e-6)
    np.testing.assert_allclose(st.beam_offset_nm, step, atol=1e-6)
    _until(dc, lambda: "applied 1 " in panel.corrections_label.text)
    assert f"excursion used {math.hypot(*step):.2f} / 2 nm" in panel.excursion_label.text
    assert "last [+0.300, -0.200] nm" in panel.corrections_label.text

    # a correction beyond the limits is clamped; the excursion follows the applied shift
    ack = engine.correct(Correction(id=3, beam_shift_nm=tuple(start + step + [0.0, -5.0]), for_seq=engine.frames[-1].seq))
    assert ack.clamped and ack.error == ""
    applied = np.asarray(ack.applied_nm) - start
    np.testing.assert_allclose(_csh_nm(usim), start + applied, atol=1e-6)
    assert ctl.status().excursion_nm == pytest.approx(math.hypot(*applied), abs=1e-6)

    # disarmed again: the engine is told, corrections are refused, the beam stays
    panel.arm_button.on_clicked()
    engine.wait(lambda: engine.commands.count("disarm") == 1 and not engine.armed)
    before = _csh_nm(usim)
    ack = engine.correct(Correction(id=4, beam_shift_nm=tuple(start), for_seq=engine.frames[-1].seq))
    assert "disabled" in ack.error
    np.testing.assert_allclose(_csh_nm(usim), before, atol=1e-9)
    _until(dc, lambda: "correction disarmed" in panel.state_label.text)

    # stop: threads end, ports are free again, the beam goes back to where it started, the scan stops
    panel.start_button.on_clicked()
    assert not ctl.running and panel.start_button.text == "Start"
    assert not [t.name for t in threading.enumerate() if t.name in THREADS]
    np.testing.assert_allclose(_csh_nm(usim), start, atol=1e-6)
    _until(dc, lambda: not usim.scan_hardware_source.is_playing, timeout_s=5.0)
    _assert_ports_free(frames_ep, corrections_ep)
    assert panel.state_label.text == "stopped" and panel.frames_edit.enabled
    assert "applied 2 " in panel.corrections_label.text  # the last run's totals stay on display


def test_errors_are_one_line_and_nothing_starts(swift, usim, engine):
    dc, panel = swift
    _fill(panel, engine.commands_endpoint)
    panel.max_step_edit.text = "fast"
    panel.start_button.on_clicked()
    assert not panel.controller.running and "max step must be a number" in panel.error_label.text
    panel.max_step_edit.text = "0.5"
    panel.strips_edit.text = "-64"
    panel.start_button.on_clicked()
    assert not panel.controller.running and "strip lines must be a whole number" in panel.error_label.text
    panel.strips_edit.text = "0"
    panel.calibration_edit.text = "/no/such/actuator.json"
    panel.start_button.on_clicked()
    assert not panel.controller.running and "is not an actuator calibration" in panel.error_label.text
    panel.calibration_edit.text = ""
    panel.arm_button.on_clicked()
    assert "start the bridge before arming" in panel.error_label.text
    blocker = zmq.Context.instance().socket(zmq.PUB)
    blocker.setsockopt(zmq.LINGER, 0)
    blocker.bind("tcp://127.0.0.1:*")
    try:
        panel.frames_edit.text = blocker.getsockopt_string(zmq.LAST_ENDPOINT)
        panel.start_button.on_clicked()
    finally:
        blocker.close(0)
    assert not panel.controller.running and "cannot bind" in panel.error_label.text
    assert "\n" not in panel.error_label.text
    assert not usim.scan_hardware_source.is_playing
    with pytest.raises(InstrumentError, match="no scan device 'nope'"):
        PanelController().start(PanelSettings(scan_device_id="nope"))


def test_no_engine_is_reported_and_stop_keeps_the_beam_when_told(usim, tmp_path):
    """Also: the actuator calibration, the stage handover and strips reach the bridge."""
    usim.instrument.SetVal("CSH.y", 0.0)
    usim.instrument.SetVal("CSH.x", 0.0)
    actuator = tmp_path / "actuator.json"
    actuator.write_text(json.dumps({"matrix": [[2.0, 0.0], [0.0, 2.0]]}))  # the beam moves twice what is commanded
    ctl = PanelController(status_interval_s=0.1, reply_timeout_s=0.3)
    probe = zmq.Context.instance().socket(zmq.REP)
    probe.bind("tcp://127.0.0.1:*")
    silent = probe.getsockopt_string(zmq.LAST_ENDPOINT)
    probe.close(0)  # a port nobody answers on
    ctl.start(PanelSettings(frames_endpoint="tcp://127.0.0.1:*", corrections_endpoint="tcp://127.0.0.1:*",
                            commands_endpoint=silent, restore_on_stop=False, actuator_calibration=str(actuator),
                            stage_handover=True, strip_lines=64))
    try:
        assert ctl.wait_frames(2, 10.0)
        rows = usim.scan_hardware_source.get_current_frame_parameters().size.height
        assert ctl.bridge.stats.strips_published >= 2 * -(-rows // 64)   # frames count once, strips each
        st = ctl.status()
        assert st.strips_sent > st.frames_sent > 0   # the panel shows both
        assert f"(in {st.strips_sent} strips)" in status_lines(st)[1]
        assert ctl.bridge.stage_handover
        ctl.arm()  # the bridge's gate opens even when the engine does not answer
        assert ctl.armed
        t_end = time.monotonic() + 5.0
        while "no reply from the engine" not in ctl.status().engine:
            assert time.monotonic() < t_end
            time.sleep(0.05)
        assert ctl.status().engine_armed is None
        ack = ctl.bridge.apply(Correction(id=1, beam_shift_nm=(0.2, 0.1), for_seq=ctl.bridge._last_seq))
        assert ack.error == ""
    finally:
        ctl.stop()
    np.testing.assert_allclose(_csh_nm(usim), [0.1, 0.05], atol=1e-6)  # A^-1 b; restore_on_stop=False: it stays
    usim.instrument.SetVal("CSH.y", 0.0)
    usim.instrument.SetVal("CSH.x", 0.0)


def test_engine_text_says_what_the_engine_reports():
    r = Reply(cmd="status", ok=True, state={"armed": True, "frames": 12, "counters": {"skipped": 3}, "locked": False,
                                            "banner": "correction DISARMED: the frames stopped"})
    assert engine_text(r) == "armed, 12 frames processed, 3 skipped, lock lost, correction DISARMED: the frames stopped"
    assert engine_text(Reply(cmd="arm", ok=False, message="no model yet")) == "disarmed, no model yet"


def test_a_failed_restore_is_reported_and_the_ports_are_freed(usim):
    ctl = PanelController(status_interval_s=0.2, reply_timeout_s=0.2)
    ctl.start(PanelSettings(frames_endpoint="tcp://127.0.0.1:*", corrections_endpoint="tcp://127.0.0.1:*"))
    frames_ep, corrections_ep = ctl.bridge.frames_endpoint, ctl.bridge.corrections_endpoint
    assert ctl.wait_frames(1, 10.0)

    def refuse(target_nm):
        raise InstrumentError("the STEM controller refused CSH.x")

    ctl.instrument.set_beam_shift = refuse
    ctl.stop()
    st = ctl.status()
    assert not st.running and "could not restore the starting beam shift" in st.last_error
    assert "set it back by hand" in st.last_error and "\n" not in st.last_error
    assert not [t.name for t in threading.enumerate() if t.name in THREADS]
    _assert_ports_free(frames_ep, corrections_ep)
