"""``stem-live evaluate``: the simulator and the engine in one process, scored against ground truth.

The same seeded session runs twice: open loop (corrections off) and closed loop (armed).
Corrections go through the same safety clamp as the instrument bridge and reach the simulated
actuator before the next frame (plus the actuator's own latency, gain error and noise).

Report keys (a contract: later work adds keys, never changes these):
- ``frames_processed``, ``frames_dropped``: frames the engine processed / never saw in the
  closed-loop run (the open-loop run processes the same number); ``engine_fps``: closed-loop
  frames per second of engine compute (median frame time), simulator time excluded;
- ``open_loop.residual_rms_nm``, ``closed_loop.residual_rms_nm``: RMS over the run of the true
  apparent displacement of the specimen in the image relative to the first frame, from the
  simulator's truth (mean over the frame's lines of ``d(t) - b(t)``), not from the engine;
- ``columns.recall``, ``columns.precision``, ``columns.rmse_px``, ``columns.rmse_pm``,
  ``columns.locate_ms``: the classical locator on the first 10 open-loop frames against the true
  column positions (:func:`column_metrics`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from .engine import Engine, EngineConfig
from .protocol import Frame


def match_columns(truth_px: np.ndarray, found_px: np.ndarray, radius_px: float) -> tuple[np.ndarray, np.ndarray]:
    """One-to-one matching: each true column takes its nearest found column within ``radius_px``;
    a found column claimed twice goes to the closer true column. Returns index arrays (truth, found)."""
    from scipy.spatial import cKDTree

    if len(truth_px) == 0 or len(found_px) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    dist, idx = cKDTree(found_px).query(truth_px, distance_upper_bound=radius_px)
    ti = np.flatnonzero(np.isfinite(dist))
    fi, d = idx[ti], dist[ti]
    order = np.lexsort((d, fi))  # by found index, then distance: the first of each found index wins
    keep = np.ones(len(order), bool)
    keep[1:] = fi[order][1:] != fi[order][:-1]
    return ti[order][keep], fi[order][keep]


def column_metrics(frames: list[tuple[np.ndarray, object, object]]) -> dict:
    """Classical locator against the simulator's true column positions.

    Matching radius 0.3 x the median nearest-neighbour spacing of the true columns; recall =
    matched / true, precision = matched / found, RMSE over matched pairs (px, and pm)."""
    from scipy.spatial import cKDTree

    from .locate import estimate_spacing, locate_classical

    spacing = estimate_spacing(np.asarray(frames[0][0], dtype=np.float32))
    n_true = n_found = n_match = 0
    sq, ms = [], []
    for image, meta, truth in frames:
        t0 = time.perf_counter()
        cols = locate_classical(np.asarray(image, dtype=np.float32), spacing)
        ms.append((time.perf_counter() - t0) * 1e3)
        tp = np.asarray(truth.columns_px)
        nn = float(np.median(cKDTree(tp).query(tp, 2)[0][:, 1]))
        ti, fi = match_columns(tp, cols.positions, 0.3 * nn)
        n_true, n_found, n_match = n_true + len(tp), n_found + len(cols), n_match + len(ti)
        sq.append(np.sum((tp[ti] - cols.positions[fi]) ** 2, axis=1))
    rmse_px = float(np.sqrt(np.mean(np.concatenate(sq)))) if n_match else float("nan")
    px_pm = float(np.mean(frames[0][1].pixel_size_nm)) * 1e3
    return {"recall": round(n_match / max(n_true, 1), 5), "precision": round(n_match / max(n_found, 1), 5),
            "rmse_px": round(rmse_px, 4), "rmse_pm": round(rmse_px * px_pm, 3),
            "locate_ms": round(float(np.median(ms[1:] if len(ms) > 1 else ms)), 2), "frames": len(frames),
            "locator": "classical", "spacing_px": round(float(spacing), 3)}


@dataclass(frozen=True)
class SessionResult:
    residual_nm: np.ndarray  # (frames, 2) true apparent displacement vs frame 0
    engine_ms: np.ndarray  # (frames,)
    corrections: int
    clamped: int
    kept: list = field(default_factory=list)  # (image, meta, truth) of the first ``keep_frames`` frames

    @property
    def residual_rms_nm(self) -> float:
        return float(np.sqrt(np.mean(np.sum(self.residual_nm**2, axis=1))))


def frame_from_sim(image: np.ndarray, meta: object, stream: str = "sim") -> Frame:
    """Wrap a simulator frame in the protocol's :class:`Frame`."""
    return Frame(seq=meta.seq, image=image, t_start=meta.t_start, pixel_size_nm=tuple(meta.pixel_size_nm),
                 dwell_us=meta.dwell_us, flyback_us=meta.flyback_us, scan_rotation_rad=meta.scan_rotation_rad,
                 beam_shift_nm=tuple(float(v) for v in meta.beam_shift_nm), stream=stream, detector=meta.detector)


def run_session(config: object, frames: int, *, armed: bool, engine_config: EngineConfig = EngineConfig(),
                progress: Callable[[str, int, int], None] | None = None, label: str = "",
                keep_frames: int = 0) -> SessionResult:
    """Run one seeded simulator session through the engine; score it against truth."""
    from instrument_adapters.safety import Limits, clamp_target
    from simulator import Microscope

    scope = Microscope(config)
    engine = Engine(engine_config)
    if armed:
        engine.arm()
    limits = Limits()
    start = np.asarray(scope.beam_shift_nm, dtype=np.float64).copy()
    apparent, times, kept = [], [], []
    n_corr = n_clamped = 0
    for k in range(frames):
        image, meta, truth = scope.acquire()
        if k < keep_frames:
            kept.append((image, meta, truth))
        apparent.append(np.mean(np.asarray(truth.drift_nm) - np.asarray(truth.beam_shift_nm), axis=0))
        t0 = time.perf_counter()
        res = engine.process(frame_from_sim(image, meta))
        times.append((time.perf_counter() - t0) * 1e3)
        if res.correction is not None:
            d = clamp_target(np.asarray(res.correction.beam_shift_nm), np.asarray(scope.beam_shift_nm), start, limits)
            if not d.error:
                scope.set_beam_shift(d.applied_nm)
                n_corr += 1
                n_clamped += int(d.clamped)
        if progress is not None:
            progress(label, k + 1, frames)
    app = np.array(apparent)
    return SessionResult(residual_nm=app - app[0], engine_ms=np.array(times), corrections=n_corr, clamped=n_clamped,
                         kept=kept)


def evaluate(*, preset: str = "graphene", size: int = 512, frames: int = 100, drift_nm_per_min: float = 3.0,
             dose: float | None = None, seed: int = 0, progress: Callable[[str, int, int], None] | None = None
             ) -> dict:
    """Run open and closed loop on one seeded configuration and return the JSON report."""
    from simulator import DriftConfig, MicroscopeConfig

    cfg = MicroscopeConfig(preset=preset, size=size, seed=seed, drift=DriftConfig(drift_nm_per_min=drift_nm_per_min))
    if dose is not None:
        cfg = replace(cfg, dose_e_per_A2=dose)
    t0 = time.perf_counter()
    open_loop = run_session(cfg, frames, armed=False, progress=progress, label="open loop", keep_frames=10)
    closed = run_session(cfg, frames, armed=True, progress=progress, label="closed loop")
    return {
        "preset": preset, "size": size, "frames": frames, "drift_nm_per_min": drift_nm_per_min,
        "dose_e_per_A2": cfg.dose, "seed": seed,
        "frames_processed": int(frames),
        "frames_dropped": 0,
        "engine_fps": round(float(1e3 / np.median(closed.engine_ms)), 2),
        "open_loop": {"residual_rms_nm": round(open_loop.residual_rms_nm, 5),
                      "final_offset_nm": [round(float(v), 5) for v in open_loop.residual_nm[-1]]},
        "closed_loop": {"residual_rms_nm": round(closed.residual_rms_nm, 5),
                        "final_offset_nm": [round(float(v), 5) for v in closed.residual_nm[-1]],
                        "corrections": closed.corrections, "clamped": closed.clamped,
                        "ratio_to_open_loop": round(closed.residual_rms_nm / max(open_loop.residual_rms_nm, 1e-12), 4)},
        "columns": column_metrics(open_loop.kept) if preset != "particles" else {},
        "wall_s": round(time.perf_counter() - t0, 2),
    }
