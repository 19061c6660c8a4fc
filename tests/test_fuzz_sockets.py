"""Every receiving socket under fire: frames at the engine, corrections at the bridge, commands at
the engine, maps at the monitor. Every bad message is rejected and counted; none is accepted;
the process goes on and still serves the next good message."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from instrument_adapters.bridge import Bridge
from stem_live import protocol
from stem_live.engine import Engine
from stem_live.protocol import Command, Correction, Frame, Maps, Reply
from stem_live.service import EngineService
from tests.test_bridge import FakeInstrument

ANY = "tcp://127.0.0.1:*"
N = 400  # bad messages per socket and strategy run
OPTIONAL = ("arrays", "detector", "reason", "error", "metrics", "info", "args", "message", "state")
GOOD = protocol.encode(Frame(seq=1, image=np.zeros((8, 8), np.uint16)))


@st.composite
def _bad_variants(draw, valid: list) -> list:
    """Malformed multipart messages derived from a valid one, plus pure garbage."""
    head = json.loads(bytes(valid[0]))

    class _D:  # keeps the body below readable: data.draw(...) -> draw(...)
        pass

    data = _D()
    data.draw = draw
    if True:
        kind = data.draw(st.integers(0, 6))
        if kind == 0:
            return [data.draw(st.binary(max_size=200))]
        if kind == 1:  # truncated header
            raw = bytes(valid[0])
            return [raw[:data.draw(st.integers(0, len(raw) - 1))], *valid[1:]]
        h = dict(head)
        if kind == 2:  # a required field removed (optional ones have defaults)
            key = data.draw(st.sampled_from(sorted(k for k in h if k not in OPTIONAL)))
            h.pop(key)
        elif kind == 3:  # a field of the wrong type
            key = data.draw(st.sampled_from(sorted(k for k in h if k not in ("proto", "type", "arrays"))))
            v = head[key]
            wrong = [st.none()]
            if not isinstance(v, dict):
                wrong.append(st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
            if not isinstance(v, str):
                wrong.append(st.text(max_size=5))
            if not isinstance(v, list):
                wrong.append(st.lists(st.integers(), max_size=3))
            if isinstance(v, (str, list, dict)):
                wrong.append(st.integers())
            h[key] = data.draw(st.one_of(*wrong))
        elif kind == 4:  # NaN / inf in a numeric field (or, with none, in a nested object)
            numeric = sorted(k for k, v in h.items() if isinstance(v, (int, float, list)) and k != "arrays")
            if not numeric:
                h["args"] = {"gain": "@@"}
                numeric = ["args"]
            key = data.draw(st.sampled_from(numeric))
            raw = json.dumps({**h, key: "@@"} if key != "args" else h).replace('"@@"', data.draw(st.sampled_from(["NaN", "Infinity",
                                                                                        "-Infinity", "1e999"])))
            return [raw.encode(), *valid[1:]]
        elif kind == 5:  # wrong protocol or type
            h[data.draw(st.sampled_from(["proto", "type"]))] = data.draw(st.sampled_from(["stem-live/0", "bogus", ""]))
        else:  # a buffer of the wrong size (or one too many)
            return [bytes(valid[0]), *valid[1:], b"\x00" * data.draw(st.integers(1, 9))]
        return [json.dumps(h).encode(), *valid[1:]]


def _wait(cond, timeout: float = 10.0) -> None:
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout
        time.sleep(0.01)


def _generate(strategy: st.SearchStrategy, n: int) -> list:
    out: list = []

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(msg):
        out.append(msg)

    collect()
    return out


def test_engine_frames_socket():
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(ANY)
    svc = EngineService(Engine(), frames_endpoint=pub.getsockopt_string(zmq.LAST_ENDPOINT),
                        corrections_endpoint="tcp://127.0.0.1:9", maps_endpoint=ANY, commands_endpoint=ANY, context=ctx)
    svc.start()
    try:
        time.sleep(0.3)
        bad = _generate(_bad_variants(GOOD), N)
        for m in bad:
            pub.send_multipart(m)
            time.sleep(0.002)  # live mode keeps at most a few messages queued: a flood would be dropped, not counted
        _wait(lambda: svc.counters.rejected == len(bad))
        assert svc.counters.received == 0  # none accepted
        image = np.random.default_rng(7).integers(0, 1000, (64, 64)).astype(np.uint16)   # a frame the engine takes
        protocol.send(pub, Frame(seq=7, image=image))
        _wait(lambda: svc.counters.processed == 1)
    finally:
        svc.stop()
        pub.close(0)
        ctx.term()


def test_bridge_corrections_socket():
    ctx = zmq.Context()
    inst = FakeInstrument(period_s=0.02)
    bridge = Bridge(inst, frames_endpoint=ANY, corrections_endpoint=ANY, context=ctx).start()
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(bridge.corrections_endpoint)
    try:
        _wait(lambda: bridge.stats.frames_published > 0)
        valid = protocol.encode(Correction(id=1, beam_shift_nm=(1.0, -2.0), for_seq=0))
        bad = _generate(_bad_variants(valid), N)
        for m in bad:
            d.send_multipart(m)
        _wait(lambda: bridge.stats.messages_rejected == len(bad))
        assert inst.calls == [] and bridge.stats.corrections_applied == 0
        protocol.send(d, Correction(id=99, beam_shift_nm=(1.1, -2.0), for_seq=bridge._last_seq))
        assert d.poll(3000) and protocol.recv(d).error == ""
        assert len(inst.calls) == 1
    finally:
        d.close(0)
        bridge.stop()
        ctx.term()


def test_engine_commands_socket():
    ctx = zmq.Context()
    svc = EngineService(Engine(), frames_endpoint="tcp://127.0.0.1:9", corrections_endpoint="tcp://127.0.0.1:9",
                        maps_endpoint=ANY, commands_endpoint=ANY, context=ctx)
    svc.start()
    req = ctx.socket(zmq.REQ)
    req.setsockopt(zmq.LINGER, 0)
    req.connect(svc.commands_endpoint)
    try:
        valid = protocol.encode(Command(cmd="arm"))
        bad = _generate(_bad_variants(valid), N // 2)  # REQ/REP: one round trip each
        for m in bad:
            req.send_multipart(m)
            assert req.poll(3000)
            r = protocol.recv(req)
            assert isinstance(r, Reply) and not r.ok
        assert svc.counters.rejected == len(bad)
        assert svc.engine.armed is False  # no bad message armed the engine
        protocol.send(req, Command(cmd="arm"))
        assert req.poll(3000) and protocol.recv(req).ok and svc.engine.armed
    finally:
        req.close(0)
        svc.stop()
        ctx.term()


def test_monitor_maps_socket(qtbot):
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from stem_live.monitor.client import EngineClient

    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(ANY)
    client = EngineClient(pub.getsockopt_string(zmq.LAST_ENDPOINT), "tcp://127.0.0.1:9", context=ctx)
    client.start()
    try:
        time.sleep(0.3)
        valid = protocol.encode(Maps(seq=1, arrays={"preview": np.zeros((4, 4), np.float32)}, metrics={"fps": 1.0}))
        bad = _generate(_bad_variants(valid), N // 2)
        for m in bad:
            pub.send_multipart(m)
            time.sleep(0.002)
        _wait(lambda: (client._drain(), client.rejected)[1] >= len(bad))
        assert client.rejected == len(bad)
        protocol.send(pub, Maps(seq=2, metrics={"fps": 2.0}))
        got: list = []
        _wait(lambda: got.extend(client._drain()) or any(m.seq == 2 for m in got))
    finally:
        client.stop()
        pub.close(0)
        ctx.term()
