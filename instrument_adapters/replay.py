"""Replay a recorded stream as an :class:`Instrument` (lossless, in order).

``ReplayInstrument(path, pixel_size_nm=None, dwell_us=None, flyback_us=None, realtime=False,
loop=False, speed=1.0)`` reads any file :func:`stem_live.io.read_frames` understands (our
TIFF recordings, ImageJ / plain TIFF stacks, ``.npy``; options fill in or override metadata).
Bad files and missing metadata raise :class:`stem_live.io.RecordError` at construction.

- ``acquire()`` returns the frames in file order with ``seq`` and ``t_start`` as recorded
  (files without them: seq 0..N-1, t_start from the frame interval or the frame time), and
  raises :class:`EndOfStream` after the last frame (or after :meth:`close`).
- ``realtime=True`` paces delivery like the recording: frame k is returned no earlier than
  ``(t_end[k] - t_end[0]) / speed`` seconds after the first one, ``t_end = t_start + frame
  time`` (a frame is delivered when it would have been complete). The first frame comes at
  once; ``close()`` from another thread interrupts a wait.
- ``loop=True`` starts again after the last frame; ``seq`` and ``t_start`` keep increasing
  (each pass is offset by the recording's span plus one frame interval), as the protocol
  requires of a stream.
- A recording cannot move: ``set_beam_shift`` only stores the requested shift and
  ``get_beam_shift`` returns it. Frames keep the beam shift recorded with them.
- ``len(replay)`` is the number of frames in one pass. A recording that was cut off plays its
  complete frames and logs one warning saying where it ends (``truncated_at``: how many).
- Frames with a side below ``min_side`` px, colour images and non-image arrays are refused.
"""

from __future__ import annotations

import argparse
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from instrument_adapters.base import EndOfStream, Instrument, InstrumentError
from stem_live.io import count_frames, read_frames
from stem_live.protocol import Frame

log = logging.getLogger(__name__)


class ReplayInstrument(Instrument):
    """Frames from a recording, delivered losslessly and in order (optionally at recorded pace)."""

    lossless = True

    def __init__(self, path: str | os.PathLike, *, pixel_size_nm: float | tuple[float, float] | None = None,
                 dwell_us: float | None = None, flyback_us: float | None = None, realtime: bool = False,
                 loop: bool = False, speed: float = 1.0, min_side: int = 2, frame_interval_s: float | None = None,
                 frame_gap_us: float | None = None) -> None:
        if not (isinstance(speed, (int, float)) and speed > 0 and np.isfinite(speed)):
            raise InstrumentError(f"replay speed must be a positive number, got {speed!r}")
        self.path = path
        self.realtime = bool(realtime)
        self.loop = bool(loop)
        self.speed = float(speed)
        self._opts = dict(pixel_size_nm=pixel_size_nm, dwell_us=dwell_us, flyback_us=flyback_us, min_side=min_side,
                          on_truncated=self._truncated, frame_interval_s=frame_interval_s, frame_gap_us=frame_gap_us)
        self.truncated_at: int | None = None  # complete frames of a recording that was cut off
        self._frames: Iterator[Frame] = read_frames(path, **self._opts)  # RecordError now, not later
        self._n = count_frames(path)
        self._shift = np.zeros(2)
        self._closed = threading.Event()
        self._delivered = 0          # frames returned in total (all passes)
        self._in_pass = 0            # frames returned in the current pass
        self._seq_offset = 0
        self._t_offset = 0.0
        self._first: Frame | None = None   # first frame of the recording (for looping)
        self._last: Frame | None = None    # last frame returned, as recorded
        self._wall0: float | None = None
        self._tend0 = 0.0

    def _truncated(self, message: str) -> None:
        """The reader stopped at an incomplete page: warn once (one line), remember where."""
        if self.truncated_at is None:
            self.truncated_at = self._in_pass
            log.warning("%s", message)

    def __len__(self) -> int:
        return self._n

    @property
    def delivered(self) -> int:
        """Frames returned so far (all passes)."""
        return self._delivered

    def acquire(self) -> Frame:
        if self._closed.is_set():
            raise EndOfStream("replay closed")
        frame = next(self._frames, None)
        if frame is None:
            if not self.loop or self._in_pass == 0 or self._first is None or self._last is None:
                raise EndOfStream(f"end of recording after {self._delivered} frames")
            self._next_pass()
            frame = next(self._frames, None)
            if frame is None:
                raise EndOfStream(f"end of recording after {self._delivered} frames")
        if self._first is None:
            self._first = frame
        self._last = frame
        self._in_pass += 1
        out = frame
        if self._seq_offset or self._t_offset:
            out = replace(frame, seq=frame.seq + self._seq_offset, t_start=frame.t_start + self._t_offset)
        if self.realtime:
            self._pace(out)
        self._delivered += 1
        return out

    def _next_pass(self) -> None:
        first, last = self._first, self._last
        assert first is not None and last is not None
        n = self._in_pass
        span = last.t_start - first.t_start
        interval = span / (n - 1) if n > 1 and span > 0 else last.frame_time_s
        self._seq_offset += last.seq - first.seq + 1
        self._t_offset += span + interval
        self._frames = read_frames(self.path, **self._opts)
        self._in_pass = 0

    def _pace(self, frame: Frame) -> None:
        t_end = frame.t_start + frame.frame_time_s
        now = time.monotonic()
        if self._wall0 is None:
            self._wall0, self._tend0 = now, t_end
            return
        due = self._wall0 + (t_end - self._tend0) / self.speed
        if due > now and self._closed.wait(due - now):
            raise EndOfStream("replay closed")

    def get_beam_shift(self) -> np.ndarray:
        return self._shift.copy()

    def set_beam_shift(self, target_nm: np.ndarray) -> None:
        target = np.asarray(target_nm, dtype=float).reshape(-1)
        if target.shape != (2,) or not np.isfinite(target).all():
            raise InstrumentError(f"beam shift target must be two finite numbers (y, x) in nm, got {target_nm!r}")
        self._shift = target.copy()  # a recording cannot move; remember what was asked

    def close(self) -> None:
        self._closed.set()
        try:
            self._frames.close()  # type: ignore[attr-defined]
        except (AttributeError, ValueError):  # ValueError: acquire() is reading in another thread
            pass


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``stem-live serve --instrument replay`` (all prefixed ``--replay-``)."""
    g = parser.add_argument_group("replay instrument")
    g.add_argument("--replay-file", type=Path, default=None, metavar="FILE",
                   help="recording: .tif, .npy, or a vendor file (.dm3 .dm4 .emd .ser .mrc .hspy)")
    g.add_argument("--replay-pixel-size-nm", type=float, default=None, metavar="NM")
    g.add_argument("--replay-dwell-us", type=float, default=None, metavar="US")
    g.add_argument("--replay-flyback-us", type=float, default=None, metavar="US")
    g.add_argument("--replay-frame-period-s", type=float, default=None, metavar="S",
                   help="frame start to start, where the file has no frame times")
    g.add_argument("--replay-frame-gap-us", type=float, default=None, metavar="US",
                   help="pause after each frame's scan, where the file has no frame times")
    g.add_argument("--replay-realtime", action="store_true", help="reproduce the recorded frame timing")
    g.add_argument("--replay-loop", action="store_true", help="start again after the last frame")
    g.add_argument("--replay-speed", type=float, default=1.0, help="with --replay-realtime: this many times faster than recorded")


def from_args(args: argparse.Namespace) -> ReplayInstrument:
    """Build the replay from :func:`add_args` options; a bad file raises RecordError (one line)."""
    if args.replay_file is None:
        raise InstrumentError("--instrument replay needs --replay-file FILE")
    return ReplayInstrument(args.replay_file, pixel_size_nm=args.replay_pixel_size_nm, dwell_us=args.replay_dwell_us,
                            flyback_us=args.replay_flyback_us, realtime=args.replay_realtime, loop=args.replay_loop,
                            speed=args.replay_speed, frame_interval_s=args.replay_frame_period_s,
                            frame_gap_us=args.replay_frame_gap_us)
