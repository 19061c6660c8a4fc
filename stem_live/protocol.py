"""Wire protocol ``stem-live/1``: typed messages, ``encode`` / ``decode``, strict validation.

Every message is a ZeroMQ multipart message ``[header, *buffers]``. ``header`` is UTF-8 JSON
with ``"proto": "stem-live/1"`` and ``"type"``; array payloads are raw little-endian C-order
buffers described by ``header["arrays"] = [{"name", "dtype", "shape"}, ...]`` in buffer order.

``decode`` never raises anything but :class:`ProtocolError` (one clear reason per defect) and
returns arrays that are zero-copy, read-only views of the received buffers.

This module imports numpy only; the socket helpers ``send`` / ``recv`` take any object with
``send_multipart`` / ``recv_multipart`` (a pyzmq socket) so the analysis core stays zmq-free.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

PROTO = "stem-live/1"

MAX_HEADER_BYTES = 1 << 20
MAX_ARRAY_BYTES = 1 << 30
MAX_IMAGE_SIDE = 16384
MAX_ARRAYS = 64
MAX_ID = (1 << 63) - 1
MAX_TEXT = 4096

#: wire dtype name -> numpy dtype (always little-endian on the wire)
DTYPES: dict[str, np.dtype] = {
    "uint8": np.dtype("<u1"),
    "uint16": np.dtype("<u2"),
    "int32": np.dtype("<i4"),
    "float32": np.dtype("<f4"),
    "float64": np.dtype("<f8"),
}
IMAGE_DTYPES = ("uint8", "uint16", "float32")
COMMANDS = ("arm", "disarm", "reset", "record", "train", "set", "status")


class ProtocolError(ValueError):
    """A message that does not follow ``stem-live/1``; the text says what is wrong."""


# ----------------------------------------------------------------------------- messages


class _ScanRows:
    """What a frame and a strip derive alike from their scan fields and image (a plain base:
    a strip is not a frame, ``isinstance`` keeps them apart)."""

    @property
    def line_time_s(self) -> float:
        """Time from one line start to the next (s): ``cols * dwell + flyback``."""
        return (self.image.shape[1] * self.dwell_us + self.flyback_us) * 1e-6

    @property
    def beam_at_lines(self) -> np.ndarray:
        """(rows, 2) nm: the beam shift in effect at each of the image's lines."""
        if self.beam_shift_lines_nm is not None:
            return np.asarray(self.beam_shift_lines_nm, np.float64)
        return np.tile(np.asarray(self.beam_shift_nm, np.float64), (self.image.shape[0], 1))


@dataclass(frozen=True)
class Frame(_ScanRows):
    """One scanned frame (instrument -> engine). Units: s, nm, us, rad; image rows = slow scan (y)."""

    seq: int
    image: np.ndarray
    t_start: float = 0.0
    pixel_size_nm: tuple[float, float] = (0.01, 0.01)
    dwell_us: float = 1.0
    flyback_us: float = 0.0
    scan_rotation_rad: float = 0.0
    beam_shift_nm: tuple[float, float] = (0.0, 0.0)
    stream: str = "default"
    detector: str = "HAADF"
    #: (rows, 2) nm: the beam shift commanded at every line, where it changed within the frame
    #: (an instrument following a correction's trajectory); None: ``beam_shift_nm`` throughout
    beam_shift_lines_nm: np.ndarray | None = None

    @property
    def frame_time_s(self) -> float:
        return self.image.shape[0] * self.line_time_s

    def line_times(self) -> np.ndarray:
        """Start time of every scan line (s), shape (rows,)."""
        return self.t_start + np.arange(self.image.shape[0]) * self.line_time_s


@dataclass(frozen=True)
class Strip(_ScanRows):
    """Rows ``row0 .. row0 + image.shape[0] - 1`` of frame ``seq`` (instrument -> engine), sent
    as they are scanned. The scan's metadata are the whole frame's (``t_start`` is the frame's
    first line, ``frame_rows`` its number of rows): a strip's row ``i`` was scanned at
    ``t_start + (row0 + i) * line_time_s``."""

    seq: int
    row0: int
    frame_rows: int
    image: np.ndarray
    t_start: float = 0.0
    pixel_size_nm: tuple[float, float] = (0.01, 0.01)
    dwell_us: float = 1.0
    flyback_us: float = 0.0
    scan_rotation_rad: float = 0.0
    beam_shift_nm: tuple[float, float] = (0.0, 0.0)
    stream: str = "default"
    detector: str = "HAADF"
    #: (strip rows, 2) nm: the beam shift commanded at each of the strip's lines, where it
    #: changes within the frame (an instrument following a trajectory); None: ``beam_shift_nm``
    beam_shift_lines_nm: np.ndarray | None = None

    @property
    def last(self) -> bool:
        """Whether this strip ends its frame."""
        return self.row0 + self.image.shape[0] == self.frame_rows


@dataclass(frozen=True)
class Trajectory:
    """A beam-shift path: absolute targets ``beam_shift_nm`` (K, 2) nm (y, x) at times ``t_s``
    (K,) s, increasing, on the clock of the frames' ``t_start``; linear between knots, the last
    knot held after it. A start and a rate are two knots."""

    t_s: tuple[float, ...]
    beam_shift_nm: tuple[tuple[float, float], ...]

    def at(self, t_s) -> np.ndarray:
        """The path (n, 2) nm at times ``t_s`` (n,) s (the first knot before it, the last after it)."""
        t = np.asarray(t_s, np.float64).reshape(-1)
        knots = np.asarray(self.t_s, np.float64)
        b = np.asarray(self.beam_shift_nm, np.float64).reshape(-1, 2)
        return np.stack([np.interp(t, knots, b[:, q]) for q in range(2)], axis=1)


@dataclass(frozen=True)
class Correction:
    """Beam-shift target (engine -> instrument), nm (y, x), computed for frame ``for_seq``.

    ``trajectory`` (optional): the path to follow line by line over the coming lines; an
    instrument that cannot follow one applies ``beam_shift_nm`` at once, as for a correction
    without one (the engine puts there the path's mean over the frame)."""

    id: int
    beam_shift_nm: tuple[float, float]
    for_seq: int
    reason: str = ""
    trajectory: Trajectory | None = None


@dataclass(frozen=True)
class Ack:
    """The instrument's answer to a correction: what it applied, whether it clamped, or why not."""

    id: int
    applied_nm: tuple[float, float]
    clamped: bool = False
    error: str = ""
    warning: str = ""  # applied, but the operator must know (excursion budget, stage handover); optional field


@dataclass(frozen=True)
class Maps:
    """Live maps (engine -> monitor): named arrays plus JSON-able ``metrics`` and ``info``."""

    seq: int
    arrays: Mapping[str, np.ndarray] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    info: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Command:
    """A request to the engine (monitor -> engine); ``cmd`` is one of :data:`COMMANDS`."""

    cmd: str
    args: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Reply:
    """The engine's answer to a :class:`Command`."""

    cmd: str
    ok: bool
    message: str = ""
    state: Mapping[str, Any] = field(default_factory=dict)


Message = Frame | Strip | Correction | Ack | Maps | Command | Reply
_TYPES = {Frame: "frame", Strip: "strip", Correction: "correction", Ack: "ack", Maps: "maps", Command: "command",
          Reply: "reply"}
#: most knots a trajectory may carry
MAX_KNOTS = 1024


# ----------------------------------------------------------------------------- encode


def _le_contiguous(a: np.ndarray, what: str) -> np.ndarray:
    a = np.asarray(a)
    name = a.dtype.name
    if name not in DTYPES:
        raise ProtocolError(f"{what}: dtype {name} is not supported (use one of {', '.join(DTYPES)})")
    return np.asarray(a, dtype=DTYPES[name], order="C")  # not ascontiguousarray: it turns 0-d into 1-d


def _array_parts(arrays: Iterable[tuple[str, np.ndarray]]) -> tuple[list[dict], list[Any]]:
    descs, bufs = [], []
    for name, a in arrays:
        a = _le_contiguous(a, f"array {name!r}")
        descs.append({"name": name, "dtype": a.dtype.name, "shape": list(a.shape)})
        bufs.append(memoryview(a).cast("B") if a.size else b"")
    return descs, bufs


def encode(msg: Message) -> list[Any]:
    """Message -> ``[header_bytes, *buffers]``; buffers are zero-copy views where possible."""
    kind = _TYPES.get(type(msg))
    if kind is None:
        raise ProtocolError(f"cannot encode {type(msg).__name__}: not a stem-live/1 message")
    head: dict[str, Any] = {"proto": PROTO, "type": kind}
    arrays: list[tuple[str, np.ndarray]] = []
    if isinstance(msg, (Frame, Strip)):   # the scan fields frames and strips share (``_scan_fields``)
        if msg.image.dtype.name not in IMAGE_DTYPES or msg.image.ndim != 2:
            raise ProtocolError(f"{kind} image must be 2-D uint8, uint16 or float32")
        head.update(seq=int(msg.seq), stream=msg.stream, t_start=float(msg.t_start),
                    pixel_size_nm=[float(v) for v in msg.pixel_size_nm], dwell_us=float(msg.dwell_us),
                    flyback_us=float(msg.flyback_us), scan_rotation_rad=float(msg.scan_rotation_rad),
                    beam_shift_nm=[float(v) for v in msg.beam_shift_nm], detector=msg.detector)
        arrays.append(("image", msg.image))
        if isinstance(msg, Strip):
            head.update(row0=int(msg.row0), frame_rows=int(msg.frame_rows))
        if msg.beam_shift_lines_nm is not None:
            arrays.append(("beam_shift_lines_nm", np.asarray(msg.beam_shift_lines_nm, np.float64)))
    elif isinstance(msg, Correction):
        head.update(id=int(msg.id), beam_shift_nm=[float(v) for v in msg.beam_shift_nm],
                    for_seq=int(msg.for_seq), reason=msg.reason)
        if msg.trajectory is not None:
            head["trajectory"] = {"t_s": [float(v) for v in msg.trajectory.t_s],
                                  "beam_shift_nm": [[float(a), float(b)] for a, b in msg.trajectory.beam_shift_nm]}
    elif isinstance(msg, Ack):
        head.update(id=int(msg.id), applied_nm=[float(v) for v in msg.applied_nm],
                    clamped=bool(msg.clamped), error=msg.error)
        if msg.warning:
            head["warning"] = msg.warning
    elif isinstance(msg, Maps):
        head.update(seq=int(msg.seq), metrics=dict(msg.metrics), info=dict(msg.info))
        arrays.extend(msg.arrays.items())
    elif isinstance(msg, Command):
        head.update(cmd=msg.cmd, args=dict(msg.args))
    elif isinstance(msg, Reply):
        head.update(cmd=msg.cmd, ok=bool(msg.ok), message=msg.message, state=dict(msg.state))
    descs, bufs = _array_parts(arrays)
    head["arrays"] = descs
    try:
        header = json.dumps(head, allow_nan=False, separators=(",", ":"), default=_json_default).encode()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"cannot encode {kind}: {exc}") from None
    return [header, *bufs]


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray) and o.size <= 4096:
        return o.tolist()
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


# ----------------------------------------------------------------------------- decode


def _reject_constant(name: str) -> Any:
    raise ProtocolError(f"header holds {name}: metadata must be finite")


def _parse_float(text: str) -> float:
    v = float(text)
    if not math.isfinite(v):  # e.g. 1e400 parses to inf without any NaN/Infinity token
        raise ProtocolError(f"header holds {text[:40]}: metadata must be finite")
    return v


def _is_finite_number(v: Any) -> bool:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v)
    except OverflowError:  # an int too large for a float
        return False


def _buffer(part: Any) -> memoryview:
    buf = getattr(part, "buffer", part)  # zmq.Frame -> its buffer, zero-copy
    try:
        return memoryview(buf).cast("B")
    except (TypeError, ValueError, BufferError):  # ValueError: e.g. datetime64 arrays, released views
        raise ProtocolError(f"message part of type {type(part).__name__} is not a byte buffer") from None


def _get(head: Mapping[str, Any], key: str, kind: str) -> Any:
    if key not in head:
        raise ProtocolError(f"{kind} message lacks field {key!r}")
    return head[key]


def _int(head: Mapping[str, Any], key: str, kind: str) -> int:
    v = _get(head, key, kind)
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= MAX_ID:
        raise ProtocolError(f"{kind}.{key} must be an integer in [0, 2^63), got {v!r:.40}")
    return v


def _float(head: Mapping[str, Any], key: str, kind: str, *, lo: float = -math.inf, hi: float = math.inf) -> float:
    v = _get(head, key, kind)
    if not _is_finite_number(v) or not lo <= v <= hi:
        raise ProtocolError(f"{kind}.{key} must be a finite number in [{lo}, {hi}], got {v!r:.40}")
    return float(v)


def _pair(head: Mapping[str, Any], key: str, kind: str, *, positive: bool = False) -> tuple[float, float]:
    v = _get(head, key, kind)
    if not isinstance(v, list) or len(v) != 2:
        raise ProtocolError(f"{kind}.{key} must be a list [y, x] of two numbers")
    out = []
    for x in v:
        if not _is_finite_number(x) or (positive and x <= 0):
            raise ProtocolError(f"{kind}.{key} must hold two finite{' positive' if positive else ''} numbers, got {v!r:.60}")
        out.append(float(x))
    return (out[0], out[1])


def _str(head: Mapping[str, Any], key: str, kind: str, *, default: str | None = None) -> str:
    if default is not None and key not in head:
        return default
    v = _get(head, key, kind)
    if not isinstance(v, str) or len(v) > MAX_TEXT:
        raise ProtocolError(f"{kind}.{key} must be a string of at most {MAX_TEXT} characters")
    return v


def _dict(head: Mapping[str, Any], key: str, kind: str) -> dict:
    v = head.get(key, {})
    if not isinstance(v, dict):
        raise ProtocolError(f"{kind}.{key} must be a JSON object")
    return v


def _arrays(head: Mapping[str, Any], bufs: Sequence[memoryview], kind: str) -> dict[str, np.ndarray]:
    descs = head.get("arrays", [])
    if not isinstance(descs, list) or len(descs) > MAX_ARRAYS:
        raise ProtocolError(f"{kind}.arrays must be a list of at most {MAX_ARRAYS} descriptions")
    if len(descs) != len(bufs):
        raise ProtocolError(f"{kind} describes {len(descs)} arrays but carries {len(bufs)} buffers")
    out: dict[str, np.ndarray] = {}
    for d, buf in zip(descs, bufs):
        if not isinstance(d, dict) or not {"name", "dtype", "shape"} <= d.keys():
            raise ProtocolError(f"{kind}: each array description needs name, dtype and shape")
        name, dtype, shape = d["name"], d["dtype"], d["shape"]
        if not isinstance(name, str) or not name or len(name) > 64 or name in out:
            raise ProtocolError(f"{kind}: array name {name!r:.40} is empty, too long or repeated")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ProtocolError(f"{kind}: array {name!r} has unsupported dtype {dtype!r:.40}")
        if (not isinstance(shape, list) or len(shape) > 4
                or not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= 1 << 31 for s in shape)):
            raise ProtocolError(f"{kind}: array {name!r} has an invalid shape {shape!r:.60}")
        nbytes = DTYPES[dtype].itemsize * math.prod(shape)
        if nbytes > MAX_ARRAY_BYTES:
            raise ProtocolError(f"{kind}: array {name!r} of {nbytes} bytes exceeds the {MAX_ARRAY_BYTES}-byte limit")
        if nbytes != buf.nbytes:
            raise ProtocolError(f"{kind}: array {name!r} needs {nbytes} bytes for shape {shape} {dtype} "
                                f"but its buffer holds {buf.nbytes}")
        a = np.frombuffer(buf, dtype=DTYPES[dtype]).reshape(shape)
        a.flags.writeable = False
        out[name] = a
    return out


def decode(parts: Sequence[Any]) -> Message:
    """``[header, *buffers]`` -> message. Raises :class:`ProtocolError` on any defect."""
    if not isinstance(parts, (list, tuple)) or not parts:
        raise ProtocolError("empty message: expected [header, *buffers]")
    raw = _buffer(parts[0])
    if raw.nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {raw.nbytes} bytes exceeds {MAX_HEADER_BYTES} bytes")
    try:
        head = json.loads(raw.tobytes().decode("utf-8"), parse_constant=_reject_constant,
                          parse_float=_parse_float)
    except ProtocolError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise ProtocolError(f"header is not valid UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(head, dict):
        raise ProtocolError("header must be a JSON object")
    if head.get("proto") != PROTO:
        raise ProtocolError(f"wrong protocol {head.get('proto')!r:.40}: expected {PROTO!r}")
    kind = head.get("type")
    arrays = _arrays(head, [_buffer(p) for p in parts[1:]], str(kind)[:20])
    if kind == "frame":
        return _decode_frame(head, arrays)
    if kind == "strip":
        return _decode_strip(head, arrays)
    if kind == "correction":
        _no_arrays(arrays, kind)
        traj = head.get("trajectory")
        return Correction(id=_int(head, "id", kind), beam_shift_nm=_pair(head, "beam_shift_nm", kind),
                          for_seq=_int(head, "for_seq", kind), reason=_str(head, "reason", kind, default=""),
                          trajectory=None if traj is None else _trajectory(traj))
    if kind == "ack":
        _no_arrays(arrays, kind)
        clamped = _get(head, "clamped", kind)
        if not isinstance(clamped, bool):
            raise ProtocolError("ack.clamped must be true or false")
        return Ack(id=_int(head, "id", kind), applied_nm=_pair(head, "applied_nm", kind), clamped=clamped,
                   error=_str(head, "error", kind, default=""), warning=_str(head, "warning", kind, default=""))
    if kind == "maps":
        metrics = _dict(head, "metrics", kind)
        for k, v in metrics.items():
            if v is not None and not _is_finite_number(v):
                raise ProtocolError(f"maps.metrics[{k!r:.40}] must be a finite number")
        return Maps(seq=_int(head, "seq", kind), arrays=arrays, metrics=metrics, info=_dict(head, "info", kind))
    if kind == "command":
        _no_arrays(arrays, kind)
        cmd = _str(head, "cmd", kind)
        if cmd not in COMMANDS:
            raise ProtocolError(f"unknown command {cmd!r:.40}: expected one of {', '.join(COMMANDS)}")
        return Command(cmd=cmd, args=_dict(head, "args", kind))
    if kind == "reply":
        _no_arrays(arrays, kind)
        ok = _get(head, "ok", kind)
        if not isinstance(ok, bool):
            raise ProtocolError("reply.ok must be true or false")
        return Reply(cmd=_str(head, "cmd", kind), ok=ok, message=_str(head, "message", kind, default=""),
                     state=_dict(head, "state", kind))
    raise ProtocolError(f"unknown message type {kind!r:.40}")


def _no_arrays(arrays: Mapping[str, np.ndarray], kind: str) -> None:
    if arrays:
        raise ProtocolError(f"{kind} message must carry no arrays")


def _image(arrays: Mapping[str, np.ndarray], kind: str, min_rows: int, optional: tuple[str, ...] = ()) -> np.ndarray:
    if "image" not in arrays or not set(arrays) <= {"image", *optional}:
        extra = f" (and optionally {', '.join(repr(o) for o in optional)})" if optional else ""
        raise ProtocolError(f"{kind} must carry exactly one array named 'image'{extra}")
    image = arrays["image"]
    if image.dtype.name not in IMAGE_DTYPES:
        raise ProtocolError(f"{kind} image dtype {image.dtype.name} not supported: use uint8, uint16 or float32")
    if image.ndim != 2 or not (min_rows <= image.shape[0] <= MAX_IMAGE_SIDE and 2 <= image.shape[1] <= MAX_IMAGE_SIDE):
        raise ProtocolError(f"{kind} image must be 2-D with {min_rows} to {MAX_IMAGE_SIDE} rows and 2 to "
                            f"{MAX_IMAGE_SIDE} columns, got shape {image.shape}")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ProtocolError(f"{kind} image holds NaN or infinite pixels")
    return image


def _scan_fields(head: Mapping[str, Any], kind: str) -> dict[str, Any]:
    """The scan metadata frames and strips share."""
    return dict(
        t_start=_float(head, "t_start", kind),
        pixel_size_nm=_pair(head, "pixel_size_nm", kind, positive=True),
        dwell_us=_float(head, "dwell_us", kind, lo=1e-6, hi=1e6),
        flyback_us=_float(head, "flyback_us", kind, lo=0.0, hi=1e7),
        scan_rotation_rad=_float(head, "scan_rotation_rad", kind, lo=-100.0, hi=100.0),
        beam_shift_nm=_pair(head, "beam_shift_nm", kind),
        stream=_str(head, "stream", kind),
        detector=_str(head, "detector", kind, default="HAADF"),
    )


def _beam_lines(arrays: Mapping[str, np.ndarray], kind: str, rows: int) -> np.ndarray | None:
    """The optional per-line beam shift of a frame or strip of ``rows`` rows, checked."""
    lines = arrays.get("beam_shift_lines_nm")
    if lines is not None:
        if lines.dtype.name != "float64" or lines.shape != (rows, 2) or not np.isfinite(lines).all():
            raise ProtocolError(f"{kind} array 'beam_shift_lines_nm' must be finite float64 of shape "
                                f"({rows}, 2) (one [y, x] per row), got {lines.dtype.name} {lines.shape}")
    return lines


def _decode_frame(head: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Frame:
    image = _image(arrays, "frame", 2, optional=("beam_shift_lines_nm",))
    lines = _beam_lines(arrays, "frame", image.shape[0])
    return Frame(seq=_int(head, "seq", "frame"), image=image, beam_shift_lines_nm=lines, **_scan_fields(head, "frame"))


def _decode_strip(head: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> Strip:
    kind = "strip"
    image = _image(arrays, kind, 1, optional=("beam_shift_lines_nm",))
    lines = _beam_lines(arrays, kind, image.shape[0])
    row0, rows = _int(head, "row0", kind), _int(head, "frame_rows", kind)
    if not 2 <= rows <= MAX_IMAGE_SIDE:
        raise ProtocolError(f"strip.frame_rows must be in [2, {MAX_IMAGE_SIDE}], got {rows}")
    if row0 + image.shape[0] > rows:
        raise ProtocolError(f"strip rows {row0}..{row0 + image.shape[0] - 1} run past the frame's {rows} rows")
    return Strip(seq=_int(head, "seq", kind), row0=row0, frame_rows=rows, image=image, beam_shift_lines_nm=lines,
                 **_scan_fields(head, kind))


def _trajectory(value: Any) -> Trajectory:
    """A correction's ``trajectory`` header field -> :class:`Trajectory` (validated)."""
    what = "correction.trajectory"
    if not isinstance(value, dict) or set(value) != {"t_s", "beam_shift_nm"}:
        raise ProtocolError(f"{what} must be an object with exactly 't_s' and 'beam_shift_nm'")
    t, b = value["t_s"], value["beam_shift_nm"]
    if not isinstance(t, list) or not isinstance(b, list) or not 1 <= len(t) <= MAX_KNOTS or len(b) != len(t):
        raise ProtocolError(f"{what} needs 1 to {MAX_KNOTS} times in 't_s' and as many [y, x] in 'beam_shift_nm'")
    if not all(_is_finite_number(v) for v in t):
        raise ProtocolError(f"{what}.t_s must hold finite numbers (s)")
    if not all(isinstance(p, list) and len(p) == 2 and all(_is_finite_number(v) for v in p) for p in b):
        raise ProtocolError(f"{what}.beam_shift_nm must hold [y, x] pairs of finite numbers (nm)")
    if any(b2 <= a2 for a2, b2 in zip(t, t[1:])):
        raise ProtocolError(f"{what}.t_s must increase")
    return Trajectory(t_s=tuple(float(v) for v in t), beam_shift_nm=tuple((float(p[0]), float(p[1])) for p in b))


# ----------------------------------------------------------------------------- sockets


def send(sock: Any, msg: Message, *, flags: int = 0) -> None:
    """Encode and send on a pyzmq socket without copying array buffers."""
    sock.send_multipart(encode(msg), flags=flags, copy=False)


def recv(sock: Any, *, flags: int = 0) -> Message:
    """Receive and decode one message; raises :class:`ProtocolError` for a bad one."""
    return decode(sock.recv_multipart(flags=flags, copy=False))
