"""Drift-calibration session: a short series on a known lattice gives the drift velocity, the
scan distortion (scale, shear, flyback, line jitter) and its principal modes.

Pipeline (:func:`calibrate_frames`)::

    locate (classical) -> track (Tracker: the frame-to-frame shift, so sites stay the same
    sites while the specimen drifts) -> every column is assigned its site of the *known*
    lattice (:func:`fit_lattice` on the first frame) -> one drift sample per column with the
    ideal site as its reference (``observations_from_columns``) -> OnlineDriftGP over the
    whole session (the linear scan-distortion terms marginalised exactly) + ``refit`` of the
    hyperparameters -> :class:`Calibration`.

With the ideal lattice as the reference the scan distortion is observable in absolute terms;
with the engine's measured reference it cancels. Conventions (as :class:`OnlineDriftGP`): a
column at specimen position p is seen at ``p + d(t) - b(t) - S(pos)`` (nm, (y, x)), with
``S(pos) = D (pos - c) + flyback``, ``D = [[scale_y, shear_yx], [shear, scale_x]]`` (rows:
output y, x; columns: input y, x); ``shear`` is the x offset per unit y, as
``simulator.ScanConfig.shear``. A known lattice fixes lengths and angles but not how the
crystal lies on the grid to a fraction of a degree: its in-plane rotation is fitted, with the
convention that the fast-scan (x) axis is exact (``shear_yx`` = 0), so ``shear`` is the whole
non-orthogonality of the slow axis.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np

from stem_live.calibration.lattice_fit import LatticeFit, fit_lattice
from stem_live.calibration.model import Calibration
from stem_live.lattices import Lattice

Progress = Callable[[str, int, int], None]


# ----------------------------------------------------------------------------- the session
@dataclass
class CalibrationRun:
    """A calibration and the arrays its figures are drawn from (units nm, s, px)."""

    calibration: Calibration
    trace_t: np.ndarray            # (m,) scan times of the GP trace (s, from the first frame)
    trace_mean: np.ndarray         # (m, 2) GP drift mean (nm, relative to its start)
    trace_sd: np.ndarray           # (m, 2)
    points_t: np.ndarray           # (k,) measured drift points (binned samples)
    points_d: np.ndarray           # (k, 2)
    truth_t: np.ndarray | None     # simulator truth d(t), same origin
    truth_d: np.ndarray | None
    field_pos_px: np.ndarray       # (c, 2) site positions (first frame, px)
    field_meas_nm: np.ndarray      # (c, 2) mean measured distortion -S at the sites (nm)
    field_model_nm: np.ndarray     # (c, 2) modelled -S (linear + flyback) at the sites
    frame_shape: tuple[int, int]
    pca_modes: np.ndarray          # (n_modes, c, 2)
    pca_ts: np.ndarray             # (frames, n_modes) nm
    pca_evr: np.ndarray
    pca_pos_px: np.ndarray         # (c, 2)
    frame_t: np.ndarray            # (frames,) frame mid times (s, from the first frame)


def _mean_sd(gp, t: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``gp.predict`` in chunks of ``chunk`` times (the last padded): the posterior sd is solved
    at 16 points per chunk and interpolated, so short chunks give it at trace resolution."""
    t = np.asarray(t, dtype=float).ravel()
    means, sds = [], []
    for a in range(0, len(t), chunk):
        tt = t[a:a + chunk]
        m, s = gp.predict(np.concatenate([tt, np.full(chunk - len(tt), tt[-1])]))
        means.append(m[:len(tt)])
        sds.append(s[:len(tt)])
    if not means:
        return np.zeros((0, 2)), np.zeros((0, 2))
    return np.concatenate(means), np.concatenate(sds)


def _line_jitter(gp, obs, line_time_s: float) -> float:
    """Std (nm) of a common x offset of the columns scanned on one line, from the GP residuals:
    the variance of the per-line mean residual minus what the per-column noise explains."""
    mean, _ = gp.predict(obs.t_s)
    r = obs.disp_nm[:, 1] - (mean[:, 1] - gp.distortion(obs.pos_px, obs.t_line_s)[:, 1])
    line = np.floor((obs.t_s - obs.t_line_s) / line_time_s + 0.5).astype(np.int64)
    _, g = np.unique(line, return_inverse=True)
    n = np.bincount(g)
    m = n >= 2
    if m.sum() < 8:
        return 0.0
    gm = np.bincount(g, r) / n
    within = np.bincount(g, (r - gm[g]) ** 2) / np.maximum(n - 1, 1)   # unbiased per-line variance
    noise = float(np.mean(within[m]))
    between = float(np.var(gm[m], ddof=1))
    return float(np.sqrt(max(between - noise * float(np.mean(1.0 / n[m])), 0.0)))


def _report(label: str, progress: Progress | None, i: int, n: int) -> None:
    if progress is not None:
        progress(label, i, n)


def _affine_summary(mode: np.ndarray, pos_nm: np.ndarray) -> dict:
    """A mode field (c, 2) as translation + gradient (least squares) and how much of it that explains."""
    X = np.column_stack([np.ones(len(pos_nm)), pos_nm - pos_nm.mean(axis=0)])
    coef, *_ = np.linalg.lstsq(X, mode, rcond=None)
    tot = float(np.sum(mode ** 2)) or 1.0
    trans = coef[0]
    return {"translation": [float(v) for v in trans],
            "translation_fraction": float(len(mode) * np.sum(trans ** 2) / tot),
            "gradient_per_nm": [[float(coef[1, 0]), float(coef[2, 0])], [float(coef[1, 1]), float(coef[2, 1])]],
            "affine_fraction": float(1.0 - np.sum((mode - X @ coef) ** 2) / tot)}


def calibrate_frames(frames: Iterable, lattice: Lattice, *, max_frames: int | None = None,
                     spacing_px: float | None = None, sigma_px: float = 0.05, fit_rotation: bool = True,
                     max_samples: int = 24000, refit_steps: int = 60, n_modes: int = 3, min_seen_frac: float = 0.5,
                     edge_frac: float = 0.5, reweight_bins: int = 3, min_groups: int = 512,
                     source: str = "frames", truth: Callable | None = None,
                     total: int | None = None, progress: Progress | None = None) -> CalibrationRun:
    """Calibrate from a series of :class:`~stem_live.protocol.Frame` of a known lattice.

    frames: the series (an iterator is consumed once); max_frames: use at most this many.
    lattice: the known column lattice (:func:`lattice_by_name`, :func:`parse_lattice_vectors`).
    spacing_px: column spacing for the locator (None: estimated on the first frame).
    sigma_px: localisation uncertainty of one column (px) for the GP's sample weights.
    fit_rotation: fit the crystal's in-plane rotation (fast-scan axis exact), else the lattice
        vectors' orientation is taken as exact.
    max_samples: samples the session GP is conditioned on (thinned evenly above this).
    refit_steps: optax steps of the hyperparameter fit. n_modes: PCA modes.
    min_seen_frac: sites seen in fewer frames than this fraction are left out of the PCA.
    edge_frac: columns closer than this x the spacing to the frame edge are left out (a peak
        cut by the edge is located with a bias, which reads as a scale error).
    reweight_bins: after a first fit, columns are split into this many intensity classes, each
        weighted by the robust std of its residuals (> 5 sigma dropped); 0: off.
    min_groups: smallest padded GP size (OnlineDriftGP; the engine's value shares its compilation).
    source: a label for the report. total: frames expected (for progress, when ``frames`` has no length).
    truth: simulator only, ``truth(seq)`` -> the frame's FrameTruth (kept for the report).
    progress: ``progress(label, done, total)`` per frame and per GP step.
    Raises ValueError (one line) for a series that cannot be calibrated.
    """
    from stem_live.distortion import OnlineDriftGP, observations_from_columns, trajectory_pca
    from stem_live.distortion.observations import Observations
    from stem_live.locate import estimate_spacing, locate_classical
    from stem_live.track import Tracker

    t_wall = time.perf_counter()
    obs_list, keys, ints, seqs, t_mid, truths = [], [], [], [], [], []
    fit: LatticeFit | None = None
    tracker = None
    first = None
    n_total = total or max_frames or (len(frames) if hasattr(frames, "__len__") else 0)
    for k, frame in enumerate(frames):
        if max_frames is not None and k >= max_frames:
            break
        img = np.asarray(frame.image, dtype=np.float32)
        psz = np.asarray(frame.pixel_size_nm, dtype=float)
        if first is None:
            first = frame
            if spacing_px is None:
                spacing_px = float(estimate_spacing(img))
            tracker = Tracker(spacing_px=spacing_px, history=max(8, (max_frames or 64)))
            edge_px = edge_frac * spacing_px
        elif img.shape != first.image.shape or not np.allclose(psz, first.pixel_size_nm, rtol=1e-6):
            raise ValueError(f"frame {k} (seq {frame.seq}) has another size or pixel size than the first: "
                             f"a calibration needs one scan setting")
        cols = locate_classical(img, spacing_px)
        if len(cols) < 8:
            raise ValueError(f"frame {k} (seq {frame.seq}): only {len(cols)} columns found: not a lattice image")
        tracker.update(cols)
        shift = np.asarray(tracker.shift)
        # the line-averaged positions, as the engine's drift model takes them: the GP has its own
        # per-line term; fed the de-jittered positions, a 60-frame calibration's velocity comes
        # out about 95 % off
        pos = cols.line_averaged()
        q_nm = (pos - shift) * psz
        if fit is None:
            fit = fit_lattice(q_nm, lattice, rotation_guess_rad=-float(frame.scan_rotation_rad),
                              fit_rotation=fit_rotation)
        ideal_nm, key, ok = fit.assign(q_nm)
        if edge_px > 0:
            # columns cut by the frame edge are located with a bias (a truncated peak): a scale error
            h, w = img.shape
            ok &= ((pos[:, 0] >= edge_px) & (pos[:, 0] <= h - 1 - edge_px)
                   & (pos[:, 1] >= edge_px) & (pos[:, 1] <= w - 1 - edge_px))
        obs = observations_from_columns(ideal_nm[ok] / psz, pos[ok], None, t_start=frame.t_start,
                                        line_time_s=frame.line_time_s, dwell_s=frame.dwell_us * 1e-6,
                                        pixel_size_nm=frame.pixel_size_nm, beam_shift_nm=frame.beam_shift_nm,
                                        sigma_px=sigma_px, frame=frame.seq)
        obs_list.append(obs)
        keys.append(key[ok])
        ints.append(np.asarray(cols.intensity, float)[ok])
        seqs.append(frame.seq)
        t_mid.append(frame.t_start + 0.5 * frame.frame_time_s)
        if truth is not None:
            truths.append(truth(frame.seq))
        _report("frames", progress, k + 1, n_total or k + 1)
    if first is None:
        raise ValueError("no frames to calibrate from")
    if len(obs_list) < 3:
        raise ValueError(f"{len(obs_list)} frame(s): a calibration needs at least 3 (drift and distortion "
                         f"are told apart by how they change from frame to frame)")
    psz = np.asarray(first.pixel_size_nm, dtype=float)
    allobs = Observations.concat(obs_list)
    allkeys = np.concatenate(keys)
    allint = np.concatenate(ints)

    # ---- the session GP: every frame in one window, distortion terms free
    _report("GP: conditioning on the session", progress, 0, 3)
    gp_kw = dict(window_frames=1, max_samples=max_samples, min_groups=min_groups,
                 centre_px=tuple(np.asarray(first.image.shape, float) / 2.0))
    gp = OnlineDriftGP(**gp_kw)
    gp.add(allobs)
    n_outliers = 0
    if reweight_bins > 0:
        # the locator's precision differs between bright and dim columns (Sr vs O in SrTiO3):
        # each intensity class gets the robust std of its residuals as its sigma; > 5 sigma is dropped
        mean_k, _ = gp.predict(allobs.t_s)
        res = allobs.disp_nm - (mean_k - gp.distortion(allobs.pos_px, allobs.t_line_s))
        edges = np.quantile(allint, np.linspace(0, 1, reweight_bins + 1)[1:-1])
        cls = np.searchsorted(edges, allint)
        sig = np.empty(len(allobs))
        for c in range(reweight_bins):
            m = cls == c
            if m.any():
                r = res[m] - np.median(res[m], axis=0)
                sig[m] = max(1.4826 * float(np.median(np.abs(r))), 1e-4)
        good = np.all(np.abs(res - np.median(res, axis=0)) <= 5.0 * sig[:, None], axis=1)
        n_outliers = int((~good).sum())
        allobs = replace(allobs, sigma_nm=sig).select(good)
        allkeys, allint = allkeys[good], allint[good]
        gp = OnlineDriftGP(**gp_kw)
        gp.add(allobs)
    _report(f"GP: fitting hyperparameters ({refit_steps} steps)", progress, 1, 3)
    fitres = gp.refit(steps=refit_steps) if refit_steps > 0 else {"ok": False}
    _report("GP: drift trace, distortion field, PCA", progress, 2, 3)
    p = gp.distortion_params
    h = gp.hyperparameters
    sd_v = float(gp.snapshot.beta_sd[1, 0])
    jitter = _line_jitter(gp, allobs, first.line_time_s)

    # ---- drift trace (relative to the first line) and measured points
    t_first = float(first.t_start)
    lines = np.concatenate([np.asarray(first.line_times()) - first.t_start + (tm - 0.5 * first.frame_time_s)
                            for tm in t_mid])
    step = max(1, len(lines) // 4000)
    tt = lines[::step]
    mean, sd = _mean_sd(gp, tt)
    base = mean[0].copy()
    S = gp.distortion(allobs.pos_px, allobs.t_line_s)
    drift_samples = allobs.disp_nm + S                      # disp = d - S
    nb = 8
    fidx = np.searchsorted(np.asarray(seqs), allobs.frame)
    f0 = np.asarray(t_mid)[fidx] - 0.5 * first.frame_time_s
    bins = np.floor((allobs.t_s - f0) / first.frame_time_s * nb)
    gid = fidx.astype(np.int64) * nb + np.clip(bins, 0, nb - 1).astype(np.int64)
    ug, inv = np.unique(gid, return_inverse=True)
    cnt = np.bincount(inv)
    pt_t = np.bincount(inv, allobs.t_s) / cnt - t_first
    pt_d = np.stack([np.bincount(inv, drift_samples[:, i]) / cnt for i in range(2)], axis=1) - base

    # ---- per-site distortion field and PCA of the displacement fields
    usite, sinv = np.unique(allkeys, return_inverse=True)
    seen = np.bincount(sinv, minlength=len(usite))
    dmod, _ = gp.predict(allobs.t_s)
    meas = allobs.disp_nm - dmod                            # -S(pos) + noise, per sample
    field_meas = np.stack([np.bincount(sinv, meas[:, i]) / seen for i in range(2)], axis=1)
    field_pos = np.stack([np.bincount(sinv, allobs.pos_px[:, i]) / seen for i in range(2)], axis=1)
    field_model = -gp.distortion(field_pos, field_pos[:, 1] * first.dwell_us * 1e-6)
    F = len(obs_list)
    keep = seen >= max(2, int(np.ceil(min_seen_frac * F)))
    remap = np.full(len(usite), -1)
    remap[keep] = np.arange(keep.sum())
    traj = np.full((F, int(keep.sum()), 2), np.nan)
    sel = remap[sinv] >= 0
    traj[fidx[sel], remap[sinv][sel]] = allobs.disp_nm[sel]
    pca_pos = field_pos[keep]
    pca_summary: dict = {"n_modes": 0}
    modes = np.zeros((n_modes, int(keep.sum()), 2))
    ts = np.zeros((F, n_modes))
    evr = np.zeros(n_modes)
    if keep.sum() >= 3:
        modes, ts, evr = trajectory_pca(traj, n_modes=n_modes)
        pca_summary = {"n_modes": int(n_modes), "sites": int(keep.sum()), "frames": F,
                       "explained_variance_ratio": [float(v) for v in evr],
                       # rms column displacement carried by each mode (unit-norm modes over 2 x sites entries)
                       "rms_displacement_nm": [float(v) for v in np.std(ts, axis=0) / np.sqrt(keep.sum())],
                       "modes": [_affine_summary(modes[i], pca_pos * psz) for i in range(n_modes)]}

    # ---- truth (simulator), and the result
    truth_t = truth_d = None
    if truths:
        truth_t = np.concatenate([tr.line_times_s for tr in truths]) - t_first
        truth_d = np.concatenate([tr.drift_nm for tr in truths])
        # the GP's offset is arbitrary (a constant of the lattice origin): align the truth to the
        # trace by its mean difference
        off = np.mean(truth_d - np.stack([np.interp(truth_t, tt - t_first, mean[:, i] - base[i])
                                          for i in range(2)], axis=1), axis=0)
        truth_d = truth_d - off
    trace_t = tt - t_first
    trace_mean = mean - base
    # the drift velocity over the session: the slope of the GP's drift trace. The GP's own linear
    # term is not it on a short session: its long-scale kernel (up to 100 s) trades off against it
    # (20 frames: 1.8 nm/s where the trace, like the truth, says 0.0085)
    velocity = np.linalg.lstsq(np.stack([np.ones_like(tt), tt - tt.mean()], axis=1), mean, rcond=None)[0][1]
    meta = {"source": source, "lattice": lattice.to_dict(),
            "lattice_fit_rms_nm": fit.rms_nm, "frames": F, "first_seq": int(seqs[0]), "last_seq": int(seqs[-1]),
            "samples": int(len(allobs)), "gp_samples": int(gp.n_samples), "outliers_dropped": n_outliers,
            "frame_shape": list(first.image.shape),
            "pixel_size_nm": [float(v) for v in psz], "dwell_us": float(first.dwell_us),
            "flyback_us": float(first.flyback_us), "spacing_px": float(spacing_px),
            "session_s": float(t_mid[-1] - t_mid[0] + first.frame_time_s),
            "hyperparameters": {k: float(v) for k, v in h.items()}, "refit_ok": bool(fitres.get("ok", False)),
            "gp_linear_velocity_nm_per_s": [float(v) for v in p["velocity_nm_per_s"]],
            "wall_s": round(time.perf_counter() - t_wall, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    cal = Calibration(
        velocity_nm_per_s=tuple(float(v) for v in velocity), velocity_sd_nm_per_s=(sd_v, sd_v),
        scale_error=(p["scale_y"], p["scale_x"]), scale_error_sd=(p["sd_scale_y"], p["sd_scale_x"]),
        shear=p["shear"], shear_sd=p["sd_shear"], shear_yx=p["shear_yx"], rotation_rad=fit.total_rotation_rad,
        flyback_amp_nm=p["flyback_amp_nm"], flyback_amp_sd_nm=p["sd_flyback_amp_nm"],
        flyback_tau_us=p["flyback_tau_us"], line_jitter_nm=jitter,
        pca=pca_summary, meta=meta)
    return CalibrationRun(cal, trace_t, trace_mean, sd, pt_t, pt_d, truth_t, truth_d, field_pos,
                          field_meas, field_model, tuple(first.image.shape), modes, ts, evr, pca_pos,
                          np.asarray(t_mid) - t_first)
