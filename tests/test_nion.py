"""NionInstrument against Nion's simulated STEM (nionswift-usim), headless: no Nion Swift GUI.

usim renders its amorphous sample from a texture on a 1000/2048 nm grid and has no drift of
its own: the tests move the stage by whole texels (so the true image shift is exact) and run
stem-live's engine on the frames. With a 31.25 nm field of 256 pixels one texel is 4 pixels.
"""

from __future__ import annotations

import argparse
import math
import time
from types import SimpleNamespace

import numpy as np
import pytest

pytest.importorskip("nion.usim_device", reason="needs the nion extra (nionswift-instrumentation, nionswift-usim)")

from instrument_adapters import nion  # noqa: E402
from instrument_adapters.base import EndOfStream, InstrumentError  # noqa: E402
from instrument_adapters.nion import NionInstrument, start_usim  # noqa: E402
from stem_live.engine import Engine, EngineConfig  # noqa: E402
from stem_live.register import make_reference, register  # noqa: E402

TEXEL_NM = 1000 / 2048
FOV_NM = 31.25  # 256 px of 0.1220703125 nm: 4 px per texel


@pytest.fixture(scope="module")
def usim():
    session = start_usim(sample_index=1)
    assert session.settings_dir is not None and session.settings_dir.is_dir()
    yield session
    session.close()
    assert not session.settings_dir.exists()  # usim's settings folder goes with the session


@pytest.fixture
def make(usim):
    made: list[NionInstrument] = []

    def _make(**kw) -> NionInstrument:
        kw.setdefault("size", 256)
        kw.setdefault("pixel_time_us", 1.0)
        kw.setdefault("fov_nm", FOV_NM)
        kw.setdefault("rotation_rad", 0.0)
        inst = NionInstrument(usim.scan_hardware_source, **kw)
        made.append(inst)
        return inst

    yield _make
    for inst in made:
        inst.close()
    usim.instrument.SetVal("CSH.x", 0.0)
    usim.instrument.SetVal("CSH.y", 0.0)
    usim.instrument.stage_position_m = _point(0.0, 0.0)
    fp = usim.scan_hardware_source.get_current_frame_parameters()
    fp.center_nm = _point(0.0, 0.0)
    fp.rotation_rad = 0.0
    usim.scan_hardware_source.set_current_frame_parameters(fp)


def _point(y: float, x: float):
    from nion.utils import Geometry

    return Geometry.FloatPoint(y=y, x=x)


def _move_stage(usim, y_nm: float, x_nm: float) -> None:
    usim.instrument.stage_position_m = _point(y_nm * 1e-9, x_nm * 1e-9)


def _fresh(inst: NionInstrument):
    """The first frame that started after a change (continuous mode: the one in progress is dropped)."""
    inst.acquire()
    return inst.acquire()


def _content_shift_nm(ref_image, image, px_nm: float) -> np.ndarray:
    shift_px, peak = register(make_reference(ref_image), image)
    assert peak > 0.1
    return np.asarray(shift_px) * px_nm


# ----------------------------------------------------------------------------- frames and units


def test_frame_metadata_from_the_scan(make):
    inst = make()
    t0 = time.monotonic()
    f0, f1 = inst.acquire(), inst.acquire()
    assert (f0.seq, f1.seq) == (0, 1)
    assert f0.image.shape == (256, 256) and f0.image.dtype == np.float32
    assert f0.pixel_size_nm == pytest.approx((FOV_NM / 256, FOV_NM / 256))
    assert f0.dwell_us == 1.0
    assert f0.flyback_us == pytest.approx(2.0)  # usim reports flyback_pixels = 2
    assert f0.detector == "HAADF" and f0.stream == "nion"
    assert t0 - 1.0 < f0.t_start < f1.t_start <= time.monotonic()
    assert f1.t_start - f0.t_start >= f0.frame_time_s * 0.9
    assert f0.beam_shift_nm == (0.0, 0.0)


def test_beam_shift_units_and_axes(make, usim):
    inst = make()
    inst.set_beam_shift(np.array([1.5, -0.5]))
    assert usim.instrument.GetVal("CSH.y") == pytest.approx(1.5e-9)
    assert usim.instrument.GetVal("CSH.x") == pytest.approx(-0.5e-9)
    assert inst.get_beam_shift() == pytest.approx([1.5, -0.5])
    with pytest.raises(InstrumentError, match="two finite numbers"):
        inst.set_beam_shift([math.inf, 0.0])


def test_beam_shift_moves_the_image_like_b_in_design_md(make):
    """Content appears at p + d - b: a beam shift of +b (image axes) moves the content by -b, also rotated."""
    for rotation in (0.0, math.radians(30)):
        inst = make(rotation_rad=rotation)
        ref = _fresh(inst)
        b = np.array([2 * TEXEL_NM, -4 * TEXEL_NM])
        inst.set_beam_shift(b)
        f = _fresh(inst)
        assert f.beam_shift_nm == pytest.approx(tuple(b))
        assert f.scan_rotation_rad == pytest.approx(rotation)
        moved = _content_shift_nm(ref.image, f.image, f.pixel_size_nm[0])
        assert np.hypot(*(moved + b)) < 0.1 * np.hypot(*b), (rotation, moved, b)
        inst.set_beam_shift(np.zeros(2))


def test_strips_are_the_frames_cut_as_they_are_scanned(make, usim):
    """Strip mode (``strip_lines``): every frame arrives as 64-line strips in scan order, cut from
    the scan's partial reads, and put together they are the frame the kit completes."""
    from stem_live.protocol import Strip

    complete: list[np.ndarray] = []

    def keep(args, xdata):
        if args.state == "complete" and args.data_channel_id == "a":
            complete.append(np.array(xdata.data, copy=True))

    listener = usim.scan_hardware_source.data_channel_updated_event.listen(keep)
    try:
        inst = make(strip_lines=64, pixel_time_us=4.0)
        strips = [inst.acquire() for _ in range(12)]
        deadline = time.monotonic() + 5.0
        while len(complete) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        listener.close()
    assert all(isinstance(s, Strip) for s in strips)
    assert [(s.seq, s.row0) for s in strips] == [(k, r) for k in range(3) for r in (0, 64, 128, 192)]
    assert [s.last for s in strips] == [False, False, False, True] * 3
    assert {s.frame_rows for s in strips} == {256} and {s.image.shape for s in strips} == {(64, 256)}
    for k in range(3):
        mine = strips[4 * k:4 * k + 4]
        assert len({s.t_start for s in mine}) == 1
        assert np.array_equal(np.concatenate([s.image for s in mine]), complete[k])
    s0 = strips[0]
    assert s0.pixel_size_nm == pytest.approx((FOV_NM / 256, FOV_NM / 256))
    assert (s0.dwell_us, s0.flyback_us, s0.detector) == (4.0, pytest.approx(8.0), "HAADF")
    frame_s = 256 * s0.line_time_s
    # a frame's t_start is its first read's arrival less the rows read: late by that read's delay
    # (up to a read interval, 50 ms in usim, more on a loaded machine)
    assert 0.5 * frame_s < strips[4].t_start - strips[0].t_start < frame_s + 0.5
    with pytest.raises(EndOfStream):
        _end_after_one(make)
    with pytest.raises(InstrumentError, match="acquisition='continuous'"):
        NionInstrument(usim.scan_hardware_source, strip_lines=64, acquisition="single")


def _end_after_one(make) -> None:
    inst = make(strip_lines=128, frames=1)
    assert [inst.acquire().row0 for _ in range(2)] == [0, 128]
    inst.acquire()


# ----------------------------------------------------------------------------- the engine on usim


def test_engine_measures_injected_drift_and_its_correction_brings_the_image_back(make, usim):
    inst = make()
    engine = Engine(EngineConfig(history=4))
    ref = _fresh(inst)
    assert engine.process(ref).drift_nm == pytest.approx([0.0, 0.0])
    drift = np.array([3 * TEXEL_NM, -2 * TEXEL_NM])  # (1.46, -0.98) nm: the specimen moves
    _move_stage(usim, *drift)
    inst.acquire()  # the frame in progress when the stage moved
    for _ in range(4):  # enough frames at rest that the straight-line prediction is flat
        r = engine.process(inst.acquire())
        assert np.hypot(*(r.drift_nm - drift)) < 0.1 * np.hypot(*drift), r.drift_nm
        assert r.correction is None  # not armed
    engine.arm()
    r = engine.process(inst.acquire())
    assert r.correction is not None
    target = np.asarray(r.correction.beam_shift_nm)
    assert np.hypot(*(target - drift)) < 0.1 * np.hypot(*drift), target
    inst.set_beam_shift(target)  # what the bridge does with the correction
    f = _fresh(inst)
    back = _content_shift_nm(ref.image, f.image, f.pixel_size_nm[0])
    assert np.hypot(*back) < 0.1 * np.hypot(*drift), back  # the image is back where it started
    r = engine.process(f)
    assert np.hypot(*(r.drift_nm - drift)) < 0.1 * np.hypot(*drift)  # the drift is still known


def test_scan_offset_mode_moves_center_nm(make, usim):
    inst = make(correction_mode="scan_offset", acquisition="single")
    usim.instrument.scan_data_generator.sample_index = 0  # flakes: the amorphous texture ignores center_nm
    try:
        ref = inst.acquire()
        b = np.array([8 * FOV_NM / 256, -16 * FOV_NM / 256])  # whole pixels
        inst.set_beam_shift(b)
        c = usim.scan_hardware_source.get_current_frame_parameters().center_nm
        assert (c.y, c.x) == pytest.approx(tuple(b))
        assert inst.get_beam_shift() == pytest.approx(b)
        f = inst.acquire()  # single mode: the frame starts after the call
        assert f.beam_shift_nm == pytest.approx(tuple(b))
        moved = _content_shift_nm(ref.image, f.image, f.pixel_size_nm[0])
        assert np.hypot(*(moved + b)) < 0.1 * np.hypot(*b), moved
        assert usim.instrument.GetVal("CSH.x") == 0.0  # the column was not touched
    finally:
        usim.instrument.scan_data_generator.sample_index = 1


# ----------------------------------------------------------------------------- errors and wiring


def test_scan_errors_become_one_line_instrument_errors():
    class Broken:
        stem_controller = SimpleNamespace(GetVal=lambda name: 0.0)
        is_playing = True

        def __init__(self):
            self.fail = True

        def get_current_frame_parameters(self):
            return SimpleNamespace(rotation_rad=0.0, pixel_time_us=1.0, center_nm=_point(0, 0))

        def set_current_frame_parameters(self, fp):
            pass

        def start_playing(self):
            pass

        def get_next_xdatas_to_finish(self, timeout):
            if self.fail:
                self.fail = False
                raise TimeoutError("scan device did not answer\nmore detail")
            return [None]

    inst = NionInstrument(Broken())
    with pytest.raises(InstrumentError) as info:
        inst.acquire()
    assert "\n" not in str(info.value) and "TimeoutError" in str(info.value)
    with pytest.raises(InstrumentError, match="no data"):
        inst.acquire()
    with pytest.raises(InstrumentError, match="correction_mode"):
        NionInstrument(Broken(), correction_mode="stage")


def test_add_args_from_args_finds_the_scan_device_in_this_process(usim):
    p = argparse.ArgumentParser()
    nion.add_args(p)
    args = p.parse_args(["--nion-scan-device", "usim_scan_device", "--nion-size", "128", "--nion-fov-nm", "20",
                         "--nion-correction", "scan_offset", "--nion-acquisition", "single"])
    inst = nion.from_args(args)
    try:
        assert inst.hs is usim.scan_hardware_source
        assert inst.correction_mode == "scan_offset" and inst.acquisition == "single"
        f = inst.acquire()
        assert f.image.shape == (128, 128) and f.pixel_size_nm == pytest.approx((20 / 128, 20 / 128))
    finally:
        inst.close()
    with pytest.raises(InstrumentError, match="no Nion hardware source 'nope'"):
        nion.from_args(p.parse_args(["--nion-scan-device", "nope"]))


def test_stage_handover_keeps_the_image_and_returns_the_beam(make, usim):
    """hand_over_to_stage moves usim's stage by the beam shift's specimen motion; the bridge then sets
    the beam back to the start: the image stays where the beam shift had put it."""
    inst = make()
    ref = _fresh(inst)
    shift = np.array([4 * TEXEL_NM, -2 * TEXEL_NM])  # whole texels: exact image shifts
    inst.set_beam_shift(shift)
    moved = _fresh(inst)
    assert inst.hand_over_to_stage(shift) is True
    inst.set_beam_shift(np.zeros(2))
    after = _fresh(inst)
    px = ref.pixel_size_nm[0]
    np.testing.assert_allclose(_content_shift_nm(moved.image, after.image, px), 0.0, atol=0.05)
    assert np.hypot(*_content_shift_nm(ref.image, after.image, px)) > 1.0  # still where the beam shift put it
    assert inst.get_beam_shift() == pytest.approx([0.0, 0.0])
    assert make(correction_mode="scan_offset").hand_over_to_stage(shift) is False
    assert make(stage_controls=("no_such_stage.x", "no_such_stage.y")).hand_over_to_stage(shift) is False
