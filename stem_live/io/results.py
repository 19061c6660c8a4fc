"""Per-frame results of a replay in one ``.npz`` (``stem-live replay FILE --results OUT.npz``).

:class:`ResultsWriter` takes every processed frame (``add(frame, result, engine)``, gp model),
keeps only small per-frame arrays (never an image), and writes them once at the end
(``close``), atomically: a temporary file beside ``OUT`` renamed over it, so ``OUT`` is either
absent or complete. Whatever was added before a Ctrl-C or an error is written by ``close``.

Keys (units nm, s, px; pairs (y, x) / (row, col); F frames, R the most rows of any frame, N
the columns of all frames together):

- ``seq``, ``t_start`` (s, first pixel), ``t_mid`` (s), ``rows``, ``line_time_s``,
  ``dwell_s`` (F,); ``pixel_size_nm``, ``beam_shift_nm`` (F, 2): as recorded with each frame.
  Line ``i`` of frame ``k`` started at ``t_start[k] + i * line_time_s[k]``.
- ``drift_nm``, ``drift_sigma_nm`` (F, R, 2): the GP's specimen drift at the start of every
  scan line, as the engine knew it right after that frame (nothing later), relative to the
  first frame (``d(t) - d(t_ref)``, the origin of ``frame_drift_nm`` and of the monitor's
  trace), and its 1-sigma; NaN beyond a frame's own rows.
- ``frame_drift_nm`` (F, 2): the rigid (registration) estimate at ``t_mid``.
- ``col_offsets`` (F + 1,): frame ``k``'s columns are rows ``col_offsets[k]:col_offsets[k+1]``
  of ``columns_px`` (raw, as located), ``columns_undistorted_px`` (where the column would be
  with the drift since the reference frame and the modelled scan distortion taken out, from
  the line-averaged positions: the reference frame's pixels), ``columns_t_s`` (when its centre was scanned),
  ``columns_class``.
- ``correction_nm`` (F, 2): the beam-shift target the armed engine would have sent after
  the frame (NaN where it sent none); ``correction_sent`` (F,) bool, ``correction_reason`` (F,).
- ``locked``, ``jump`` (F,) bool; ``info``: JSON text (source, model, units, frames, and
  ``drift_hyperparameters``: the drift GP's learnt hyperparameters and mains frequency as of
  the last frame, ``Engine.drift_hyperparameters()``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["FrameRecord", "ResultsWriter", "load_results"]


@dataclass(frozen=True)
class FrameRecord:
    """One frame's results (see the module doc for units and axes)."""

    seq: int
    t_start: float
    t_mid: float
    line_time_s: float
    dwell_s: float
    pixel_size_nm: np.ndarray  # (2,)
    beam_shift_nm: np.ndarray  # (2,)
    frame_drift_nm: np.ndarray  # (2,)
    drift_nm: np.ndarray  # (rows, 2) float32
    drift_sigma_nm: np.ndarray  # (rows, 2) float32
    columns_px: np.ndarray  # (n, 2) float32
    columns_undistorted_px: np.ndarray  # (n, 2) float32
    columns_t_s: np.ndarray  # (n,) float64
    columns_class: np.ndarray  # (n,) int16
    correction_nm: np.ndarray  # (2,), NaN for none
    correction_reason: str
    locked: bool
    jump: bool


def frame_record(frame, result, engine) -> FrameRecord:
    """The results of one frame processed by a gp-model ``engine`` (call right after
    ``engine.process``: the drift model is read as it is after this frame)."""
    from stem_live.distortion.dewarp import undistort_positions

    gp = engine.drift_model
    if gp is None or result.line_drift_nm is None or result.columns is None:
        raise ValueError("per-frame results need the column model: use --model gp")
    psz = np.asarray(frame.pixel_size_nm, dtype=np.float64)
    beam = np.asarray(frame.beam_shift_nm, dtype=np.float64)
    b0 = engine.start_beam_nm
    origin = beam if b0 is None else b0
    lines = np.asarray(frame.line_times(), dtype=np.float64)
    mean = np.asarray(result.line_drift_nm, dtype=np.float64).reshape(-1, 2)  # beam-shift space
    sd = np.asarray(result.line_sigma_nm, dtype=np.float64).reshape(-1, 2)
    pos = np.asarray(result.columns.positions, dtype=np.float64).reshape(-1, 2)
    dwell = frame.dwell_us * 1e-6
    t_col = frame.t_start + pos[:, 0] * frame.line_time_s + pos[:, 1] * dwell
    t_line = np.clip(pos[:, 1], 0.0, None) * dwell  # time into its line (flyback term)

    def drift_at(t: np.ndarray) -> np.ndarray:  # the model between line starts: linear (lines << 50 Hz period)
        return np.stack([np.interp(t, lines, mean[:, k]) for k in range(2)], axis=1)

    # from the line-averaged positions, as the drift model saw them (the random line jitter
    # that the de-jitter adds back to ``pos`` would stay in a lattice meant to be fixed)
    smooth = np.asarray(result.columns.line_averaged(), dtype=np.float64).reshape(-1, 2)
    und = undistort_positions(smooth, t_col, drift_at, psz, beam, distortion_fn=lambda p: gp.distortion(p, t_line))
    c = result.correction
    return FrameRecord(
        seq=int(frame.seq), t_start=float(frame.t_start), t_mid=float(result.t_mid),
        line_time_s=float(frame.line_time_s), dwell_s=float(dwell), pixel_size_nm=psz, beam_shift_nm=beam,
        frame_drift_nm=np.asarray(result.drift_nm, dtype=np.float64),
        drift_nm=(mean - origin).astype(np.float32), drift_sigma_nm=sd.astype(np.float32),
        columns_px=pos.astype(np.float32), columns_undistorted_px=und.astype(np.float32), columns_t_s=t_col,
        columns_class=np.asarray(result.columns.klass, dtype=np.int16),
        correction_nm=np.full(2, np.nan) if c is None else np.asarray(c.beam_shift_nm, dtype=np.float64),
        correction_reason="" if c is None else str(c.reason), locked=bool(result.locked), jump=bool(result.jump))


class ResultsWriter:
    """Collect :class:`FrameRecord` s and write them to ``path`` (.npz) once, atomically.

    Raises ValueError (one line) for a name that is not ``.npz`` or a folder that does not
    exist, before any frame is processed."""

    def __init__(self, path: str | os.PathLike, *, info: dict | None = None) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() != ".npz":
            raise ValueError(f"--results writes an .npz file: give a name ending in .npz, not {self.path.name}")
        if not self.path.parent.is_dir():
            raise ValueError(f"cannot write {self.path}: folder {self.path.parent} does not exist")
        self.info = dict(info or {})
        self.records: list[FrameRecord] = []
        self.written = False

    def __len__(self) -> int:
        return len(self.records)

    @property
    def n_columns(self) -> int:
        return sum(len(r.columns_px) for r in self.records)

    def add(self, frame, result, engine) -> FrameRecord:
        rec = frame_record(frame, result, engine)
        self.records.append(rec)
        hyper = getattr(engine, "drift_hyperparameters", None)
        if hyper is not None:
            self.info["drift_hyperparameters"] = hyper()
        return rec

    def arrays(self) -> dict[str, np.ndarray]:
        """The ``.npz`` content (module doc)."""
        recs = self.records
        f = len(recs)
        rows = np.array([len(r.drift_nm) for r in recs], dtype=np.int64)
        r_max = int(rows.max()) if f else 0
        drift = np.full((f, r_max, 2), np.nan, np.float32)
        sigma = np.full((f, r_max, 2), np.nan, np.float32)
        for k, r in enumerate(recs):
            drift[k, :rows[k]] = r.drift_nm
            sigma[k, :rows[k]] = r.drift_sigma_nm
        counts = np.array([len(r.columns_px) for r in recs], dtype=np.int64)

        def cat(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
            parts = [getattr(r, name) for r in recs]
            return np.concatenate(parts).astype(dtype) if parts else np.zeros(shape, dtype)

        def col(name: str, dtype, width: int | None = None) -> np.ndarray:
            v = [getattr(r, name) for r in recs]
            return np.array(v, dtype=dtype).reshape((f,) if width is None else (f, width))

        info = {"units": {"length": "nm", "time": "s", "positions": "px (row, col)"}, "frames": f,
                "columns": int(counts.sum()), **self.info}
        return {
            "seq": col("seq", np.int64), "t_start": col("t_start", np.float64), "t_mid": col("t_mid", np.float64),
            "rows": rows, "line_time_s": col("line_time_s", np.float64), "dwell_s": col("dwell_s", np.float64),
            "pixel_size_nm": col("pixel_size_nm", np.float64, 2), "beam_shift_nm": col("beam_shift_nm", np.float64, 2),
            "frame_drift_nm": col("frame_drift_nm", np.float64, 2), "drift_nm": drift, "drift_sigma_nm": sigma,
            "col_offsets": np.concatenate([[0], np.cumsum(counts)]).astype(np.int64),
            "columns_px": cat("columns_px", (0, 2), np.float32),
            "columns_undistorted_px": cat("columns_undistorted_px", (0, 2), np.float32),
            "columns_t_s": cat("columns_t_s", (0,), np.float64),
            "columns_class": cat("columns_class", (0,), np.int16),
            "correction_nm": col("correction_nm", np.float64, 2),
            "correction_sent": np.array([np.isfinite(r.correction_nm).all() for r in recs], dtype=bool).reshape(f),
            "correction_reason": np.array([r.correction_reason for r in recs], dtype=np.str_).reshape(f),
            "locked": col("locked", bool), "jump": col("jump", bool),
            "info": np.array(json.dumps(info)),
        }

    def close(self) -> Path:
        """Write everything added so far (temporary file + rename); returns the path."""
        tmp = self.path.with_name(f".{self.path.name}.partial")
        try:
            with open(tmp, "wb") as fh:
                np.savez(fh, **self.arrays())
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.written = True
        return self.path


def load_results(path: str | os.PathLike) -> dict:
    """A results file as a dict of arrays (``info`` decoded from its JSON); frame k's columns
    are ``columns_px[col_offsets[k]:col_offsets[k + 1]]``."""
    with np.load(path, allow_pickle=False) as z:
        out = {k: z[k] for k in z.files}
    out["info"] = json.loads(str(out["info"]))
    return out
