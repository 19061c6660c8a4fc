"""Vendor files through RosettaSciIO: real DM3 / Velox EMD files, and HSPY / MRC files written here."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from instrument_adapters import replay
from stem_live.io import RecordError, count_frames, is_vendor_file, read_frames, read_vendor_frames, vendor

DATA = Path(__file__).parent / "data" / "vendor"
DM3 = DATA / "test_STEM_image.dm3"            # 68x68 STEM image, DigiScan tags
DM3_STACK = DATA / "test_stackbuilder_imagestack.dm3"  # 3 frames of 2x16, µm axes
EMD = DATA / "fei_example_tem_stack.emd"      # Velox TEM (Ceta) stack: 2 frames of 3x3, pm axes, 0.8 s apart


def _write_hspy(path: Path, data: np.ndarray, axes: list[dict], original_metadata: dict | None = None,
                title: str = "HAADF") -> Path:
    """A .hspy file written with RosettaSciIO alone (no HyperSpy)."""
    from rsciio.hspy import file_writer

    file_writer(str(path), {
        "data": data, "axes": axes, "metadata": {"General": {"title": title}, "Signal": {"signal_type": ""}},
        "original_metadata": original_metadata or {}, "tmp_parameters": {}, "attributes": {"_lazy": False},
        "package_info": {"name": "stem-live", "version": "test"}, "learning_results": {}, "models": {},
    })
    return path


def _axis(name: str, size: int, scale: float, units: str, navigate: bool = False) -> dict:
    return {"name": name, "size": size, "scale": scale, "offset": 0.0, "units": units, "navigate": navigate}


def _write_mrc(path: Path, data: np.ndarray, angstrom_per_px: float) -> Path:
    """A minimal MRC2014 file (uint16, mode 6) with the cell size giving the pixel size."""
    nz, ny, nx = data.shape
    h = np.zeros(256, dtype="<i4")
    hf = h.view("<f4")
    h[0:4] = [nx, ny, nz, 6]
    h[7:10] = [nx, ny, nz]
    hf[10:13] = [nx * angstrom_per_px, ny * angstrom_per_px, nz]
    hf[13:16] = 90.0
    h[16:19] = [1, 2, 3]
    header = bytearray(h.tobytes())
    header[208:212] = b"MAP "
    header[212:216] = bytes([0x44, 0x44, 0, 0])
    path.write_bytes(bytes(header) + data.astype("<u2").tobytes())
    return path


# ----------------------------------------------------------------------------- real files


def test_dm3_stem_image_pixel_size_and_digiscan_timing():
    frames = list(read_vendor_frames(DM3))
    assert len(frames) == 1 and count_frames(DM3) == 1
    f = frames[0]
    assert f.image.shape == (68, 68) and f.image.dtype == np.float32  # uint32 pixels -> float32
    assert f.pixel_size_nm == pytest.approx((0.248538, 0.248538), rel=1e-5)  # axes in nm
    assert f.dwell_us == pytest.approx(3.5)  # DigiScan/Sample Time (us)
    assert f.flyback_us == pytest.approx(400.0)  # DigiScan/Flyback (us)
    assert (f.seq, f.t_start, f.scan_rotation_rad) == (0, 0.0, 0.0)
    assert f.stream == "test_STEM_image"


def test_dm3_stack_micrometre_axes_and_frame_times():
    frames = list(read_frames(DM3_STACK))
    assert [f.seq for f in frames] == [0, 1, 2] and count_frames(DM3_STACK) == 3
    f = frames[0]
    assert f.image.shape == (2, 16)
    assert f.pixel_size_nm == pytest.approx((59.9829, 59.9829), rel=1e-5)  # 0.05998 µm
    assert f.dwell_us == pytest.approx(30000.05, rel=1e-6) and f.flyback_us == 500.0  # "Tags at creation"
    frame_time = 2 * (16 * f.dwell_us + f.flyback_us) * 1e-6
    assert [g.t_start for g in frames] == pytest.approx([0.0, frame_time, 2 * frame_time])


def test_velox_emd_without_scan_timing_names_the_missing_fields():
    with pytest.raises(RecordError) as info:
        read_vendor_frames(EMD)
    msg = str(info.value)
    assert "\n" not in msg
    assert "dwell_us" in msg and "flyback_us" in msg and "pixel_size_nm" not in msg
    assert "Scan/DwellTime" in msg and "--dwell-us" in msg and "--flyback-us" in msg
    assert "fei_example_tem_stack.json" in msg


def test_velox_emd_with_options_picometre_axes_and_time_axis():
    frames = list(read_vendor_frames(EMD, dwell_us=2.0, flyback_us=10.0))
    assert len(frames) == 2 and count_frames(EMD) == 2
    f = frames[0]
    assert f.image.shape == (3, 3) and f.image.dtype == np.float32  # int16 -> float32
    assert f.pixel_size_nm == pytest.approx((0.0081729, 0.0081729), rel=1e-4)  # 8.17 pm
    assert (f.dwell_us, f.flyback_us) == (2.0, 10.0)
    assert [g.t_start for g in frames] == pytest.approx([0.0, 0.8])  # the Time axis
    assert f.detector == "Ceta"


def test_sidecar_fills_in_and_options_override(tmp_path):
    emd = tmp_path / "stack.emd"
    emd.write_bytes(EMD.read_bytes())
    (tmp_path / "stack.json").write_text(json.dumps({"dwell_us": 4.0, "flyback_us": 25.0, "pixel_size_nm": 0.05}))
    f = next(read_vendor_frames(emd))
    assert (f.dwell_us, f.flyback_us) == (4.0, 25.0)
    assert f.pixel_size_nm == (0.05, 0.05)  # the sidecar overrides the file
    f = next(read_vendor_frames(emd, pixel_size_nm=(0.1, 0.2), dwell_us=1.0))
    assert f.pixel_size_nm == (0.1, 0.2) and f.dwell_us == 1.0 and f.flyback_us == 25.0


def test_unknown_signal_choice_lists_the_image_signals():
    with pytest.raises(RecordError, match="choose one of 0: Ceta"):
        read_vendor_frames(EMD, dwell_us=1, flyback_us=0, signal="HAADF")
    assert next(read_vendor_frames(EMD, dwell_us=1, flyback_us=0, signal="ceta")).seq == 0


# ----------------------------------------------------------------------------- files written here


def test_hspy_roundtrip_angstrom_axes_and_velox_scan_metadata(tmp_path):
    data = (np.arange(3 * 8 * 10) % 251).astype(np.uint16).reshape(3, 8, 10)
    om = {"Scan": {"DwellTime": "2e-06", "LineTime": "3.5e-05", "ScanRotation": "0.5"}}  # as Velox stores them
    path = _write_hspy(tmp_path / "series.hspy", data,
                       [_axis("Time", 3, 0.25, "s", True), _axis("y", 8, 1.5, "Å"), _axis("x", 10, 2.0, "Å")], om)
    frames = list(read_frames(path))
    assert len(frames) == 3 and count_frames(path) == 3
    f = frames[1]
    assert f.pixel_size_nm == pytest.approx((0.15, 0.2))
    assert f.dwell_us == pytest.approx(2.0)
    assert f.flyback_us == pytest.approx(35.0 - 10 * 2.0)  # LineTime - columns x DwellTime
    assert f.scan_rotation_rad == pytest.approx(0.5)
    assert f.t_start == pytest.approx(0.25)
    assert f.image.dtype == np.uint16 and np.array_equal(f.image, data[1])


def test_hspy_with_digiscan_metadata_and_single_image(tmp_path):
    data = np.random.default_rng(0).random((16, 12)).astype(np.float32)
    om = {"ImageList": {"TagGroup0": {"ImageTags": {"DigiScan": {"Sample Time": 8.0, "Flyback": 150.0,
                                                                  "Rotation": 90.0}}}}}
    path = _write_hspy(tmp_path / "one.hspy", data, [_axis("y", 16, 0.02, "µm"), _axis("x", 12, 0.02, "um")], om)
    (f,) = list(read_vendor_frames(path))
    assert f.pixel_size_nm == pytest.approx((20.0, 20.0))
    assert (f.dwell_us, f.flyback_us) == (8.0, 150.0)
    assert f.scan_rotation_rad == pytest.approx(math.pi / 2)
    assert np.array_equal(f.image, data)


def test_hspy_without_units_needs_the_pixel_size(tmp_path):
    data = np.zeros((8, 8), np.uint8)
    om = {"Scan": {"DwellTime": 1e-6, "LineTime": 8e-6}}
    path = _write_hspy(tmp_path / "nounits.hspy", data, [_axis("y", 8, 1.0, ""), _axis("x", 8, 1.0, "")], om)
    with pytest.raises(RecordError, match=r"pixel_size_nm not in the file .*--pixel-size-nm"):
        read_vendor_frames(path)
    assert next(read_vendor_frames(path, pixel_size_nm=0.03)).pixel_size_nm == (0.03, 0.03)


def test_spectrum_only_file_is_refused(tmp_path):
    path = _write_hspy(tmp_path / "eels.hspy", np.zeros(64, np.float32), [_axis("Energy", 64, 0.5, "eV")],
                       title="EELS")
    with pytest.raises(RecordError, match="holds no 2-D image"):
        read_vendor_frames(path)


def test_mrc_stack(tmp_path):
    data = np.arange(2 * 10 * 12, dtype=np.uint16).reshape(2, 10, 12)
    path = _write_mrc(tmp_path / "stack.mrc", data, angstrom_per_px=2.5)
    frames = list(read_vendor_frames(path, dwell_us=1.0, flyback_us=5.0))
    assert len(frames) == 2 and count_frames(path) == 2
    assert frames[0].pixel_size_nm == pytest.approx((0.25, 0.25))
    assert np.array_equal(frames[1].image, data[1])


# ----------------------------------------------------------------------------- errors and dispatch


def test_is_vendor_file_and_dispatch_to_record(tmp_path):
    assert all(is_vendor_file(f"a{s}") for s in (".dm3", ".DM4", ".emd", ".ser", ".emi", ".mrc", ".hspy"))
    assert not any(is_vendor_file(f"a{s}") for s in (".tif", ".npy", ".h5", ""))
    npy = tmp_path / "stack.npy"
    np.save(npy, np.zeros((2, 4, 4), np.uint16))
    frames = list(read_frames(npy, pixel_size_nm=0.1, dwell_us=1.0, flyback_us=0.0))
    assert len(frames) == 2 and count_frames(npy) == 2
    with pytest.raises(RecordError, match="not a vendor file"):
        read_vendor_frames(npy)


def test_damaged_and_missing_files_are_one_line(tmp_path):
    bad = tmp_path / "broken.dm3"
    bad.write_bytes(b"\x00\x00\x00\x03garbage" * 10)
    with pytest.raises(RecordError) as info:
        read_vendor_frames(bad)
    assert "\n" not in str(info.value) and "broken.dm3" in str(info.value) and "damaged" in str(info.value)
    cut = tmp_path / "cut.dm3"
    cut.write_bytes(DM3.read_bytes()[:5000])
    with pytest.raises(RecordError, match="cut.dm3"):
        list(read_vendor_frames(cut))
    with pytest.raises(RecordError, match="does not exist"):
        read_vendor_frames(tmp_path / "nope.emd")


def test_missing_rosettasciio_says_install_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "rsciio.digitalmicrograph", None)  # import now raises ImportError
    with pytest.raises(RecordError, match=r"install stem-live\[vendor\]"):
        read_vendor_frames(DM3)


def test_scan_metadata_ignores_garbage():
    assert vendor.scan_metadata({"Scan": {"DwellTime": "n/a"}}, 10) == {}
    assert vendor.scan_metadata({"x": {"DigiScan": {"Sample Time": -1, "Flyback": "?"}}}, 10) == {}
    assert vendor.scan_metadata({"Scan": {"DwellTime": 1e-6, "LineTime": 1e-6}}, 10) == {"dwell_us": 1.0}


def test_replay_plays_vendor_files():
    inst = replay.ReplayInstrument(DM3_STACK, loop=True)
    assert len(inst) == 3
    frames = [inst.acquire() for _ in range(4)]
    assert [f.seq for f in frames] == [0, 1, 2, 3]
    assert frames[0].pixel_size_nm == pytest.approx((59.9829, 59.9829), rel=1e-5)
    with pytest.raises(RecordError, match="--dwell-us"):
        replay.ReplayInstrument(EMD)


def test_locate_reads_vendor_files_through_io(tmp_path):
    """``locate`` reads what ``replay`` reads: the same pixels as the frame reader, no scan metadata needed."""
    from stem_live.cli import main
    from stem_live.io import read_images

    images = read_images(DM3_STACK)  # no dwell in the file: not needed for the pixels
    frames = list(read_frames(DM3_STACK, dwell_us=1.0, flyback_us=0.0))
    assert images.shape == (3, *frames[0].image.shape)
    for img, f in zip(images, frames):
        np.testing.assert_array_equal(img, f.image)
    out = tmp_path / "cols.csv"
    assert main(["locate", str(DM3), "--spacing-px", "8", "--out", str(out)]) == 0
    assert out.exists() and (tmp_path / "cols.png").exists()
    with pytest.raises(RecordError, match="does not exist"):
        read_images(tmp_path / "missing.dm4")
