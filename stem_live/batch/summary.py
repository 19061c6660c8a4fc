"""One row per input of a batch: what it gave, or why it failed; ``summary.csv``.

A row is a flat dict: ``name``, ``source``, ``status`` (ok / failed), ``reason`` (one line
where it failed), ``frames``, ``columns`` (located in the drift-corrected average),
``columns_per_frame`` (mean, as replayed), ``total_drift_nm`` (from the first line of the first
frame to the last line of the last), ``scatter_px`` (RMS deviation of the undistorted columns
of every frame from the same column's mean; NaN where no column was seen twice), ``seconds``,
and ``hyper_<name>`` for each learnt drift hyperparameter (``drift_hyperparameters``, units
of their names) and ``mains_hz``.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stem_live.batch.outputs import write_text

__all__ = ["FIELDS", "result_stats", "write_summary"]

FIELDS = ("name", "status", "reason", "frames", "columns", "columns_per_frame", "total_drift_nm", "scatter_px",
          "seconds", "source")


def result_stats(results: dict, *, match_px: float | None = None) -> dict:
    """The row fields that come from a replay's results (:func:`stem_live.io.results.load_results`).

    match_px: how near (px) two frames' undistorted columns must be to count as one column
    (default: a third of the median nearest-neighbour distance of the first frame's)."""
    from scipy.spatial import cKDTree

    f = len(results["seq"])
    offs = np.asarray(results["col_offsets"])
    row: dict = {"frames": f, "columns_per_frame": float(np.diff(offs).mean()) if f else 0.0}
    drift = np.asarray(results["drift_nm"], dtype=np.float64)
    lines = drift.reshape(-1, 2)
    lines = lines[np.isfinite(lines).all(axis=1)]
    row["total_drift_nm"] = float(np.hypot(*(lines[-1] - lines[0]))) if len(lines) else float("nan")
    und = np.asarray(results["columns_undistorted_px"], dtype=np.float64)
    row["scatter_px"] = float("nan")
    if f >= 2 and offs[1] > 2:
        ref = und[offs[0]:offs[1]]
        tree = cKDTree(ref)
        if match_px is None:
            match_px = float(np.median(tree.query(ref, k=2)[0][:, 1])) / 3.0
        dist, idx = tree.query(und, distance_upper_bound=match_px)
        ok = np.isfinite(dist)
        if ok.sum() > len(ref):
            sums = np.zeros((len(ref), 2))
            counts = np.bincount(idx[ok], minlength=len(ref)).astype(float)
            np.add.at(sums, idx[ok], und[ok])
            mean = sums / np.maximum(counts, 1.0)[:, None]
            dev = und[ok] - mean[idx[ok]]
            seen_twice = counts[idx[ok]] >= 2
            if seen_twice.any():
                row["scatter_px"] = float(np.sqrt((dev[seen_twice] ** 2).sum(axis=1).mean()))
    hyper = (results.get("info") or {}).get("drift_hyperparameters") or {}
    for k, v in (hyper.get("values") or {}).items():
        row[f"hyper_{k}"] = v
    if "mains_hz" in hyper:
        row["mains_hz"] = hyper["mains_hz"]
    return row


def _cell(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "nan" if not np.isfinite(v) else f"{v:.6g}"
    return " ".join(str(v).split())


def write_summary(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """``summary.csv``: the :data:`FIELDS` first, then every other key of any row (sorted),
    one row per input, atomically."""
    extra = sorted({k for r in rows for k in r} - set(FIELDS))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*FIELDS, *extra])
    for r in rows:
        w.writerow([_cell(r.get(k)) for k in (*FIELDS, *extra)])
    return write_text(path, buf.getvalue())
