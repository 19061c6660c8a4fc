"""The instrument bridge: frames out, clamped corrections in, acks back, over real sockets."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from instrument_adapters.base import EndOfStream, Instrument, InstrumentError
from instrument_adapters.bridge import Bridge
from instrument_adapters.safety import Limits, clamp_path, clamp_target
from stem_live import protocol
from stem_live.protocol import Ack, Correction, Frame, Trajectory
from stem_live.security import is_loopback


class FakeInstrument(Instrument):
    """Numbered frames of a fixed pattern; records every beam-shift call."""

    def __init__(self, n: int | None = None, period_s: float = 0.01, lossless: bool = False) -> None:
        self.n, self.period_s, self.lossless = n, period_s, lossless
        self.seq = 0
        self.shift = np.array([1.0, -2.0])
        self.calls: list[np.ndarray] = []

    def acquire(self) -> Frame:
        if self.n is not None and self.seq >= self.n:
            raise EndOfStream
        time.sleep(self.period_s)
        img = np.full((8, 8), self.seq, dtype=np.uint16)
        f = Frame(seq=self.seq, image=img, t_start=self.seq * 0.1, beam_shift_nm=tuple(self.shift))
        self.seq += 1
        return f

    def get_beam_shift(self) -> np.ndarray:
        return self.shift.copy()

    def set_beam_shift(self, target_nm: np.ndarray) -> None:
        self.calls.append(np.asarray(target_nm, dtype=float).copy())
        self.shift = np.asarray(target_nm, dtype=float).copy()


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


def _bridge(inst: Instrument, ctx, **kw) -> Bridge:
    return Bridge(inst, frames_endpoint="tcp://127.0.0.1:*", corrections_endpoint="tcp://127.0.0.1:*",
                  context=ctx, **kw)


def _dealer(ctx, bridge: Bridge):
    d = ctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(bridge.corrections_endpoint)
    return d


def _ack(sock, timeout_ms: int = 2000) -> Ack:
    assert sock.poll(timeout_ms), "no ack within the timeout"
    msg = protocol.recv(sock)
    assert isinstance(msg, Ack)
    return msg


def _wait_published(bridge: Bridge, n: int = 1, timeout: float = 5.0) -> None:
    t0 = time.monotonic()
    while bridge.stats.frames_published < n:
        assert time.monotonic() - t0 < timeout, "bridge published nothing"
        time.sleep(0.005)


def test_frames_are_published_in_order(ctx):
    inst = FakeInstrument(n=40, period_s=0.005, lossless=True)
    bridge = _bridge(inst, ctx)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(bridge.frames_endpoint)
    time.sleep(0.2)  # slow joiner: let the subscription reach the publisher
    bridge.start()
    seqs = []
    try:
        while len(seqs) < 40 and sub.poll(2000):
            f = protocol.recv(sub)
            assert isinstance(f, Frame)
            assert f.image[0, 0] == f.seq
            seqs.append(f.seq)
        assert seqs == list(range(40))
        assert bridge.wait(5.0)
    finally:
        sub.close()
        bridge.stop()


def test_correction_is_clamped_acked_and_restorable(ctx):
    inst = FakeInstrument(period_s=0.02)
    bridge = _bridge(inst, ctx, limits=Limits(max_step_nm=0.5, max_excursion_nm=1.0))
    bridge.start()
    d = _dealer(ctx, bridge)
    try:
        _wait_published(bridge, 2)
        seq = bridge._last_seq
        protocol.send(d, Correction(id=1, beam_shift_nm=(1.2, -2.0), for_seq=seq))
        a = _ack(d)
        assert a.id == 1 and not a.clamped and a.error == ""
        np.testing.assert_allclose(a.applied_nm, (1.2, -2.0))
        # a 3 nm step is shortened to 0.5 nm along its direction
        protocol.send(d, Correction(id=2, beam_shift_nm=(1.2, 1.0), for_seq=bridge._last_seq))
        a = _ack(d)
        assert a.clamped
        np.testing.assert_allclose(a.applied_nm, (1.2, -1.5), atol=1e-12)
        # the excursion from the start (1, -2) is capped at 1 nm
        for i in range(3, 8):
            protocol.send(d, Correction(id=i, beam_shift_nm=(1.0, 5.0), for_seq=bridge._last_seq))
            a = _ack(d)
        assert np.hypot(a.applied_nm[0] - 1.0, a.applied_nm[1] + 2.0) == pytest.approx(1.0, abs=1e-9)
        bridge.restore()
        np.testing.assert_allclose(inst.get_beam_shift(), (1.0, -2.0))
    finally:
        d.close()
        bridge.stop()


def test_bad_replayed_and_stale_corrections_are_refused(ctx):
    inst = FakeInstrument(period_s=0.02)
    bridge = _bridge(inst, ctx)
    bridge.start()
    d = _dealer(ctx, bridge)
    try:
        _wait_published(bridge, 15)
        start = inst.get_beam_shift()
        # non-finite target, sent raw (the encoder itself refuses NaN)
        head = {"proto": protocol.PROTO, "type": "correction", "id": 10, "beam_shift_nm": [1.0, 2.0],
                "for_seq": bridge._last_seq, "reason": "", "arrays": []}
        raw = json.dumps(head).replace("[1.0, 2.0]", "[NaN, 2.0]").encode()
        d.send_multipart([raw])
        time.sleep(0.2)
        assert bridge.stats.messages_rejected == 1
        # garbage and a wrong message type are rejected and counted, not acked
        d.send_multipart([b"\xff\x00garbage"])
        protocol.send(d, Ack(id=3, applied_nm=(0.0, 0.0)))
        time.sleep(0.2)
        assert bridge.stats.messages_rejected == 3
        # stale: computed for a frame long gone
        protocol.send(d, Correction(id=11, beam_shift_nm=(1.1, -2.0), for_seq=0))
        a = _ack(d)
        assert "stale" in a.error
        # from the future
        protocol.send(d, Correction(id=12, beam_shift_nm=(1.1, -2.0), for_seq=bridge._last_seq + 100))
        assert "stale" in _ack(d).error
        # valid, then replayed id
        protocol.send(d, Correction(id=13, beam_shift_nm=(1.1, -2.0), for_seq=bridge._last_seq))
        assert _ack(d).error == ""
        protocol.send(d, Correction(id=13, beam_shift_nm=(1.4, -2.0), for_seq=bridge._last_seq))
        assert "replayed" in _ack(d).error
        np.testing.assert_allclose(inst.get_beam_shift(), start + [0.1, 0.0], atol=1e-12)
        assert bridge.stats.corrections_refused == 3
    finally:
        d.close()
        bridge.stop()


def test_corrections_disabled_never_move_the_beam(ctx):
    inst = FakeInstrument(period_s=0.02)
    bridge = _bridge(inst, ctx, accept_corrections=False)
    bridge.start()
    d = _dealer(ctx, bridge)
    try:
        _wait_published(bridge, 1)
        protocol.send(d, Correction(id=1, beam_shift_nm=(1.1, -2.0), for_seq=bridge._last_seq))
        assert "disabled" in _ack(d).error
        assert inst.calls == []
    finally:
        d.close()
        bridge.stop()


def test_only_loopback_binds():
    assert is_loopback("tcp://127.0.0.1:5555") and is_loopback("tcp://localhost:1") and is_loopback("tcp://[::1]:1")
    assert not is_loopback("tcp://0.0.0.0:5555") and not is_loopback("tcp://*:5555")
    assert not is_loopback("tcp://192.168.1.10:5555")
    with pytest.raises(InstrumentError, match="loopback"):
        Bridge(FakeInstrument(), frames_endpoint="tcp://0.0.0.0:5555")


def test_port_clash_is_one_clear_error(ctx):
    a = _bridge(FakeInstrument(), ctx)
    try:
        with pytest.raises(InstrumentError, match="cannot bind"):
            Bridge(FakeInstrument(), frames_endpoint=a.frames_endpoint, corrections_endpoint="tcp://127.0.0.1:*",
                   context=ctx)
    finally:
        a.stop()


finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False)
anything = st.one_of(finite, st.just(float("nan")), st.just(float("inf")), st.just(-float("inf")))


@settings(max_examples=300, deadline=None)
@given(targets=st.lists(st.tuples(anything, anything), min_size=1, max_size=40),
       step=st.floats(0.01, 5.0), excursion=st.floats(0.01, 20.0))
def test_no_correction_sequence_exceeds_the_limits(targets, step, excursion):
    limits = Limits(max_step_nm=step, max_excursion_nm=excursion)
    start = np.array([0.3, -0.7])
    cur = start.copy()
    for t in targets:
        d = clamp_target(np.array(t), cur, start, limits)
        assert np.isfinite(d.applied_nm).all()
        assert np.hypot(*(d.applied_nm - cur)) <= step * (1 + 1e-9) + 1e-12
        assert np.hypot(*(d.applied_nm - start)) <= excursion * (1 + 1e-9) + 1e-12
        if not np.isfinite(t).all():
            assert d.error and np.array_equal(d.applied_nm, cur)
        cur = d.applied_nm


@settings(max_examples=300, deadline=None)
@given(knots=st.lists(st.tuples(st.floats(1e-4, 0.05), anything, anything), min_size=1, max_size=12),
       line_ms=st.floats(0.05, 20.0), step=st.floats(0.01, 5.0), per_line=st.floats(1e-4, 0.5),
       excursion=st.floats(0.01, 20.0), cur=st.tuples(st.floats(-1, 1), st.floats(-1, 1)))
def test_no_trajectory_exceeds_the_limits(knots, line_ms, step, per_line, excursion, cur):
    """Every line of a clamped trajectory: the first within ``max_step_nm`` of where the beam is,
    each next within ``max_step_per_line_nm`` of the line before, all within the excursion;
    a non-finite path is refused and the beam stays."""
    limits = Limits(max_step_nm=step, max_excursion_nm=excursion, max_step_per_line_nm=per_line)
    start = np.array([0.3, -0.7])
    current = start + np.asarray(cur) * min(1.0, excursion) / np.sqrt(2)
    t = np.cumsum([k[0] for k in knots])
    path = np.array([[k[1], k[2]] for k in knots])
    d = clamp_path(t, path, line_ms * 1e-3, current, start, limits)
    if not np.isfinite(path).all():
        assert d.error and np.array_equal(d.applied_nm, current[None, :])
        return
    assert not d.error
    a = d.applied_nm
    assert np.isfinite(a).all() and len(a) == len(d.t_s)
    np.testing.assert_allclose(np.diff(d.t_s), line_ms * 1e-3, rtol=1e-9)
    assert d.t_s[0] == t[0] and d.t_s[-1] <= t[-1] + 1e-12
    assert np.hypot(*(a[0] - current)) <= step * (1 + 1e-9) + 1e-12
    assert np.all(np.hypot(*np.diff(a, axis=0).T) <= per_line * (1 + 1e-9) + 1e-12)
    assert np.all(np.hypot(*(a - start).T) <= excursion * (1 + 1e-9) + 1e-12)
    # a path within every limit is followed exactly
    want = np.stack([np.interp(d.t_s, t, path[:, q]) for q in range(2)], axis=1)
    ok = (np.hypot(*(want[0] - current)) <= step and np.all(np.hypot(*np.diff(want, axis=0).T) <= per_line)
          and np.all(np.hypot(*(want - start).T) <= excursion))
    if ok:
        assert not d.clamped
        np.testing.assert_allclose(a, want, atol=1e-12)


def test_unordered_or_endless_trajectories_are_refused():
    lim, here = Limits(), np.zeros(2)
    for t, why in (([0.0, 0.0], "increase"), ([1.0, 0.5], "increase"), ([0.0, 1e3], "lines")):
        d = clamp_path(t, [[0.0, 0.0], [0.1, 0.0]], 1e-3, here, here, lim)
        assert why in d.error and np.array_equal(d.applied_nm, here[None, :])
    assert "line time" in clamp_path([0.0, 1.0], [[0, 0], [0, 0]], float("nan"), here, here, lim).error


class PathInstrument(FakeInstrument):
    """A fake that follows beam-shift paths line by line (records each path)."""

    follows_paths = True

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.paths: list[tuple[np.ndarray, np.ndarray]] = []

    def follow_path(self, t_s: np.ndarray, shift_nm: np.ndarray) -> None:
        self.paths.append((np.asarray(t_s).copy(), np.asarray(shift_nm).copy()))
        self.shift = np.asarray(shift_nm[-1], dtype=float).copy()


def test_a_trajectory_is_followed_line_by_line_or_applied_as_one_shift(ctx):
    """An instrument that follows paths gets the trajectory at every line of the last frame's
    line time, clamped per line; one that does not applies the correction's single shift."""
    lim = Limits(max_step_nm=0.5, max_excursion_nm=5.0, max_step_per_line_nm=0.01)
    for inst in (PathInstrument(period_s=0.02), FakeInstrument(period_s=0.02)):
        bridge = _bridge(inst, ctx, limits=lim)
        bridge.start()
        d = _dealer(ctx, bridge)
        try:
            _wait_published(bridge, 2)
            line = bridge._line_time_s
            t0 = 1.0
            # 40 lines at 0.5 pm a line, then a 0.1 nm jump the per-line limit spreads over 10 lines
            traj = Trajectory(t_s=(t0, t0 + 40 * line, t0 + 41 * line, t0 + 60 * line),
                              beam_shift_nm=((1.0, -2.0), (1.0, -1.98), (1.1, -1.98), (1.1, -1.98)))
            protocol.send(d, Correction(id=1, beam_shift_nm=(1.0, -2.0), for_seq=bridge._last_seq, trajectory=traj))
            a = _ack(d)
            assert a.error == ""
            if isinstance(inst, PathInstrument):
                (t, b), = inst.paths
                assert len(t) == 61 and t[0] == t0
                np.testing.assert_allclose(b[:41, 1], np.linspace(-2.0, -1.98, 41), atol=1e-12)
                assert a.clamped and np.max(np.abs(np.diff(b[40:, 0]))) <= 0.01 + 1e-12
                np.testing.assert_allclose(b[-1], (1.1, -1.98), atol=1e-12)   # reached by line 50
                np.testing.assert_allclose(a.applied_nm, b[-1])
                assert inst.calls == []
            else:
                np.testing.assert_allclose(inst.calls[-1], (1.0, -2.0))
                assert not a.clamped
        finally:
            d.close()
            bridge.stop()
