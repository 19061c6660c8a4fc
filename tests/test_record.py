"""Recording and reading streams: round trip, kill safety, truncation, disk full, foreign
files, bad files, and recording a live PUB/SUB stream."""

from __future__ import annotations

import errno
import io
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stem_live.io import RecordError, StackWriter, count_frames, read_frames, tiff_writer
from stem_live.protocol import Correction, Frame, encode
from stem_live.recorder import record_stream

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("seq", "stream", "t_start", "pixel_size_nm", "dwell_us", "flyback_us", "scan_rotation_rad",
          "beam_shift_nm", "detector")

# shared by the tests and the writer subprocess, so both know the exact frames
FRAME_SRC = '''
import numpy as np
from stem_live.protocol import Frame

def make_frame(seq, stream="kill"):
    rng = np.random.default_rng(seq)
    dtype = ("uint16", "uint8", "float32")[seq % 3]
    shape = (100 + seq % 7, 160)
    if dtype == "float32":
        img = rng.normal(size=shape).astype(np.float32)
    else:
        img = rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True, dtype=dtype)
    return Frame(seq=seq, image=img, t_start=seq * 0.125 + 1e-3, pixel_size_nm=(0.02 + seq * 1e-4, 0.021),
                 dwell_us=0.5 + seq % 3, flyback_us=12.5, scan_rotation_rad=-0.1 * seq,
                 beam_shift_nm=(seq * 0.01, -seq * 0.02), stream=stream, detector=("HAADF", "BF")[seq % 2])
'''
_ns: dict = {}
exec(FRAME_SRC, _ns)
make_frame = _ns["make_frame"]

WRITER_SRC = FRAME_SRC + '''
import sys, time
from pathlib import Path
from stem_live.io import StackWriter

with StackWriter(Path(sys.argv[1]), fsync_interval_s=None) as w:
    for seq in range(100000):
        if seq >= 400:
            time.sleep(3600)  # wait to be killed without growing the file further
        w.write(make_frame(seq))
        print(seq, flush=True)
'''


def assert_same(a: Frame, b: Frame) -> None:
    assert a.image.dtype == b.image.dtype
    assert a.image.shape == b.image.shape
    assert a.image.tobytes() == b.image.tobytes()  # bit-exact
    for f in FIELDS:
        assert getattr(a, f) == getattr(b, f), f


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    return e


def write_stack(path: Path, frames) -> None:
    with StackWriter(path) as w:
        for f in frames:
            w.write(f)


# ----------------------------------------------------------------------------- round trip


def test_round_trip_dtypes_and_metadata(tmp_path):
    frames = [make_frame(s) for s in range(9)]
    path = tmp_path / "rec.tif"
    write_stack(path, frames)
    assert count_frames(path) == 9
    got = list(read_frames(path))
    assert len(got) == 9
    for a, b in zip(frames, got):
        assert_same(a, b)
    assert {f.image.dtype.name for f in got} == {"uint8", "uint16", "float32"}
    # other tools see an ordinary TIFF stack with a physical pixel size
    with tifffile.TiffFile(path) as tif:
        assert len(tif.pages) == 9
        page = tif.pages[1]
        assert json.loads(page.description)["seq"] == 1
        xres = page.tags["XResolution"].value
        assert xres[0] / xres[1] == pytest.approx(1e7 / 0.021)
        assert np.array_equal(page.asarray(), frames[1].image)


def test_round_trip_classic_tiff(tmp_path):
    frames = [make_frame(s) for s in range(4)]
    path = tmp_path / "classic.tif"
    with StackWriter(path, bigtiff=False) as w:
        for f in frames:
            w.write(f)
    for a, b in zip(frames, read_frames(path), strict=True):
        assert_same(a, b)


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seq=st.integers(0, 2**63 - 1), t=finite, px=st.tuples(st.floats(1e-6, 1e6), st.floats(1e-6, 1e6)),
       dwell=st.floats(1e-6, 1e6), fly=st.floats(0, 1e7), rot=st.floats(-100, 100),
       shift=st.tuples(finite, finite), stream=st.text(max_size=20), detector=st.text(max_size=20),
       dtype=st.sampled_from(["uint8", "uint16", "float32"]), rows=st.integers(2, 9), cols=st.integers(2, 9),
       data=st.data())
def test_round_trip_any_metadata(tmp_path, seq, t, px, dwell, fly, rot, shift, stream, detector, dtype,
                                 rows, cols, data):
    raw = data.draw(st.binary(min_size=rows * cols * np.dtype(dtype).itemsize,
                              max_size=rows * cols * np.dtype(dtype).itemsize))
    img = np.frombuffer(raw, dtype=dtype).reshape(rows, cols)
    if dtype == "float32":
        img = np.where(np.isfinite(img), img, np.float32(1.5)).astype(np.float32)
    f = Frame(seq=seq, image=img, t_start=t, pixel_size_nm=px, dwell_us=dwell, flyback_us=fly,
              scan_rotation_rad=rot, beam_shift_nm=shift, stream=stream, detector=detector)
    path = tmp_path / f"h{random.getrandbits(64)}.tif"
    write_stack(path, [f])
    (g,) = list(read_frames(path))
    assert_same(f, g)
    path.unlink()


def test_options_override_recorded_metadata(tmp_path):
    path = tmp_path / "rec.tif"
    write_stack(path, [make_frame(0), make_frame(1)])
    got = list(read_frames(path, pixel_size_nm=0.5, dwell_us=3.0, flyback_us=7.0))
    assert all(f.pixel_size_nm == (0.5, 0.5) and f.dwell_us == 3.0 and f.flyback_us == 7.0 for f in got)
    assert [f.seq for f in got] == [0, 1]


# ----------------------------------------------------------------------------- writer errors


def test_writer_refuses_existing_file_and_bad_images(tmp_path):
    path = tmp_path / "rec.tif"
    write_stack(path, [make_frame(0)])
    with pytest.raises(RecordError, match="already exists"):
        StackWriter(path)
    with StackWriter(path, overwrite=True) as w:
        with pytest.raises(RecordError, match="2-D uint8, uint16 or float32"):
            w.write(Frame(seq=0, image=np.zeros((4, 4), np.int64)))
        with pytest.raises(RecordError, match="NaN"):
            w.write(Frame(seq=0, image=np.full((4, 4), np.nan, np.float32)))
        w.write(make_frame(3))
    assert [f.seq for f in read_frames(path)] == [3]


class _NoFd(io.BufferedWriter):
    """No file descriptor: numpy's ``tofile`` (used by tifffile for pixel data) would write
    around a Python-level wrapper; without a descriptor every byte goes through ``write``."""

    def fileno(self):
        raise io.UnsupportedOperation("no file descriptor")


class _FullDisk(io.FileIO):
    """A file on a disk with ``room`` bytes left: writes what fits, then ENOSPC."""

    def __init__(self, path, room: int, err: int = errno.ENOSPC):
        super().__init__(path, "w")
        self.room, self.err = room, err

    def write(self, b):
        n = len(memoryview(b))
        if self.room <= 0:
            raise OSError(self.err, os.strerror(self.err))
        k = min(n, self.room)
        self.room -= k
        return super().write(memoryview(b)[:k])


@pytest.mark.parametrize("room", [3000, 40000, 251234])
def test_disk_full_keeps_written_frames(tmp_path, monkeypatch, room):
    monkeypatch.setattr(tiff_writer, "open_for_writing",
                        lambda path, overwrite: _NoFd(_FullDisk(path, room), buffer_size=4096))
    path = tmp_path / "full.tif"
    w = StackWriter(path)
    written = []
    with pytest.raises(RecordError) as info:
        for s in range(1000):
            w.write(make_frame(s))
            written.append(s)
    msg = str(info.value)
    assert "\n" not in msg and "disk full" in msg and "free some space" in msg
    assert f"{len(written)} frames kept" in msg
    with pytest.raises(RecordError, match="disk full"):
        w.write(make_frame(999))  # refuses further frames, same clear message
    w.close()  # never raises after the error
    if room < 30000:  # not even one frame fitted: a clear error, no traceback
        assert not written
        with pytest.raises(RecordError, match="no complete frame"):
            read_frames(path)
        return
    assert written
    got = list(read_frames(path))
    assert [f.seq for f in got] == written
    for f in got:
        assert_same(make_frame(f.seq), f)


def test_other_os_error_message(tmp_path, monkeypatch):
    monkeypatch.setattr(tiff_writer, "open_for_writing",
                        lambda path, overwrite: _NoFd(_FullDisk(path, 5000, errno.EIO), 4096))
    with pytest.raises(RecordError, match="cannot write .*check the disk"):
        with StackWriter(tmp_path / "eio.tif") as w:
            for s in range(100):
                w.write(make_frame(s))


def test_unwritable_folder(tmp_path):
    with pytest.raises(RecordError, match="cannot write"):
        StackWriter(tmp_path / "no" / "such" / "dir.tif")


# ----------------------------------------------------------------------------- truncation / kill


@pytest.mark.parametrize("bigtiff", [True, False])
def test_truncated_recording_reads_prefix(tmp_path, bigtiff):
    frames = [make_frame(s) for s in range(6)]
    path = tmp_path / "full.tif"
    with StackWriter(path, bigtiff=bigtiff) as w:
        for f in frames:
            w.write(f)
    data = path.read_bytes()
    header = 16 if bigtiff else 8
    rng = random.Random(1234)
    offsets = sorted({rng.randrange(header, len(data) + 1) for _ in range(400)} | {header, len(data)})
    cut = tmp_path / "cut.tif"
    seen = set()
    for n in offsets:
        cut.write_bytes(data[:n])
        try:
            got = list(read_frames(cut))
        except RecordError as exc:
            assert "no complete frame" in str(exc)
            assert count_frames(cut) == 0
            seen.add(0)
            continue
        assert count_frames(cut) == len(got) >= 1
        for a, b in zip(frames, got):
            assert_same(a, b)
        seen.add(len(got))
    assert seen == set(range(7))  # every prefix length occurred, the full file included
    for n in range(header):  # cut inside the TIFF header
        cut.write_bytes(data[:n])
        with pytest.raises(RecordError) as info:
            read_frames(cut)
        assert "\n" not in str(info.value)


class _SyscallLog(io.FileIO):
    """Logs every write the OS would see: (offset, bytes)."""

    def __init__(self, path):
        super().__init__(path, "w")
        self.ops: list[tuple[int, bytes]] = []

    def write(self, b):
        self.ops.append((self.tell(), bytes(b)))
        return super().write(b)


def test_kill_at_every_write_syscall(tmp_path, monkeypatch):
    """Rebuild the file as a SIGKILL would leave it after every prefix of the writer's system
    calls (holes included: tifffile links a page and skips its IFD before writing the data),
    and with the last call cut short at random points."""
    logs: list[_SyscallLog] = []

    def opener(path, overwrite):
        raw = _SyscallLog(path)
        logs.append(raw)
        return _NoFd(raw, buffer_size=8192)

    monkeypatch.setattr(tiff_writer, "open_for_writing", opener)
    frames = [make_frame(s) for s in range(5)]
    done_after: list[int] = []  # number of syscalls once write(frame k) had returned
    with StackWriter(tmp_path / "log.tif") as w:
        for f in frames:
            w.write(f)
            done_after.append(len(logs[0].ops))
    ops = logs[0].ops
    rng = random.Random(5)
    cut = tmp_path / "cut.tif"
    for i in range(len(ops) + 1):
        for part in {0, *(rng.randrange(len(ops[i][1]) + 1) for _ in range(3))} if i < len(ops) else {0}:
            with open(cut, "wb") as fh:
                for off, data in ops[:i] + ([(ops[i][0], ops[i][1][:part])] if i < len(ops) else []):
                    fh.seek(off)
                    fh.write(data)
            finished = sum(1 for d in done_after if d <= i)
            try:
                got = list(read_frames(cut))
            except RecordError as exc:
                assert finished == 0 and "\n" not in str(exc), (i, part)
                continue
            assert finished <= len(got) <= finished + 1, (i, part)
            for a, b in zip(frames, got):
                assert_same(a, b)


def _kill_and_check(tmp_path, seed: int) -> None:
    rng = random.Random(seed)
    path = tmp_path / f"kill{seed}.tif"
    script = tmp_path / "writer.py"
    script.write_text(WRITER_SRC)
    proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, env=env(), text=True)
    try:
        want = rng.randint(1, 60)
        reported = []
        while len(reported) < want:
            line = proc.stdout.readline()
            assert line, "writer died"
            reported.append(int(line))
        time.sleep(rng.uniform(0, 0.004))
        proc.send_signal(signal.SIGKILL)
        rest = proc.stdout.read()
        proc.wait(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        proc.stdout.close()
    reported += [int(x) for x in rest.split("\n")[:-1]]  # complete lines only
    got = list(read_frames(path))
    assert [f.seq for f in got][:len(reported)] == reported
    assert [f.seq for f in got] == list(range(len(got)))
    assert len(got) >= len(reported)
    assert count_frames(path) == len(got)
    for f in got:
        assert_same(make_frame(f.seq), f)


def test_sigkill_writer_loses_no_finished_frame(tmp_path):
    for seed in range(6):
        _kill_and_check(tmp_path, seed)


# ----------------------------------------------------------------------------- foreign files


@pytest.mark.parametrize("unit,scale", [("nm", 1.0), ("um", 1e-3), ("micron", 1e-3), ("\\u00B5m", 1e-3),
                                        ("angstrom", 10.0)])
def test_imagej_stack_pixel_size(tmp_path, unit, scale):
    stack = (np.arange(5 * 12 * 10) % 4000).reshape(5, 12, 10).astype(np.uint16)
    px_y, px_x = 0.04, 0.025  # nm
    path = tmp_path / "ij.tif"
    tifffile.imwrite(path, stack, imagej=True, resolution=(1 / (px_x * scale), 1 / (px_y * scale)),
                     metadata={"unit": unit, "axes": "TYX", "finterval": 0.25})
    assert count_frames(path) == 5
    got = list(read_frames(path, dwell_us=2.0, flyback_us=10.0))
    assert [f.seq for f in got] == [0, 1, 2, 3, 4]
    assert got[0].pixel_size_nm == pytest.approx((px_y, px_x), rel=1e-6)
    assert [f.t_start for f in got] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])
    assert np.array_equal(np.stack([f.image for f in got]), stack)
    assert got[0].image.dtype == np.uint16


def test_imagej_hyperstack_and_plain_multipage(tmp_path):
    hyper = np.random.default_rng(0).random((2, 3, 1, 8, 9)).astype(np.float32)
    p = tmp_path / "hyper.tif"
    tifffile.imwrite(p, hyper, imagej=True, metadata={"axes": "TZCYX"})
    got = list(read_frames(p, pixel_size_nm=(0.1, 0.2), dwell_us=1.0, flyback_us=0.0))
    assert len(got) == 6 and got[0].pixel_size_nm == (0.1, 0.2)
    assert np.array_equal(np.stack([f.image for f in got]), hyper.reshape(6, 8, 9))

    plain = tmp_path / "plain.tif"
    frames = (np.arange(3 * 6 * 7) % 200).reshape(3, 6, 7).astype(np.uint8)
    with tifffile.TiffWriter(plain) as tw:  # one series per page, cm resolution tags
        for img in frames:
            tw.write(img, photometric="minisblack", resolution=(1e7 / 0.05, 1e7 / 0.05),
                     resolutionunit="CENTIMETER", metadata=None)
    got = list(read_frames(plain, dwell_us=1.0, flyback_us=0.0))
    assert got[0].pixel_size_nm == pytest.approx((0.05, 0.05))
    # t_start from the frame time when the file has no timing: rows * (cols * dwell + flyback)
    assert [f.t_start for f in got][:2] == pytest.approx([0.0, 6 * 7 * 1e-6])


def test_default_72dpi_is_not_a_pixel_size(tmp_path):
    p = tmp_path / "dpi.tif"
    tifffile.imwrite(p, np.zeros((5, 8, 8), np.uint16), resolution=(72, 72), resolutionunit="INCH",
                     photometric="minisblack")
    with pytest.raises(RecordError, match="pixel_size_nm"):
        read_frames(p, dwell_us=1, flyback_us=0)


def test_npy_with_sidecars(tmp_path):
    stack = np.random.default_rng(1).integers(-300, 300, size=(4, 10, 12)).astype(np.int16)
    p = tmp_path / "stack.npy"
    np.save(p, stack)
    with pytest.raises(RecordError) as info:
        read_frames(p)
    msg = str(info.value)
    assert "\n" not in msg and "pixel_size_nm" in msg and "--pixel-size-nm" in msg and "stack.json" in msg
    # same-stem sidecar
    (tmp_path / "stack.json").write_text(json.dumps({"pixel_size_nm": 0.03, "dwell_us": 4.0, "flyback_us": 20.0,
                                                     "detector": "ADF"}))
    got = list(read_frames(p))
    assert len(got) == 4 and count_frames(p) == 4
    assert got[2].pixel_size_nm == (0.03, 0.03) and got[2].dwell_us == 4.0 and got[2].detector == "ADF"
    assert got[1].image.dtype == np.float32  # int16 converted
    assert np.array_equal(got[1].image, stack[1].astype(np.float32))
    assert got[1].t_start == pytest.approx(10 * (12 * 4.0 + 20.0) * 1e-6)
    # <file>.json wins over <stem>.json; options win over both
    (tmp_path / "stack.npy.json").write_text(json.dumps({"pixel_size_nm": [0.1, 0.2], "dwell_us": 1.0,
                                                         "flyback_us": 0.0, "frame_interval_s": 0.5}))
    got = list(read_frames(p, dwell_us=9.0))
    assert got[0].pixel_size_nm == (0.1, 0.2) and got[0].dwell_us == 9.0
    assert [f.t_start for f in got] == pytest.approx([0, 0.5, 1.0, 1.5])
    # a single (H, W) array is one frame
    single = tmp_path / "one.npy"
    np.save(single, stack[0].astype(np.uint16))
    (f,) = list(read_frames(single, pixel_size_nm=0.1, dwell_us=1, flyback_us=0))
    assert f.seq == 0 and f.image.dtype == np.uint16


@pytest.mark.parametrize("missing", ["pixel_size_nm", "dwell_us", "flyback_us"])
def test_missing_metadata_names_the_field(tmp_path, missing):
    p = tmp_path / "a.npy"
    np.save(p, np.zeros((2, 4, 4), np.uint16))
    opts = {"pixel_size_nm": 0.1, "dwell_us": 1.0, "flyback_us": 0.0}
    del opts[missing]
    with pytest.raises(RecordError) as info:
        read_frames(p, **opts)
    msg = str(info.value)
    assert "\n" not in msg and missing in msg and "--" + missing.replace("_", "-") in msg
    others = {"pixel_size_nm", "dwell_us", "flyback_us"} - {missing}
    assert not any(o in msg for o in others)


def _bad_files(tmp_path):
    yield "not a tiff", b"hello, this is no image at all"
    yield "empty", b""
    yield "tiff magic only", b"II*\x00"
    good = tmp_path / "good.tif"
    tifffile.imwrite(good, np.zeros((5, 8, 8), np.uint16), photometric="minisblack")
    data = good.read_bytes()
    yield "truncated header", data[:6]
    yield "truncated plain tiff", data[:200]
    yield "garbage ifd", data[:8] + b"\xff" * 300


def test_bad_files_raise_one_line(tmp_path):
    for what, content in _bad_files(tmp_path):
        p = tmp_path / "bad.tif"
        p.write_bytes(content)
        with pytest.raises(RecordError) as info:
            list(read_frames(p, pixel_size_nm=0.1, dwell_us=1, flyback_us=0))
        assert "\n" not in str(info.value), what
    arrays = {"complex": np.zeros((2, 4, 4), np.complex64), "int64": np.zeros((2, 4, 4), np.int64),
              "4-D": np.zeros((2, 2, 4, 4), np.uint16), "empty": np.zeros((0, 4, 4), np.uint16),
              "bool": np.zeros((2, 4, 4), bool), "nan": np.full((2, 4, 4), np.nan)}
    for what, a in arrays.items():
        p = tmp_path / f"{what}.npy"
        np.save(p, a)
        with pytest.raises(RecordError) as info:
            list(read_frames(p, pixel_size_nm=0.1, dwell_us=1, flyback_us=0))
        assert "\n" not in str(info.value), what
    for what, a, kw in [("complex", np.zeros((5, 4, 4), np.complex64), {}),
                        ("int64", np.zeros((5, 4, 4), np.int64), {}),
                        ("rgb", np.zeros((8, 8, 3), np.uint8), {"photometric": "rgb"})]:
        p = tmp_path / f"{what}.tif"
        tifffile.imwrite(p, a, **kw)
        with pytest.raises(RecordError) as info:
            read_frames(p, pixel_size_nm=0.1, dwell_us=1, flyback_us=0)
        assert "\n" not in str(info.value), what
    with pytest.raises(RecordError, match="does not exist"):
        read_frames(tmp_path / "nope.tif")
    with pytest.raises(RecordError, match="folder"):
        read_frames(tmp_path)
    p = tmp_path / "x.npy"
    np.save(p, np.zeros((2, 4, 4), np.uint8))
    (tmp_path / "x.json").write_text("{not json")
    with pytest.raises(RecordError, match="sidecar"):
        read_frames(p)
    (tmp_path / "x.json").write_text(json.dumps({"pixel_size_nm": -1, "dwell_us": 1, "flyback_us": 0}))
    with pytest.raises(RecordError, match="pixel_size_nm"):
        read_frames(p)


def test_other_dtypes_become_float32(tmp_path):
    for dt in ("int8", "int16", "int32", "uint32", "float16", "float64"):
        p = tmp_path / f"{dt}.npy"
        a = (np.arange(2 * 5 * 6) % 100).reshape(2, 5, 6).astype(dt)
        np.save(p, a)
        got = list(read_frames(p, pixel_size_nm=0.1, dwell_us=1, flyback_us=0))
        assert got[0].image.dtype == np.float32 and np.array_equal(got[1].image, a[1].astype(np.float32))


# ----------------------------------------------------------------------------- live stream


def _pub():
    zmq = pytest.importorskip("zmq")
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    pub.setsockopt(zmq.SNDHWM, 100000)
    pub.bind("tcp://127.0.0.1:*")
    return ctx, pub, pub.getsockopt(zmq.LAST_ENDPOINT).decode()


def _invalid_messages():
    good = encode(make_frame(1))
    head = json.loads(bytes(good[0]))
    wrong_proto = json.dumps({**head, "proto": "other/9"}).encode()
    return [
        [b"not json at all"],
        [wrong_proto, bytes(good[1])],
        [bytes(good[0]), bytes(good[1])[:-2]],  # buffer shorter than the shape says
        encode(Correction(id=1, beam_shift_nm=(0.0, 0.0), for_seq=1)),  # valid, but not a frame
    ]


def test_record_stream_over_pub_sub(tmp_path):
    ctx, pub, endpoint = _pub()
    path = tmp_path / "live.tif"
    stats: dict = {}
    first = threading.Event()
    stop = threading.Event()
    test_frames: list[int] = []

    def progress(n, f):
        first.set()
        if f.stream == "test":
            test_frames.append(f.seq)

    result: dict = {}

    def run():
        try:
            result["n"] = record_stream(endpoint, path, progress=progress, stop=stop, stats=stats, timeout_s=15)
        except BaseException as exc:  # noqa: BLE001
            result["exc"] = exc

    th = threading.Thread(target=run, daemon=True)
    th.start()
    try:
        # slow-joiner handshake: warm-up frames until the recorder has written one
        t0, w = time.monotonic(), 0
        while not first.wait(0.02):
            assert time.monotonic() - t0 < 10, "recorder never connected"
            pub.send_multipart(encode(make_frame(w, stream="warmup")))
            w += 1
        frames = [make_frame(s, stream="test") for s in range(30)]
        bad = _invalid_messages()
        for i, f in enumerate(frames):
            pub.send_multipart(encode(f))
            if i % 7 == 3:
                pub.send_multipart(bad[(i // 7) % len(bad)])
        n_bad = sum(1 for i in range(30) if i % 7 == 3)
        t0 = time.monotonic()
        while len(test_frames) < 30 and time.monotonic() - t0 < 10:
            time.sleep(0.01)
    finally:
        stop.set()
        th.join(10)
        pub.close(0)
        ctx.term()
    assert not th.is_alive()
    assert "exc" not in result, result.get("exc")
    assert stats["invalid"] == n_bad
    got = list(read_frames(path))
    assert len(got) == result["n"] == stats["written"]
    live = [f for f in got if f.stream == "test"]
    assert [f.seq for f in live] == list(range(30))
    for a, b in zip(frames, live):
        assert_same(a, b)
    assert all(f.stream == "warmup" for f in got[:len(got) - 30])


def test_record_stream_stops_after_frames_and_bad_endpoint(tmp_path):
    ctx, pub, endpoint = _pub()
    out: dict = {}
    th = threading.Thread(target=lambda: out.setdefault("n", record_stream(endpoint, tmp_path / "n.tif",
                                                                            frames=5, timeout_s=10)))
    th.start()
    try:
        s = 0
        while th.is_alive() and s < 5000:
            pub.send_multipart(encode(make_frame(s)))
            s += 1
            time.sleep(0.002)
    finally:
        th.join(10)
        pub.close(0)
        ctx.term()
    assert out["n"] == 5 and count_frames(tmp_path / "n.tif") == 5
    with pytest.raises(RecordError, match="cannot connect"):
        record_stream("nonsense://x", tmp_path / "e.tif", timeout_s=0.1)


def test_record_cli_killed_keeps_reported_frames(tmp_path):
    """``stem-live record`` fed by a PUB here, SIGKILLed mid-stream."""
    ctx, pub, endpoint = _pub()
    path = tmp_path / "cli.tif"
    proc = subprocess.Popen([sys.executable, "-m", "stem_live.cli", "record", str(path), "--frames-endpoint", endpoint],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env(), text=True)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True)
    reader.start()
    reported: list[int] = []
    try:
        t0, s = time.monotonic(), 0
        rng = random.Random(7)
        want = rng.randint(20, 50)
        while len(reported) < want:
            assert time.monotonic() - t0 < 15, "recorder reported too few frames"
            assert proc.poll() is None, proc.stdout.read()
            pub.send_multipart(encode(make_frame(s)))
            s += 1
            time.sleep(0.002)
            while not lines.empty():
                m = re.search(r"last seq (\d+)", lines.get())
                if m:
                    reported.append(int(m.group(1)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        reader.join(5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        pub.close(0)
        ctx.term()
        proc.stdout.close()
        proc.stderr.close()
    while not lines.empty():
        line = lines.get()
        m = re.search(r"last seq (\d+)", line)
        if m and line.endswith("\n"):
            reported.append(int(m.group(1)))
    got = list(read_frames(path))
    seqs = [f.seq for f in got]
    assert seqs[:len(reported)] == reported and len(got) >= len(reported)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # in order, none skipped
    for f in got:
        assert_same(make_frame(f.seq), f)


def test_record_cli_bad_arguments(tmp_path):
    r = subprocess.run([sys.executable, "-m", "stem_live.cli", "record", str(tmp_path / "x.tif"), "--frames-endpoint",
                        "tcp://127.0.0.1:1", "--frames", "0"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "--frames" in r.stderr and "Traceback" not in r.stderr
    existing = tmp_path / "exists.tif"
    existing.write_bytes(b"x")
    r = subprocess.run([sys.executable, "-m", "stem_live.cli", "record", str(existing), "--frames-endpoint",
                        "tcp://127.0.0.1:1", "--timeout", "0.1"], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=20)
    assert r.returncode == 2 and "already exists" in r.stderr and "Traceback" not in r.stderr
    assert existing.read_bytes() == b"x"


def test_module_imports_no_zmq():
    code = "import sys, stem_live.io; assert 'zmq' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env(), check=True, timeout=20)
