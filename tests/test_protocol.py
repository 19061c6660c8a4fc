"""Property tests for the ``stem-live/1`` wire protocol (``stem_live.protocol``).

1. Every valid message type round-trips bit-exactly through ``encode`` -> ``decode`` with the
   parts given as-is (memoryviews), as ``bytes`` and as ``bytearray``; decoded arrays are
   zero-copy, read-only views of the received buffers.
2. Malformed messages of every kind raise ``ProtocolError`` and nothing else; none decodes.
   Unknown extra header / array-description fields are accepted (forward compatible).
3. A real pyzmq PAIR socket pair carries valid and malformed messages through ``protocol.recv``.

Every decoded message is counted in ``_COUNTS``; ``test_zz_generated_message_count`` asserts the
whole module decoded at least 10,000 generated messages (it skips when only a subset ran).
"""

from __future__ import annotations

import functools
import json
import math
import struct
from dataclasses import fields
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stem_live import protocol as P
from stem_live.protocol import Ack, Command, Correction, Frame, Maps, ProtocolError, Reply

# ----------------------------------------------------------------------------- bookkeeping

_COUNTS: dict[str, int] = {}
_CURRENT = ["?"]
MIN_TOTAL_MESSAGES = 10_000


def tallied(fn):
    """Attribute every message decoded while ``fn`` runs to ``fn``'s name."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _CURRENT[0] = fn.__name__
        _COUNTS.setdefault(fn.__name__, 0)
        return fn(*args, **kwargs)

    return wrapper


def _count(n: int = 1) -> None:
    _COUNTS[_CURRENT[0]] = _COUNTS.get(_CURRENT[0], 0) + n


def fast(n: int):
    return settings(max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much])


def decode_ok(parts: list) -> P.Message:
    _count()
    return P.decode(parts)


def assert_rejected(parts: Any) -> ProtocolError:
    """``decode`` must raise ProtocolError with a non-empty reason -- and nothing else."""
    _count()
    try:
        out = P.decode(parts)
    except ProtocolError as exc:
        assert str(exc), "ProtocolError without a reason"
        return exc
    except Exception as exc:  # any other exception type is a defect
        pytest.fail(f"decode raised {type(exc).__name__}: {exc!s:.300} (not ProtocolError) for {_short(parts)}")
    pytest.fail(f"decode accepted a malformed message {_short(parts)} -> {out!r:.300}")


def _short(parts: Any) -> str:
    try:
        return repr([bytes(p)[:300] if isinstance(p, (bytes, bytearray, memoryview)) else p for p in parts])[:600]
    except Exception:
        return repr(parts)[:600]


# ----------------------------------------------------------------------------- strategies

MAX_ID = P.MAX_ID
FINITE = st.floats(allow_nan=False, allow_infinity=False)
TEXT = st.text(max_size=12)
SCALAR = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), FINITE, TEXT)
JSON = st.recursive(SCALAR, lambda c: st.lists(c, max_size=4) | st.dictionaries(TEXT, c, max_size=4),
                    max_leaves=12)
JSON_OBJ = st.dictionaries(TEXT, JSON, max_size=5)
LISTS = st.lists(SCALAR, max_size=3) | st.lists(st.lists(SCALAR, max_size=2), min_size=1, max_size=2)  # cheap junk
DICTS = st.dictionaries(TEXT, SCALAR, max_size=3)
HUGE_INT = st.integers(10**309, 10**400) | st.integers(-(10**400), -(10**309))  # no float can hold these
LONG_TEXT = st.integers(P.MAX_TEXT + 1, P.MAX_TEXT + 200).map(lambda n: "x" * n)
IDS = st.integers(0, MAX_ID)

# numpy dtypes as a sender may hold them: both byte orders (uint8 has none)
ALL_DTYPES = [np.dtype(o + c) for c in ("u1", "u2", "i4", "f4", "f8") for o in "<>"]
IMAGE_DTYPES = [np.dtype(o + c) for c in ("u1", "u2", "f4") for o in "<>"]


def _layout(a: np.ndarray, how: str) -> np.ndarray:
    """Same values as ``a`` in a different memory layout (all views are non-contiguous or F-order)."""
    if how == "fortran":
        return np.asfortranarray(a)
    if how == "step" and a.ndim:
        return np.repeat(a, 2, axis=-1)[..., ::2]
    if how == "negative" and a.ndim:
        return np.flip(np.flip(a, -1).copy(), -1)
    return a


@st.composite
def arrays(draw, dtypes, min_dims, max_dims, min_side, max_side, finite=False):
    """Arrays of every bit pattern (raw random bytes), both byte orders, several layouts."""
    dt = draw(st.sampled_from(dtypes))
    ndim = draw(st.integers(min_dims, max_dims))
    shape = tuple(draw(st.integers(min_side, max_side)) for _ in range(ndim))
    n = math.prod(shape) * dt.itemsize
    a = np.frombuffer(draw(st.binary(min_size=n, max_size=n)), dtype=dt).reshape(shape).copy()
    if finite and dt.kind == "f":
        a[~np.isfinite(a)] = draw(st.floats(-65504.0, 65504.0, width=32))
    return _layout(a, draw(st.sampled_from(["c", "fortran", "step", "negative"])))


def images(finite=True, max_side=12):
    return arrays(IMAGE_DTYPES, 2, 2, 2, max_side, finite=finite)


def pairs(elem=FINITE):
    return st.tuples(elem, elem)


POSITIVE = st.floats(min_value=5e-324, allow_nan=False, allow_infinity=False)

frames = st.builds(
    Frame,
    seq=IDS,
    image=images(),
    t_start=FINITE,
    pixel_size_nm=pairs(POSITIVE),
    dwell_us=st.floats(1e-6, 1e6),
    flyback_us=st.floats(0.0, 1e7),
    scan_rotation_rad=st.floats(-100.0, 100.0),
    beam_shift_nm=pairs(),
    stream=TEXT,
    detector=TEXT,
)
corrections = st.builds(Correction, id=IDS, beam_shift_nm=pairs(), for_seq=IDS, reason=TEXT)
acks = st.builds(Ack, id=IDS, applied_nm=pairs(), clamped=st.booleans(), error=TEXT)
METRIC = st.one_of(st.none(), FINITE, st.integers(-(2**53), 2**53))
maps_ = st.builds(
    Maps,
    seq=IDS,
    arrays=st.dictionaries(st.text(min_size=1, max_size=64), arrays(ALL_DTYPES, 0, 4, 0, 4), max_size=5),
    metrics=st.dictionaries(TEXT, METRIC, max_size=6),
    info=JSON_OBJ,
)
commands = st.builds(Command, cmd=st.sampled_from(P.COMMANDS), args=JSON_OBJ)
replies = st.builds(Reply, cmd=st.sampled_from(P.COMMANDS) | TEXT, ok=st.booleans(), message=TEXT, state=JSON_OBJ)
MESSAGES = st.one_of(frames, corrections, acks, maps_, commands, replies)

# Small, cheap valid messages (the raw material of the malformed-message tests).
small_maps = st.builds(Maps, seq=IDS,
                       arrays=st.dictionaries(st.text(min_size=1, max_size=8), arrays(ALL_DTYPES, 1, 3, 1, 3), max_size=3),
                       metrics=st.dictionaries(TEXT, METRIC, max_size=3), info=st.dictionaries(TEXT, SCALAR, max_size=3))
SMALL = st.one_of(frames, corrections, acks, small_maps, commands, replies)
WITH_ARRAYS = st.one_of(frames, small_maps.filter(lambda m: len(m.arrays) > 0))

# field -> kind, per message type ("?" = optional, has a default)
FIELDS: dict[str, dict[str, str]] = {
    "frame": {"seq": "int", "t_start": "float", "pixel_size_nm": "ppair", "dwell_us": "dwell", "flyback_us": "flyback",
              "scan_rotation_rad": "rotation", "beam_shift_nm": "pair", "stream": "str", "detector": "str?",
              "arrays": "arrays"},
    "correction": {"id": "int", "beam_shift_nm": "pair", "for_seq": "int", "reason": "str?", "arrays": "arrays?"},
    "ack": {"id": "int", "applied_nm": "pair", "clamped": "bool", "error": "str?", "arrays": "arrays?"},
    "maps": {"seq": "int", "metrics": "metrics?", "info": "dict?", "arrays": "arrays?"},
    "command": {"cmd": "cmd", "args": "dict?", "arrays": "arrays?"},
    "reply": {"cmd": "str", "ok": "bool", "message": "str?", "state": "dict?", "arrays": "arrays?"},
}
TYPES = tuple(FIELDS)
BOUNDS = {"dwell": (1e-6, 1e6), "flyback": (0.0, 1e7), "rotation": (-100.0, 100.0)}


def _out_of(lo: float, hi: float):
    return st.one_of(st.floats(max_value=lo, exclude_max=True, allow_nan=False, allow_infinity=False),
                     st.floats(min_value=hi, exclude_min=True, allow_nan=False, allow_infinity=False))


def _as_list(t):
    return list(t)


JUNK_ELEM = st.one_of(TEXT, st.booleans(), st.none(), LISTS, DICTS, HUGE_INT)
NOT_A_NUMBER = st.one_of(TEXT, st.booleans(), st.none(), LISTS, DICTS)


def wrong_value(kind: str):
    """Values that are never valid for a field of ``kind``."""
    kind = kind.rstrip("?")
    if kind == "int":
        return st.one_of(NOT_A_NUMBER, FINITE, st.integers(max_value=-1), st.integers(MAX_ID + 1, 10**400))
    if kind == "float":
        return st.one_of(NOT_A_NUMBER, HUGE_INT)
    if kind in BOUNDS:
        return st.one_of(NOT_A_NUMBER, HUGE_INT, _out_of(*BOUNDS[kind]))
    if kind in ("pair", "ppair"):
        bad = [NOT_A_NUMBER.filter(lambda v: not isinstance(v, list)), FINITE, st.integers(),
               st.lists(FINITE, max_size=6).filter(lambda v: len(v) != 2),
               st.tuples(JUNK_ELEM, FINITE).map(_as_list), st.tuples(FINITE, JUNK_ELEM).map(_as_list),
               st.lists(st.lists(FINITE, max_size=2), min_size=2, max_size=2)]
        if kind == "ppair":
            nonpos = st.floats(max_value=0.0, allow_nan=False, allow_infinity=False)
            bad += [st.tuples(nonpos, POSITIVE).map(_as_list), st.tuples(POSITIVE, nonpos).map(_as_list)]
        return st.one_of(bad)
    if kind == "str":
        return st.one_of(st.integers(), FINITE, st.booleans(), st.none(), LISTS, DICTS, LONG_TEXT)
    if kind == "cmd":
        return st.one_of(wrong_value("str"), TEXT.filter(lambda s: s not in P.COMMANDS),
                         st.sampled_from(["ARM", " arm", "arm ", "disarmed", "stop", ""]))
    if kind == "bool":
        return st.one_of(st.integers(), FINITE, TEXT, st.none(), LISTS, DICTS)
    if kind == "dict":
        return st.one_of(st.integers(), FINITE, TEXT, st.booleans(), st.none(), LISTS)
    if kind == "metrics":
        return st.one_of(wrong_value("dict"),
                         st.dictionaries(TEXT, st.one_of(TEXT, st.booleans(), LISTS, DICTS, HUGE_INT), min_size=1,
                                         max_size=3))
    if kind == "arrays":
        return st.one_of(TEXT, st.integers(), FINITE, st.booleans(), st.none(), DICTS,
                         st.lists(st.one_of(SCALAR, LISTS), min_size=1, max_size=3))
    if kind == "proto":
        return st.one_of(TEXT.filter(lambda s: s != P.PROTO), st.integers(), FINITE, st.booleans(), st.none(),
                         LISTS, DICTS,
                         st.sampled_from(["stem-live/2", "stem-live/0", "STEM-LIVE/1", " stem-live/1", "stem-live/1\n",
                                          "stem-live", "stem-live/1.0", "stem-live/10"]))
    if kind == "type":
        return st.one_of(TEXT.filter(lambda s: s not in TYPES), st.integers(), FINITE, st.booleans(), st.none(),
                         LISTS, DICTS, st.sampled_from(["Frame", "FRAME", "frames", " frame", "map", "cmd", ""]))
    raise AssertionError(kind)


UNSUPPORTED_DTYPES = ["int8", "complex64", "object", "<U4", "U4", "O", "S4", "float16", "bool", "int64", "uint32",
                      "uint64", "int16", "complex128", "<u2", ">f4", "u1", "f4", "float", "int", "UINT8", "uint8 ",
                      " float32", "", "datetime64[ns]", "V4"]

# ----------------------------------------------------------------------------- helpers


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _canon(x: Any) -> str:
    """JSON with float reprs: tells 1 from 1.0 and 0.0 from -0.0, tuples compare as lists."""
    return json.dumps(x, sort_keys=True, allow_nan=False)


def _meta(msg: Any) -> dict:
    return {f.name: getattr(msg, f.name) for f in fields(msg) if f.name not in ("image", "arrays")}


def _arrays_of(msg: Any) -> list[tuple[str, np.ndarray]]:
    if isinstance(msg, Frame):
        return [("image", msg.image)]
    if isinstance(msg, Maps):
        return list(msg.arrays.items())
    return []


def wire_bytes(a: np.ndarray) -> bytes:
    """Little-endian C-order bytes of ``a``, computed independently of protocol.py."""
    raw = np.frombuffer(a.tobytes(order="C"), dtype=np.uint8)
    if a.dtype.byteorder == ">" and a.dtype.itemsize > 1:
        raw = raw.reshape(-1, a.dtype.itemsize)[:, ::-1]
    return raw.tobytes()


def le_dtype(a: np.ndarray) -> np.dtype:
    return a.dtype.newbyteorder("<")


def header(parts: list) -> dict:
    return json.loads(bytes(parts[0]))


def with_header(head: dict, parts: list, *, token: str | None = None) -> list:
    raw = json.dumps(head)
    if token is not None:
        assert '"@@TOKEN@@"' in raw
        raw = raw.replace('"@@TOKEN@@"', token)
    return [raw.encode(), *parts[1:]]


def check_decoded(msg: Any, out: Any, parts: list) -> None:
    assert type(out) is type(msg)
    assert _canon(_meta(out)) == _canon(_meta(msg))
    for k, v in _meta(msg).items():  # float bits too, not just JSON text
        if isinstance(v, float):
            assert _bits(getattr(out, k)) == _bits(v), k
        if isinstance(v, tuple):
            assert [_bits(x) for x in getattr(out, k)] == [_bits(float(x)) for x in v], k
    sent = _arrays_of(msg)
    got = _arrays_of(out)
    assert [n for n, _ in got] == [n for n, _ in sent]
    assert len(parts) == 1 + len(sent)
    for (name, a), (_, b), part in zip(sent, got, parts[1:]):
        assert isinstance(b, np.ndarray)
        assert b.dtype == le_dtype(a) and b.dtype.byteorder in "<=|", name
        assert b.shape == a.shape, name
        assert b.tobytes() == wire_bytes(a), name
        if a.dtype.kind != "f":
            assert np.array_equal(a, b)
        # zero-copy, read-only view of the received buffer
        assert not b.flags.writeable
        if b.size:
            assert np.shares_memory(b, np.frombuffer(part, dtype=np.uint8)), name
            with pytest.raises(ValueError):
                b.reshape(-1)[0] = 0


def roundtrip(msg: Any) -> None:
    parts = P.encode(msg)
    assert isinstance(parts, list) and isinstance(parts[0], bytes)
    head = json.loads(parts[0].decode("utf-8"))
    assert head["proto"] == P.PROTO and head["type"] == P._TYPES[type(msg)]
    for variant in (list(parts), [bytes(p) for p in parts], [bytearray(p) for p in parts], tuple(parts)):
        out = decode_ok(variant)
        check_decoded(msg, out, list(variant))
    # encode is zero-copy for arrays that already are C-contiguous little-endian
    for (_, a), part in zip(_arrays_of(msg), parts[1:]):
        if a.size and a.flags.c_contiguous and a.dtype.byteorder in "<=|":
            assert np.shares_memory(np.frombuffer(part, dtype=np.uint8), a)


# ============================================================================ 1. round trips


@tallied
@fast(120)
@given(frames)
def test_frame_roundtrip(msg):
    roundtrip(msg)
    out = decode_ok(P.encode(msg))
    assert out.line_times().shape == (msg.image.shape[0],)


@tallied
@fast(100)
@given(maps_)
def test_maps_roundtrip(msg):
    roundtrip(msg)


@tallied
@fast(120)
@given(st.one_of(corrections, acks, commands, replies))
def test_small_messages_roundtrip(msg):
    roundtrip(msg)


@tallied
def test_every_command_and_dtype_roundtrips():
    for cmd in P.COMMANDS:
        roundtrip(Command(cmd=cmd, args={"k": [1, 2.5, None, "x", {"n": -0.0}]}))
        roundtrip(Reply(cmd=cmd, ok=True, message="done", state={"armed": False}))
    rng = np.random.default_rng(0)
    for dt in ALL_DTYPES:
        a = rng.integers(0, 256, size=48, dtype=np.uint8).view(dt)
        roundtrip(Maps(seq=1, arrays={"a": a.reshape(2, -1), "empty": a[:0].reshape(0, 3)}, metrics={"fps": 1.5}))
    for dt in IMAGE_DTYPES:
        img = np.arange(12, dtype=dt).reshape(3, 4)
        for how in ("c", "fortran", "step", "negative"):
            roundtrip(Frame(seq=7, image=_layout(img, how)))
            roundtrip(Frame(seq=7, image=_layout(img, how).T))


# ============================================================================ 2. malformed


@tallied
@fast(250)
@given(st.one_of(st.binary(max_size=300), TEXT.map(str.encode), JSON.map(lambda v: json.dumps(v).encode())),
       st.lists(st.binary(max_size=40), max_size=3))
def test_random_header_bytes(head, bufs):
    assert_rejected([head, *bufs])


@tallied
@fast(40)
@given(SMALL)
def test_every_truncated_header(msg):
    parts = P.encode(msg)
    raw = parts[0]
    view = memoryview(bytearray(raw))
    for n in range(len(raw)):  # every proper prefix, as bytes and as a memoryview slice
        assert_rejected([raw[:n], *parts[1:]])
        assert_rejected([view[:n], *parts[1:]])


@tallied
@fast(120)
@given(SMALL, st.data())
def test_wrong_or_missing_proto(msg, data):
    parts = P.encode(msg)
    head = header(parts)
    if data.draw(st.booleans()):
        del head["proto"]
    else:
        head["proto"] = data.draw(wrong_value("proto"))
    assert_rejected(with_header(head, parts))


@tallied
@fast(60)
@given(SMALL)
def test_every_required_field_removed(msg):
    parts = P.encode(msg)
    head = header(parts)
    kind = head["type"]
    required = ["proto", "type"] + [k for k, v in FIELDS[kind].items() if not v.endswith("?")]
    if kind == "maps" and len(parts) > 1:
        required.append("arrays")
    for key in required:
        h = dict(head)
        del h[key]
        assert_rejected(with_header(h, parts))
    # optional fields may go: the defaults apply
    for key, v in FIELDS[kind].items():
        if v.endswith("?") and not (key == "arrays" and len(parts) > 1):
            h = dict(head)
            h.pop(key, None)
            decode_ok(with_header(h, parts))


@tallied
@fast(100)
@given(SMALL, st.data())
def test_every_field_wrong_type(msg, data):
    parts = P.encode(msg)
    head = header(parts)
    kind = head["type"]
    for key, fkind in {"proto": "proto", "type": "type", **FIELDS[kind]}.items():
        h = dict(head)
        h[key] = data.draw(wrong_value(fkind), label=key)
        assert_rejected(with_header(h, parts))


NONFINITE_TOKENS = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1E999", "2e308", "-9.9e99999"]


@tallied
@fast(60)
@given(SMALL, st.sampled_from(NONFINITE_TOKENS), st.data())
def test_nonfinite_metadata(msg, token, data):
    parts = P.encode(msg)
    head = header(parts)
    kind = head["type"]
    spots = []
    for key, fkind in FIELDS[kind].items():
        base = fkind.rstrip("?")
        if base in ("float", "dwell", "flyback", "rotation", "int", "str", "bool"):
            spots.append((key, "@@TOKEN@@"))
        elif base in ("pair", "ppair"):
            spots += [(key, ["@@TOKEN@@", 1.0]), (key, [1.0, "@@TOKEN@@"])]
        elif base == "metrics":
            spots.append((key, {"fps": "@@TOKEN@@"}))
        elif base == "dict":
            spots += [(key, {"a": "@@TOKEN@@"}), (key, {"a": [1, {"b": "@@TOKEN@@"}]})]
    spots.append((data.draw(TEXT.filter(lambda k: k not in head), label="unknown key"), "@@TOKEN@@"))
    for key, value in spots:
        h = dict(head)
        h[key] = value
        assert_rejected(with_header(h, parts, token=token))
    if parts[1:]:  # inside an array description
        h = json.loads(json.dumps(head))
        h["arrays"][0]["shape"] = ["@@TOKEN@@"] + h["arrays"][0]["shape"][1:]
        assert_rejected(with_header(h, parts, token=token))


@tallied
@fast(120)
@given(WITH_ARRAYS, st.data())
def test_buffer_size_mismatch(msg, data):
    parts = [bytes(p) for p in P.encode(msg)]
    i = data.draw(st.integers(1, len(parts) - 1), label="buffer")
    buf = parts[i]
    if buf and data.draw(st.booleans(), label="truncate"):
        new = buf[: data.draw(st.integers(0, len(buf) - 1), label="keep")]
    else:
        new = buf + data.draw(st.binary(min_size=1, max_size=64), label="extra")
    parts[i] = data.draw(st.sampled_from([bytes, bytearray, memoryview]))(new)
    assert_rejected(parts)


@tallied
@fast(100)
@given(WITH_ARRAYS, st.one_of(st.sampled_from(UNSUPPORTED_DTYPES), st.integers(), st.none(), LISTS, DICTS,
                              st.booleans()), st.data())
def test_unsupported_dtype(msg, dtype, data):
    assert not (isinstance(dtype, str) and dtype in P.DTYPES)
    parts = P.encode(msg)
    head = header(parts)
    j = data.draw(st.integers(0, len(head["arrays"]) - 1))
    head["arrays"][j]["dtype"] = dtype
    assert_rejected(with_header(head, parts))


@st.composite
def absurd_shape(draw, frame: bool, itemsize: int):
    """(shape value, buffer) pairs; where possible the buffer matches the product of the shape."""
    n = st.integers(1, 40)
    options = [
        st.tuples(st.integers(-50, -1), n).map(list),  # negative
        st.tuples(n, st.integers(-50, -1)).map(list),
        st.lists(st.integers(1, 3), min_size=5, max_size=7),  # 5-D and more
        st.lists(st.integers(2**31 + 1, 2**70), min_size=1, max_size=2),  # side beyond 2^31
        st.lists(st.integers(2**20, 2**31), min_size=2, max_size=4),  # over the 1 GiB limit
        st.lists(st.floats(1.0, 9.0).map(float), min_size=2, max_size=2),  # float sides
        st.lists(st.booleans(), min_size=2, max_size=2),
        st.lists(st.just("4"), min_size=2, max_size=2),
        st.lists(st.lists(n, min_size=1, max_size=1), min_size=2, max_size=2),
        st.one_of(st.none(), n, TEXT, DICTS),  # not a list
    ]
    if frame:
        options += [
            st.tuples(st.just(1), n).map(list),  # 1xN
            st.tuples(n, st.just(1)).map(list),  # Nx1
            st.tuples(st.just(0), n).map(list),  # zero-size
            st.tuples(n, st.just(0)).map(list),
            st.lists(n, min_size=1, max_size=1),  # 1-D
            st.just([]),  # 0-D
            st.lists(st.integers(2, 4), min_size=3, max_size=4),  # 3-D / 4-D
            st.tuples(st.integers(P.MAX_IMAGE_SIDE + 1, 20000), st.just(2)).map(list),  # side too long
            st.tuples(st.just(2), st.integers(P.MAX_IMAGE_SIDE + 1, 20000)).map(list),
        ]
    shape = draw(st.one_of(options))
    size = None
    if isinstance(shape, list) and all(isinstance(s, (int, float)) for s in shape):
        prod = abs(math.prod(shape))
        if prod * itemsize <= 1 << 20 and prod == int(prod):
            size = int(prod) * itemsize
    if size is None or draw(st.booleans()):
        size = draw(st.integers(0, 64)) if size is None else size
    return shape, bytes(size)


@tallied
@fast(150)
@given(WITH_ARRAYS, st.data())
def test_absurd_shapes(msg, data):
    parts = P.encode(msg)
    head = header(parts)
    j = data.draw(st.integers(0, len(head["arrays"]) - 1))
    desc = head["arrays"][j]
    shape, buf = data.draw(absurd_shape(isinstance(msg, Frame), P.DTYPES[desc["dtype"]].itemsize))
    desc["shape"] = shape
    parts = with_header(head, parts)
    parts[1 + j] = buf
    assert_rejected(parts)


@tallied
@fast(120)
@given(SMALL, st.data())
def test_bad_array_descriptions(msg, data):
    parts = P.encode(msg)
    head = header(parts)
    n = len(parts) - 1
    how = data.draw(st.sampled_from(["drop_buffer", "extra_buffer", "drop_desc", "extra_desc", "bad_name",
                                     "not_dict", "missing_key", "too_many"]))
    bufs = list(parts[1:])
    descs = head.get("arrays", [])
    if how == "drop_buffer" and n:
        bufs.pop(data.draw(st.integers(0, n - 1)))
    elif how == "drop_desc" and n:
        descs.pop(data.draw(st.integers(0, n - 1)))
    elif how == "extra_desc":
        descs.append({"name": "extra", "dtype": "uint8", "shape": [data.draw(st.integers(0, 4))]})
    elif how == "bad_name" and n:
        j = data.draw(st.integers(0, n - 1))
        names = [d["name"] for d in descs]
        bad = [st.just(""), st.text(min_size=65, max_size=80), st.integers(), st.none(), LISTS, st.booleans()]
        if n > 1:
            bad.append(st.sampled_from([nm for k, nm in enumerate(names) if k != j]))  # repeated
        if isinstance(msg, Frame):
            bad.append(TEXT.filter(lambda s: s != "image"))
        descs[j]["name"] = data.draw(st.one_of(bad))
    elif how == "not_dict" and n:
        descs[data.draw(st.integers(0, n - 1))] = data.draw(st.one_of(SCALAR, LISTS))
    elif how == "missing_key" and n:
        del descs[data.draw(st.integers(0, n - 1))][data.draw(st.sampled_from(["name", "dtype", "shape"]))]
    elif how == "too_many":
        k = P.MAX_ARRAYS + 1
        descs[:] = [{"name": f"a{i}", "dtype": "uint8", "shape": [1]} for i in range(k)]
        bufs = [b"x"] * k
    else:  # extra_buffer (and fall-back when the message has no arrays)
        bufs.insert(data.draw(st.integers(0, len(bufs))), data.draw(st.binary(max_size=16)))
    head["arrays"] = descs
    assert_rejected([json.dumps(head).encode(), *bufs])


NON_BYTES = st.one_of(st.integers(), st.none(), DICTS, FINITE, st.text(min_size=1, max_size=8), LISTS,
                      st.builds(object), st.just(np.array(["2020-01-01"], dtype="M8[D]")),
                      st.just(np.zeros((4, 4), np.uint8)[:, 1]), st.just(memoryview(b"abcdef")[::2]),
                      st.just(str), st.just(P.decode))


@tallied
@fast(120)
@given(SMALL, NON_BYTES, st.data())
def test_non_bytes_parts(msg, junk, data):
    parts = list(P.encode(msg))
    i = data.draw(st.integers(0, len(parts)))
    if i < len(parts) and data.draw(st.booleans()):
        parts[i] = junk
    else:
        parts.insert(i, junk)
    assert_rejected(parts)


@tallied
def test_empty_and_non_sequence_messages():
    for parts in ([], (), None, b"", b"{}", "stem-live/1", 0, {}, {"proto": P.PROTO}, iter([b"{}"]), bytearray(),
                  np.array([b"{}"]), [[]], [None], [b""], [b"   "], [b"null"], [b"[]"], [b'"x"'], [b"{}"],
                  [b"[" * 100_000], [b'{"a":' * 100_000], [b"\xef\xbb\xbf{}"], [b"{" + b" " * (P.MAX_HEADER_BYTES + 1) + b"}"]):
        assert_rejected(parts)


@tallied
@fast(80)
@given(arrays([np.dtype("<f4"), np.dtype(">f4")], 2, 2, 2, 12, finite=True),
       st.sampled_from([np.nan, -np.nan, np.inf, -np.inf]), st.data())
def test_nonfinite_float_image(img, bad, data):
    img = img.copy()
    flat = data.draw(st.lists(st.integers(0, img.size - 1), min_size=1, max_size=3))
    img.reshape(-1)[flat] = bad
    img = _layout(img, data.draw(st.sampled_from(["c", "fortran", "step", "negative"])))
    parts = P.encode(Frame(seq=1, image=img))
    assert_rejected(parts)
    assert_rejected([bytes(p) for p in parts])


@tallied
def test_encode_rejects_what_decode_would():
    with pytest.raises(ProtocolError):
        P.encode(Frame(seq=1, image=np.zeros((4, 4), np.int8)))
    with pytest.raises(ProtocolError):
        P.encode(Frame(seq=1, image=np.zeros((4, 4, 1), np.uint8)))
    with pytest.raises(ProtocolError):
        P.encode(Maps(seq=1, arrays={"c": np.zeros(3, np.complex64)}))
    with pytest.raises(ProtocolError):
        P.encode(Command(cmd="set", args={"x": float("nan")}))
    with pytest.raises(ProtocolError):
        P.encode("not a message")  # type: ignore[arg-type]


@tallied
@fast(100)
@given(SMALL, st.dictionaries(TEXT, JSON, min_size=1, max_size=4), st.dictionaries(TEXT, SCALAR, max_size=3))
def test_unknown_fields_are_accepted(msg, extra, extra_desc):
    """Forward compatibility: decode ignores header and array-description fields it does not know."""
    parts = P.encode(msg)
    head = header(parts)
    known = set(FIELDS[head["type"]]) | {"proto", "type"}
    h = dict(head, **{k: v for k, v in extra.items() if k not in known})
    for d in h.get("arrays", []):
        d.update({k: v for k, v in extra_desc.items() if k not in ("name", "dtype", "shape")})
    out = decode_ok(with_header(h, parts))
    check_decoded(msg, out, with_header(h, parts))


# ============================================================================ 3. real pyzmq


zmq = pytest.importorskip("zmq")


@pytest.fixture(scope="module")
def pair():
    ctx = zmq.Context()
    a = ctx.socket(zmq.PAIR)
    b = ctx.socket(zmq.PAIR)
    for s in (a, b):
        s.setsockopt(zmq.LINGER, 0)
        s.setsockopt(zmq.RCVTIMEO, 5000)
        s.setsockopt(zmq.SNDTIMEO, 5000)
    try:
        a.bind("tcp://127.0.0.1:*")
        endpoint = a.getsockopt(zmq.LAST_ENDPOINT).decode()
        assert endpoint.startswith("tcp://127.0.0.1:")
        b.connect(endpoint)
        yield a, b
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


@st.composite
def malformed_wire(draw):
    """A malformed message made of byte parts (what can actually travel over ZeroMQ)."""
    msg = draw(SMALL)
    parts = [bytes(p) for p in P.encode(msg)]
    how = draw(st.sampled_from(["truncate_header", "bad_proto", "drop_field", "nan", "buffer", "extra_buffer"]))
    head = header(parts)
    if how == "truncate_header":
        parts[0] = parts[0][: draw(st.integers(0, len(parts[0]) - 1))]
    elif how == "bad_proto":
        head["proto"] = "stem-live/2"
        parts = with_header(head, parts)
    elif how == "drop_field":
        req = [k for k, v in FIELDS[head["type"]].items() if not v.endswith("?")] or ["proto"]
        del head[draw(st.sampled_from(req))]
        parts = with_header(head, parts)
    elif how == "nan":
        head["x"] = "@@TOKEN@@"
        parts = with_header(head, parts, token="NaN")
    elif how == "buffer" and len(parts) > 1:
        parts[1] = parts[1] + b"\x00"
    else:
        parts.append(b"\x01\x02")
    return parts


@tallied
@fast(25)
@given(st.lists(st.one_of(SMALL.map(lambda m: ("ok", m)), malformed_wire().map(lambda p: ("bad", p))),
                min_size=1, max_size=8))
def test_zmq_pair_valid_and_malformed(pair, batch):
    tx, rx = pair
    while rx.poll(0):  # left over from an earlier failing example
        rx.recv_multipart()
    for what, item in batch:
        if what == "ok":
            P.send(tx, item)
        else:
            tx.send_multipart(item)
    for what, item in batch:
        _count()
        if what == "ok":
            out = P.recv(rx)
            assert type(out) is type(item)
            assert _canon(_meta(out)) == _canon(_meta(item))
            for (n1, a), (n2, b) in zip(_arrays_of(item), _arrays_of(out)):
                assert n1 == n2 and b.tobytes() == wire_bytes(a) and not b.flags.writeable
        else:
            with pytest.raises(ProtocolError):
                P.recv(rx)
    # the receiver is still alive and in step
    P.send(tx, Command(cmd="status"))
    assert P.recv(rx) == Command(cmd="status")
    assert rx.poll(0) == 0


# ============================================================================ total


def test_zz_generated_message_count():
    """All the tests above together decode at least 10,000 generated messages per run."""
    expected = {name for name, obj in globals().items()
                if name.startswith("test_") and callable(obj) and name != "test_zz_generated_message_count"}
    if not expected <= set(_COUNTS):
        pytest.skip(f"only part of the module ran ({len(set(_COUNTS) & expected)}/{len(expected)} tests)")
    total = sum(_COUNTS.values())
    print(f"\ndecoded messages per test: {_COUNTS}\ntotal: {total}")
    assert total >= MIN_TOTAL_MESSAGES, _COUNTS
