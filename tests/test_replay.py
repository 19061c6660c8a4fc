"""ReplayInstrument: lossless, in order, EndOfStream, realtime pacing, looping, beam shift."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import tifffile

from instrument_adapters.base import EndOfStream, Instrument, InstrumentError
from instrument_adapters.replay import ReplayInstrument
from stem_live.io import RecordError, StackWriter
from stem_live.protocol import Frame


def frames(n: int, dt: float = 0.05, start_seq: int = 10) -> list[Frame]:
    rng = np.random.default_rng(3)
    return [Frame(seq=start_seq + 2 * i, image=rng.integers(0, 65535, (16, 24), dtype=np.uint16),
                  t_start=100.0 + i * dt, pixel_size_nm=(0.02, 0.02), dwell_us=1.0, flyback_us=5.0,
                  beam_shift_nm=(0.1 * i, 0.0), stream="rec") for i in range(n)]


def recording(tmp_path, fs: list[Frame]):
    path = tmp_path / "rec.tif"
    with StackWriter(path) as w:
        for f in fs:
            w.write(f)
    return path


def drain(inst: Instrument) -> list[Frame]:
    out = []
    while True:
        try:
            out.append(inst.acquire())
        except EndOfStream:
            return out


def test_lossless_in_order_then_end_of_stream(tmp_path):
    fs = frames(7)
    inst = ReplayInstrument(recording(tmp_path, fs))
    assert inst.lossless is True and isinstance(inst, Instrument)
    assert len(inst) == 7
    got = drain(inst)
    assert [f.seq for f in got] == [f.seq for f in fs]
    for a, b in zip(fs, got):
        assert a.image.tobytes() == b.image.tobytes() and a.t_start == b.t_start
        assert a.beam_shift_nm == b.beam_shift_nm  # the shift recorded with the frame
    with pytest.raises(EndOfStream):
        inst.acquire()  # stays at the end
    inst.close()


def test_realtime_reproduces_recorded_timing(tmp_path):
    fs = frames(6, dt=0.06)
    path = recording(tmp_path, fs)
    fast = ReplayInstrument(path)
    t0 = time.monotonic()
    drain(fast)
    assert time.monotonic() - t0 < 0.2
    slow = ReplayInstrument(path, realtime=True)
    t0 = time.monotonic()
    arrivals = []
    for _ in range(6):
        slow.acquire()
        arrivals.append(time.monotonic() - t0)
    assert arrivals[0] < 0.1  # the first frame at once
    assert 0.28 <= arrivals[-1] <= 1.0  # 5 intervals of 60 ms
    assert all(b - a >= 0.045 for a, b in zip(arrivals, arrivals[1:]))
    double = ReplayInstrument(path, realtime=True, speed=2.0)
    t0 = time.monotonic()
    drain(double)
    assert 0.13 <= time.monotonic() - t0 <= 0.6


def test_close_interrupts_realtime_wait(tmp_path):
    fs = frames(3, dt=30.0)  # 30 s between frames
    inst = ReplayInstrument(recording(tmp_path, fs), realtime=True)
    inst.acquire()
    threading.Timer(0.1, inst.close).start()
    t0 = time.monotonic()
    with pytest.raises(EndOfStream):
        inst.acquire()
    assert time.monotonic() - t0 < 2


def test_loop_keeps_seq_and_time_increasing(tmp_path):
    fs = frames(3, dt=0.5)
    inst = ReplayInstrument(recording(tmp_path, fs), loop=True)
    got = [inst.acquire() for _ in range(8)]
    seqs = [f.seq for f in got]
    ts = [f.t_start for f in got]
    assert seqs == [10, 12, 14, 15, 17, 19, 20, 22]
    assert all(b > a for a, b in zip(ts, ts[1:]))
    assert ts[3] == pytest.approx(101.5)
    for i, f in enumerate(got):
        assert f.image.tobytes() == fs[i % 3].image.tobytes()
    inst.close()


def test_beam_shift_is_only_remembered(tmp_path):
    fs = frames(2)
    inst = ReplayInstrument(recording(tmp_path, fs))
    assert np.array_equal(inst.get_beam_shift(), [0.0, 0.0])
    inst.set_beam_shift(np.array([1.5, -2.0]))
    assert np.array_equal(inst.get_beam_shift(), [1.5, -2.0])
    assert inst.acquire().beam_shift_nm == fs[0].beam_shift_nm  # a recording cannot move
    with pytest.raises(InstrumentError):
        inst.set_beam_shift(np.array([np.nan, 0.0]))


def test_npy_and_imagej_sources(tmp_path):
    stack = np.arange(5 * 8 * 10, dtype=np.float32).reshape(5, 8, 10)
    npy = tmp_path / "s.npy"
    np.save(npy, stack)
    with pytest.raises(RecordError, match="pixel_size_nm"):
        ReplayInstrument(npy)
    (tmp_path / "s.json").write_text(json.dumps({"pixel_size_nm": 0.05, "dwell_us": 2.0, "flyback_us": 4.0}))
    inst = ReplayInstrument(npy)
    got = drain(inst)
    assert len(inst) == 5 and [f.seq for f in got] == [0, 1, 2, 3, 4]
    frame_time = 8 * (10 * 2.0 + 4.0) * 1e-6
    assert [f.t_start for f in got] == pytest.approx([i * frame_time for i in range(5)])
    assert np.array_equal(np.stack([f.image for f in got]), stack)

    ij = tmp_path / "ij.tif"
    tifffile.imwrite(ij, stack.astype(np.uint16), imagej=True, resolution=(1 / 0.03, 1 / 0.03),
                     metadata={"unit": "nm", "axes": "TYX"})
    inst = ReplayInstrument(ij, dwell_us=1.0, flyback_us=0.0)
    got = drain(inst)
    assert len(got) == 5 and got[0].pixel_size_nm == pytest.approx((0.03, 0.03))


def test_bad_file_is_a_record_error(tmp_path):
    p = tmp_path / "bad.tif"
    p.write_bytes(b"II*\x00garbage")
    with pytest.raises(RecordError):
        ReplayInstrument(p)
    with pytest.raises(InstrumentError):
        ReplayInstrument(recording(tmp_path, frames(1)), speed=0)
