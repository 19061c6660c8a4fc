"""Frame times of recordings: the file's own, a sidecar's, an option's, or back to back (said once)."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from stem_live.io import RecordError, StackWriter, read_frames
from stem_live.protocol import Frame

ROWS, COLS, DWELL, FLY = 40, 50, 2.0, 30.0
FRAME_S = ROWS * (COLS * DWELL + FLY) * 1e-6   # 5.2 ms


def _npy(tmp_path, n=4):
    path = tmp_path / "stack.npy"
    np.save(path, np.arange(n * ROWS * COLS, dtype=np.uint16).reshape(n, ROWS, COLS))
    return path


def _times(path, **kw):
    return np.array([f.t_start for f in read_frames(path, pixel_size_nm=0.02, dwell_us=DWELL, flyback_us=FLY, **kw)])


def test_back_to_back_is_assumed_and_said_once(tmp_path, caplog):
    path = _npy(tmp_path)
    with caplog.at_level(logging.WARNING, logger="stem_live.io"):
        t = _times(path)
        _times(path)
    np.testing.assert_allclose(np.diff(t), FRAME_S)
    said = [r for r in caplog.records if "no frame times" in r.getMessage()]
    assert len(said) == 1 and "--frame-period-s" in said[0].getMessage()


def test_frame_period_and_gap_options(tmp_path):
    path = _npy(tmp_path)
    np.testing.assert_allclose(np.diff(_times(path, frame_interval_s=0.25)), 0.25)
    np.testing.assert_allclose(np.diff(_times(path, frame_gap_us=300_000.0)), FRAME_S + 0.3)
    with pytest.raises(RecordError, match="once"):
        _times(path, frame_interval_s=0.25, frame_gap_us=10.0)
    with pytest.raises(RecordError, match="frame period"):
        _times(path, frame_interval_s=-1.0)


def test_sidecar_times_beat_the_default_and_options_beat_the_sidecar(tmp_path, caplog):
    path = _npy(tmp_path)
    (tmp_path / "stack.json").write_text(json.dumps({"frame_interval_s": 0.5, "t_start": 10.0}))
    with caplog.at_level(logging.WARNING, logger="stem_live.io"):
        t = _times(path)
    np.testing.assert_allclose(t, 10.0 + 0.5 * np.arange(4))
    assert not any("no frame times" in r.getMessage() for r in caplog.records)
    np.testing.assert_allclose(np.diff(_times(path, frame_interval_s=0.1)), 0.1)


def test_our_recordings_keep_their_own_times(tmp_path):
    path = tmp_path / "rec.tif"
    starts = [3.0, 3.7, 5.1]   # irregular: a paused scan
    with StackWriter(path) as w:
        for k, t0 in enumerate(starts):
            w.write(Frame(seq=k, image=np.zeros((ROWS, COLS), np.uint16), t_start=t0, pixel_size_nm=(0.02, 0.02),
                          dwell_us=DWELL, flyback_us=FLY))
    assert [f.t_start for f in read_frames(path, frame_interval_s=1.0)] == starts
