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
- ``open_loop.residual_line_rms_nm``, ``closed_loop.residual_line_rms_nm`` (and the
  baseline's): the same per scan line (``d(t) - b(t)`` at every line, against frame 0's mean):
  what the frame mean hides, the drift and mains within each frame, stays in (a loop that
  corrects once a frame leaves it all);
- ``closed_loop.oracle_floor_nm``: the residual of an oracle corrector that knows the true
  drift up to the end of each frame and the drift model (:func:`oracle_residual_rms_nm`): the
  floor of any corrector that acts once a frame, set by the unpredictable OU wander;
- ``columns.recall``, ``columns.precision``, ``columns.rmse_px``, ``columns.rmse_pm``,
  ``columns.locate_ms``: the locator (``columns.locator``: classical or unet) on the first 10
  open-loop frames against the true column positions that the frame's detector shows
  (``FrameTruth.visible``: not the O columns of PbTiO3 in HAADF; :func:`column_metrics`), dark
  columns (ABF, BF) inverted first (``columns.contrast``); also ``columns.crlb_px`` (the Cramer-Rao bound of
  those positions at the session's dose), ``columns.rmse_inner_px`` / ``columns.rmse_border_px``
  and ``columns.border_fraction`` (columns whose fit window crosses the frame edge);
  ``columns.tracked_*`` (``recall``, ``precision``, ``rmse_px``, ``rmse_inner_px``,
  ``rmse_second_half_px``): the same frames located with the lattice of the frames before each
  as the prior (``lattice_prior.LatticePrior``, causal: frame k knows frames 0..k-1 only).
- ``drift.rmse_pm`` (gp model): per-line drift RMSE of the open-loop run against the truth, one
  constant offset removed; ``gp.update_ms``; ``gp.hyperparameters``: what the engine learnt
  from the stream by the end of the open-loop run (``Engine.drift_hyperparameters()``: the
  kernel's amplitudes (nm) and time scales (s), the mains frequency in use, fit counts).
- with ``strips`` (``evaluate --strips K``): the closed loop is the strip-level one (the
  simulator sends every frame as strips of K lines, the engine corrects after each with a path,
  :mod:`stem_live.strip_loop`; a frame's own correction then carries its path too);
  ``frame_level.residual_rms_nm`` / ``.residual_line_rms_nm``: the frame-level closed loop on the
  same session (one correction a frame; with a path only with ``trajectory``);
  ``strips.lines``, ``strips.paths`` (strips that sent a path), ``strips.latency_ms`` (``median``,
  ``p99``, ``max``: engine time from a strip's arrival to its correction, this machine) and
  ``strips.assumed_latency_s`` (when, after its strip, a path starts in the simulated scan).

:func:`evaluate_config` runs the same on any ``MicroscopeConfig`` and returns the sessions too;
``stem-live evaluate --matrix`` (:mod:`stem_live.lab.matrix`) runs it on drawn scenarios.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from stem_live.engine import Engine, EngineConfig, FrameRefused
from stem_live.protocol import Frame
from stem_live.strips import strip_from_meta


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


def _truth_px(truth) -> np.ndarray:
    """The true positions (px) of the columns the frame's detector shows (``truth.visible``)."""
    tp = np.asarray(truth.columns_px)
    vis = getattr(truth, "visible", None)
    return tp if vis is None else tp[np.asarray(vis, bool)]


def column_metrics(frames: list[tuple[np.ndarray, object, object]], config=None, *,
                   calibration: str = "", locator: str = "classical", contrast: str = "auto") -> dict:
    """A locator (``locator``: "classical" or "unet", the committed weights) against the
    simulator's true column positions (with a ``calibration`` JSON, on its flyback, as the
    engine locates then; ``flyback_px`` in the result). Only the columns the frame's detector
    shows count (``FrameTruth.visible``). ``contrast``: "bright", "dark" (ABF/BF: every frame
    is inverted first) or "auto" (from the frames' detector, ``locate.contrast.frame_contrast``).

    Matching radius 0.3 x the median nearest-neighbour spacing of the true columns; recall =
    matched / true, precision = matched / found, RMSE over matched pairs (px, and pm);
    ``rmse_inner_px`` / ``rmse_border_px`` split it by whether the found column's fit window
    crosses the frame edge (``Columns.border``, ``border_fraction`` of the matched). With the
    session's ``config`` (a ``MicroscopeConfig``) also ``crlb_px``: the rms Cramer-Rao bound
    of the matched true columns (``simulator.crlb``), the floor of any single-frame locator at
    that dose. ``tracked_*``: the frames again, in order, each located with the lattice of the
    frames before it as the prior (``LatticePrior``), as a live session can; the second half's
    RMSE is the steady state (frame 0 has no prior). ``stack_*``: the frames as one recorded
    stack, each with all the others as its prior (``locate_stack``, as ``stem-live locate
    --tracked``; ``stack_flyback_px`` the flyback it measured, without a calibration)."""
    from scipy.spatial import cKDTree

    from stem_live.locate import estimate_spacing, locate_classical
    from stem_live.locate.contrast import as_bright, frame_contrast

    img0 = np.asarray(frames[0][0], dtype=np.float32)
    contrast, _ = frame_contrast(img0, contrast, getattr(frames[0][1], "detector", ""))
    frames = [(as_bright(np.asarray(im, np.float32), contrast), m, t) for im, m, t in frames]
    spacing = estimate_spacing(frames[0][0])
    if locator == "unet":
        from stem_live.locate.unet import load_default, locate_unet

        params = load_default()

        def locate_fn(img, spacing_px=spacing, flyback_px=None, prior=None):
            return locate_unet(img, spacing_px, params=params, flyback_px=flyback_px, prior=prior)
    elif locator == "classical":
        def locate_fn(img, spacing_px=spacing, flyback_px=None, prior=None):
            return locate_classical(img, spacing_px, flyback_px=flyback_px, prior=prior)
    else:
        raise ValueError(f"locator must be 'classical' or 'unet', got {locator!r}")
    flyback = None
    if calibration:
        from stem_live.calibration import load_cached

        meta0 = frames[0][1]
        flyback = load_cached(calibration).flyback_px(meta0.pixel_size_nm[1], meta0.dwell_us)
    from stem_live.lattice_prior import LatticePrior

    # without a calibration the lattice measures the flyback as a live session does
    lattice = LatticePrior(spacing, fit_flyback=flyback is None)
    n_true = 0
    bound2, ms = [], []
    # per locate path: columns found, matched, and every matched pair's squared error and border flag
    tally = {name: {"found": 0, "match": 0, "sq": [], "edge": []} for name in ("single", "tracked", "stack")}

    def score(name: str, cols, tp: np.ndarray, radius: float) -> np.ndarray:
        ti, fi = match_columns(tp, cols.positions, radius)
        t = tally[name]
        t["found"] += len(cols)
        t["match"] += len(ti)
        t["sq"].append(np.sum((tp[ti] - cols.positions[fi]) ** 2, axis=1))
        t["edge"].append(cols.border[fi])
        return ti

    for image, _meta, truth in frames:
        img = np.asarray(image, dtype=np.float32)
        t0 = time.perf_counter()
        cols = locate_fn(img, spacing, flyback_px=flyback)
        ms.append((time.perf_counter() - t0) * 1e3)
        tp = _truth_px(truth)
        radius = 0.3 * float(np.median(cKDTree(tp).query(tp, 2)[0][:, 1]))
        n_true += len(tp)
        ti = score("single", cols, tp, radius)
        if config is not None and getattr(config, "detector", "haadf") == "haadf":
            from simulator.crlb import position_crlb_px

            vis = getattr(truth, "visible", None)
            bound = position_crlb_px(config, truth)
            bound2.append((bound if vis is None else bound[np.asarray(vis, bool)])[ti] ** 2)
        # the same frame with the lattice of the frames before it as the prior (causal)
        tracked = locate_fn(img, spacing, flyback_px=flyback if flyback is not None else lattice.flyback_px,
                            prior=lattice)
        lattice.update(tracked)
        score("tracked", tracked, tp, radius)
    # the frames as one recorded stack: each with all the others as its prior (``locate_stack``,
    # the flyback measured from the stack unless a calibration gives it), as ``locate --tracked``
    from functools import partial

    from stem_live.lattice_prior import locate_stack

    images = [np.asarray(image, dtype=np.float32) for image, _, _ in frames]
    stack = locate_stack(images, spacing, partial(locate_fn, spacing_px=spacing, flyback_px=flyback),
                         fit_flyback=flyback is None)
    for cols, (_, _, truth) in zip(stack, frames):
        tp = _truth_px(truth)
        score("stack", cols, tp, 0.3 * float(np.median(cKDTree(tp).query(tp, 2)[0][:, 1])))
    sq, edge = np.concatenate(tally["single"]["sq"]), np.concatenate(tally["single"]["edge"])
    n_found, n_match = tally["single"]["found"], tally["single"]["match"]

    def rms(v: np.ndarray) -> float:
        return round(float(np.sqrt(np.mean(v))), 4) if len(v) else float("nan")

    px_pm = float(np.mean(frames[0][1].pixel_size_nm)) * 1e3
    out = {"recall": round(n_match / max(n_true, 1), 5), "precision": round(n_match / max(n_found, 1), 5),
           "rmse_px": rms(sq), "rmse_pm": round(float(np.sqrt(np.mean(sq))) * px_pm, 3) if len(sq) else float("nan"),
           "locate_ms": round(float(np.median(ms[1:] if len(ms) > 1 else ms)), 2), "frames": len(frames),
           "locator": locator, "contrast": contrast, "spacing_px": round(float(spacing), 3),
           "rmse_inner_px": rms(sq[~edge]), "rmse_border_px": rms(sq[edge]),
           "border_fraction": round(float(edge.mean()), 4) if len(edge) else float("nan")}
    t = tally["tracked"]
    tsq, tedge = np.concatenate(t["sq"]), np.concatenate(t["edge"])
    out.update({"tracked_recall": round(t["match"] / max(n_true, 1), 5),
                "tracked_precision": round(t["match"] / max(t["found"], 1), 5),
                "tracked_rmse_px": rms(tsq), "tracked_rmse_inner_px": rms(tsq[~tedge]),
                "tracked_rmse_second_half_px": rms(np.concatenate(t["sq"][len(frames) // 2:])),
                "tracked_flyback_px": (None if lattice.flyback_px is None
                                       else [round(float(v), 4) for v in lattice.flyback_px])})
    st, fb_stack = tally["stack"], stack[0].meta.get("flyback_px") if stack else None
    out.update({"stack_recall": round(st["match"] / max(n_true, 1), 5),
                "stack_precision": round(st["match"] / max(st["found"], 1), 5),
                "stack_rmse_px": rms(np.concatenate(st["sq"])),
                "stack_flyback_px": None if fb_stack is None else [round(float(v), 4) for v in fb_stack]})
    if calibration:
        out["flyback_px"] = None if flyback is None else [round(float(v), 4) for v in flyback]
    if bound2:
        out["crlb_px"] = rms(np.concatenate(bound2))
    return out


@dataclass(frozen=True)
class SessionResult:
    residual_nm: np.ndarray  # (frames, 2) true apparent displacement vs frame 0
    engine_ms: np.ndarray  # (frames,)
    drift_err_nm: np.ndarray  # (lines, 2) modelled minus true per-line drift (gp model; empty otherwise)
    gp_ms: np.ndarray  # (frames,) GP update time (gp model; empty otherwise)
    jump_frame: int | None
    corrections: int
    clamped: int
    kept: list = field(default_factory=list)  # (image, meta, truth) of the first ``keep_frames`` frames
    drift_err_frame: np.ndarray = field(default_factory=lambda: np.zeros(0, int))  # (lines,) frame of each drift_err row
    jump_detected: np.ndarray = field(default_factory=lambda: np.zeros(0, bool))  # (frames,) engine reported a jump
    true_jump_frames: tuple[int, ...] = ()  # frames in which a true jump first shows (scan or gap before it)
    hyperparameters: dict | None = None  # the drift GP's learnt hyperparameters at the end (gp model)
    line_residual_nm: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (lines, 2) true d - b per line vs frame 0's mean
    strip_ms: np.ndarray = field(default_factory=lambda: np.zeros(0))  # engine time of every strip (strip loop; ms)
    strip_paths: int = 0   # strips that sent a path

    @property
    def residual_rms_nm(self) -> float:
        return float(np.sqrt(np.mean(np.sum(self.residual_nm**2, axis=1))))

    @property
    def residual_line_rms_nm(self) -> float:
        """RMS over every line of the run of the true apparent displacement (``d - b`` at the
        line) relative to frame 0's mean: ``residual_rms_nm`` with the drift within each frame
        (its warping) left in. NaN without lines."""
        r = self.line_residual_nm
        return float(np.sqrt(np.mean(np.sum(r**2, axis=1)))) if len(r) else float("nan")


def frame_from_sim(image: np.ndarray, meta: object, stream: str = "sim") -> Frame:
    """Wrap a simulator frame in the protocol's :class:`Frame`."""
    return Frame(seq=meta.seq, image=image, t_start=meta.t_start, pixel_size_nm=tuple(meta.pixel_size_nm),
                 dwell_us=meta.dwell_us, flyback_us=meta.flyback_us, scan_rotation_rad=meta.scan_rotation_rad,
                 beam_shift_nm=tuple(float(v) for v in meta.beam_shift_nm), stream=stream, detector=meta.detector,
                 beam_shift_lines_nm=getattr(meta, "beam_shift_lines_nm", None))


def run_session(config: object, frames: int, *, armed: bool, engine_config: EngineConfig = EngineConfig(),
                progress: Callable[[str, int, int], None] | None = None, label: str = "",
                keep_frames: int = 0, limits: object | None = None, strips: int = 0) -> SessionResult:
    """Run one seeded simulator session through the engine; score it against truth.
    ``limits``: the bridge's safety limits (``instrument_adapters.safety.Limits``; default: its defaults);
    ``strips``: the simulator sends every frame as strips of this many lines, each to the
    engine's strip loop (``Engine.process_strip``) as it is scanned, and the frame when whole."""
    from instrument_adapters.safety import Limits, clamp_path, clamp_target
    from simulator import Microscope
    from stem_live.heap import SETTLE_AFTER_FRAMES, settle_heap

    scope = Microscope(config)
    engine = Engine(engine_config)
    if armed:
        engine.arm()
    limits = Limits() if limits is None else limits
    start = np.asarray(scope.beam_shift_nm, dtype=np.float64).copy()
    apparent, times, kept, errs, gp_ms, err_frame, detected, lines = [], [], [], [], [], [], [], []
    true_jumps: list[int] = []
    t_prev_end = -np.inf
    n_corr = n_clamped = 0
    jump_frame = None
    jumps = [t for t, _ in config.drift.jumps] + ([config.drift.jump_time_s] if config.drift.jump_nm else [])
    strip_ms: list[float] = []
    strip_paths = [0]

    def apply(correction, line_time_s: float) -> None:
        nonlocal n_corr, n_clamped
        traj = correction.trajectory
        if traj is not None:   # the simulated scan follows a path line by line, as the bridge clamps it
            d = clamp_path(traj.t_s, traj.beam_shift_nm, line_time_s, np.asarray(scope.beam_shift_nm), start, limits)
        else:
            d = clamp_target(np.asarray(correction.beam_shift_nm), np.asarray(scope.beam_shift_nm), start, limits)
        if not d.error:
            if traj is not None:
                scope.set_beam_path(d.t_s, d.applied_nm)
            else:
                scope.set_beam_shift(d.applied_nm)
            n_corr += 1
            n_clamped += int(d.clamped)

    def on_strip(rows: np.ndarray, meta, row0: int) -> None:
        strip = strip_from_meta(rows, meta, row0)
        t0 = time.perf_counter()
        try:
            res = engine.process_strip(strip)
        except FrameRefused:
            return
        strip_ms.append((time.perf_counter() - t0) * 1e3)
        if res.correction is not None:
            strip_paths[0] += 1
            apply(res.correction, meta.line_time_s)

    for k in range(frames):
        image, meta, truth = scope.acquire_strips(strips, on_strip) if strips else scope.acquire()
        if jump_frame is None and jumps and truth.line_times_s[-1] >= min(jumps):
            jump_frame = k
        t_end = meta.t_start + meta.rows * meta.line_time_s
        if any(t_prev_end < tj <= t_end for tj in jumps):
            true_jumps.append(k)
        t_prev_end = t_end
        if k < keep_frames:
            kept.append((image, meta, truth))
        lines.append(np.asarray(truth.drift_nm, np.float64) - np.asarray(truth.beam_shift_nm, np.float64))
        apparent.append(lines[-1].mean(axis=0))
        if k == SETTLE_AFTER_FRAMES:
            settle_heap()  # as the live service does: no full-collection pauses in the timings
        t0 = time.perf_counter()
        res = engine.process(frame_from_sim(image, meta))
        times.append((time.perf_counter() - t0) * 1e3)
        detected.append(bool(res.jump))
        if res.line_drift_nm is not None:
            # the model works in beam-shift space (d - d_ref + b_ref); with no corrections sent,
            # that is the drift itself up to one constant, which drift_rmse removes
            errs.append(np.asarray(res.line_drift_nm) - np.asarray(truth.drift_nm))
            err_frame.append(np.full(len(errs[-1]), k))
            gp_ms.append(res.timings_ms.get("gp", np.nan))
        if res.correction is not None:
            apply(res.correction, meta.line_time_s)
        if progress is not None:
            progress(label, k + 1, frames)
    app = np.array(apparent)
    return SessionResult(residual_nm=app - app[0], engine_ms=np.array(times), corrections=n_corr, clamped=n_clamped,
                         kept=kept, drift_err_nm=np.concatenate(errs) if errs else np.zeros((0, 2)),
                         gp_ms=np.array(gp_ms), jump_frame=jump_frame,
                         drift_err_frame=np.concatenate(err_frame) if err_frame else np.zeros(0, int),
                         jump_detected=np.array(detected, bool), true_jump_frames=tuple(true_jumps),
                         hyperparameters=engine.drift_hyperparameters(),
                         line_residual_nm=np.concatenate(lines) - app[0] if lines else np.zeros((0, 2)),
                         strip_ms=np.array(strip_ms), strip_paths=strip_paths[0])


def _rounded(x):
    """``x`` (nested dicts, lists, numbers) with floats to 6 significant digits, for the JSON report."""
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_rounded(v) for v in x]
    if isinstance(x, float):
        return float(f"{x:.6g}")
    return x


def oracle_residual_rms_nm(config: object, frames: int) -> float:
    """The closed-loop residual of an oracle that, at the end of every frame, knows the true
    drift so far and the drift model itself (velocity, mains phase, OU parameters) and sets
    the beam shift for the next frame perfectly: all that is left is the part of the
    Ornstein-Uhlenbeck wander that nobody can predict (its innovation over the next frame,
    averaged over that frame's lines). The floor of any corrector that acts once a frame;
    same RMS definition as ``residual_rms_nm`` (nm, both axes). Jumps are not included."""
    from simulator import Microscope

    scope = Microscope(config)
    drift = scope.drift
    tau = config.drift.ou_tau_s
    rows = int(config.size)
    line_s = scope.frame_time_s / rows
    period = scope.frame_time_s + config.frame_gap_s
    if config.drift.ou_sigma_nm <= 0 or frames < 2:
        return 0.0
    k = np.arange(1, frames)
    t = (k * period)[:, None] + np.arange(rows)[None, :] * line_s           # (frames - 1, rows)
    t_end = (k - 1) * period + scope.frame_time_s                           # end of the frame before
    pred = drift.ou_at(t_end)[:, None, :] * np.exp(-(t - t_end[:, None]) / tau)[..., None]
    res = (drift.ou_at(t) - pred).mean(axis=1)                              # (frames - 1, 2)
    return float(np.sqrt(np.mean(np.sum(res ** 2, axis=1))))


def drift_rmse_pm(err_nm: np.ndarray, skip_lines: int = 0) -> float:
    """RMS of the per-line drift error after removing its one constant offset (pm)."""
    e = err_nm[skip_lines:]
    if not len(e):
        return float("nan")
    e = e - e.mean(axis=0)
    return float(np.sqrt(np.mean(np.sum(e**2, axis=1)))) * 1e3


def recovery_frames(res: SessionResult, *, floor_nm: float = 0.02) -> int | None:
    """Frames after the jump until the true image position is back within max(3 x the
    pre-jump residual RMS, ``floor_nm``) of where it was held before the jump (None: never)."""
    j = res.jump_frame
    if j is None or j < 3:
        return None
    before = res.residual_nm[max(0, j - 10):j]
    held = before.mean(axis=0)
    tol = max(3 * float(np.sqrt(np.mean(np.sum((before - held) ** 2, axis=1)))), floor_nm)
    for k in range(j, len(res.residual_nm)):
        if np.all(np.hypot(*(res.residual_nm[k:k + 3] - held).T) <= tol):
            return k - j
    return None


def evaluate(*, preset: str = "graphene", size: int = 512, frames: int = 100, drift_nm_per_min: float = 3.0,
             dose: float | None = None, seed: int = 0, model: str = "rigid", jump_nm: float = 0.0,
             baseline: bool = True, calibration: str = "", detector: str = "haadf", locator: str = "classical",
             contrast: str = "auto", progress: Callable[[str, int, int], None] | None = None,
             trajectory: bool = False, strips: int = 0) -> dict:
    """Run open and closed loop (and the baseline tracker) on one seeded configuration; the JSON report.
    ``calibration``: a ``stem-live calibrate`` JSON the engine (gp model) starts from; ``detector``:
    the simulator's "haadf", "abf" or "bf"; ``locator``: "classical" or "unet", scored on the
    columns; ``contrast``: "bright", "dark" or "auto" (from the frames' detector), for the
    scored locator and the engine; ``trajectory``: the gp model's corrections carry the drift
    over the next frame as a path the simulated scan follows line by line; ``strips``: the
    closed loop corrects after every strip of this many lines (gp model; module doc)."""
    from simulator import DriftConfig, MicroscopeConfig

    drift = DriftConfig(drift_nm_per_min=drift_nm_per_min, jump_nm=jump_nm)
    cfg = MicroscopeConfig(preset=preset, size=size, seed=seed, drift=drift, detector=detector)
    if dose is not None:
        cfg = replace(cfg, dose_e_per_A2=dose)
    head = {"preset": preset, "size": size, "frames": frames, "drift_nm_per_min": drift_nm_per_min,
            "dose_e_per_A2": cfg.dose, "seed": seed, "detector": detector, "trajectory": trajectory or bool(strips)}
    run = evaluate_config(cfg, frames, model=model, baseline=baseline, calibration=calibration, progress=progress,
                          locator=locator, contrast=contrast, trajectory=trajectory, strips=strips)
    return {**head, **run.report}


@dataclass(frozen=True)
class ConfigRun:
    """One configuration's report body (every key of :func:`evaluate` after the header) and its
    sessions (``baseline`` None when skipped)."""

    report: dict
    open_loop: SessionResult
    closed: SessionResult
    baseline: SessionResult | None


def evaluate_config(cfg: object, frames: int, *, model: str = "rigid", baseline: bool = True,
                    calibration: str = "", columns: bool = True, keep_frames: int = 10,
                    progress: Callable[[str, int, int], None] | None = None, locator: str = "classical",
                    contrast: str = "auto", limits: object | None = None, trajectory: bool = False,
                    strips: int = 0) -> ConfigRun:
    """Open loop, closed loop and (``baseline``) the baseline tracker on one ``MicroscopeConfig``.
    ``columns``: score the ``locator`` on the first ``keep_frames`` open-loop frames (those frames
    are kept in ``open_loop.kept`` either way); ``contrast`` for it and the engine; ``limits``:
    the bridge's safety limits of the closed-loop and baseline sessions (default: its defaults);
    ``strips``: the closed loop corrects after every strip of this many lines (gp model, with
    paths), and the frame-level closed loop runs beside it (``frame_level``)."""
    if strips and model != "gp":
        raise ValueError("--strips needs the gp model (--model gp): the rigid model corrects once a frame")
    if strips < 0:
        raise ValueError(f"--strips must be a number of lines >= 1, got {strips}")
    ec = EngineConfig(model=model, calibration=calibration, hyperfit_background=False,  # reproducible
                      contrast=contrast, trajectory=trajectory)
    frame_ec, ec = ec, replace(ec, trajectory=trajectory or bool(strips))   # a strip loop's frame path sends paths too
    rows = cfg.shape[0]
    t0 = time.perf_counter()
    open_loop = run_session(cfg, frames, armed=False, engine_config=ec, progress=progress, label="open loop",
                            keep_frames=keep_frames)
    closed = run_session(cfg, frames, armed=True, engine_config=ec, progress=progress,
                         label="closed loop" + (f" (strips of {strips} lines)" if strips else ""), limits=limits,
                         strips=strips)
    # the drift trackers users have today: cross-correlation against a reference frame and a
    # linear drift rate from the last three frames, applied once per frame
    base = run_session(cfg, frames, armed=True, engine_config=EngineConfig(model="rigid", history=3),
                       progress=progress, label="baseline", limits=limits) if baseline else None
    extra: dict = {}
    if strips:
        frame_level = run_session(cfg, frames, armed=True, engine_config=frame_ec, progress=progress,
                                  label="closed loop (frame level)", limits=limits)
        extra["frame_level"] = {"residual_rms_nm": round(frame_level.residual_rms_nm, 5),
                                "residual_line_rms_nm": round(frame_level.residual_line_rms_nm, 5),
                                "method": "the same engine without strips: one correction a frame"
                                          + (", with its path over the frame" if trajectory else "")}
        ms = closed.strip_ms if len(closed.strip_ms) else np.full(1, np.nan)
        extra["strips"] = {"lines": int(strips), "paths": closed.strip_paths,
                           "latency_ms": {"median": round(float(np.median(ms)), 2),
                                          "p99": round(float(np.percentile(ms, 99)), 2),
                                          "max": round(float(np.max(ms)), 2)},
                           "assumed_latency_s": ec.strip_latency_s}
    if base is not None:
        extra["baseline"] = {"residual_rms_nm": round(base.residual_rms_nm, 5),
                             "residual_line_rms_nm": round(base.residual_line_rms_nm, 5), "method": "cross-correlation + "
                             "linear drift rate from the last 3 frames, one beam shift per frame"}
    if model == "gp":
        line_frames = 3  # the GP's first frames are conditioned on almost nothing: not scored
        extra["drift"] = {"rmse_pm": round(drift_rmse_pm(open_loop.drift_err_nm, line_frames * rows), 3),
                          "scored": "open loop, per line, after removing one constant offset; "
                                    f"frames {line_frames}..{frames - 1}"}
        g = closed.gp_ms[5:] if len(closed.gp_ms) > 5 else closed.gp_ms
        extra["gp"] = {"update_ms": {"median": round(float(np.nanmedian(g)), 2), "max": round(float(np.nanmax(g)), 2)},
                       "hyperparameters": _rounded(open_loop.hyperparameters)}
    if cfg.drift.jump_nm:
        extra["jump"] = {"nm": cfg.drift.jump_nm, "at_frame": closed.jump_frame,
                         "recovery_frames": recovery_frames(closed)}
    report = {
        "frames_processed": int(frames),
        "frames_dropped": 0,
        "engine_fps": round(float(1e3 / np.median(closed.engine_ms)), 2),
        "open_loop": {"residual_rms_nm": round(open_loop.residual_rms_nm, 5),
                      "residual_line_rms_nm": round(open_loop.residual_line_rms_nm, 5),
                      "final_offset_nm": [round(float(v), 5) for v in open_loop.residual_nm[-1]]},
        "closed_loop": {"residual_rms_nm": round(closed.residual_rms_nm, 5),
                        "residual_line_rms_nm": round(closed.residual_line_rms_nm, 5),
                        "final_offset_nm": [round(float(v), 5) for v in closed.residual_nm[-1]],
                        "corrections": closed.corrections, "clamped": closed.clamped,
                        "ratio_to_open_loop": round(closed.residual_rms_nm / max(open_loop.residual_rms_nm, 1e-12), 4),
                        "oracle_floor_nm": round(oracle_residual_rms_nm(cfg, frames), 5)},
        "columns": (column_metrics(open_loop.kept, cfg, calibration=calibration, locator=locator, contrast=contrast)
                    if columns and cfg.preset != "particles" else {}),
        **extra,
        "model": model,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    return ConfigRun(report, open_loop, closed, base)
