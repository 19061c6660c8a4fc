"""StripCutter: a scan's partial reads (as Nion's instrumentation kit delivers them) cut into strips."""

from __future__ import annotations

import numpy as np
import pytest

from instrument_adapters.nion_strips import StripCutter

LINE_S = 1e-3


def _frame(rows: int = 256, cols: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((rows, cols)).astype(np.float32)


def _reads(cutter: StripCutter, frame: np.ndarray, valid_rows: list[int], t0: float) -> list:
    """Feed reads of ``frame`` (one buffer the kit keeps writing into) at 50 ms intervals."""
    buf = np.zeros_like(frame)
    out = []
    for i, v in enumerate(valid_rows):
        buf[:v] = frame[:v]
        complete = v == len(frame) and i == len(valid_rows) - 1
        out += cutter.update(buf, v, complete, t0 + 0.05 * i, LINE_S)
        buf[v:] = -1.0   # the kit's buffer beyond the valid rows is stale: never sent
    return out


def test_reads_of_uneven_size_give_whole_strips_in_scan_order_and_the_rest_at_the_end():
    cutter = StripCutter(48)
    frame = _frame()
    strips = _reads(cutter, frame, [8, 57, 106, 155, 204, 253, 256], t0=10.0)
    assert [s.row0 for s in strips] == [0, 48, 96, 144, 192, 240]
    assert [len(s.rows) for s in strips] == [48] * 5 + [16]
    assert np.array_equal(np.concatenate([s.rows for s in strips]), frame)
    assert {s.frame for s in strips} == {0} and {s.frame_rows for s in strips} == {256}
    # the frame's first line: the first read (10.0 s) less its 8 rows
    assert [s.t_start for s in strips] == pytest.approx([10.0 - 8 * LINE_S] * 6)


def test_the_next_frame_starts_after_the_complete_read_and_copies_are_kept():
    cutter = StripCutter(64)
    a, b = _frame(seed=1), _frame(seed=2)
    first = _reads(cutter, a, [64, 128, 192, 256], t0=0.0)
    second = _reads(cutter, b, [30, 100, 180, 256], t0=1.0)
    assert [(s.frame, s.row0) for s in first + second] == [(0, 0), (0, 64), (0, 128), (0, 192),
                                                            (1, 0), (1, 64), (1, 128), (1, 192)]
    assert np.array_equal(np.concatenate([s.rows for s in first]), a)    # not overwritten by frame b
    assert np.array_equal(np.concatenate([s.rows for s in second]), b)
    assert second[0].t_start == pytest.approx(1.0 - 30 * LINE_S)


def test_a_restarted_scan_starts_a_new_frame_and_a_late_start_still_sends_row_0():
    cutter = StripCutter(32)
    frame = _frame()
    buf = frame.copy()
    # first seen mid-frame: everything scanned so far goes out, from row 0
    got = cutter.update(buf, 113, False, 5.0, LINE_S)
    assert [s.row0 for s in got] == [0, 32, 64] and got[0].frame == 0
    # the scan restarted (fewer valid rows than already cut): a new frame, not a strip of the old one
    got = cutter.update(buf, 40, False, 5.1, LINE_S)
    assert [(s.frame, s.row0) for s in got] == [(1, 0)]
    # a complete read with nothing new (the rows came with the last partial read) sends nothing
    assert [s.row0 for s in cutter.update(buf, 256, False, 5.2, LINE_S)] == [32, 64, 96, 128, 160, 192, 224]
    assert cutter.update(buf, 256, True, 5.25, LINE_S) == []
    assert cutter.update(buf, 10, False, 5.3, LINE_S) == [] and cutter.frame == 2


def test_bad_line_counts_are_refused():
    with pytest.raises(ValueError, match="at least 1 line"):
        StripCutter(0)
