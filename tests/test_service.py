"""The live loop over real loopback sockets: simulator bridge <-> engine service <-> commands."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from instrument_adapters.bridge import Bridge
from instrument_adapters.simulated import SimulatedInstrument
from simulator import DriftConfig, MicroscopeConfig
from stem_live import protocol
from stem_live.engine import Engine
from stem_live.protocol import Command, Frame, Maps, Reply
from stem_live.service import EngineService

ANY = "tcp://127.0.0.1:*"


def _config(drift_nm_per_min: float = 30.0, seed: int = 3) -> MicroscopeConfig:
    return MicroscopeConfig(preset="graphene", size=128, seed=seed, drift=DriftConfig(drift_nm_per_min=drift_nm_per_min))


class Loop:
    """Bridge + engine service wired together on free loopback ports; stops everything on exit."""

    def __init__(self, config: MicroscopeConfig, *, speed: float | None, frames: int | None = None,
                 armed: bool = False) -> None:
        self.ctx = zmq.Context()
        self.inst = SimulatedInstrument(config, speed=speed, frames=frames)
        self.bridge = Bridge(self.inst, frames_endpoint=ANY, corrections_endpoint=ANY, context=self.ctx)
        self.engine = Engine()
        if armed:
            self.engine.arm()
        self.apparent: dict[int, np.ndarray] = {}
        self.svc = EngineService(self.engine, frames_endpoint=self.bridge.frames_endpoint,
                                 corrections_endpoint=self.bridge.corrections_endpoint, maps_endpoint=ANY,
                                 commands_endpoint=ANY, context=self.ctx, on_result=self._record_truth)

    def _record_truth(self, frame: Frame, result) -> None:
        t = self.inst.truth_for(frame.seq)
        if t is not None:
            self.apparent[frame.seq] = np.mean(np.asarray(t.drift_nm) - np.asarray(t.beam_shift_nm), axis=0)

    def __enter__(self) -> Loop:
        self.svc.start()
        time.sleep(0.2)  # let the SUB connect before the first frame
        self.bridge.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bridge.stop(restore=True)
        self.svc.stop()
        self.ctx.term()

    def command(self, cmd: str, **args) -> Reply:
        req = self.ctx.socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(self.svc.commands_endpoint)
        try:
            protocol.send(req, Command(cmd=cmd, args=args))
            assert req.poll(3000), f"no reply to {cmd}"
            reply = protocol.recv(req)
            assert isinstance(reply, Reply)
            return reply
        finally:
            req.close()

    def wait_processed(self, n: int, timeout: float = 20.0) -> None:
        t0 = time.monotonic()
        while self.svc.counters.processed < n:
            assert time.monotonic() - t0 < timeout, f"only {self.svc.counters.processed} frames processed"
            time.sleep(0.01)


def _rms(apparent: dict[int, np.ndarray], first: int) -> float:
    seqs = sorted(s for s in apparent if s >= first)
    a = np.array([apparent[s] for s in seqs])
    a -= a[0]
    return float(np.sqrt((a**2).sum(1).mean()))


def test_closed_loop_over_sockets_holds_the_image():
    cfg = _config()
    with Loop(cfg, speed=4.0, armed=False) as loop:
        loop.wait_processed(60)
        open_rms = _rms(loop.apparent, 0)
    with Loop(cfg, speed=4.0, armed=True) as loop:
        loop.wait_processed(60)
        closed_rms = _rms(loop.apparent, 0)
        assert loop.svc.counters.corrections_sent > 40
        t0 = time.monotonic()  # acks arrive asynchronously: the newest few may still be in flight
        while loop.svc.counters.acks < loop.svc.counters.corrections_sent - 2 and time.monotonic() - t0 < 2.0:
            time.sleep(0.02)
        assert loop.svc.counters.acks >= loop.svc.counters.corrections_sent - 2
        assert loop.bridge.stats.corrections_applied > 40
    assert open_rms > 0.2  # the specimen really moves (nm)
    assert closed_rms < 0.25 * open_rms, (open_rms, closed_rms)


def test_commands_change_engine_state_and_maps_flow():
    with Loop(_config(), speed=4.0) as loop:
        sub = loop.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(loop.svc.maps_endpoint)
        try:
            r = loop.command("status")
            assert r.ok and r.state["armed"] is False
            assert loop.command("arm").state["armed"] is True
            loop.wait_processed(10)
            assert sub.poll(3000)
            m = protocol.recv(sub)
            assert isinstance(m, Maps) and m.arrays["preview"].shape == (128, 128)
            assert m.metrics["armed"] == 1.0
            bad = loop.command("set", gian=2.0)
            assert not bad.ok and "unknown parameter" in bad.message
            assert loop.command("set", gain=0.5).state["config"]["gain"] == 0.5
            assert loop.command("disarm").state["armed"] is False
            assert loop.command("reset").state["frames"] == 0
            assert not loop.command("train").ok  # the rigid engine has no rVAE to train: says so, does not crash
        finally:
            sub.close()


class SlowEngine(Engine):
    def process(self, frame: Frame, *, encode: bool = True):
        time.sleep(0.03)
        return super().process(frame, encode=encode)


def test_live_mode_takes_the_newest_frame_and_counts_skips():
    """A simulator far faster than the engine: frames are skipped, counted, never queued up."""
    with Loop(MicroscopeConfig(preset="srtio3", size=128, seed=1), speed=None, frames=150) as loop:
        loop.svc.engine = SlowEngine()
        assert loop.bridge.wait(30)
        time.sleep(0.5)
        c = loop.svc.counters
        published, dropped = loop.bridge.stats.frames_published, loop.bridge.stats.frames_dropped
        assert published + dropped == 150 and published > 0.9 * 150
        assert c.processed < 0.7 * published
        # every frame from the first one received on was processed or counted as skipped; frames
        # the bridge dropped (its queue full on a busy machine) are gaps in seq, counted as skipped
        sent_since_first = published + dropped - loop.svc.first_seq
        assert c.processed + c.skipped == sent_since_first, (c.processed, c.skipped, published, dropped)


def test_bad_frames_are_rejected_and_the_stream_goes_on():
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(ANY)
    svc = EngineService(Engine(), frames_endpoint=pub.getsockopt_string(zmq.LAST_ENDPOINT),
                        corrections_endpoint="tcp://127.0.0.1:9", maps_endpoint=ANY, commands_endpoint=ANY, context=ctx)
    svc.start()
    try:
        time.sleep(0.3)
        img = np.random.default_rng(0).poisson(100, (64, 64)).astype(np.uint16)
        pub.send_multipart([b"not json"])
        pub.send_multipart(protocol.encode(Frame(seq=0, image=img))[:1])  # buffer missing
        protocol.send(pub, protocol.Correction(id=1, beam_shift_nm=(0, 0), for_seq=0))  # wrong type
        protocol.send(pub, Frame(seq=1, image=np.zeros((64, 64), np.uint16)))  # valid message, constant: refused
        t0 = time.monotonic()
        while svc.counters.refused < 1 and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        protocol.send(pub, Frame(seq=2, image=img))
        while svc.counters.processed < 1 and time.monotonic() - t0 < 5:
            time.sleep(0.01)
        assert svc.counters.rejected == 3
        assert svc.counters.refused == 1 and "frame 1 refused: constant" in svc.counters.last_refused
        assert svc.counters.processed == 1
    finally:
        svc.stop()
        pub.close()
        ctx.term()


@pytest.mark.parametrize("endpoint", ["tcp://0.0.0.0:5557", "tcp://10.1.2.3:5557"])
def test_engine_refuses_non_loopback(endpoint):
    with pytest.raises(Exception, match="loopback"):
        EngineService(Engine(), maps_endpoint=endpoint, commands_endpoint=ANY)


class BrokenEngine(Engine):
    """Raises on every third frame, as an analysis bug would."""

    def process(self, frame: Frame, *, encode: bool = True):
        if frame.seq % 3 == 1:
            raise RuntimeError("boom")
        return super().process(frame, encode=encode)


def test_an_engine_error_is_counted_and_the_stream_goes_on():
    """A frame the engine raises on is counted and logged; the frames after it are processed."""
    with Loop(MicroscopeConfig(preset="srtio3", size=128, seed=1), speed=1.0, frames=30) as loop:
        loop.svc.engine = BrokenEngine()
        assert loop.bridge.wait(30)
        time.sleep(0.5)
        c = loop.svc.counters
        assert c.failed >= 3 and "boom" in c.last_error
        assert c.processed >= 10
        assert c.processed + c.failed + c.skipped == 30, (c.processed, c.failed, c.skipped)


def test_settle_heap_freezes_the_survivors_and_a_new_session_collects_the_old_garbage():
    """The service freezes the heap after its first frames (no full-collection pauses in the
    frame thread); a later settle (a new session in the process) collects what was left."""
    import gc
    import weakref

    from stem_live.heap import settle_heap

    class Node:
        pass

    a = Node()
    a.loop = a  # a reference cycle: only the cyclic collector frees it
    ref = weakref.ref(a)
    try:
        settle_heap()
        assert gc.get_freeze_count() > 0
        del a
        gc.collect()
        assert ref() is not None  # frozen: the collector does not walk it (the pause it saves)
        settle_heap()
        assert ref() is None
    finally:
        gc.unfreeze()


def test_latest_slot_keeps_the_newest_and_reports_what_it_replaced():
    import threading
    import time

    from stem_live.service_state import LatestSlot

    slot = LatestSlot()
    t0 = time.perf_counter()
    assert slot.take(0.05) is None  # nothing came: returns after the timeout
    assert time.perf_counter() - t0 >= 0.04
    assert slot.put(1) is False
    assert slot.put(2) is True  # 1 was never taken: replaced (the caller counts it skipped)
    assert slot.full and slot.take(0.0) == 2 and not slot.full
    # a waiting taker wakes on put, not after its timeout
    got = []
    th = threading.Thread(target=lambda: got.append(slot.take(5.0)))
    th.start()
    time.sleep(0.05)
    t0 = time.perf_counter()
    slot.put(3)
    th.join(2.0)
    assert got == [3] and time.perf_counter() - t0 < 1.0
