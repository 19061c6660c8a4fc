"""What one acquisition returns besides the image: instrument metadata and ground truth."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FrameMeta", "FrameTruth"]


@dataclass(frozen=True)
class FrameMeta:
    """What the instrument reports with a frame (the wire ``frame`` fields).

    t_start: s, time of pixel (0, 0); pixel_size_nm: (y, x) nominal; beam_shift_nm: (y, x)
    commanded target in effect at line 0 (the setpoint, not the true applied shift).
    """

    seq: int
    t_start: float
    pixel_size_nm: tuple[float, float]
    dwell_us: float
    flyback_us: float
    scan_rotation_rad: float
    beam_shift_nm: tuple[float, float]
    rows: int
    cols: int
    detector: str = "HAADF"
    #: (rows, 2) commanded target per line where it changes within the frame (a path), else None
    beam_shift_lines_nm: np.ndarray | None = None

    @property
    def line_time_s(self) -> float:
        return (self.cols * self.dwell_us + self.flyback_us) * 1e-6

    def to_dict(self) -> dict:
        """Plain JSON-able dict (floats, ints, lists)."""
        return {
            "seq": int(self.seq), "t_start": float(self.t_start),
            "pixel_size_nm": [float(v) for v in self.pixel_size_nm],
            "dwell_us": float(self.dwell_us), "flyback_us": float(self.flyback_us),
            "scan_rotation_rad": float(self.scan_rotation_rad),
            "beam_shift_nm": [float(v) for v in self.beam_shift_nm],
            "rows": int(self.rows), "cols": int(self.cols), "detector": self.detector,
        }


@dataclass(frozen=True)
class FrameTruth:
    """Ground truth of one frame. Lengths nm, (y, x); pixel positions (row, col).

    line_times_s: (rows,) start time of each line.
    drift_nm: (rows, 2) true d(t) at each line start.
    beam_shift_nm: (rows, 2) true applied b on each line (after gain, noise, latency).
    line_jitter_nm: (rows,) random x offset of each line (scan distortion).
    columns_px: (N, 2) sub-pixel (row, col) where each column appears (for particles: the
        reference blob), with drift, shift and scan distortion at the time it was scanned;
        only columns inside the frame (-0.5 <= row < rows - 0.5, same for col).
    column_times_s: (N,) time at which each column was scanned.
    column_ids: (N,) stable across frames; species: (N,) index into species_names.
    weight: (N,) HAADF weight (sum Z^1.7) of each column.
    orientation_rad: (N,) for particles (image axes, atan2(dy, dx)), else None.
    specimen_nm: (N, 2) position of each column on the specimen (image frame, no drift).
    visible: (N,) bool: the column counts as visible with this frame's detector (False for
        species a real HAADF dose does not show, e.g. O in PbTiO3; all True for ABF / BF);
        None: all visible. A scorer compares a locator with ``columns_px[visible]``.
    """

    line_times_s: np.ndarray
    drift_nm: np.ndarray
    beam_shift_nm: np.ndarray
    line_jitter_nm: np.ndarray
    columns_px: np.ndarray
    column_times_s: np.ndarray
    column_ids: np.ndarray
    species: np.ndarray
    species_names: tuple[str, ...]
    weight: np.ndarray
    orientation_rad: np.ndarray | None
    specimen_nm: np.ndarray
    symmetry_order: int | None = None
    visible: np.ndarray | None = None
