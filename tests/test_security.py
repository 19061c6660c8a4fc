"""CURVE: a peer without an allowed key can neither read a frame nor move the beam (real TCP)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from instrument_adapters.base import InstrumentError
from instrument_adapters.bridge import Bridge
from stem_live import protocol
from stem_live.protocol import Ack, Correction
from stem_live.security import ClientKeys, ServerKeys, make_keys
from tests.test_bridge import FakeInstrument


@pytest.fixture
def keys(tmp_path):
    make_keys(tmp_path / "instrument", "instrument")
    make_keys(tmp_path / "allowed", "engine")  # the allowed folder holds engine.key (+ its secret, here only)
    make_keys(tmp_path / "stranger", "stranger")
    return tmp_path


def _client(ctx, kind: int, endpoint: str, keys: ClientKeys | None):
    s = ctx.socket(kind)
    s.setsockopt(zmq.LINGER, 0)
    if kind == zmq.SUB:
        s.setsockopt(zmq.SUBSCRIBE, b"")
    if keys is not None:
        keys.apply(s)
    s.connect(endpoint)
    return s


def test_only_allowed_keys_get_frames_or_move_the_beam(keys):
    ctx = zmq.Context()
    inst = FakeInstrument(period_s=0.02)
    server = ServerKeys(str(keys / "instrument" / "instrument.key_secret"), str(keys / "allowed"))
    bridge = Bridge(inst, frames_endpoint="tcp://127.0.0.1:*", corrections_endpoint="tcp://127.0.0.1:*",
                    keys=server, context=ctx)
    server_pub = str(keys / "instrument" / "instrument.key")
    good = ClientKeys(str(keys / "allowed" / "engine.key_secret"), server_pub)
    stranger = ClientKeys(str(keys / "stranger" / "stranger.key_secret"), server_pub)
    socks = []
    try:
        bridge.start()
        subs = {name: _client(ctx, zmq.SUB, bridge.frames_endpoint, k)
                for name, k in (("good", good), ("stranger", stranger), ("plain", None))}
        dealers = {name: _client(ctx, zmq.DEALER, bridge.corrections_endpoint, k)
                   for name, k in (("good", good), ("stranger", stranger), ("plain", None))}
        socks = [*subs.values(), *dealers.values()]
        assert subs["good"].poll(3000), "the allowed engine receives no frames"
        assert protocol.recv(subs["good"]).image.shape == (8, 8)
        start = inst.get_beam_shift()
        for i, name in enumerate(("stranger", "plain")):
            try:  # with no completed handshake a DEALER has no peer: the send may not even be queued
                protocol.send(dealers[name], Correction(id=100 + i, beam_shift_nm=(5.0, 5.0),
                                                        for_seq=bridge._last_seq), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
        time.sleep(1.0)
        assert not subs["stranger"].poll(0) and not subs["plain"].poll(0)
        assert not dealers["stranger"].poll(0) and not dealers["plain"].poll(0)
        assert inst.calls == [] and np.array_equal(inst.get_beam_shift(), start)
        protocol.send(dealers["good"], Correction(id=1, beam_shift_nm=(1.1, -2.0), for_seq=bridge._last_seq))
        assert dealers["good"].poll(3000)
        ack = protocol.recv(dealers["good"])
        assert isinstance(ack, Ack) and ack.error == ""
        assert len(inst.calls) == 1
    finally:
        for s in socks:
            s.close()
        bridge.stop()
        ctx.term()


def test_non_loopback_needs_keys_and_readable_key_files(keys, tmp_path):
    with pytest.raises(InstrumentError, match="CURVE"):
        Bridge(FakeInstrument(), frames_endpoint="tcp://0.0.0.0:0")
    with pytest.raises(InstrumentError, match="cannot read key file"):
        Bridge(FakeInstrument(), frames_endpoint="tcp://127.0.0.1:*", corrections_endpoint="tcp://127.0.0.1:*",
               keys=ServerKeys(str(tmp_path / "missing.key_secret"), str(keys / "allowed")))
    with pytest.raises(InstrumentError, match="does not exist"):
        Bridge(FakeInstrument(), frames_endpoint="tcp://127.0.0.1:*", corrections_endpoint="tcp://127.0.0.1:*",
               keys=ServerKeys(str(keys / "instrument" / "instrument.key_secret"), str(tmp_path / "nowhere")))
