"""Protocol additions for the correction inside the frame: strips of a frame and corrections
that carry a beam-shift trajectory (issue 29). Backward compatible with stem-live/1 peers."""
import json

import numpy as np
import pytest

from stem_live import protocol
from stem_live.protocol import Correction, ProtocolError, Strip, Trajectory


def _strip(**kw) -> Strip:
    img = np.arange(64 * 32, dtype=np.uint16).reshape(64, 32)
    args = dict(seq=7, row0=128, frame_rows=256, image=img, t_start=12.5, pixel_size_nm=(0.02, 0.021), dwell_us=2.0,
                flyback_us=30.0, beam_shift_nm=(0.5, -0.25), stream="s", detector="ABF")
    args.update(kw)
    return Strip(**args)


def test_strip_round_trip_and_timing():
    s = _strip()
    back = protocol.decode(protocol.encode(s))
    assert isinstance(back, Strip)
    assert (back.seq, back.row0, back.frame_rows, back.stream, back.detector) == (7, 128, 256, "s", "ABF")
    np.testing.assert_array_equal(back.image, s.image)
    assert back.t_start == 12.5 and back.pixel_size_nm == (0.02, 0.021) and back.beam_shift_nm == (0.5, -0.25)
    assert back.line_time_s == pytest.approx((32 * 2.0 + 30.0) * 1e-6)
    assert not back.last and _strip(row0=192).last


@pytest.mark.parametrize("change, text", [
    (dict(row0=200), "run past the frame"),
    (dict(frame_rows=1), "frame_rows must be in"),
    (dict(arrays=[{"name": "image", "dtype": "uint16", "shape": [64, 16, 2]}]), "must be 2-D"),
    (dict(arrays=[{"name": "image", "dtype": "uint16", "shape": [0, 32]}]), "1 to"),
])
def test_bad_strips_are_refused_with_a_reason(change, text):
    parts = protocol.encode(_strip())
    head = json.loads(bytes(parts[0]))   # a header a sender got wrong: edited on the wire
    head.update(change)
    body = parts[1:] if head["arrays"][0]["shape"][0] else [b""]
    with pytest.raises(ProtocolError, match=text):
        protocol.decode([json.dumps(head).encode(), *body])
    nan = _strip(image=np.full((4, 4), np.nan, np.float32))
    with pytest.raises(ProtocolError, match="NaN"):
        protocol.decode(protocol.encode(nan))


def test_a_correction_carries_a_trajectory():
    traj = Trajectory(t_s=(1.0, 1.01, 1.05), beam_shift_nm=((0.1, 0.2), (0.11, 0.2), (0.15, 0.18)))
    c = Correction(id=3, beam_shift_nm=(0.1, 0.2), for_seq=9, reason="drift", trajectory=traj)
    back = protocol.decode(protocol.encode(c))
    assert back == c
    np.testing.assert_allclose(traj.at([0.5, 1.005, 1.03, 2.0]),
                               [[0.1, 0.2], [0.105, 0.2], [0.13, 0.19], [0.15, 0.18]], atol=1e-12)


def test_a_correction_without_a_trajectory_is_what_v1_peers_know():
    """No ``trajectory`` key on the wire: a stem-live/1 instrument decodes it as before, and a
    correction a v1 engine sends decodes with ``trajectory`` None."""
    parts = protocol.encode(Correction(id=1, beam_shift_nm=(0.0, 1.0), for_seq=2))
    head = json.loads(bytes(parts[0]))
    assert head["proto"] == "stem-live/1" and "trajectory" not in head
    assert protocol.decode(parts).trajectory is None


@pytest.mark.parametrize("traj, text", [
    ({"t_s": [1.0, 0.5], "beam_shift_nm": [[0, 0], [0, 1]]}, "must increase"),
    ({"t_s": [1.0], "beam_shift_nm": [[0, 0], [0, 1]]}, "as many"),
    ({"t_s": [], "beam_shift_nm": []}, "1 to"),
    ({"t_s": [1.0], "beam_shift_nm": [[0, "a"]]}, "pairs of finite"),
    ({"t_s": [True], "beam_shift_nm": [[0, 0]]}, "finite numbers"),
    ({"t_s": [1.0]}, "exactly"),
    ([1.0, 2.0], "an object"),
    ({"t_s": list(range(protocol.MAX_KNOTS + 1)), "beam_shift_nm": [[0, 0]] * (protocol.MAX_KNOTS + 1)}, "1 to"),
])
def test_bad_trajectories_are_refused_with_a_reason(traj, text):
    parts = protocol.encode(Correction(id=1, beam_shift_nm=(0.0, 0.0), for_seq=0))
    head = json.loads(bytes(parts[0]))
    head["trajectory"] = traj
    with pytest.raises(ProtocolError, match=text):
        protocol.decode([json.dumps(head).encode()])


# ----------------------------------------------------------------------------- strips -> frames
def _cut(frame_img: np.ndarray, seq: int, rows: int, order=None, **kw) -> list[Strip]:
    h = frame_img.shape[0]
    starts = list(range(0, h, rows))
    if order is not None:
        starts = [starts[i] for i in order]
    return [Strip(seq=seq, row0=r, frame_rows=h, image=frame_img[r:r + rows], t_start=seq * 1.0, **kw) for r in starts]


def test_strips_make_whole_frames_in_any_order():
    from stem_live.strips import StripAssembler

    rng = np.random.default_rng(0)
    a = StripAssembler()
    for seq, order in ((0, None), (1, [2, 0, 3, 1])):
        img = rng.integers(0, 60000, (100, 48)).astype(np.uint16)
        parts = _cut(img, seq, 32, order, beam_shift_nm=(0.1 * seq, 0.0), detector="BF")   # 32+32+32+4 rows
        out = [a.add(s) for s in parts]
        assert all(o is None for o in out[:-1])
        f = out[-1]
        assert f.seq == seq and f.detector == "BF" and f.t_start == seq and f.beam_shift_nm == (0.1 * seq, 0.0)
        np.testing.assert_array_equal(f.image, img)
    assert a.frames_dropped == 0


def test_a_stream_joined_mid_frame_skips_that_frame_without_a_drop():
    """The engine subscribed after a frame's first strips went out: that frame is skipped and
    counted as joined late, not dropped; the next frame is put together. A frame of the same
    stream that loses its first strip later is dropped."""
    from stem_live.strips import StripAssembler

    rng = np.random.default_rng(2)
    imgs = [rng.integers(0, 60000, (64, 16)).astype(np.uint16) for _ in range(3)]
    a = StripAssembler()
    assert all(a.add(s) is None for s in _cut(imgs[0], 0, 16)[2:])   # rows 32.. of frame 0 only
    frames = [a.add(s) for s in _cut(imgs[1], 1, 16)]
    assert a.frames_joined_late == 1 and a.frames_dropped == 0
    assert frames[-1] is not None and frames[-1].seq == 1
    np.testing.assert_array_equal(frames[-1].image, imgs[1])
    assert all(a.add(s) is None for s in _cut(imgs[2], 2, 16)[1:])   # frame 2 loses its first strip
    assert a.add(_cut(imgs[0], 3, 16)[0]) is None
    assert a.frames_dropped == 1 and "16 of 64 rows never arrived" in a.last_error and a.frames_joined_late == 1


def test_a_frame_with_missing_duplicate_or_inconsistent_strips_is_dropped_with_a_reason():
    from stem_live.strips import StripAssembler

    img = np.arange(64 * 16, dtype=np.uint16).reshape(64, 16)
    a = StripAssembler()
    s0 = _cut(img, 0, 16)
    assert a.add(s0[0]) is None and a.add(s0[1]) is None
    s1 = _cut(img, 1, 16)
    assert a.add(s1[0]) is None                      # frame 0 never finished
    assert a.frames_dropped == 1 and "32 of 64 rows never arrived" in a.last_error
    assert a.add(s1[0]) is None                      # the same rows twice
    assert a.frames_dropped == 2 and "sent twice" in a.last_error
    bad = Strip(seq=2, row0=16, frame_rows=64, image=img[16:32].astype(np.float32), t_start=2.0)
    assert a.add(_cut(img, 2, 16)[0]) is None and a.add(bad) is None   # dtype changed within the frame
    assert a.frames_dropped == 3 and "disagrees" in a.last_error
    frames = [a.add(s) for s in _cut(img, 3, 16)]   # and the stream goes on
    assert frames[-1] is not None and frames[-1].seq == 3
    # one row that claims a frame far larger than it: no memory is taken for it
    small = StripAssembler(max_frame_bytes=1 << 20)
    huge = Strip(seq=4, row0=0, frame_rows=16384, image=np.zeros((1, 1024), np.uint16), t_start=4.0)
    assert small.add(huge) is None and small.frames_dropped == 1 and "32 MiB" in small.last_error
    assert small._part is None


def test_the_engine_service_takes_strips():
    """An instrument that sends strips gets its frames processed; a frame with a strip missing
    is dropped with a reason, and the stream goes on."""
    import time

    import zmq

    from stem_live.engine import Engine
    from stem_live.service import EngineService

    any_ = "tcp://127.0.0.1:*"
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(any_)
    svc = EngineService(Engine(), frames_endpoint=pub.getsockopt_string(zmq.LAST_ENDPOINT),
                        corrections_endpoint="tcp://127.0.0.1:9", maps_endpoint=any_, commands_endpoint=any_,
                        context=ctx)
    svc.start()
    try:
        time.sleep(0.3)
        rng = np.random.default_rng(1)
        img = rng.poisson(100, (64, 64)).astype(np.uint16)
        for s in _cut(img, 0, 16)[:3]:          # frame 0: the last strip never comes
            protocol.send(pub, s)
        for seq in (1, 2):
            for s in _cut(img, seq, 16):
                protocol.send(pub, s)
        t0 = time.monotonic()
        while svc.counters.processed < 2 and time.monotonic() - t0 < 10:
            time.sleep(0.01)
        assert svc.counters.processed + svc.counters.skipped == 2
        assert svc.counters.rejected == 1 and "rows never arrived" in svc.counters.last_reject
    finally:
        svc.stop()
        pub.close()
        ctx.term()


def test_a_frame_reports_its_beam_shift_per_line():
    """An instrument following a trajectory sends the commanded shift of every line with the
    frame (optional array ``beam_shift_lines_nm``); without it the frame's one shift holds."""
    from stem_live.protocol import Frame

    img = np.zeros((6, 4), np.uint16)
    lines = np.stack([np.arange(6) * 0.01, np.zeros(6)], axis=1)
    f = protocol.decode(protocol.encode(Frame(seq=1, image=img, beam_shift_nm=(0.0, 0.0), beam_shift_lines_nm=lines)))
    np.testing.assert_array_equal(f.beam_shift_lines_nm, lines)
    np.testing.assert_array_equal(f.beam_at_lines, lines)
    plain = protocol.decode(protocol.encode(Frame(seq=1, image=img, beam_shift_nm=(0.5, 0.25))))
    assert plain.beam_shift_lines_nm is None
    np.testing.assert_array_equal(plain.beam_at_lines, np.tile([0.5, 0.25], (6, 1)))
    for bad in (lines[:5], np.full((6, 2), np.inf), lines[:, :1]):
        parts = protocol.encode(Frame(seq=1, image=img, beam_shift_lines_nm=np.asarray(bad)))
        with pytest.raises(ProtocolError, match="beam_shift_lines_nm"):
            protocol.decode(parts)
