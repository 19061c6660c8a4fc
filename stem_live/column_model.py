"""The gp model's per-frame pipeline for one stream (:class:`ColumnModel`): locate the columns,
track them to a reference lattice, turn them into drift samples, update the online GP, decide
the correction. Pure compute, no sockets; :class:`~stem_live.engine.Engine` owns one.

The first frames: a reference built from one frame carries the drift during its scan (a skew
of ``v * (t - t_mid)``); relative to it every later frame's drift reads as flat within the
frame. On the second frame the velocity from the step between the two (over the time between a
feature's two scans) takes that skew out of the reference (``_bootstrap``); from then on the GP
de-skews every frame before it is linked (``_deskewed``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from stem_live.protocol import Frame

log = logging.getLogger("stem_live.engine")
#: a line pick-up the locator finds is the mains line when its frequency is within this
#: fraction of 50 or 60 Hz (other periodic line shifts, e.g. 178 Hz at 4 pm on a fast SrTiO3
#: scan, are not drift)
PICKUP_MAINS_TOL = 0.05
#: frames between two measurements of the reference's lattice vectors (``_unwarped_reference``)
VECTORS_EVERY = 16
#: frames after a jump whose corrections carry no path (a single shift, as without paths): a
#: path over a frame the jump's re-lock has not finished held the image a lattice vector off
#: (SrTiO3, a 0.9 nm jump: 880 pm off for good with paths, back within 2 frames without)
RELOCK_FRAMES = 2
#: share (y, x) of the model's mains line in the reference's de-skew (:func:`drift_without_mains`)
DESKEW_MAINS_KEEP = (0.0, 1.0)


def drift_without_mains(gp, t_s: np.ndarray, *, keep: tuple[float, float] = (0.0, 0.0)) -> tuple[np.ndarray, np.ndarray]:
    """The drift model's (``OnlineDriftGP``) drift (n, 2) nm and its sd at times ``t_s`` (s),
    averaged over one period of its mains frequency (the mains line and its harmonics left out);
    ``keep``: the share (y, x) of the model's mains line kept on each axis.

    The de-skew (``ColumnModel._deskewed``) takes out of the tracker's reference the drift
    during the frame; the mains line is the locator's and the GP's to model, line by line. Put
    into the reference, the model's own mains line comes back in the next frames' samples from
    the sites seen in few frames (a drifting field brings new ones every frame) and feeds
    itself: a 50 Hz line in y that grew to 70 pm in 20 frames of a stream that had none.
    ``DESKEW_MAINS_KEEP`` keeps it along x, the fast axis, where every line's columns pin it
    (no such growth seen) and where taking it out of the reference is what lets the model see a
    line locked to the frames (``tests/test_row_warp.py``: 0.8 pm kept, 15 pm left out)."""
    t_s = np.asarray(t_s, np.float64)
    mean, sd = gp.predict(t_s)
    hz = gp.mains_hz
    if not hz or not len(t_s):
        return mean, sd
    step = 1.0 / (8.0 * hz)
    grid = np.arange(t_s.min() - 4.0 * step, t_s.max() + 5.0 * step, step)
    g, _ = gp.predict(grid)
    box = np.r_[0.5, np.ones(7), 0.5] / 8.0   # one period, centred
    smooth = np.stack([np.convolve(g[:, q], box, mode="same") for q in range(2)], axis=1)
    smooth = np.stack([np.interp(t_s, grid, smooth[:, q]) for q in range(2)], axis=1)
    return smooth + np.asarray(keep, np.float64)[None, :] * (mean - smooth), sd


def line_drift(gp, line_times_s: np.ndarray, smear_s: float) -> tuple[np.ndarray, np.ndarray]:
    """The drift model's (``OnlineDriftGP``) drift (rows, 2) nm and its sd at every line's
    time (s) of a frame whose columns average over ``smear_s`` (s, rms) of scan time.

    Every line, not a coarser grid: that would alias the 50 Hz term (a period of ~20 lines);
    the mean is O(1) a point in state-space form. Where the samples hide the mains line
    (``gp.follows_mains`` false: slow lines, a column spans much of a mains period), the model's
    quasi-periodic term only soaks up what the columns leave of the line (it stays in the fit:
    without it the other terms take that variance, and a stream of 2-line mains periods lost
    its lock) and follows their noise at the mains frequency on both axes; the lines then get
    the model averaged over a mains period (``drift_without_mains``), and the locator's
    line-by-line pick-up gives the line along x (``ColumnModel._with_pickup``)."""
    if gp.mains_on and not gp.follows_mains(smear_s):
        return drift_without_mains(gp, line_times_s)
    return gp.predict(line_times_s)


@dataclass(frozen=True)
class ColumnResult:
    columns: object
    line_drift_nm: np.ndarray | None
    line_sigma_nm: np.ndarray | None
    decision: object | None
    jump: bool
    flagged: str = ""   # the quality gate's reason where the columns are not credible


class ColumnModel:
    """Locate -> track -> drift samples -> online GP -> correction decision, for one stream."""

    def __init__(self, config) -> None:   # the engine's EngineConfig
        from stem_live.distortion import CorrectionPolicy, OnlineDriftGP
        from stem_live.distortion.hyperfit import HyperLearner
        from stem_live.track import Tracker

        self.config = config
        self.spacing_px = config.spacing_px or None
        self.tracker = Tracker(spacing_px=self.spacing_px, history=64)
        # padded GP sizes from 512 sample groups up to a cap the first frame sets from its lines
        # (``OnlineDriftGP.size_for_frames``; ``Engine.warm_up`` compiles them all ahead)
        # (mains: a set frequency, or 50 Hz until the stream says 60 or none; 0: no periodic term)
        mains = 50.0 if config.mains_hz is None else (float(config.mains_hz) or None)
        self.gp = OnlineDriftGP(window_frames=config.gp_window_frames, min_groups=512, max_groups=512,
                                mains_hz=mains)
        self.calibration = None
        if config.calibration:  # drift velocity as the GP's prior mean, scan scale/shear taken out of the samples
            from stem_live.calibration import load_cached

            self.calibration = load_cached(config.calibration)
            hyper = self.calibration.meta.get("hyperparameters") or {}
            if hyper:  # the calibration's fitted values: the warm start of the online fit
                self.gp.set_hyperparameters(**{k: v for k, v in hyper.items() if k in self.gp.learnt_hyperparameters()})
            self.gp = self.calibration.wrap_gp(self.gp)
        self.learner = None
        if config.learn_hyperparameters:
            self.learner = HyperLearner(self.gp, every_frames=config.hyperfit_every,
                                        mains="auto" if config.mains_hz is None else config.mains_hz,
                                        background=config.hyperfit_background)
        self.policy = CorrectionPolicy(gain=config.gain, deadband_nm=config.deadband_nm,
                                       max_sigma_nm=config.max_sigma_nm)
        self.deskew_min_frames = 2  # GP frames needed before the tracker gets de-skewed positions
        # the probe width (column Gaussian sigma, px) is measured on the first frame and again
        # every `probe_refresh_frames`; in between the fit takes it as known (one free fit of the
        # brightest columns less per frame, and no frame-to-frame jitter of the width)
        self.probe_refresh_frames = 32
        self.quality_every = 10   # frames between quality-gate checks of a steady stream
        self.hyperfit_ms = 0.0    # the last frame's inline hyperparameter fit (ms; 0 when none ran)
        self._probe_sigma_px: float | None = None
        self._located = 0
        self.lattice = None  # LatticePrior, made once the spacing is known (config.lattice_prior)
        self._flyback_warned: set[tuple[float, float]] = set()
        self._scan_key: tuple[float, float] | None = None  # (pixel size nm, dwell us) of the measured flyback
        self._contrast: tuple[str, str] | None = None   # (detector, "bright" | "dark") decided for the stream
        self.period_s = 0.0   # this frame's start to the next one's (s; set by the engine each frame)
        self._first: tuple | None = None        # (frame, positions px, track ids) of the first tracked frame
        self._boot_v_px: np.ndarray | None = None  # velocity (px/s) from the first two frames' step
        self._boot_done = False
        self._vectors: np.ndarray | None = None   # the reference's lattice vectors (px), for row_warp
        self.reference_px: np.ndarray | None = None   # the reference the last frame was linked to (row warp out)

    def process(self, frame: Frame, image: np.ndarray, hint_px: np.ndarray, timings: dict) -> ColumnResult:
        from dataclasses import replace as dc_replace

        from stem_live.locate import estimate_spacing, locate_classical

        t0 = time.perf_counter()
        img = self.bright(np.asarray(image, dtype=np.float32), frame.detector)
        if self.spacing_px is None:
            try:
                self.spacing_px = float(estimate_spacing(img))
            except ValueError as exc:   # no lattice (yet): a flagged frame; the next one tries again
                timings.update(locate=(time.perf_counter() - t0) * 1e3)
                return ColumnResult(None, None, None, None, False, flagged=str(exc))
            self.tracker.spacing_px = self.spacing_px
        if self.config.lattice_prior and self.lattice is None:
            from stem_live.lattice_prior import LatticePrior

            # without a calibration the lattice measures the flyback where the frames drift
            self.lattice = LatticePrior(self.spacing_px, fit_flyback=self.calibration is None)
        known = self._probe_sigma_px if self._located % self.probe_refresh_frames else None
        # the flyback (a calibration's, or the lattice's measurement): the columns cut by the
        # left edge are fitted on the distorted scan
        flyback = self.flyback_px(frame)
        if self._located == 0:   # the GP's largest padded size from the frame's lines
            self.gp.size_for_frames(img.shape[0], frame.line_time_s)
        cols = locate_classical(img, self.spacing_px, probe_sigma_px=known, flyback_px=flyback, prior=self.lattice)
        if self.lattice is not None:
            self.lattice.update(cols)
            if flyback is None and self.lattice.flyback_px is not None:
                amp, decay = self.lattice.flyback_px
                log.info("flyback measured from the frames: %.3g px decaying over %.3g px (%.3g pm, %.3g us); "
                         "the left-edge columns are fitted on it from the next frame", amp, decay,
                         amp * frame.pixel_size_nm[1] * 1e3, decay * frame.dwell_us)
        self._located += 1
        self._probe_sigma_px = cols.meta.get("probe_sigma_px", known)
        reason = self._quality(img, cols)
        if reason:
            timings.update(locate=(time.perf_counter() - t0) * 1e3)
            return ColumnResult(cols, None, None, None, False, flagged=reason)
        t1 = time.perf_counter()
        # the tracker and the drift model take the line-averaged positions: the random part of
        # each scan line's offset, which the de-jitter puts back, is noise to a drift model
        # (with them the replay test's correction error grew from 4.1 to 6.2 pm)
        pickup = self._pickup_model(cols, frame)
        smooth = dc_replace(cols, positions=self._without_pickup(cols.line_averaged(), pickup))
        if self._first is not None and self._boot_v_px is None:
            self._bootstrap(frame, hint_px)
        ids = self.tracker.update(self._deskewed(frame, smooth), shift_hint=tuple(self._mid_frame_shift(frame, hint_px)))
        matched = self._matched(ids)
        if self._first is None:
            self._first = (frame, smooth.positions, ids)
        elif self._boot_v_px is not None and not self._boot_done:
            self._restart_gp_on_first()
        t2 = time.perf_counter()
        ref = self._unwarped_reference(frame)
        line_mean, line_sd, decision, jump = self.gp_stage(frame, ref, smooth.positions, matched, pickup=pickup)
        self.reference_px = ref
        t3 = time.perf_counter()
        # the gp stage without an inline hyperparameter fit (timed on its own, where one ran)
        timings.update(locate=(t1 - t0) * 1e3, track=(t2 - t1) * 1e3, gp=(t3 - t2) * 1e3 - self.hyperfit_ms)
        if self.hyperfit_ms > 1.0:
            timings["hyperfit"] = self.hyperfit_ms
        return ColumnResult(cols, line_mean, line_sd, decision, jump)

    def bright(self, img: np.ndarray, detector: str) -> np.ndarray:
        """``img`` (float32) with bright columns: dark ones (ABF/BF) are mirrored, the contrast
        decided once per detector (``config.contrast``)."""
        if self.config.contrast == "bright":
            return img
        from stem_live.locate.contrast import as_bright, frame_contrast

        if self._contrast is None or self._contrast[0] != detector:
            kind, why = frame_contrast(img, self.config.contrast, detector)
            self._contrast = (detector, kind)
            log.info("contrast: %s", why)
        return as_bright(img, self._contrast[1])

    @property
    def probe_sigma_px(self) -> float | None:
        """The column width (Gaussian sigma, px) the locator measured last, or None."""
        s = self._probe_sigma_px
        return float(s) if s and np.isfinite(s) else None

    def flyback_px(self, scan) -> tuple[float, float] | None:
        """The flyback (amplitude, decay; px) the locator takes for a frame or strip's scan: the
        calibration's, or the lattice's measurement."""
        return self._flyback(scan) if self.calibration is not None else self._measured_flyback(scan)

    def _matched(self, ids: np.ndarray) -> np.ndarray:
        """Index into ``tracker.reference`` of every track id (-1: not a reference site)."""
        ref_ids = self.tracker.reference_ids
        order = np.argsort(ref_ids)
        pos = np.clip(np.searchsorted(ref_ids[order], ids), 0, max(len(ref_ids) - 1, 0))
        return np.where(ref_ids[order][pos] == ids, order[pos], -1) if len(ref_ids) else np.full(len(ids), -1)

    def _bootstrap(self, frame: Frame, hint_px: np.ndarray) -> None:
        """On the second tracked frame: the drift velocity from the step since the first
        (``hint_px``: apparent shift vs the first frame, px), and the first frame's skew (the
        drift during its scan, ``v * (t - t_mid)``) taken out of the tracker's reference.

        A feature seen at row y0 in the first frame and y0 + dy in this one was scanned
        ``t_start1 - t_start0 + dy * line_time + dx * dwell`` apart: the velocity is the step
        over that time, not over the frame period (at 20 nm/min over a 9 s frame the two
        differ by 5 %). Without this the reference keeps the first frame's skew, and the
        drift within every later frame reads as flat (its velocity only from frame to frame)."""
        f0 = self._first[0]
        px = np.asarray(frame.pixel_size_nm, dtype=np.float64)
        h = np.asarray(hint_px, dtype=np.float64)
        dt = (frame.t_start - f0.t_start) + h[0] * frame.line_time_s + h[1] * frame.dwell_us * 1e-6
        if not (dt > 0 and np.all(np.isfinite(h))):
            self._boot_v_px = np.zeros(2)
            return
        # the specimen's drift is the apparent step plus the beam shift added since
        step_nm = h * px + (np.asarray(frame.beam_shift_nm, float) - np.asarray(f0.beam_shift_nm, float))
        self._boot_v_px = step_nm / px / dt
        ref = self.tracker.reference
        t_ref = f0.t_start + ref[:, 0] * f0.line_time_s + ref[:, 1] * f0.dwell_us * 1e-6
        self.tracker.move_reference(-self._boot_v_px[None, :] * (t_ref - (f0.t_start + 0.5 * f0.frame_time_s))[:, None])

    def _velocity_px(self, frame: Frame) -> np.ndarray | None:
        """The drift velocity (px/s) the de-skew uses for this frame: the GP's at mid-frame, or
        the first two frames' step while the GP holds too few frames; None before either."""
        if len(self.gp.frames) < self.deskew_min_frames:
            return self._boot_v_px
        t_mid = frame.t_start + 0.5 * frame.frame_time_s
        h = 0.05 * frame.frame_time_s
        mean, _ = self.gp.predict(np.array([t_mid - h, t_mid + h]))
        v = (mean[1] - mean[0]) / (2 * h) / np.asarray(frame.pixel_size_nm, dtype=np.float64)
        return v if np.all(np.isfinite(v)) else None

    def _mid_frame_shift(self, frame: Frame, hint_px: np.ndarray) -> np.ndarray:
        """The registration's shift (``hint_px``: a feature's displacement since the first
        frame, px) as the shift between the de-skewed frames the tracker links (both moved to
        their mid-frame times): a feature that moved by dy rows was scanned ``dy * line_time``
        later in its frame, so the two differ by the drift over that time."""
        h = np.asarray(hint_px, dtype=np.float64)
        v = self._velocity_px(frame)
        if v is None:
            return h
        return h - v * (h[0] * frame.line_time_s + h[1] * frame.dwell_us * 1e-6)

    def _smear_s(self, frame: Frame) -> float:
        return self.smear_s(frame.line_time_s)

    def smear_s(self, line_time_s: float) -> float:
        """RMS spread (s) of the scan times a fitted column position averages over: the
        position information of a Gaussian column of width sigma (px) comes from its lines
        with weights ~ exp(-y^2 / sigma^2), a spread of sigma / sqrt 2 lines."""
        sigma = self.probe_sigma_px
        return 0.0 if sigma is None else sigma / np.sqrt(2.0) * float(line_time_s)

    def _restart_gp_on_first(self) -> None:
        """The GP conditioned again on the first frame's samples, now against the de-skewed reference."""
        from stem_live.distortion import observations_from_columns

        f0, pos0, ids0 = self._first
        obs = observations_from_columns(self.tracker.reference, pos0, self._matched(ids0), t_start=f0.t_start,
                                        line_time_s=f0.line_time_s, dwell_s=f0.dwell_us * 1e-6,
                                        pixel_size_nm=f0.pixel_size_nm, beam_shift_nm=f0.beam_shift_nm,
                                        frame=f0.seq, smear_s=self._smear_s(f0))
        if self.calibration is not None:
            obs = self.calibration.correct_observations(obs, f0.beam_shift_nm)
        self.gp.reset()
        self.gp.add(obs)
        self._boot_done = True

    def _quality(self, img: np.ndarray, cols) -> str:
        """The quality gate's reason where this frame's columns are not credible, else "". The
        gate (10-40 ms) runs on the first frames, every ``quality_every`` frames, and whenever
        far fewer columns are found than the tracker's reference holds."""
        from stem_live.locate.quality import credible

        n_ref = len(self.tracker.reference_ids)
        due = self._located <= 3 or self._located % self.quality_every == 0 or len(cols) < 0.5 * n_ref
        if not due:
            return ""
        ok, reason = credible(cols, img, spacing_px=self.spacing_px)
        return "" if ok else reason

    def _measured_flyback(self, frame: Frame) -> tuple[float, float] | None:
        """The lattice's flyback measurement (px), valid while the pixel size and dwell stay the
        ones it was measured at (a change starts a new measurement)."""
        if self.lattice is None:
            return None
        key = (float(frame.pixel_size_nm[1]), float(frame.dwell_us))
        if key != self._scan_key:
            if self._scan_key is not None:
                self.lattice.forget_flyback()
            self._scan_key = key
        return self.lattice.flyback_px

    def _flyback(self, frame: Frame) -> tuple[float, float] | None:
        """The calibration's flyback in this frame's pixels; where a flyback was measured but
        cannot be used here (the frame carries no dwell time, or the pixel size and dwell make
        it non-monotone), one warning per (pixel size, dwell): the left edge is then fitted as
        a regular scan."""
        cal = self.calibration
        px, dwell = float(frame.pixel_size_nm[1]), float(frame.dwell_us)
        fb = cal.flyback_px(px, dwell)
        key = (px, dwell)
        if fb is None and cal.flyback_measured(px) and key not in self._flyback_warned:
            self._flyback_warned.add(key)
            log.warning("calibration flyback (%.4g nm, %.4g us) not usable with %.4g nm pixels and %.4g us dwell: "
                        "the left-edge columns are fitted as a regular scan; check the frames' dwell time or "
                        "recalibrate at this scan setting", cal.flyback_amp_nm, cal.flyback_tau_us, px, dwell)
        return fb

    def gp_stage(self, frame: Frame, ref_px: np.ndarray, positions_px: np.ndarray, matched: np.ndarray,
                 pickup: tuple[float, ...] | None = None) -> tuple:
        """Drift samples in, correction decision out (the ``gp`` stage of the timings):
        observations of the tracked columns, jump check + GP update, the model at every
        line, the policy's decision. ``pickup``: the locator's periodic line pick-up, added to
        the model's lines (:meth:`_with_pickup`). Returns (line_mean (rows, 2),
        line_sd, decision, jump)."""
        from stem_live.distortion import observations_from_columns

        beam = frame.beam_shift_nm if frame.beam_shift_lines_nm is None else frame.beam_shift_lines_nm
        obs = observations_from_columns(ref_px, positions_px, matched, t_start=frame.t_start,
                                        line_time_s=frame.line_time_s, dwell_s=frame.dwell_us * 1e-6,
                                        pixel_size_nm=frame.pixel_size_nm, beam_shift_nm=beam,
                                        frame=frame.seq, smear_s=self._smear_s(frame))
        if self.calibration is not None:
            obs = self.calibration.correct_observations(obs, frame.beam_shift_nm)
        # the frame is checked for a jump against the model from before it: its strips' samples
        # (strip_loop) out first, else a jump they saw would read as expected
        self.gp.drop_partial(frame.seq)
        jump = self.policy.observe(self.gp, obs)
        self.hyperfit_ms = 0.0
        if self.learner is not None:
            t0 = time.perf_counter()
            self.learner.after_frame()   # live: starts a background fit when one is due; never waits
            self.hyperfit_ms = (time.perf_counter() - t0) * 1e3   # an inline fit (replay, evaluate)
        line_mean, line_sd = line_drift(self.gp, frame.line_times(), self._smear_s(frame))
        line_mean = self._with_pickup(frame, line_mean, pickup)
        decision = self.policy.correction(self.gp, frame.t_start + self.period_s, frame.frame_time_s,
                                          frame.beam_shift_nm)
        if self.config.trajectory and decision.apply and not self.relocking(frame.seq):
            decision = replace(decision, path=self._path(frame, decision))
        return line_mean, line_sd, decision, jump

    def relocking(self, seq: int) -> bool:
        """Whether frame ``seq`` is within ``RELOCK_FRAMES`` of a jump the policy found (no paths then)."""
        last = max((j[0] for j in self.policy.jumps), default=None)
        return last is not None and 0 <= int(seq) - last <= RELOCK_FRAMES

    def _path(self, frame: Frame, decision) -> tuple[np.ndarray, np.ndarray]:
        """The beam shift over the next frame (t_s (K,), nm (K, 2)): the model's drift there as
        the lines get it (``line_drift``) with the policy's gain, moved so that its mean over the
        frame is the decision's single shift (an instrument that cannot follow the path applies
        that one). A knot every ``trajectory_lines`` lines, or every eighth of a mains period
        where the model follows the mains line (linear between knots 8 lines apart, a 19-line
        period would lose a third of its amplitude), at most ``protocol.MAX_KNOTS``."""
        from stem_live.protocol import MAX_KNOTS

        rows = frame.image.shape[0]
        step = max(1, int(self.config.trajectory_lines))
        smear = self._smear_s(frame)
        if self.gp.mains_on and self.gp.follows_mains(smear):
            step = min(step, max(1, int(1.0 / (8.0 * self.gp.mains_hz * frame.line_time_s))))
        step = max(step, int(np.ceil(rows / (MAX_KNOTS - 1))))
        lines = np.unique(np.r_[np.arange(0, rows, step), rows - 1])
        t_all = frame.t_start + self.period_s + np.arange(rows) * frame.line_time_s
        every, _ = line_drift(self.gp, t_all, smear)   # every line: the knots are some of them
        path = self.policy.gain * (every[lines] - every.mean(axis=0)) + np.asarray(decision.beam_shift_nm)[None, :]
        return t_all[lines], path

    def _unwarped_reference(self, frame: Frame) -> np.ndarray:
        """The tracker's reference less its warp along the rows (``row_warp``: what repeats from
        frame to frame as a function of the row), where the sites show a lattice."""
        from stem_live.locate.spacing import lattice_vectors
        from stem_live.row_warp import row_warp

        ref = self.tracker.reference
        spacing = self.tracker.spacing_px
        if not spacing or len(ref) < 8:
            return ref
        # they change while the first frames settle the reference (its de-skew), then hardly: once in a while
        if self._vectors is None or self._located <= 4 or self._located % VECTORS_EVERY == 0:
            self._vectors = lattice_vectors(ref, spacing)
        warp = row_warp(ref, spacing, frame.image.shape[0], vectors=self._vectors)
        return ref if warp is None else ref - np.nan_to_num(warp)

    def _pickup_model(self, cols, frame: Frame) -> tuple[float, ...] | None:
        """The locator's periodic line pick-up (``linejitter.LineShifts.pickup_model``) where it
        is the mains line (within ``PICKUP_MAINS_TOL`` of 50 or 60 Hz: other periodic line
        shifts are left to the GP's noise) and the GP does not follow that line itself (slow
        lines, where the columns' samples average it away, or before the GP has found the
        grid's frequency); None otherwise. Where the GP follows it, its sinusoid, phase-continuous
        over its window, is the better estimate than one frame's fit. A mains pick-up also votes
        for its frequency (``HyperLearner.line_pickup_vote``)."""
        model = cols.meta.get("line_pickup_model")
        if model is None or len(model) != 7 or not np.all(np.isfinite(model)) or not model[0]:
            return None
        hz = abs(model[0]) / (2.0 * np.pi * frame.line_time_s)
        mains = [f for f in (50.0, 60.0) if abs(hz / f - 1.0) <= PICKUP_MAINS_TOL]
        if not mains:
            return None
        if self.learner is not None:
            self.learner.line_pickup_vote(mains[0])
        gp = self.gp
        if gp.mains_on and abs(gp.mains_hz - mains[0]) < 1.0 and gp.follows_mains(self._smear_s(frame)):
            return None
        return tuple(float(v) for v in model)

    def _without_pickup(self, positions: np.ndarray, model: tuple[float, ...] | None) -> np.ndarray:
        """Line-averaged positions (px) less the share of the pick-up their fit averaged in: a
        column spans ``sigma / sqrt 2`` lines (rms), so a pick-up of ``w`` rad per line reaches
        its fitted x attenuated by ``exp(-(w spread)^2 / 2)``."""
        if model is None or not len(positions):
            return positions
        from stem_live.locate.linejitter import pickup_shift

        sigma = self._probe_sigma_px if self._probe_sigma_px and np.isfinite(self._probe_sigma_px) else 0.0
        att = float(np.exp(-0.5 * (model[0] * sigma / np.sqrt(2.0)) ** 2))
        out = np.array(positions, dtype=np.float64, copy=True)
        out[:, 1] -= att * pickup_shift(model, out[:, 0], out[:, 1])
        return out

    def _with_pickup(self, frame: Frame, line_mean: np.ndarray, model: tuple[float, ...] | None) -> np.ndarray:
        """The per-line drift with the lines' periodic pick-up (mains) along x, as the locator
        measured it line by line (``linejitter``) at each line's first pixel. The columns' drift
        samples carry it attenuated (all of it on slow lines, where a column spans several
        periods), so they go to the GP without it (``_without_pickup``) and it is added here;
        the frame-mean correction is unchanged by it."""
        if model is None:
            return line_mean
        from stem_live.locate.linejitter import pickup_shift

        out = np.array(line_mean, dtype=np.float64, copy=True)
        out[:, 1] += pickup_shift(model, np.arange(len(out)), 0.0) * float(frame.pixel_size_nm[1])
        return out

    def _deskewed(self, frame: Frame, cols):
        """The columns as if the whole frame had been scanned at its middle (px).

        Each column is moved back by the modelled drift between the time it was scanned and
        mid-frame (less the beam's own move, where the frame was scanned under a path). Without this the tracker's reference lattice would carry the drift of the
        frames it was built from as a function of the row (``v * line_time * row``); once the
        field has moved by some rows that skew reads as a spurious drift offset (about
        ``v * line_time`` per row moved)."""
        from dataclasses import replace as dc_replace

        if not len(cols) or (len(self.gp.frames) < self.deskew_min_frames and self._boot_v_px is None):
            return cols
        pos = np.asarray(cols.positions, dtype=np.float64)
        t_col = frame.t_start + pos[:, 0] * frame.line_time_s + pos[:, 1] * frame.dwell_us * 1e-6
        t_mid = frame.t_start + 0.5 * frame.frame_time_s
        if len(self.gp.frames) < self.deskew_min_frames:   # the velocity of the first two frames' step
            return dc_replace(cols, positions=pos - self._boot_v_px[None, :] * (t_col - t_mid)[:, None])
        mean, sd = drift_without_mains(self.gp, np.append(t_col, t_mid), keep=DESKEW_MAINS_KEEP)
        px = np.asarray(frame.pixel_size_nm, dtype=np.float64)
        move = mean[:-1] - mean[-1]
        if frame.beam_shift_lines_nm is not None:   # a path moved the beam within the frame: the image
            b = np.asarray(frame.beam_shift_lines_nm, np.float64)   # moved by the drift less the beam's move
            rows = np.arange(len(b))
            at = np.stack([np.interp(np.append(pos[:, 0], 0.5 * len(b)), rows, b[:, q]) for q in range(2)], axis=1)
            move = move - (at[:-1] - at[-1])
        dev = move / px
        # a fast drift over a slow scan moves the columns by several spacings within one frame: the
        # size of the skew is no reason to distrust it, the model's uncertainty is
        if not np.all(np.isfinite(dev)) or np.max(np.asarray(sd) / px) > 0.25 * (self.spacing_px or np.inf):
            return cols  # the model is not trustworthy here: link the raw positions
        return dc_replace(cols, positions=pos - dev)
