"""Whole frames from the strips an instrument sends as it scans (``protocol.Strip``).

The engine's frame path takes whole frames: :class:`StripAssembler` puts each frame's strips
together (in any order, each row once) and hands the frame on when its last row arrives. A
frame whose strips stop coming (a new frame begins, or its strips disagree on the scan) is
dropped and counted, never half-processed; the strips of a stream's first frame that came
before the engine subscribed were never sent to it, so a frame joined after its first row is
skipped and counted (``frames_joined_late``), not dropped. The frame's ``beam_shift_nm`` is
its first strip's (the shift in effect when its scan began); where a strip says the shift
changed within it or strips differ (an instrument following a trajectory), the frame carries
it per line (``Frame.beam_shift_lines_nm``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from stem_live.protocol import Frame, Strip


@dataclass
class _Partial:
    key: tuple
    image: np.ndarray
    have: np.ndarray   # (rows,) bool: rows received
    first: Strip
    beam: np.ndarray   # (rows, 2) nm: the beam shift at every line


def _scan_key(s: Strip) -> tuple:
    return (s.stream, s.seq, s.frame_rows, s.image.shape[1], s.image.dtype.str, s.t_start, s.pixel_size_nm,
            s.dwell_us, s.flyback_us, s.scan_rotation_rad, s.detector)


class StripAssembler:
    """Strips in, whole frames out, one stream at a time (the frames socket carries one)."""

    def __init__(self, *, max_frame_bytes: int = 1 << 28) -> None:
        self.max_frame_bytes = int(max_frame_bytes)   # a strip may not make the engine hold a larger frame
        self._part: _Partial | None = None
        self.frames_dropped = 0   # frames given up with rows missing or strips that disagree
        self.frames_joined_late = 0   # a stream's first frame, joined after its first row: skipped
        self.last_error = ""
        self._stream: str | None = None   # the stream of the last frame begun at its first row
        self._late: tuple | None = None   # (stream, seq) of the frame being skipped

    def add(self, strip: Strip) -> Frame | None:
        """Take one strip; the whole frame once its last missing row has arrived, else None."""
        if self._late == (strip.stream, strip.seq):
            return None
        key = _scan_key(strip)
        part = self._part
        if part is not None and part.key != key:
            same_frame = (part.first.stream, part.first.seq) == (strip.stream, strip.seq)
            self._drop(f"frame {part.first.seq}: " + ("a strip disagrees with the frame's scan (size, dtype or "
                                                     "metadata); send every strip of a frame with the same scan "
                                                     "fields" if same_frame else
                                                     f"{int((~part.have).sum())} of {len(part.have)} rows never arrived"))
            part = None
            if same_frame:
                return None
        if part is None and strip.row0 > 0 and strip.stream != self._stream:
            # the engine subscribed while this frame was being scanned: its first rows went out before
            self._late = (strip.stream, strip.seq)
            self.frames_joined_late += 1
            return None
        if part is None:
            self._stream = strip.stream
            need = strip.frame_rows * strip.image.shape[1] * strip.image.dtype.itemsize
            if need > self.max_frame_bytes:
                self._drop(f"frame {strip.seq}: its strips claim a {strip.frame_rows} x {strip.image.shape[1]} frame "
                           f"({need / 2**20:.0f} MiB, more than {self.max_frame_bytes / 2**20:.0f} MiB); send "
                           "smaller frames or whole frames")
                return None
            part = self._part = _Partial(key, np.zeros((strip.frame_rows, strip.image.shape[1]), strip.image.dtype),
                                         np.zeros(strip.frame_rows, bool), strip, np.zeros((strip.frame_rows, 2)))
        rows = slice(strip.row0, strip.row0 + strip.image.shape[0])
        if part.have[rows].any():
            self._drop(f"frame {strip.seq}: rows {strip.row0}..{rows.stop - 1} sent twice")
            return None
        part.image[rows] = strip.image
        part.have[rows] = True
        part.beam[rows] = strip.beam_at_lines
        if not part.have.all():
            return None
        self._part = None
        f = part.first
        lines = None if np.all(part.beam == part.beam[:1]) else part.beam
        return Frame(seq=f.seq, image=part.image, t_start=f.t_start, pixel_size_nm=f.pixel_size_nm, dwell_us=f.dwell_us,
                     flyback_us=f.flyback_us, scan_rotation_rad=f.scan_rotation_rad,
                     beam_shift_nm=tuple(float(v) for v in part.beam[0]), stream=f.stream, detector=f.detector,
                     beam_shift_lines_nm=lines)

    def _drop(self, why: str) -> None:
        self.frames_dropped += 1
        self.last_error = f"{why}: the frame is dropped"
        self._part = None


def cut_into_strips(frame: Frame, lines: int) -> list[Strip]:
    """``frame`` as the strips of ``lines`` rows an instrument would send (the last may be shorter)."""
    rows = frame.image.shape[0]
    beam = frame.beam_shift_lines_nm
    return [Strip(seq=frame.seq, row0=r, frame_rows=rows, image=frame.image[r:r + lines], t_start=frame.t_start,
                  pixel_size_nm=frame.pixel_size_nm, dwell_us=frame.dwell_us, flyback_us=frame.flyback_us,
                  scan_rotation_rad=frame.scan_rotation_rad, beam_shift_nm=frame.beam_shift_nm, stream=frame.stream,
                  detector=frame.detector, beam_shift_lines_nm=None if beam is None else np.asarray(beam)[r:r + lines])
            for r in range(0, rows, int(lines))]


def strip_from_meta(rows: np.ndarray, meta: object, row0: int, stream: str = "sim") -> Strip:
    """Rows ``row0 ..`` of a scanned frame as the protocol's :class:`Strip`. ``meta``: the frame's
    scan metadata (the simulator's ``FrameMeta``: ``Microscope.next_strip``), with the beam shift
    of the strip's lines (a copy) where a path moved it."""
    lines = getattr(meta, "beam_shift_lines_nm", None)
    return Strip(seq=meta.seq, row0=row0, frame_rows=meta.rows, image=rows, t_start=meta.t_start,
                 pixel_size_nm=tuple(meta.pixel_size_nm), dwell_us=meta.dwell_us, flyback_us=meta.flyback_us,
                 scan_rotation_rad=meta.scan_rotation_rad, beam_shift_nm=tuple(float(v) for v in meta.beam_shift_nm),
                 stream=stream, detector=meta.detector,
                 beam_shift_lines_nm=None if lines is None else np.array(np.asarray(lines)[row0:row0 + len(rows)], np.float64))
