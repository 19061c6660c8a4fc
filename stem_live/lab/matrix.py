"""``stem-live evaluate --matrix N``: the engine on N microscopes drawn from the literature ranges.

Scenarios come from :func:`simulator.ranges.draw_scenarios` (seeded, drawn before anything is
run); each runs open loop, closed loop and the baseline tracker as ``evaluate`` does
(:func:`~stem_live.lab.evaluate.evaluate_config`, without the locator scoring), for
``frames_for(size)`` frames.

Report keys (a contract: later work adds keys, never changes these), all under ``matrix``:

- ``scenarios``: one dict per scenario: its parameters (``Scenario`` fields, ``frames``), the
  keys of the per-scenario ``evaluate`` body (``open_loop``, ``closed_loop``, ``baseline``,
  ``drift``, ...), and
  ``drift_rmse_pm`` (:func:`line_drift_rmse_pm`; per frame in ``drift_rmse_by_frame_pm``), ``drift_bound_pm`` (:func:`drift_bound`; its
  parts in ``drift_bound_parts``),
  ``drift_over_bound`` (their ratio), ``false_jumps`` (:func:`false_jumps`, open + closed loop),
  ``closed_over_floor`` (closed-loop residual over ``closed_loop.oracle_floor_nm``) and
  ``closed_over_baseline`` (over the baseline's residual), both residuals without the frames
  of a true jump and the 2 frames of re-lock after it, and without frames 0 and 1 (the oracle
  knows the velocity from the start; a corrector can know it after two frames);
- ``drift_rmse_pm.median`` / ``.worst``, ``drift_over_bound.median`` / ``.worst``,
  ``false_jumps`` (sum), ``closed_over_floor.median`` / ``.worst``,
  ``closed_over_baseline.median`` over the scenarios; ``failed``: the scenarios that could not
  be run (their entries carry ``error``). A value that cannot be computed (the rigid model has
  no per-line drift, a failed scenario) is null.
- with ``--strips K`` (gp model): every scenario's closed loop is the strip-level one, its
  ``frame_level`` and ``strips`` keys as ``evaluate``'s, and ``strip_over_frame_line`` (the strip
  loop's ``closed_loop.residual_line_rms_nm`` over the frame-level loop's); the matrix gives
  ``strip_over_frame_line.median`` / ``.worst`` and ``strips`` (K).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stem_live.lab.evaluate import ConfigRun, SessionResult, evaluate_config

RELOCK_FRAMES = 2  # frames after a true jump in which a detection is that jump's, not a false one
STARTUP_FRAMES = 2  # closed-loop frames before any corrector can know the velocity (not scored)

#: Frames per session by frame size: enough for the GP's window to fill at 256 px, fewer at the
#: larger sizes (more lines per frame; compute grows with the pixels). N = 20 in < 15 min, 2 cores.
FRAMES_BY_SIZE: dict[int, int] = {256: 24, 512: 20, 1024: 12}


def frames_for(size: int) -> int:
    """Session length (frames) for a frame of ``size`` px (the nearest tabulated size at or above)."""
    for s in sorted(FRAMES_BY_SIZE):
        if size <= s:
            return FRAMES_BY_SIZE[s]
    return FRAMES_BY_SIZE[max(FRAMES_BY_SIZE)]


def _excluded_frames(res: SessionResult, after: int) -> set[int]:
    """Frames of every true jump and the ``after`` frames following it."""
    return {j + k for j in res.true_jump_frames for k in range(after + 1)}


def _scored_errors(res: SessionResult) -> tuple[np.ndarray, np.ndarray]:
    """The per-line drift errors that are scored (nm, (n, 2)) and their frames: frame 0 and
    frames in which a true jump shows left out, one constant offset removed per stretch
    between true jumps (a re-lock may restart the estimate's offset)."""
    err, fr = np.asarray(res.drift_err_nm), np.asarray(res.drift_err_frame)
    if not len(err):
        return np.zeros((0, 2)), np.zeros(0, int)
    keep = (fr > 0) & ~np.isin(fr, list(res.true_jump_frames))
    segment = np.searchsorted(np.asarray(sorted(res.true_jump_frames), int), fr, side="right")
    out = err[keep].copy()
    seg = segment[keep]
    for s in np.unique(seg):
        out[seg == s] -= out[seg == s].mean(axis=0)
    return out, fr[keep]


def line_drift_rmse_pm(res: SessionResult) -> float:
    """Per-line drift RMSE (pm, both axes) of the engine's per-line drift against the truth
    (:func:`_scored_errors`: frame 0 and true-jump frames out, one offset per stretch between
    jumps). NaN without per-line estimates (rigid model)."""
    e, _ = _scored_errors(res)
    return float(np.sqrt(np.mean(np.sum(e**2, axis=1)))) * 1e3 if len(e) else float("nan")


def frame_drift_rmse_pm(res: SessionResult) -> list[float | None]:
    """The same errors as :func:`line_drift_rmse_pm`, RMS per frame (pm; None where not scored)."""
    e, fr = _scored_errors(res)
    n = len(res.residual_nm)
    return [_num(float(np.sqrt(np.mean(np.sum(e[fr == k] ** 2, axis=1)))) * 1e3, 2) if np.any(fr == k) else None
            for k in range(n)]


def false_jumps(res: SessionResult) -> int:
    """Frames where the engine reported a jump and no true jump showed in that frame or the
    ``RELOCK_FRAMES`` before it."""
    allowed = _excluded_frames(res, RELOCK_FRAMES)
    return int(sum(1 for k in np.flatnonzero(res.jump_detected) if int(k) not in allowed))


def residual_outside_jumps_nm(res: SessionResult) -> float:
    """``residual_rms_nm`` without the frames of a true jump and the ``RELOCK_FRAMES`` after it,
    and without the first ``STARTUP_FRAMES`` (nm): the oracle floor knows the drift velocity
    from the start, a causal corrector only once it has seen two frames."""
    skip = _excluded_frames(res, RELOCK_FRAMES) | set(range(STARTUP_FRAMES))
    keep = [k for k in range(len(res.residual_nm)) if k not in skip]
    r = res.residual_nm[keep]
    return float(np.sqrt(np.mean(np.sum(r**2, axis=1)))) if len(r) else float("nan")


@dataclass(frozen=True)
class DriftBound:
    """The best per-line drift RMSE a scenario allows (pm, both axes; see :func:`drift_bound`).

    frame_pm: the bound of one shift shared by all the frame's columns; ou_pm: the bound of
    following the OU wander line by line with those columns; mains_pm: the bound of following
    the mains line (see :func:`drift_bound`); bound_pm: all three in quadrature; columns:
    columns of the frame; column_pm: their effective 2-D Cramer-Rao bound."""

    bound_pm: float
    frame_pm: float
    ou_pm: float
    columns: int
    column_pm: float
    mains_pm: float = 0.0


def drift_bound(config: object, truth: object) -> DriftBound:
    """The per-line drift RMSE that a frame's columns, dose and noise allow at best.

    Every column's Cramer-Rao bound (``simulator.crlb.position_crlb_px``, 2-D, px) is combined
    into ``frame_pm`` = 1 / sqrt(sum 1 / crlb_i^2): the bound of one drift shared by the whole
    frame. The per-line drift also carries the Ornstein-Uhlenbeck wander, which no model
    predicts: following a random walk of diffusion q = 2 sigma^2 / tau per axis, observed by
    columns at a rate n = N / frame scan time each of variance s^2 per axis, a smoother at best
    reaches a variance of sqrt(q s^2 / n) / 2 per axis (steady-state Kalman smoother of a
    continuous random walk; ``ou_pm`` is the 2-D root of it). Both ignore the locator's bias,
    the scan distortion and the mains fit: optimistic, so a measured RMSE below ``bound_pm``
    is not possible; one at a few times it may be the best any tracker does.

    ``mains_pm``: a column's position is a weighted mean over the lines it spans (rms spread
    sigma_probe / sqrt 2 lines), so the mains line of amplitude A reaches the samples
    attenuated by a = exp(-(w * spread)^2 / 2); its sine and cosine amplitudes, fitted on the
    columns of the three frames a window holds, are known to sqrt(2 var / (N a^2)) per axis;
    the scan lines' own x shifts (the line pick-up the locator fits, on the fast axis the
    simulator's mains line lies along) know them unattenuated from one frame's columns,
    sqrt(2 var / N); never worse than not modelling the line at all (A / sqrt 2): the smallest,
    as a per-line rms."""
    from simulator.crlb import position_crlb_px

    crlb = np.asarray(position_crlb_px(config, truth), float)
    ok = np.isfinite(crlb) & (crlb > 0)
    n = int(ok.sum())
    if not n:
        return DriftBound(float("nan"), float("nan"), float("nan"), 0, float("nan"))
    pix_pm = float(np.mean(config.pixel_size)) * 1e3
    info = float(np.sum(1.0 / (crlb[ok] * pix_pm) ** 2))         # 1/pm^2, 2-D
    frame_pm = 1.0 / np.sqrt(info)
    col_var = n / info                                            # effective 2-D variance per column
    rows, cols = config.shape
    scan_s = rows * (cols * config.dwell_us + config.flyback_us) * 1e-6
    d = config.drift
    ou_pm = 0.0
    if d.ou_sigma_nm > 0 and d.ou_tau_s > 0:
        q = 2.0 * (d.ou_sigma_nm * 1e3) ** 2 / d.ou_tau_s         # pm^2/s per axis
        r = (col_var / 2.0) / (n / scan_s)                        # pm^2 s per axis
        ou_pm = float(np.sqrt(2.0 * 0.5 * np.sqrt(q * r)))
    mains_pm = 0.0
    if d.jitter_amp_nm > 0:
        line_s = cols * config.dwell_us * 1e-6 + config.flyback_us * 1e-6
        sigma_px = config.probe_fwhm / 2.3548 / float(np.mean(config.pixel_size))
        att = float(np.exp(-0.5 * (2 * np.pi * d.jitter_hz * sigma_px / np.sqrt(2.0) * line_s) ** 2))
        amp_pm = d.jitter_amp_nm * 1e3
        fitted = np.sqrt(2.0 * (col_var / 2.0) / (3 * n)) / att if att > 0 else np.inf
        from_lines = np.sqrt(2.0 * (col_var / 2.0) / n)
        mains_pm = float(min(amp_pm, fitted, from_lines) / np.sqrt(2.0))
    return DriftBound(float(np.sqrt(frame_pm ** 2 + ou_pm ** 2 + mains_pm ** 2)), float(frame_pm), ou_pm, n,
                      float(np.sqrt(col_var)), mains_pm)


def _num(v: float, nd: int = 4) -> float | None:
    """Rounded finite float, or None (JSON null)."""
    return round(float(v), nd) if v is not None and np.isfinite(v) else None


def failed_entry(scenario: object, frames: int, error: str) -> dict:
    """A scenario that could not be run: its parameters, ``error``, and null scores (the
    summary's medians leave it out; ``matrix.failed`` lists it)."""
    return {**scenario.to_dict(), "frames": int(frames), "error": error, "drift_rmse_pm": None,
            "drift_bound_pm": None, "drift_over_bound": None, "false_jumps": 0, "closed_over_floor": None,
            "closed_over_baseline": None, "interframe_shift_spacings": None}


def scenario_report(scenario: object, run: ConfigRun, frames: int) -> dict:
    """One scenario's entry of ``matrix.scenarios`` (see the module docstring)."""
    rep = run.report
    cfg = scenario.config(frames)
    nan = float("nan")
    b = drift_bound(cfg, run.open_loop.kept[0][2]) if run.open_loop.kept else DriftBound(nan, nan, nan, 0, nan)
    bound = b.bound_pm
    rmse = line_drift_rmse_pm(run.open_loop)
    closed = residual_outside_jumps_nm(run.closed)
    floor = rep["closed_loop"]["oracle_floor_nm"]
    base = residual_outside_jumps_nm(run.baseline) if run.baseline is not None else float("nan")
    return {
        **scenario.to_dict(), "frames": int(frames), **rep,
        "drift_rmse_pm": _num(rmse, 3), "drift_rmse_by_frame_pm": frame_drift_rmse_pm(run.open_loop),
        "drift_bound_pm": _num(bound, 3),
        "drift_over_bound": _num(rmse / bound if bound > 0 else float("nan"), 3),
        "drift_bound_parts": {"frame_pm": _num(b.frame_pm, 4), "ou_pm": _num(b.ou_pm, 4), "mains_pm": _num(b.mains_pm, 4),
                              "columns": b.columns, "column_crlb_pm": _num(b.column_pm, 4)},
        "false_jumps": false_jumps(run.open_loop) + false_jumps(run.closed),
        "jump_frames": {"truth": list(run.open_loop.true_jump_frames),
                        "open_loop": [int(k) for k in np.flatnonzero(run.open_loop.jump_detected)],
                        "closed_loop": [int(k) for k in np.flatnonzero(run.closed.jump_detected)]},
        "closed_residual_outside_jumps_nm": _num(closed, 6),
        "closed_over_floor": _num(closed / floor if floor > 0 else float("nan"), 3),
        "closed_over_baseline": _num(closed / base if base > 0 else float("nan"), 4),
        "interframe_shift_spacings": _num(interframe_shift_spacings(run.open_loop, scenario.specimen), 3),
        **_strip_ratio(rep),
    }


def _strip_ratio(rep: dict) -> dict:
    """With strips: the strip loop's per-line residual over the frame-level loop's (``strip_over_frame_line``)."""
    fl = rep.get("frame_level")
    if not fl:
        return {}
    line, frame_line = rep["closed_loop"]["residual_line_rms_nm"], fl["residual_line_rms_nm"]
    return {"strip_over_frame_line": _num(line / frame_line if frame_line > 0 else float("nan"), 3)}


def interframe_shift_spacings(res: SessionResult, specimen: str) -> float:
    """Largest true image shift between consecutive open-loop frames (frame means, nm; the steps
    into and out of frames with a true jump left out) in units of the specimen's nearest-neighbour column
    spacing. Above 0.5 the frame-to-frame match is ambiguous on the periodic part of the lattice
    (only defects tell the aliases apart)."""
    from stem_live.lattices import LATTICES

    lat = LATTICES.get(specimen)
    if lat is None or len(res.residual_nm) < 2:
        return float("nan")
    step = np.hypot(*np.diff(res.residual_nm, axis=0).T)   # step[k]: frame k -> k + 1
    keep = np.ones(len(step), bool)
    # a jump inside frame k moves the frame means of k and of k + 1: both steps are left out
    keep[[j for k in res.true_jump_frames for j in (k - 1, k) if 0 <= j < len(step)]] = False
    return float(np.max(step[keep]) / lat.min_distance_nm) if keep.any() else float("nan")


def scenario_limits(scenario: object, frames: int) -> object:
    """The bridge's safety limits an operator would set for this drift: the defaults
    (0.5 nm a step, 10 nm in all), raised to 3 frames' drift a step and twice the session's
    drift in all where the drift is faster (at 20 nm/min over 8 s frames the defaults would
    stop any corrector after a few frames: a test of the limits, not of the drift model)."""
    from instrument_adapters.safety import Limits

    per_frame_nm = scenario.drift_nm_per_min / 60.0 * scenario.frame_time_s
    return Limits(max_step_nm=max(0.5, 3.0 * per_frame_nm),
                  max_excursion_nm=max(10.0, 2.0 * per_frame_nm * frames + 1.0))


def _stats(values: list, *, worst: bool = True) -> dict:
    v = np.array([x for x in values if x is not None], float)
    out = {"median": _num(np.median(v)) if len(v) else None}
    if worst:
        out["worst"] = _num(np.max(v)) if len(v) else None
    return out


def summarise(scenarios: list[dict]) -> dict:
    """The matrix-level keys from the scenario entries."""
    return {
        "drift_rmse_pm": _stats([s["drift_rmse_pm"] for s in scenarios]),
        "drift_over_bound": _stats([s["drift_over_bound"] for s in scenarios]),
        "false_jumps": int(sum(s["false_jumps"] for s in scenarios)),
        "closed_over_floor": _stats([s["closed_over_floor"] for s in scenarios]),
        "closed_over_baseline": _stats([s["closed_over_baseline"] for s in scenarios], worst=False),
        # scenarios whose frames move by more than half a column spacing from one to the next
        "aliasing_risk": [s["index"] for s in scenarios if (s.get("interframe_shift_spacings") or 0) > 0.5],
        "failed": [s["index"] for s in scenarios if s.get("error")],
        **({"strip_over_frame_line": _stats([s.get("strip_over_frame_line") for s in scenarios])}
           if any("strip_over_frame_line" in s for s in scenarios) else {}),
    }


def run_matrix(n: int, seed: int, *, model: str = "rigid", frames: int | None = None,
               size: int | None = None, progress: Callable[[str], None] | None = None, strips: int = 0) -> dict:
    """Draw ``n`` scenarios (seed ``seed``), run each; the report ``{"matrix": {...}}``.
    ``frames`` / ``size`` override every scenario's session length / frame size (tests);
    ``strips``: the closed loop corrects after every strip of this many lines (gp model) and
    the frame-level loop runs beside it (``strip_over_frame_line``)."""
    from simulator.ranges import draw_scenarios

    t0 = time.perf_counter()
    drawn = draw_scenarios(n, seed)
    if size is not None:
        drawn = [s.with_(size=int(size)) for s in drawn]
    entries = []
    for i, sc in enumerate(drawn):
        t1 = time.perf_counter()
        nf = int(frames) if frames is not None else frames_for(sc.size)
        try:
            run = evaluate_config(sc.config(nf), nf, model=model, baseline=True, columns=False, keep_frames=1,
                                  limits=scenario_limits(sc, nf), strips=strips)
        except Exception as exc:   # noqa: BLE001 - one scenario's failure is a row, not the end of the matrix
            entries.append(failed_entry(sc, nf, f"{type(exc).__name__}: {exc}"))
            if progress is not None:
                progress(f"scenario {i + 1}/{n}: {sc.specimen} {sc.size} px: failed: {exc}")
            continue
        entry = scenario_report(sc, run, nf)
        entries.append(entry)
        if progress is not None:
            progress(f"scenario {i + 1}/{n}: {sc.specimen} {sc.size} px, {nf} frames, "
                     f"{sc.drift_nm_per_min:.2g} nm/min, OU {sc.ou_sigma_pm:.0f} pm/{sc.ou_tau_s:.2g} s, "
                     f"mains {sc.mains_pm:.0f} pm@{sc.mains_hz:.0f} Hz{', jump' if sc.jump_nm else ''}: "
                     f"drift {entry['drift_rmse_pm']} pm (bound {entry['drift_bound_pm']}), "
                     f"closed/floor {entry['closed_over_floor']}, closed/baseline {entry['closed_over_baseline']}, "
                     f"false jumps {entry['false_jumps']}"
                     + (f", strip/frame per line {entry['strip_over_frame_line']}" if strips else "")
                     + f" ({time.perf_counter() - t1:.0f} s)")
    matrix = {"n": int(n), "seed": int(seed), "model": model, **({"strips": int(strips)} if strips else {}),
              "scenarios": entries, **summarise(entries),
              "wall_s": round(time.perf_counter() - t0, 1)}
    return {"matrix": matrix}
