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

from stem_live.column_model import ColumnModel
from stem_live.protocol import Correction, Frame, Strip, Trajectory
from stem_live.register import Reference, make_reference, register_resolved

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
    # gp model: "bright" columns (HAADF/ADF), "dark" (ABF/BF: each frame is inverted before it is
    # located), or "auto": from the frame's detector name where it is a known one, else from the
    # image (``locate.contrast.frame_contrast``)
    contrast: str = "bright"
    # gp model: every correction also carries the model's drift over the next frame as a
    # trajectory (``protocol.Trajectory``, a knot every ``trajectory_lines`` lines) for an
    # instrument that can follow one line by line; its ``beam_shift_nm`` stays the frame's mean
    trajectory: bool = False
    trajectory_lines: int = 8
    # gp model, strips (``Engine.process_strip``): the time from the end of a strip to the first
    # line its path can move (s): the engine's own time and the instrument's, together
    strip_latency_s: float = 0.02
    # gp model, live (the engine service): the strips an instrument sends go to the strip loop
    # as they arrive (``Engine.process_strip``) as well as into whole frames
    strip_corrections: bool = False


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
        self._prev_start: tuple[float, float] | None = None   # (t_start, frame_time_s) of the last frame
        self.frames = 0
        self.last: FrameResult | None = None
        self._columns = None if self.config.model != "gp" else ColumnModel(self.config)
        self._strips = None   # the strip loop (strip_loop.StripLoop), from the first strip on

    def warm_up(self, frames: Sequence[Frame], *, strip_lines: int = 0) -> float:
        """Compile what a stream's first frames need (the gp model's locator and fit sizes for
        the frame size, the GP's predictions) by processing ``frames`` (a few frames like the
        stream's, e.g. simulated ones of its size), disarmed, then forget them (``reset``; the
        compiled functions stay). Without it the first frame of a ``--model gp`` stream takes
        ~10 s: the frames meanwhile are skipped, and the policy takes the drift accumulated by
        then for a jump and holds the image there for a few frames (138 pm off, back to ~15 pm
        five frames later, at 512 px). ``strip_lines``: the last frame also goes through the strip
        loop first, cut into strips of that many lines (its one compiled fit size). Returns the
        seconds it took."""
        from stem_live.strips import cut_into_strips

        t0 = time.perf_counter()
        armed, self.armed = self.armed, False
        try:
            for i, frame in enumerate(frames):
                if strip_lines and self._columns is not None and i == len(frames) - 1:
                    for strip in cut_into_strips(frame, strip_lines):
                        self.process_strip(strip)
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
        if self._columns is not None:
            self._columns.period_s = self._period_s(frame.t_start, frame.frame_time_s)
        px = np.asarray(frame.pixel_size_nm, dtype=np.float64)
        # the beam over the frame's scan (its mean where a path moved it): the registration
        # measures the frame's mean displacement, d - b averaged over its lines
        beam = frame.beam_at_lines.mean(axis=0)
        t_mid = frame.t_start + 0.5 * frame.frame_time_s
        image = np.asarray(frame.image)
        reg_image = self._register_view(image)
        if self._ref is None or self._ref.shape != reg_image.shape:
            self._set_reference(reg_image, beam, np.zeros(2) if self._ref is None else self._last_drift())
            if self._b0_nm is None:
                self._b0_nm = beam.copy()
            shift_px, peak, moved = np.zeros(2), 1.0, False
        else:
            # where this frame should be, from the drift history and the beam shift it was taken with:
            # robust to skipped frames and to corrections that arrived late
            pred = self.predict_drift(t_mid)
            pred_px = np.zeros(2) if pred is None else (pred - self._ref_offset_nm - (beam - self._ref_beam_nm)) / px
            shift_px, peak, moved = register_resolved(self._ref, reg_image, predicted=tuple(pred_px))
            if moved:  # the drift history predicted a lattice alias: the specimen's defects say where it is
                log.info("frame %d: %.1f px from the predicted position (lattice period %.1f px); "
                         "locked by the specimen's non-periodic features", frame.seq,
                         float(np.hypot(*(shift_px - pred_px))), self._ref.period_px)
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
            if col.jump and len(self._hist) >= 2 and self._hist[-1][0] == t_mid:   # the GP saw a jump
                last = self._hist.pop()
                self._shift_history(*last)
                self._hist.append(last)
            if col.flagged:  # no credible columns: the registration's shift is no measurement either
                if self._hist and self._hist[-1][0] == t_mid:
                    self._hist.pop()
                drift = self._last_drift()
        flagged = "" if col is None else col.flagged
        if self.armed and locked and not flagged:
            if col is not None and col.decision is not None and col.decision.apply:
                correction = self._make(frame, col.decision.beam_shift_nm, col.decision.reason,
                                        path=col.decision.path)
            else:
                pred = self.predict_drift(t_mid + self._period_s(frame.t_start, frame.frame_time_s))
                if pred is not None:
                    correction = self._correction(frame, pred, beam)
        self.frames += 1
        self._prev_start = (frame.t_start, frame.frame_time_s)
        timings["total"] = (time.perf_counter() - t0) * 1e3
        self.last = FrameResult(seq=frame.seq, t_mid=t_mid, shift_px=shift_px, drift_nm=drift, peak=peak,
                                locked=locked, correction=correction, timings_ms=timings,
                                columns=None if col is None or flagged else col.columns,
                                line_drift_nm=None if col is None else col.line_drift_nm,
                                line_sigma_nm=None if col is None else col.line_sigma_nm,
                                jump=False if col is None else col.jump, lost=not locked, flagged=flagged)
        return self.encode(frame, self.last) if encode else self.last

    def process_strip(self, strip: Strip):
        """One strip of a frame being scanned (gp model; ``strip_loop``): its columns' drift
        samples go to the GP at once, and, when armed and the model is sure enough, the result
        carries a correction whose trajectory is the beam's path from ``strip_latency_s`` after
        the strip to the end of the next frame (its single ``beam_shift_nm``: the path's first
        point, where the beam should be then). The whole frame still goes to :meth:`process`
        once its last strip is in. Returns a ``strip_loop.StripResult``; a strip that cannot be
        an image is refused (:class:`FrameRefused`)."""
        from dataclasses import replace

        if self._columns is None:
            raise ValueError("strips are processed by the gp model: use --model gp")
        problem = frame_problem(strip.image, min_side=2)
        if problem is not None:
            raise FrameRefused(f"strip of frame {strip.seq} (rows from {strip.row0}) refused: {problem}")
        if self._strips is None:
            from stem_live.strip_loop import StripLoop

            self._strips = StripLoop(self._columns, latency_s=self.config.strip_latency_s,
                                     knot_lines=self.config.trajectory_lines)
        res = self._strips.process(strip, period_s=self._period_s(strip.t_start, strip.frame_rows * strip.line_time_s))
        if self.armed and res.path is not None:
            t, path = res.path
            traj = Trajectory(t_s=tuple(float(v) for v in t), beam_shift_nm=tuple((float(a), float(b)) for a, b in path))
            res = replace(res, correction=Correction(id=self.next_correction_id(),
                                                     beam_shift_nm=(float(path[0, 0]), float(path[0, 1])),
                                                     for_seq=strip.seq, reason=res.reason, trajectory=traj))
        return res

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

    def _shift_history(self, t_mid: float, drift: np.ndarray) -> None:
        """After a jump (the gp model's policy saw one): the past drift estimates moved onto
        the new level, so that the straight-line prediction keeps the velocity it had instead
        of taking the step for one."""
        step = drift - self.predict_drift(t_mid)
        self._hist = deque(((t, d + step) for t, d in self._hist), maxlen=self._hist.maxlen)

    def _period_s(self, t_start: float, frame_time_s: float) -> float:
        """Time from this frame's start to the next one's (s): the step from the previous
        frame's start where that is a plausible period (the scan plus a gap between frames of
        up to 2 scan times + 1 s), else the scan time alone (a pause, a skipped frame)."""
        prev = self._prev_start
        if prev is not None:
            step = t_start - prev[0]
            if frame_time_s <= step <= 3.0 * frame_time_s + 1.0:
                return float(step)
        return float(frame_time_s)

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

    def _make(self, frame: Frame, target: np.ndarray, reason: str, path=None) -> Correction:
        traj = None
        if path is not None:   # (t_s (K,), targets (K, 2) nm): the drift over the next frame
            traj = Trajectory(t_s=tuple(float(v) for v in path[0]),
                              beam_shift_nm=tuple((float(a), float(b)) for a, b in path[1]))
        return Correction(id=self.next_correction_id(), beam_shift_nm=(float(target[0]), float(target[1])),
                          for_seq=frame.seq, reason=reason, trajectory=traj)

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
