"""Averages of a series from its frames and its replay results (``stem-live replay --results``
layout, :mod:`stem_live.io.results`), streamed one frame at a time.

- **drift-corrected**: every pixel of frame ``k`` is resampled from where the drift says its
  content was seen (by default the drift fitted again to the columns of the whole series,
  :mod:`stem_live.batch.refine`, not the engine's causal one): pixel ``(i, j)`` was scanned at ``t = t_start + i *
  line_time + j * dwell``; its displacement is ``(d(t) - b_k) / pixel size`` (px), ``d`` the
  per-line drift of the results (``drift_nm`` relative to the first frame, linear in time
  between line starts), ``b_k`` the frame's beam shift relative to the first frame's. The
  output is in the pixels of the reference (first) frame with the drift of the first frame's
  reference time taken out, the same frame as ``columns_undistorted_px``.
- **rigid**: every frame shifted by the mean of that displacement over the frame only.

Resampling is a cubic spline (``scipy.ndimage.map_coordinates``, order 3); a pixel of the
output is the mean over the frames that saw it (``coverage``: how many).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

__all__ = ["Averages", "average_series", "displacement_field_px"]


@dataclass(frozen=True)
class Averages:
    """corrected, rigid: (rows, cols) float32 means (counts as in the frames); coverage_*:
    (rows, cols) int32 frames that saw each pixel; frames: frames averaged; pixel_size_nm (2,)."""

    corrected: np.ndarray
    rigid: np.ndarray
    coverage_corrected: np.ndarray
    coverage_rigid: np.ndarray
    frames: int
    pixel_size_nm: np.ndarray


def displacement_field_px(drift_nm: np.ndarray, shape: tuple[int, int], *, line_time_s: float, dwell_s: float,
                          pixel_size_nm, beam_nm=(0.0, 0.0)) -> np.ndarray:
    """(2, rows, cols) px: where the content that belongs at each pixel was seen, minus the pixel.

    drift_nm: (rows, 2) the drift at the start of each scan line (nm, beam-shift space, as in
    the results); it is linear in time between line starts and after the last one (its last
    two lines' slope). beam_nm (2,): the frame's beam shift relative to the reference's."""
    rows, cols = shape
    d = np.asarray(drift_nm, dtype=np.float64).reshape(-1, 2)[:rows] - np.asarray(beam_nm, dtype=np.float64)
    psz = np.broadcast_to(np.asarray(pixel_size_nm, dtype=np.float64), (2,))
    if len(d) < rows or not np.isfinite(d).all():
        raise ValueError(f"the results give the drift of {int(np.isfinite(d).all(axis=1).sum())} of {rows} lines")
    u = np.arange(rows, dtype=np.float64)[:, None] + np.arange(cols, dtype=np.float64)[None, :] * (
        dwell_s / line_time_s if line_time_s > 0 else 0.0)    # time in lines since the frame's start
    if rows < 2:
        field = np.broadcast_to(d[0], (rows, cols, 2))
    else:
        i0 = np.clip(np.floor(u).astype(np.int64), 0, rows - 2)
        w = (u - i0)[..., None]
        field = d[i0] * (1.0 - w) + d[i0 + 1] * w
    return np.moveaxis(field / psz, -1, 0)


def _resample(img: np.ndarray, disp: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray]:
    """The (spline-prefiltered) frame at each pixel + displacement, and where that lies inside it."""
    from scipy.ndimage import map_coordinates

    rows, cols = img.shape
    ii, jj = np.meshgrid(np.arange(rows, dtype=np.float64), np.arange(cols, dtype=np.float64), indexing="ij")
    cy, cx = ii + disp[0], jj + disp[1]
    out = map_coordinates(img, np.stack([cy, cx]), order=order, mode="nearest", prefilter=False)
    inside = (cy >= -0.5) & (cy <= rows - 0.5) & (cx >= -0.5) & (cx <= cols - 0.5)
    return out, inside


def average_series(frames: Iterable, results: dict, *, order: int = 3, hindsight: bool = True) -> Averages:
    """Both averages of ``frames`` (protocol ``Frame`` s with ``seq`` and ``image``, e.g.
    :func:`stem_live.io.read_frames`) using ``results`` (:func:`stem_live.io.results.load_results`).
    hindsight: the drift fitted again to the whole series first
    (:func:`stem_live.batch.refine.refine_drift`); False: the engine's causal drift as recorded.

    Frames not in the results (refused or lost) are left out; all frames must share the
    first one's shape. Raises ValueError when no frame of the results is among ``frames``."""
    if hindsight:
        from stem_live.batch.refine import refine_drift

        results = refine_drift(results)
    index = {int(s): k for k, s in enumerate(np.asarray(results["seq"]).reshape(-1))}
    beam0 = np.asarray(results["beam_shift_nm"], dtype=np.float64)[0] if index else np.zeros(2)
    acc_c = acc_r = cov_c = cov_r = None
    n = 0
    for frame in frames:
        k = index.get(int(frame.seq))
        if k is None:
            continue
        img = np.asarray(frame.image, dtype=np.float64)
        if img.ndim != 2:
            raise ValueError(f"frame {frame.seq}: an image of shape {img.shape}, not (rows, cols)")
        if acc_c is None:
            acc_c, acc_r = np.zeros(img.shape), np.zeros(img.shape)
            cov_c, cov_r = np.zeros(img.shape, np.int32), np.zeros(img.shape, np.int32)
        elif img.shape != acc_c.shape:
            raise ValueError(f"frame {frame.seq}: shape {img.shape}, the first frame's is {acc_c.shape}")
        rows = int(results["rows"][k])
        if rows != img.shape[0]:
            raise ValueError(f"frame {frame.seq}: {img.shape[0]} rows, the results say {rows}")
        disp = displacement_field_px(
            results["drift_nm"][k], img.shape, line_time_s=float(results["line_time_s"][k]),
            dwell_s=float(results["dwell_s"][k]), pixel_size_nm=results["pixel_size_nm"][k],
            beam_nm=np.asarray(results["beam_shift_nm"][k], dtype=np.float64) - beam0)
        if order > 1:
            from scipy.ndimage import spline_filter

            img = spline_filter(img, order=order, mode="nearest")  # once for both resamplings
        for acc, cov, field in ((acc_c, cov_c, disp),
                                (acc_r, cov_r, np.broadcast_to(disp.mean(axis=(1, 2))[:, None, None], disp.shape))):
            out, inside = _resample(img, field, order)
            acc += np.where(inside, out, 0.0)
            cov += inside
        n += 1
    if acc_c is None:
        raise ValueError("no frame of the results is in the file")
    return Averages(corrected=_mean(acc_c, cov_c), rigid=_mean(acc_r, cov_r), coverage_corrected=cov_c,
                    coverage_rigid=cov_r, frames=n, pixel_size_nm=np.asarray(results["pixel_size_nm"][0], float))


def _mean(acc: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """acc / cov; pixels no frame saw get the mean of the others."""
    seen = cov > 0
    out = np.zeros(acc.shape, np.float32)
    out[seen] = acc[seen] / cov[seen]
    if seen.any() and not seen.all():
        out[~seen] = out[seen].mean()
    return out
