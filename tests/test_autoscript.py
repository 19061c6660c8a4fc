"""AutoScriptInstrument against a fake client that mirrors the AutoScript TEM API surface.

The fake speaks the client's units and shapes: metres, ``Point(x, y)``, ``AdornedImage`` with
``.data`` and ``.metadata.binary_result.pixel_size``, ``DetectorType`` / ``ImageSize``
enumerations, and raises an ``ApplicationServerException`` on demand.
"""

from __future__ import annotations

import argparse
import enum
import time
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import zmq

from instrument_adapters import autoscript
from instrument_adapters.autoscript import AutoScriptInstrument
from instrument_adapters.base import EndOfStream, InstrumentError
from instrument_adapters.bridge import Bridge
from stem_live import protocol
from stem_live.protocol import Frame

# ----------------------------------------------------------------------------- the fake client


class ApplicationServerException(Exception):
    """Stands in for autoscript_core.common.ApplicationServerException."""


class DetectorType(enum.Enum):
    HAADF = "HAADF"
    BF = "BF"


class ImageSize(enum.Enum):
    PRESET_256 = "256x256"
    PRESET_512 = "512x512"


@dataclass
class Point:
    x: float = 0.0
    y: float = 0.0


class AdornedImage:
    def __init__(self, data: np.ndarray, pixel_size_m: tuple[float, float] | None) -> None:
        self.data = data
        px = None if pixel_size_m is None else Point(x=pixel_size_m[0], y=pixel_size_m[1])
        self.metadata = SimpleNamespace(binary_result=SimpleNamespace(pixel_size=px))


class FakeTemMicroscopeClient:
    """``acquisition.acquire_stem_image`` and ``optics.deflectors.beam_shift`` in metres."""

    def __init__(self, pixel_size_m=(20e-12, 25e-12), dtype=np.uint16, scan_s: float = 0.0) -> None:
        self.pixel_size_m, self.dtype, self.scan_s = pixel_size_m, dtype, scan_s
        self.calls: list[tuple] = []
        self.fail_next = 0
        self.disconnected = False
        self.optics = SimpleNamespace(deflectors=SimpleNamespace(beam_shift=Point(x=3e-9, y=-1e-9)))
        self.acquisition = SimpleNamespace(acquire_stem_image=self._acquire)

    def _acquire(self, detector, size, dwell_time):
        self.calls.append((detector, size, dwell_time))
        time.sleep(self.scan_s)
        if self.fail_next:
            self.fail_next -= 1
            raise ApplicationServerException("Acquisition failed: detector not inserted.\nServer trace ...")
        side = {ImageSize.PRESET_256: 256, ImageSize.PRESET_512: 512}.get(size, size)
        img = (np.arange(side * side, dtype=np.uint32).reshape(side, side) % 4096).astype(self.dtype)
        return AdornedImage(img, self.pixel_size_m)

    def disconnect(self) -> None:
        self.disconnected = True


ENUMS = SimpleNamespace(DetectorType=DetectorType, ImageSize=ImageSize)
STRUCTS = SimpleNamespace(Point=Point)


def make(client=None, **kw) -> AutoScriptInstrument:
    return AutoScriptInstrument(client=client or FakeTemMicroscopeClient(), enumerations=ENUMS,
                                structures=STRUCTS, **kw)


# ----------------------------------------------------------------------------- units and axes


def test_frame_metadata_units_and_request():
    client = FakeTemMicroscopeClient()
    inst = make(client, size=256, dwell_us=2.5, flyback_us=15.0)
    t0 = time.monotonic()
    f0, f1 = inst.acquire(), inst.acquire()
    det, size, dwell_s = client.calls[0]
    assert det is DetectorType.HAADF and size is ImageSize.PRESET_256
    assert dwell_s == pytest.approx(2.5e-6)
    assert (f0.seq, f1.seq) == (0, 1)
    assert t0 <= f0.t_start <= f1.t_start <= time.monotonic()
    assert f0.image.shape == (256, 256) and f0.image.dtype == np.uint16
    # metadata pixel_size is x=20 pm, y=25 pm -> (y, x) nm
    assert f0.pixel_size_nm == pytest.approx((0.025, 0.020))
    assert (f0.dwell_us, f0.flyback_us) == (2.5, 15.0)
    # beam shift Point(x=3e-9, y=-1e-9) m -> (y, x) = (-1, 3) nm
    assert f0.beam_shift_nm == pytest.approx((-1.0, 3.0))
    assert f0.detector == "HAADF" and f0.stream == "autoscript"


def test_default_flyback_is_documented_constant():
    f = make(size=256).acquire()
    assert f.flyback_us == autoscript.DEFAULT_FLYBACK_US


def test_set_beam_shift_converts_nm_yx_to_metres_point():
    client = FakeTemMicroscopeClient()
    inst = make(client)
    inst.set_beam_shift(np.array([1.5, -0.25]))
    p = client.optics.deflectors.beam_shift
    assert isinstance(p, Point)
    assert p.y == pytest.approx(1.5e-9) and p.x == pytest.approx(-0.25e-9)
    assert inst.get_beam_shift() == pytest.approx([1.5, -0.25])


def test_shift_matrix_maps_axes_both_ways():
    client = FakeTemMicroscopeClient()
    inst = make(client, shift_matrix=[[0, 1], [-1, 0]])  # deflector y = our x, deflector x = -our y
    inst.set_beam_shift(np.array([2.0, 1.0]))
    p = client.optics.deflectors.beam_shift
    assert (p.y, p.x) == pytest.approx((1e-9, -2e-9))
    assert inst.get_beam_shift() == pytest.approx([2.0, 1.0])


@pytest.mark.parametrize("bad", [[np.nan, 0.0], [1.0], "x"])
def test_set_beam_shift_refuses_bad_targets(bad):
    client = FakeTemMicroscopeClient()
    inst = make(client)
    with pytest.raises(InstrumentError, match="two finite numbers"):
        inst.set_beam_shift(bad)
    assert client.optics.deflectors.beam_shift == Point(x=3e-9, y=-1e-9)


def test_other_dtypes_become_float32_and_nonpreset_size_is_passed_as_int():
    client = FakeTemMicroscopeClient(dtype=np.int32)
    f = make(client, size=128).acquire()
    assert client.calls[0][1] == 128
    assert f.image.dtype == np.float32


def test_missing_pixel_size_needs_the_option():
    client = FakeTemMicroscopeClient(pixel_size_m=None)
    with pytest.raises(InstrumentError, match="pixel-size-nm"):
        make(client, size=256).acquire()
    f = make(FakeTemMicroscopeClient(pixel_size_m=None), size=256, pixel_size_nm=0.05).acquire()
    assert f.pixel_size_nm == (0.05, 0.05)


def test_errors_are_one_line_and_the_next_acquire_works():
    client = FakeTemMicroscopeClient()
    inst = make(client, size=256)
    client.fail_next = 1
    with pytest.raises(InstrumentError) as info:
        inst.acquire()
    msg = str(info.value)
    assert "\n" not in msg and "ApplicationServerException" in msg and "detector not inserted" in msg
    assert inst.acquire().seq == 0  # a failed scan does not use up a seq


def test_beam_shift_errors_become_instrument_errors():
    class Broken:
        @property
        def beam_shift(self):
            raise ApplicationServerException("optics offline")

        @beam_shift.setter
        def beam_shift(self, value):
            raise ApplicationServerException("value out of range")

    client = FakeTemMicroscopeClient()
    client.optics = SimpleNamespace(deflectors=Broken())
    inst = make(client)
    with pytest.raises(InstrumentError, match="optics offline"):
        inst.get_beam_shift()
    with pytest.raises(InstrumentError, match="out of range"):
        inst.set_beam_shift([0.0, 0.0])


def test_unknown_detector_and_bad_options():
    with pytest.raises(InstrumentError, match="unknown AutoScript detector"):
        make(detector="EELS")
    with pytest.raises(InstrumentError, match="dwell_us"):
        make(dwell_us=0)
    with pytest.raises(InstrumentError, match="shift_matrix"):
        make(shift_matrix=[[1, 0], [0, 0]])


def test_frames_limit_and_close():
    client = FakeTemMicroscopeClient()
    inst = make(client, size=256, frames=1)
    inst.acquire()
    with pytest.raises(EndOfStream):
        inst.acquire()
    inst.close()
    assert not client.disconnected  # an injected client belongs to the caller


def test_missing_client_package_is_a_one_line_error():
    with pytest.raises(InstrumentError, match="autoscript_tem_microscope_client"):
        AutoScriptInstrument("192.0.2.1")


def test_add_args_from_args_roundtrip(monkeypatch):
    p = argparse.ArgumentParser()
    autoscript.add_args(p)
    args = p.parse_args(["--autoscript-host", "10.0.0.2", "--autoscript-port", "9095", "--autoscript-size", "256",
                         "--autoscript-dwell-us", "3", "--autoscript-shift-matrix", "1", "0", "0", "-1"])
    seen = {}

    def fake_init(self, host, port, **kw):
        seen.update(host=host, port=port, **kw)

    monkeypatch.setattr(AutoScriptInstrument, "__init__", fake_init)
    autoscript.from_args(args)
    assert seen["host"] == "10.0.0.2" and seen["port"] == 9095
    assert seen["size"] == 256 and seen["dwell_us"] == 3.0
    assert seen["shift_matrix"] == [[1.0, 0.0], [0.0, -1.0]]


# ----------------------------------------------------------------------------- through the bridge


def test_bridge_stream_survives_a_client_error_and_applies_corrections():
    client = FakeTemMicroscopeClient(scan_s=0.02)  # a 20 ms scan: the bridge never has to drop frames
    inst = make(client, size=256)
    ctx = zmq.Context()
    bridge = Bridge(inst, frames_endpoint="tcp://127.0.0.1:*", corrections_endpoint="tcp://127.0.0.1:*",
                    context=ctx)
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(bridge.frames_endpoint)
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(bridge.corrections_endpoint)
    time.sleep(0.2)  # let SUB join before frames flow
    seqs: list[int] = []
    try:
        client.fail_next = 1  # the very first scan fails
        bridge.start()
        deadline = time.monotonic() + 10
        while len(seqs) < 3 and time.monotonic() < deadline:
            if sub.poll(100):
                msg = protocol.recv(sub)
                assert isinstance(msg, Frame)
                seqs.append(msg.seq)
        assert seqs[:3] == [0, 1, 2], "the stream continues after the error"
        assert bridge.stats.acquire_errors == 1
        assert "ApplicationServerException" in bridge.stats.last_error
        # a correction comes back through the bridge and moves the deflector (in metres)
        start = inst.get_beam_shift()
        protocol.send(dealer, protocol.Correction(id=1, beam_shift_nm=(start[0] + 0.2, start[1]), for_seq=seqs[-1]))
        assert dealer.poll(5000)
        ack = protocol.decode(dealer.recv_multipart())
        assert ack.error == "" and not ack.clamped
        p = client.optics.deflectors.beam_shift
        assert p.y == pytest.approx((start[0] + 0.2) * 1e-9) and p.x == pytest.approx(start[1] * 1e-9)
    finally:
        bridge.stop()
        sub.close(0)
        dealer.close(0)
        ctx.term()
