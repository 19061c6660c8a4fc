"""Fault injection: a misbehaving instrument (nonsense, changing sizes, a flood, silence, a restart)
and a chaos run (the instrument side killed and restarted 20 times while armed). The beam never
leaves its limits, the engine disarms within the silence limit each time and says so, and every
frame it took is in the recording. (test_faults.py: engine/monitor processes; test_fuzz_sockets.py:
malformed messages per socket.)"""

from __future__ import annotations

import logging
import time

import numpy as np
import pytest
import zmq

from instrument_adapters.bridge import Bridge
from instrument_adapters.safety import Limits
from instrument_adapters.simulated import SimulatedInstrument
from simulator import DriftConfig, MicroscopeConfig
from stem_live import protocol, service
from stem_live.engine import Engine
from stem_live.io import count_frames
from stem_live.protocol import Command, Frame
from stem_live.service import EngineService
from tests.test_cli import _free_endpoints

ANY = "tcp://127.0.0.1:*"


def _until(cond, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, what
        time.sleep(0.01)
    return time.monotonic() - t0


def _recorded_everything(svc: EngineService, path) -> None:
    """Every frame the engine took (processed, refused, failed) is in the recording, and readable."""
    svc.recorder.stop()
    c = svc.counters
    assert svc.recorder.frames == c.processed + c.refused + c.failed > 0
    assert count_frames(path) == svc.recorder.frames


def test_misbehaving_instrument(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="stem_live.service")
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(ANY)
    svc = EngineService(Engine(), frames_endpoint=pub.getsockopt_string(zmq.LAST_ENDPOINT),
                        corrections_endpoint=_free_endpoints(1)[0], maps_endpoint=ANY, commands_endpoint=ANY,
                        context=ctx)
    rec = tmp_path / "rec.tif"
    svc.recorder.start(rec)
    svc.engine.arm()
    svc.start()
    sim = {n: SimulatedInstrument(MicroscopeConfig(size=n, seed=1), speed=None) for n in (96, 128)}
    images = {n: [s.acquire().image for _ in range(3)] for n, s in sim.items()}
    seq = 0

    def send(n: int = 128, k: int | None = None) -> None:
        nonlocal seq
        protocol.send(pub, Frame(seq=seq, image=images[n][seq % 3 if k is None else k], t_start=seq * 0.05,
                                 pixel_size_nm=(0.01, 0.01)))
        seq += 1

    try:
        time.sleep(0.5)  # the SUB connects
        for k in range(12):  # good frames among nonsense, then frames of changing size
            pub.send_multipart([b"\x00garbage" * k, b"more"])
            send(128 if k < 4 or k >= 8 else 96)
            time.sleep(0.03)
        _until(lambda: svc.counters.processed >= 6, 15, "no frame processed among the nonsense")
        assert svc.counters.rejected >= 11 and svc.engine.armed
        for _ in range(300):  # a flood: the engine takes the newest, counts the rest
            send()
        last_sent = time.monotonic()
        _until(lambda: not svc.engine.armed, 2.0 + 1.0, "the engine did not disarm after the frames stopped")
        assert time.monotonic() - last_sent <= 2.0 + 0.6  # 2 s of silence, plus the worker's poll
        assert "DISARMED" in svc.banner and "DISARMED" in svc.status()["banner"]
        assert any("no frames from" in r.message for r in caplog.records)
        time.sleep(0.5)
        assert not svc.engine.armed  # stays disarmed while the stream is back ...
        seq = 0  # ... the instrument restarts its stream
        n0 = svc.counters.processed
        for _ in range(10):
            send()
            time.sleep(0.03)
        _until(lambda: svc.counters.processed > n0 + 3, 10, "the engine did not resume after the restart")
        assert not svc.engine.armed and svc.handle(Command(cmd="arm")).ok and svc.banner == ""
        c = svc.counters
        assert c.received + c.rejected >= 12 + 11 and c.processed + c.skipped + c.refused >= 12
    finally:
        svc.stop()
        pub.close(0)
        ctx.term()
    _recorded_everything(svc, rec)


class Watched(SimulatedInstrument):
    """The simulator, with every beam-shift command kept (the test's view of the deflectors)."""

    moves: list[np.ndarray] = []

    def set_beam_shift(self, target_nm: np.ndarray) -> None:
        self.moves.append(np.asarray(target_nm, dtype=np.float64).copy())
        super().set_beam_shift(target_nm)


def test_chaos_instrument_killed_and_restarted_20_times_while_armed(tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="stem_live.service")
    silence = 0.4  # shortened from 2 s so that 20 rounds fit in the test
    monkeypatch.setattr(service, "SILENCE_S", silence)
    limits = Limits(max_step_nm=0.05, max_excursion_nm=0.3)
    ctx = zmq.Context()
    frames_ep, corr_ep = _free_endpoints(2)
    cfg = MicroscopeConfig(preset="graphene", size=64, seed=3, drift=DriftConfig(drift_nm_per_min=60))
    inst = Watched(cfg, speed=None)  # one microscope; its bridge (the instrument side) dies and comes back
    inst.moves = []
    svc = EngineService(Engine(), frames_endpoint=frames_ep, corrections_endpoint=corr_ep, maps_endpoint=ANY,
                        commands_endpoint=ANY, context=ctx)
    rec = tmp_path / "chaos.tif"
    svc.recorder.start(rec)
    svc.start()
    disarm_s: list[float] = []
    t_start = time.monotonic()
    try:
        for round_ in range(20):
            inst.speed = 8.0 if round_ % 2 else None  # paced, then as fast as it can render
            bridge = Bridge(inst, frames_endpoint=frames_ep, corrections_endpoint=corr_ep, context=ctx,
                            limits=limits)
            start, first_move = bridge.start_shift_nm.copy(), len(inst.moves)
            bridge.start()
            n0, acks0 = svc.counters.processed, svc.counters.acks
            _until(lambda n0=n0: svc.counters.processed > n0, 5, f"no frame in round {round_}")
            assert svc.handle(Command(cmd="arm")).ok  # the operator re-arms
            _until(lambda n0=n0, acks0=acks0: svc.counters.processed > n0 + 3 and svc.counters.acks > acks0, 5,
                   f"no correction in round {round_}")
            bridge.stop()  # killed: no more frames, no more acks
            killed = time.monotonic()
            _until(lambda: not svc.engine.armed, silence + 1.5, f"not disarmed in round {round_}")
            disarm_s.append(time.monotonic() - killed)
            assert "DISARMED" in svc.banner
            moves = np.array([start, *inst.moves[first_move:]])
            assert (np.hypot(*(moves - start).T) <= limits.max_excursion_nm + 1e-9).all()
            assert (np.hypot(*np.diff(moves, axis=0).T) <= limits.max_step_nm + 1e-9).all()
    finally:
        svc.stop()
        ctx.term()
    assert time.monotonic() - t_start < 30
    assert max(disarm_s) <= silence + 0.6, disarm_s
    assert sum("no frames from" in r.message for r in caplog.records) >= 20  # said so every time
    _recorded_everything(svc, rec)


@pytest.fixture(autouse=True)
def _no_leftover_threads():
    yield
    time.sleep(0.05)
