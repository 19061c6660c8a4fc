"""Scan generator geometry: where the probe is for pixel (i, j), before drift and shift.

Image axes: row i = slow scan (y), column j = fast scan (x). The nominal scan position
(nm, image frame) of pixel (i, j) is

    y = (1 + sy) * i * py
    x = (1 + sx) * j * px + shear * y + flyback(j) + line_jitter[i]

with ``flyback(j) = A exp(-t_l / tau) cos(2 pi f t_l)``, ``t_l = j * dwell`` the time since
the line started (the beam has just come back from the flyback and overshoots along x),
and ``line_jitter[i]`` a random x offset per line (N(0, line_jitter_nm), per frame).
The probe then samples the specimen point ``r = scan(i, j) - d(t) + b(t)``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ScanConfig", "ScanGeometry"]


@dataclass(frozen=True)
class ScanConfig:
    """Scan distortions.

    scale_error: (sy, sx) fractional error of the scan step (0.01 = 1 % too large).
    shear: dimensionless non-orthogonality, x offset per unit y (tan of the angle, ~rad).
    flyback_amp_nm, flyback_tau_us, flyback_ring_khz: x displacement at the start of
        each line, decaying with time constant tau; ring_khz > 0 adds an oscillation.
    line_jitter_nm: std of a random x offset of each whole line.
    """

    scale_error: tuple[float, float] = (0.0, 0.0)
    shear: float = 0.0
    flyback_amp_nm: float = 0.01
    flyback_tau_us: float = 20.0
    flyback_ring_khz: float = 0.0
    line_jitter_nm: float = 0.002

    @classmethod
    def none(cls) -> ScanConfig:
        """A perfect scan: no distortion at all."""
        return cls(flyback_amp_nm=0.0, line_jitter_nm=0.0)


class ScanGeometry:
    """The scan map of one frame: pixel (i, j) -> nominal probe position (nm)."""

    def __init__(self, cfg: ScanConfig, rows: int, cols: int, pixel_size_nm: tuple[float, float],
                 dwell_s: float, line_jitter_nm: np.ndarray | None = None):
        self.cfg = cfg
        self.rows, self.cols = int(rows), int(cols)
        self.py, self.px = (float(pixel_size_nm[0]), float(pixel_size_nm[1]))
        self.dwell_s = float(dwell_s)
        self.step_y = (1.0 + cfg.scale_error[0]) * self.py
        self.step_x = (1.0 + cfg.scale_error[1]) * self.px
        self.line_jitter = (np.zeros(self.rows) if line_jitter_nm is None
                            else np.asarray(line_jitter_nm, dtype=float))

    def flyback(self, j: np.ndarray) -> np.ndarray:
        """x displacement (nm) at fast-scan index ``j`` (float ok)."""
        cfg = self.cfg
        j = np.asarray(j, dtype=float)
        if not cfg.flyback_amp_nm:
            return np.zeros(j.shape)
        tl = np.maximum(j, 0.0) * self.dwell_s
        out = cfg.flyback_amp_nm * np.exp(-tl / (cfg.flyback_tau_us * 1e-6))
        if cfg.flyback_ring_khz:
            out = out * np.cos(2.0 * np.pi * cfg.flyback_ring_khz * 1e3 * tl)
        return out

    def row_index(self, i: np.ndarray) -> np.ndarray:
        """Nearest valid integer row for (possibly fractional, out-of-frame) ``i``."""
        return np.clip(np.rint(i), 0, self.rows - 1).astype(np.int64)

    def y(self, i: np.ndarray) -> np.ndarray:
        return np.asarray(i, dtype=float) * self.step_y

    def x(self, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Scan x (nm) for broadcastable i, j (ints for the frame, floats allowed)."""
        i = np.asarray(i)
        return (np.asarray(j, dtype=float) * self.step_x + self.cfg.shear * self.y(i)
                + self.flyback(j) + self.line_jitter[self.row_index(i)])

    def invert(self, qy: np.ndarray, qx: np.ndarray, j_guess: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Fractional (i, j) whose scan position is (qy, qx); flyback at ``j_guess``."""
        i = np.asarray(qy, dtype=float) / self.step_y
        xr = (np.asarray(qx, dtype=float) - self.cfg.shear * qy - self.flyback(j_guess)
              - self.line_jitter[self.row_index(i)])
        return i, xr / self.step_x
