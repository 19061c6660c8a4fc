"""Undo modelled per-line displacements in an image, and map column positions back to the
specimen frame.

Convention (DESIGN.md): a specimen point appears displaced by ``d(t) - b(t)`` (nm); a line
displacement ``line_disp_px[i] = (d(t_i) - b(t_i)) / pixel_size`` (and minus the scan
distortion, if modelled) means the content that belongs at (i, j) was seen at
``(i + dy_i, j + dx_i)``.
"""
from __future__ import annotations

import numpy as np

__all__ = ["dewarp", "undistort_positions", "line_displacement_px"]


def dewarp(image, line_disp_px, order: int = 1, mode: str = "nearest") -> np.ndarray:
    """Resample each line i at (i + dy_i, j + dx_i): returns float32 (rows, cols)."""
    from scipy.ndimage import map_coordinates

    img = np.asarray(image, dtype=np.float32)
    rows, cols = img.shape
    d = np.asarray(line_disp_px, dtype=float).reshape(rows, 2)
    ii, jj = np.meshgrid(np.arange(rows, dtype=float), np.arange(cols, dtype=float), indexing="ij")
    coords = np.stack([ii + d[:, 0:1], jj + d[:, 1:2]])
    return map_coordinates(img, coords, order=order, mode=mode, prefilter=order > 1).astype(np.float32)


def line_displacement_px(drift_fn, t_start: float, rows: int, line_time_s: float, pixel_size_nm,
                         beam_shift_nm=(0.0, 0.0), cols: int | None = None, dwell_s: float = 0.0):
    """(rows, 2) px displacement of each line at its middle: (d(t) - b) / pixel size.

    drift_fn(t (n,)) -> (n, 2) nm, e.g. ``lambda t: gp.predict(t)[0]``; beam_shift_nm (2,)
    or (rows, 2)."""
    t = t_start + np.arange(rows) * line_time_s + (0.5 * (cols or 0) * dwell_s)
    b = np.broadcast_to(np.asarray(beam_shift_nm, dtype=float), (rows, 2)) if np.ndim(beam_shift_nm) == 1 \
        else np.asarray(beam_shift_nm, dtype=float)
    return (np.asarray(drift_fn(t)) - b) / np.broadcast_to(np.asarray(pixel_size_nm, float), (2,))


def undistort_positions(positions_px, t_s, drift_fn, pixel_size_nm, beam_shift_nm=(0.0, 0.0),
                        distortion_fn=None) -> np.ndarray:
    """Specimen-frame position (px) of columns seen at ``positions_px`` (n, 2) at times
    ``t_s`` (n,): ``p = pos - (d(t) - b) / px + S(pos) / px``.

    drift_fn(t) -> (n, 2) nm; distortion_fn(pos_px) -> (n, 2) nm scan distortion S (e.g.
    ``gp.distortion``); beam_shift_nm (2,) or (n, 2)."""
    pos = np.asarray(positions_px, dtype=float).reshape(-1, 2)
    psz = np.broadcast_to(np.asarray(pixel_size_nm, dtype=float), (2,))
    d = np.asarray(drift_fn(np.asarray(t_s, dtype=float)), dtype=float).reshape(-1, 2)
    out = pos - (d - np.asarray(beam_shift_nm, dtype=float)) / psz
    if distortion_fn is not None:
        out = out + np.asarray(distortion_fn(pos), dtype=float) / psz
    return out
