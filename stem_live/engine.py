"""Per-frame pipeline and its state: pure compute, no sockets.

Two drift models (``EngineConfig.model``):

- ``"rigid"``: one shift per frame from image registration, a straight-line prediction;
- ``"gp"``: the columns of every frame are located and tracked to a reference lattice; each
  tracked column is one drift sample at the time it was scanned; an online GP
  (:mod:`stem_live.distortion`) models drift and scan distortion and predicts the next frame.
  Until the GP is confident, the rigid prediction is used.

In both, for every frame the engine measures the rigid shift of the image against a reference frame
(band-passed cross-correlation, :mod:`stem_live.register`), turns it into the specimen drift by adding the
beam shift that was in effect (``D = apparent shift + (b - b_ref)``; DESIGN.md: a column at
specimen position p appears at ``p + d(t) - b(t)``), predicts the drift at the middle of the
next frame from a straight line through the recent estimates, and, when armed, returns the
beam-shift target ``b_ref + D_pred`` that keeps the image still.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from stem_live.protocol import Correction, Frame
from stem_live.register import Reference, make_reference, register

log = logging.getLogger("stem_live.engine")

#: the smallest frame side (px) the engine processes: below it no registration means anything
MIN_FRAME_SIDE = 32


class FrameRefused(ValueError):
    """A frame that cannot be what it claims (see :func:`frame_problem`); never processed."""


def frame_problem(image: np.ndarray, *, min_side: int = MIN_FRAME_SIDE) -> str | None:
    """Why ``image`` cannot be a STEM frame, in a few words, or None: not 2-D (e.g. colour
    channels), a side below ``min_side`` px, non-finite pixels, or every pixel the same."""
    a = np.asarray(image)
    if a.ndim != 2:
        return f"not a 2-D image (shape {a.shape})"
    if min(a.shape) < min_side:
        return f"{a.shape[0]}x{a.shape[1]} px, smaller than {min_side} px a side"
    if a.dtype.kind not in "uif":
        return f"pixels of dtype {a.dtype.name}"
    if a.dtype.kind == "f" and not np.isfinite(a).all():
        return "holds NaN or infinite pixels"
    lo, hi = a.min(), a.max()
    if lo == hi:
        return f"constant (every pixel {lo:g}): detector off or beam blanked?"
    return None


@dataclass(frozen=True)
class EngineConfig:
    """Engine parameters. ``gain``: fraction of the predicted drift corrected each frame;
    ``history``: frames used for the velocity fit; ``deadband_nm``: corrections smaller than
    this are not sent; ``rereference_frac``: re-reference when the shift exceeds this fraction
    of the field; ``min_peak``: correlation peaks below this are treated as lost lock."""

    gain: float = 1.0
    history: int = 4
    deadband_nm: float = 0.002
    rereference_frac: float = 0.2
    min_peak: float = 0.02
    model: str = "rigid"
    spacing_px: float = 0.0  # nearest-neighbour column spacing for the gp model; 0 = estimate on the first frame
    gp_window_frames: int = 20
    max_sigma_nm: float = 0.05
    rvae_checkpoint: str = ""  # rVAE checkpoint encoding every column (gp model); "" = none until `train`
    calibration: str = ""  # `stem-live calibrate` JSON (gp model): known drift velocity and scan distortion
    # gp model: register only a centred crop of at most this many px a side (the tracker measures
    # the shift from the columns; registration only hints it and checks the lock): 4x less
    # work at 1024 px. 0: the whole frame (the rigid model always registers the whole frame)
    register_crop_px: int = 512
    # gp model: locate every frame with the lattice of the frames before as the prior
    # (``lattice_prior.LatticePrior``): the columns sent on (monitor, exports, rVAE patches) are
    # the combined positions; the tracker and the drift model take ``Columns.line_averaged()``:
    # the fits' own line-averaged x, the combined y (its drift is this frame's: the prior's row
    # offsets are fitted to this frame's columns). 30 frames, evaluate --model gp:
    # drift.rmse_pm 2.16 -> 2.08 (graphene), 2.39 -> 2.12 (SrTiO3)
    lattice_prior: bool = True
    # gp model: mains frequency of the drift model's periodic term (Hz): None = detected from
    # the stream (50, 60 or none), 0 = none, else that frequency
    mains_hz: float | None = None
    # gp model: learn the drift GP's hyperparameters from the stream (background fit every
    # `hyperfit_every` frames, bounded; ``Engine.drift_hyperparameters()``); False keeps the
    # defaults (or a calibration's values)
    learn_hyperparameters: bool = True
    hyperfit_every: int = 8
    # False: the fit runs inside the frame that makes it due (replay, evaluate: reproducible
    # results); True: in a background thread (live: no frame waits for it)
    hyperfit_background: bool = True


@dataclass(frozen=True)
class FrameResult:
    """What the engine learnt from one frame. Units nm and s; pairs are (y, x)."""

    seq: int
    t_mid: float
    shift_px: np.ndarray  # apparent shift of the image vs the reference frame
    drift_nm: np.ndarray  # specimen drift d(t_mid) - d(t_ref)
    peak: float
    locked: bool
    correction: Correction | None
    timings_ms: dict[str, float] = field(default_factory=dict)
    columns: object | None = None  # Columns found in this frame (gp model)
    line_drift_nm: np.ndarray | None = None  # (rows, 2) modelled beam-shift-space drift at each line (gp model)
    line_sigma_nm: np.ndarray | None = None
    jump: bool = False
    latents: dict | None = None  # rVAE latents of every column, index-matched to ``columns`` (gp model + rVAE)
    # the registration found no significant match (peak below ``min_peak``): no drift sample,
    # no columns, no correction; ``drift_nm`` is the last measured drift
    lost: bool = False
    # gp model: the frame failed the columns' quality gate (noise, vacuum, blank, contamination):
    # the reason; no drift sample and no correction from it
    flagged: str = ""


class Engine:
    """Stateful per-frame pipeline. Not thread-safe: one caller at a time (the service locks).

    ``rvae``: an :class:`~stem_live.rvae.stage.RvaeStage` that encodes the columns of every
    frame (gp model only); without one, ``config.rvae_checkpoint`` names a checkpoint to load,
    and ``train()`` builds a stage from scratch. The stage survives ``reset``."""

    def __init__(self, config: EngineConfig = EngineConfig(), *, rvae: object | None = None) -> None:
        self.config = config
        self.armed = False
        self._next_id = int(time.time() * 1000) % (1 << 40)  # distinct across restarts
        if rvae is None and config.rvae_checkpoint:
            if config.model != "gp":
                raise ValueError("an rVAE checkpoint needs columns: use the gp model (--model gp)")
            from stem_live.rvae.stage import RvaeStage

            rvae = RvaeStage(config.rvae_checkpoint)
        elif rvae is not None and config.model != "gp":
            raise ValueError("the rVAE stage needs columns: use the gp model (--model gp)")
        if config.calibration and config.model != "gp":
            raise ValueError("a calibration is used by the gp model: add --model gp")
        self.rvae = rvae
        self._rvae_building = False
        self.reset()

    def reset(self) -> None:
        """Forget the reference and the drift history (the next frame becomes the reference)."""
        self._ref: Reference | None = None
        self._ref_offset_nm = np.zeros(2)  # drift already accumulated when the current reference was taken
        self._ref_beam_nm = np.zeros(2)  # beam shift during the current reference frame
        self._b0_nm: np.ndarray | None = None  # beam shift during the very first frame
        self._hist: deque[tuple[float, np.ndarray]] = deque(maxlen=max(2, self.config.history))
        self.frames = 0
        self.last: FrameResult | None = None
        self._columns = None if self.config.model != "gp" else ColumnModel(self.config)

    def warm_up(self, frames: Sequence[Frame]) -> float:
        """Compile what a stream's first frames need (the gp model's locator and fit sizes for
        the frame size, the GP's predictions) by processing ``frames`` (a few frames like the
        stream's, e.g. simulated ones of its size), disarmed, then forget them (``reset``; the
        compiled functions stay). Without it the first frame of a ``--model gp`` stream takes
        ~10 s: the frames meanwhile are skipped, and the policy takes the drift accumulated by
        then for a jump and holds the image there for a few frames (138 pm off, back to ~15 pm
        five frames later, at 512 px). Returns the seconds it took."""
        t0 = time.perf_counter()
        armed, self.armed = self.armed, False
        try:
            for frame in frames:
                self.process(frame, encode=False)
        finally:
            self.armed = armed
            if self._columns is not None and self._columns.learner is not None:
                self._columns.learner.compile()   # the background fit's compilation, here, not live
            self.reset()
        return time.perf_counter() - t0

    @property
    def start_beam_nm(self) -> np.ndarray | None:
        """Beam shift (nm) during the very first frame (the GP model's beam-shift-space origin)."""
        return None if self._b0_nm is None else self._b0_nm.copy()

    @property
    def drift_model(self):
        """The gp model's online GP as of the last frame (``predict``: beam-shift-space drift, nm;
        ``distortion``: scan distortion, nm); None for the rigid model."""
        return None if self._columns is None else self._columns.gp

    def drift_hyperparameters(self) -> dict | None:
        """The gp model's drift hyperparameters as learnt so far (JSON-able: ``values`` in the
        units of their names, ``mains_hz`` in use, fit counts); None for the rigid model."""
        if self._columns is None:
            return None
        learner = self._columns.learner
        if learner is not None:
            return learner.summary()
        gp = self._columns.gp
        return {"values": gp.learnt_hyperparameters(), "mains_hz": gp.mains_hz if gp.mains_on else None,
                "mains_mode": "set", "fits": 0, "accepted": 0, "running": False}

    def train(self, steps: int | None = None) -> str:
        """Start background rVAE fine-tuning (never waits for it); a one-line message.

        Without a stage, one is built from scratch in a background thread and trains as soon as
        enough patches are buffered. ValueError when the engine finds no columns (rigid model)."""
        if self._columns is None:
            raise ValueError("rVAE training needs located columns; start the engine with --model gp")
        stage = self.rvae
        if stage is not None:
            return stage.train(steps)
        if self._rvae_building:
            return "rVAE model from scratch is still being built; training starts when it is ready"
        self._rvae_building = True

        def build() -> None:
            from stem_live.rvae.stage import RvaeStage

            try:
                new = RvaeStage(None, seed=0)
                new.train(steps)
                self.rvae = new  # one reference assignment: the frame loop sees the stage whole or not at all
            finally:
                self._rvae_building = False

        threading.Thread(target=build, name="rvae-build", daemon=True).start()
        return ("no rVAE checkpoint: building a model from scratch (seed 0) in the background; training "
                "starts once enough patches are buffered, latents appear after the first fine-tune")

    def next_correction_id(self) -> int:
        self._next_id += 1
        return self._next_id

    def arm(self) -> None:
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    def set(self, **params: float) -> None:
        """Change engine parameters by name (``gain``, ``history``, ``deadband_nm``, ...)."""
        cur = self.config.__dict__.copy()
        unknown = set(params) - set(cur)
        if unknown:
            raise ValueError(f"unknown parameter(s) {', '.join(sorted(unknown))}; known: {', '.join(cur)}")
        cur.update({k: v if v is None else (float if cur[k] is None else type(cur[k]))(v)
                    for k, v in params.items()})
        self.config = EngineConfig(**cur)
        self._hist = deque(self._hist, maxlen=max(2, self.config.history))

    def predict_drift(self, t: float) -> np.ndarray | None:
        """Drift (nm) predicted at time ``t`` from a straight-line fit of the recent estimates."""
        if not self._hist:
            return None
        ts = np.array([h[0] for h in self._hist])
        ds = np.stack([h[1] for h in self._hist])
        if len(ts) < 2 or np.ptp(ts) <= 0:
            return ds[-1]
        tc = ts - ts.mean()
        v = (tc[:, None] * (ds - ds.mean(0))).sum(0) / (tc**2).sum()
        return ds.mean(0) + v * (t - ts.mean())

    def process(self, frame: Frame, *, encode: bool = True) -> FrameResult:
        """Measure one frame; return the result and, when armed, the correction to send.

        ``encode=False`` leaves out the rVAE stage, so that a caller can send the correction
        first and then call :meth:`encode` (the service does: a correction never waits for
        the rVAE)."""
        problem = frame_problem(frame.image)
        if problem is not None:
            raise FrameRefused(f"frame {frame.seq} refused: {problem}")
        t0 = time.perf_counter()
        px = np.asarray(frame.pixel_size_nm, dtype=np.float64)
        beam = np.asarray(frame.beam_shift_nm, dtype=np.float64)
        t_mid = frame.t_start + 0.5 * frame.frame_time_s
        image = np.asarray(frame.image)
        reg_image = self._register_view(image)
        if self._ref is None or self._ref.shape != reg_image.shape:
            self._set_reference(reg_image, beam, np.zeros(2) if self._ref is None else self._last_drift())
            if self._b0_nm is None:
                self._b0_nm = beam.copy()
            shift_px, peak = np.zeros(2), 1.0
        else:
            # where this frame should be, from the drift history and the beam shift it was taken with:
            # robust to skipped frames and to corrections that arrived late
            pred = self.predict_drift(t_mid)
            pred_px = np.zeros(2) if pred is None else (pred - self._ref_offset_nm - (beam - self._ref_beam_nm)) / px
            shift_px, peak = register(self._ref, reg_image, predicted=tuple(pred_px))
        t1 = time.perf_counter()
        locked = bool(np.isfinite(peak) and peak >= self.config.min_peak)
        drift = self._ref_offset_nm + shift_px * px + (beam - self._ref_beam_nm)
        if not locked:  # a lost frame: what it would say is no measurement
            drift = self._last_drift()
        if locked:
            self._hist.append((t_mid, drift))
            if np.hypot(*shift_px) > self.config.rereference_frac * min(reg_image.shape):
                self._set_reference(reg_image, beam, drift)  # keep the reference overlapping the image
        correction = None
        timings = {"register": (t1 - t0) * 1e3}
        col = None
        if self._columns is not None and locked:
            # apparent shift vs the very first frame, as a hint for the tracker
            hint = (drift - (beam - self._b0_nm)) / px
            col = self._columns.process(frame, image, hint, timings)
            if col.flagged:  # no credible columns: the registration's shift is no measurement either
                if self._hist and self._hist[-1][0] == t_mid:
                    self._hist.pop()
                drift = self._last_drift()
        flagged = "" if col is None else col.flagged
        if self.armed and locked and not flagged:
            if col is not None and col.decision is not None and col.decision.apply:
                correction = self._make(frame, col.decision.beam_shift_nm, col.decision.reason)
            else:
                pred = self.predict_drift(t_mid + frame.frame_time_s)
                if pred is not None:
                    correction = self._correction(frame, pred, beam)
        self.frames += 1
        timings["total"] = (time.perf_counter() - t0) * 1e3
        self.last = FrameResult(seq=frame.seq, t_mid=t_mid, shift_px=shift_px, drift_nm=drift, peak=peak,
                                locked=locked, correction=correction, timings_ms=timings,
                                columns=None if col is None or flagged else col.columns,
                                line_drift_nm=None if col is None else col.line_drift_nm,
                                line_sigma_nm=None if col is None else col.line_sigma_nm,
                                jump=False if col is None else col.jump, lost=not locked, flagged=flagged)
        return self.encode(frame, self.last) if encode else self.last

    def encode(self, frame: Frame, result: FrameResult, *, between: Callable[[], object] | None = None
               ) -> FrameResult:
        """``result`` with the rVAE latents of its columns (and the stage's time in
        ``timings_ms["rvae"]``); unchanged without an rVAE stage or columns. ``between`` is
        called between the encoder's chunks (the service: wait while a frame is processed)."""
        from dataclasses import replace

        stage = self.rvae
        if stage is None or result.columns is None:
            return result
        t0 = time.perf_counter()
        waited = [0.0]

        def timed_between() -> None:  # the stage's time is its work, not its waits
            t = time.perf_counter()
            between()
            waited[0] += time.perf_counter() - t

        latents = None
        try:
            latents = stage.process(np.asarray(frame.image), result.columns.positions,
                                    between=None if between is None else timed_between)
        except ValueError as exc:  # e.g. an image too small for patches: no latents, the stream goes on
            stage.frame_error = str(exc)
        timings = dict(result.timings_ms)
        timings["rvae"] = (time.perf_counter() - t0 - waited[0]) * 1e3
        if between is not None:
            timings["rvae_wait"] = waited[0] * 1e3
        timings["total"] = timings.get("total", 0.0) + timings["rvae"]
        out = replace(result, latents=latents, timings_ms=timings)
        if self.last is result:
            self.last = out
        return out

    def _register_view(self, image: np.ndarray) -> np.ndarray:
        """What the rigid registration sees: the whole frame, or (gp model) a centred crop of
        at most ``register_crop_px`` a side; a crop moves with the frame like the whole."""
        crop = int(self.config.register_crop_px) if self.config.model == "gp" else 0
        h, w = image.shape[:2]
        if crop <= 0 or (h <= crop and w <= crop):
            return image
        ch, cw = min(h, crop), min(w, crop)
        y0, x0 = (h - ch) // 2, (w - cw) // 2
        return image[y0:y0 + ch, x0:x0 + cw]

    def _last_drift(self) -> np.ndarray:
        return self._hist[-1][1] if self._hist else np.zeros(2)

    def _set_reference(self, image: np.ndarray, beam: np.ndarray, drift: np.ndarray) -> None:
        self._ref = make_reference(image)
        self._ref_offset_nm = np.asarray(drift, dtype=np.float64).copy()
        self._ref_beam_nm = beam.copy()

    def _correction(self, frame: Frame, pred: np.ndarray, beam: np.ndarray) -> Correction | None:
        assert self._b0_nm is not None
        target = self._b0_nm + pred
        step = self.config.gain * (target - beam)
        if np.hypot(*step) < self.config.deadband_nm:
            return None
        return self._make(frame, beam + step, "predictive drift correction (rigid registration)")

    def _make(self, frame: Frame, target: np.ndarray, reason: str) -> Correction:
        return Correction(id=self.next_correction_id(), beam_shift_nm=(float(target[0]), float(target[1])),
                          for_seq=frame.seq, reason=reason)

    def status(self) -> dict:
        """A JSON-able summary of the engine state."""
        last = self.last
        return {
            "armed": self.armed,
            "frames": self.frames,
            "config": dict(self.config.__dict__),
            "last_seq": None if last is None else last.seq,
            "locked": None if last is None else last.locked,
            "drift_nm": None if last is None else [float(v) for v in last.drift_nm],
            "rvae": None if self.rvae is None else self.rvae.status(),
            "drift_hyperparameters": self.drift_hyperparameters(),
        }


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

    def __init__(self, config: EngineConfig) -> None:
        from stem_live.distortion import CorrectionPolicy, OnlineDriftGP
        from stem_live.distortion.hyperfit import HyperLearner
        from stem_live.track import Tracker

        self.config = config
        self.spacing_px = config.spacing_px or None
        self.tracker = Tracker(spacing_px=self.spacing_px, history=64)
        # one padded GP size per session (512 sample groups: about 4 frames of 512 lines), so
        # that no frame after the first waits for a compilation
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

    def process(self, frame: Frame, image: np.ndarray, hint_px: np.ndarray, timings: dict) -> ColumnResult:
        from dataclasses import replace as dc_replace

        from stem_live.locate import estimate_spacing, locate_classical

        t0 = time.perf_counter()
        img = np.asarray(image, dtype=np.float32)
        if self.spacing_px is None:
            self.spacing_px = float(estimate_spacing(img))
            self.tracker.spacing_px = self.spacing_px
        if self.config.lattice_prior and self.lattice is None:
            from stem_live.lattice_prior import LatticePrior

            # without a calibration the lattice measures the flyback where the frames drift
            self.lattice = LatticePrior(self.spacing_px, fit_flyback=self.calibration is None)
        known = self._probe_sigma_px if self._located % self.probe_refresh_frames else None
        # the flyback (a calibration's, or the lattice's measurement): the columns cut by the
        # left edge are fitted on the distorted scan
        flyback = self._flyback(frame) if self.calibration is not None else self._measured_flyback(frame)
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
        smooth = dc_replace(cols, positions=cols.line_averaged())
        ids = self.tracker.update(self._deskewed(frame, smooth), shift_hint=tuple(hint_px))
        ref_ids = self.tracker.reference_ids
        order = np.argsort(ref_ids)
        pos = np.searchsorted(ref_ids[order], ids)
        pos = np.clip(pos, 0, len(ref_ids) - 1)
        matched = np.where(ref_ids[order][pos] == ids, order[pos], -1)
        t2 = time.perf_counter()
        line_mean, line_sd, decision, jump = self.gp_stage(frame, self.tracker.reference, smooth.positions, matched)
        t3 = time.perf_counter()
        # the gp stage without an inline hyperparameter fit (timed on its own, where one ran)
        timings.update(locate=(t1 - t0) * 1e3, track=(t2 - t1) * 1e3, gp=(t3 - t2) * 1e3 - self.hyperfit_ms)
        if self.hyperfit_ms > 1.0:
            timings["hyperfit"] = self.hyperfit_ms
        return ColumnResult(cols, line_mean, line_sd, decision, jump)

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

    def gp_stage(self, frame: Frame, ref_px: np.ndarray, positions_px: np.ndarray, matched: np.ndarray) -> tuple:
        """Drift samples in, correction decision out (the ``gp`` stage of the timings):
        observations of the tracked columns, jump check + GP update, the model at every
        line, the policy's decision. Returns (line_mean (rows, 2), line_sd, decision, jump)."""
        from stem_live.distortion import observations_from_columns

        obs = observations_from_columns(ref_px, positions_px, matched, t_start=frame.t_start,
                                        line_time_s=frame.line_time_s, dwell_s=frame.dwell_us * 1e-6,
                                        pixel_size_nm=frame.pixel_size_nm, beam_shift_nm=frame.beam_shift_nm,
                                        frame=frame.seq)
        if self.calibration is not None:
            obs = self.calibration.correct_observations(obs, frame.beam_shift_nm)
        jump = self.policy.observe(self.gp, obs)
        self.hyperfit_ms = 0.0
        if self.learner is not None:
            t0 = time.perf_counter()
            self.learner.after_frame()   # live: starts a background fit when one is due; never waits
            self.hyperfit_ms = (time.perf_counter() - t0) * 1e3   # an inline fit (replay, evaluate)
        # the model at every line (the mean is O(1) a point in state-space form; a coarser grid
        # would alias the 50 Hz term, a period of ~20 lines)
        line_mean, line_sd = self.gp.predict(frame.line_times())
        decision = self.policy.correction(self.gp, frame.t_start + frame.frame_time_s, frame.frame_time_s,
                                          frame.beam_shift_nm)
        return line_mean, line_sd, decision, jump

    def _deskewed(self, frame: Frame, cols):
        """The columns as if the whole frame had been scanned at its middle (px).

        Each column is moved back by the modelled drift between the time it was scanned and
        mid-frame. Without this the tracker's reference lattice would carry the drift of the
        frames it was built from as a function of the row (``v * line_time * row``); once the
        field has moved by some rows that skew reads as a spurious drift offset (about
        ``v * line_time`` per row moved)."""
        from dataclasses import replace as dc_replace

        if len(self.gp.frames) < self.deskew_min_frames or not len(cols):
            return cols
        pos = np.asarray(cols.positions, dtype=np.float64)
        t_col = frame.t_start + pos[:, 0] * frame.line_time_s + pos[:, 1] * frame.dwell_us * 1e-6
        t_mid = frame.t_start + 0.5 * frame.frame_time_s
        mean, _ = self.gp.predict(np.append(t_col, t_mid))
        dev = (mean[:-1] - mean[-1]) / np.asarray(frame.pixel_size_nm, dtype=np.float64)
        if not np.all(np.isfinite(dev)) or np.max(np.abs(dev)) > 0.25 * (self.spacing_px or np.inf):
            return cols  # the model is not trustworthy here: link the raw positions
        return dc_replace(cols, positions=pos - dev)
