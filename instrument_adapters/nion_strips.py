"""Strips from a Nion scan's partial reads (:class:`StripCutter`: no Nion import, pure state).

The instrumentation kit reads a running scan in pieces (nionswift-usim every 50 ms; a real
scan device as its driver delivers rows): each read fires the scan hardware source's
``data_channel_updated_event`` with the whole frame's buffer, ``metadata["scan"]["valid_rows"]``
rows of it scanned so far, and the channel's state (``"partial"``, ``"marked"`` when a stop
was asked for at the end of the frame, ``"complete"``). :class:`StripCutter` turns that
sequence into strips of a fixed number of lines, in scan order, each as soon as its last line
is in; the frame's last strip takes what is left.

Timing: a read does not say when its rows were scanned. A frame's ``t_start`` is taken from the
first read that shows it, ``t_read - valid_rows * line_time``: late by that read's own delay
(up to one read interval), the same for every strip of the frame.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["CutStrip", "StripCutter"]


@dataclass(frozen=True)
class CutStrip:
    """Rows ``row0 .. row0 + len(rows) - 1`` of the cutter's frame ``frame`` (0, 1, ...)."""

    frame: int
    row0: int
    rows: np.ndarray        # (lines, cols), a copy: the kit reuses its buffer
    frame_rows: int
    t_start: float          # the frame's first line (s, the clock of ``t_read``)


class StripCutter:
    """Cut a scan's partial reads into strips of ``lines`` rows (``update`` once per read)."""

    def __init__(self, lines: int) -> None:
        if int(lines) < 1:
            raise ValueError(f"strips need at least 1 line, got {lines!r}")
        self.lines = int(lines)
        self.frame = -1          # the frame being cut (-1: none yet)
        self._cut = 0            # rows of it already sent
        self._done = True        # the frame was completed (the next read starts a new one)
        self._t_start = 0.0

    def update(self, data: np.ndarray, valid_rows: int, complete: bool, t_read: float,
               line_time_s: float) -> list[CutStrip]:
        """The strips one read makes whole. ``data``: the frame buffer (rows, cols);
        ``valid_rows``: rows of it scanned so far; ``complete``: the read ends the frame;
        ``t_read``: when the read arrived (s); ``line_time_s``: one line with its flyback."""
        rows = int(data.shape[0])
        valid = min(max(int(valid_rows), 0), rows)
        if complete:
            valid = rows
        if self._done or valid < self._cut:      # a new frame (fewer rows than already cut: it restarted)
            self.frame += 1
            self._cut = 0
            self._done = False
            self._t_start = float(t_read) - valid * float(line_time_s)
        out = []
        while valid - self._cut >= self.lines or (complete and valid > self._cut):
            end = min(self._cut + self.lines, valid)
            out.append(CutStrip(self.frame, self._cut, np.array(data[self._cut:end], copy=True), rows, self._t_start))
            self._cut = end
        self._done = bool(complete)
        return out
