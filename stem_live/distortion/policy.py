"""Predictive drift-correction policy on top of :class:`~.gp.OnlineDriftGP`.

Per frame: ``policy.observe(gp, obs)`` checks the new samples against the model's
prediction (jump detection), re-locks the GP after a jump, and adds the samples;
``policy.correction(gp, t_start_next, frame_time_s, beam_now_nm)`` returns the beam shift
that keeps the specimen still at the middle of the next frame, plus a per-line ramp.

Beam-shift convention (see :mod:`.observations`): observations built with the absolute
beam shift give a GP whose prediction *is* the beam shift that holds the columns at their
reference positions (``b(t) = d(t) - d_ref + b_ref``).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from stem_live.distortion.observations import Observations

__all__ = ["CorrectionPolicy", "CorrectionDecision", "is_abrupt"]

#: times over the next frame at which the drift is averaged for its correction (odd: one at mid-frame)
AVERAGE_POINTS = 33


@dataclass(frozen=True)
class CorrectionDecision:
    """apply: send ``beam_shift_nm``; ramp_nm_per_s: predicted drift rate over the frame
    (for instruments that can ramp the shift per line); sigma_nm: GP 1-sigma at mid-frame."""

    apply: bool
    beam_shift_nm: np.ndarray | None
    ramp_nm_per_s: np.ndarray
    predicted_nm: np.ndarray | None
    sigma_nm: np.ndarray
    reason: str
    jump_detected: bool = False
    path: tuple[np.ndarray, np.ndarray] | None = None   # (t_s (K,), target (K, 2) nm) over the next frame


def is_abrupt(res: np.ndarray, s: int, step: np.ndarray, *, window: int = 6, n_sigma: float = 6.0,
              fraction: float = 0.6) -> bool:
    """Is the change of the time-ordered residuals ``res`` (n, 2) (nm) at sample ``s`` a step?

    ``D(j)`` = mean of the ``window`` samples from j on minus the mean of the ``window`` before
    j (nm, 2-vector), for every j with full windows. A step at s has ``|D(s)|`` near the step
    size and far above the spread of ``D`` elsewhere (1.4826 x the median absolute ``D``
    outside s +- window, per axis); a drift the model did not predict, or a wander, changes
    the residual gradually, so its ``D`` is alike everywhere."""
    n = len(res)
    w = int(max(1, min(window, s, n - s)))
    if w < 2 or n < 4 * w:
        return bool(np.hypot(*step) > 0)  # too few samples to judge the shape: the size test decides
    cs = np.vstack([np.zeros((1, 2)), np.cumsum(res, axis=0)])
    j = np.arange(w, n - w + 1)
    d = (cs[j + w] - cs[j]) / w - (cs[j] - cs[j - w]) / w  # (m, 2) local change at each j
    d_s = (cs[s + w] - cs[s]) / w - (cs[s] - cs[s - w]) / w
    away = np.abs(j - s) > w
    if away.sum() < 4:
        return bool(np.hypot(*d_s) >= fraction * np.hypot(*step))
    spread = 1.4826 * np.median(np.abs(d[away]), axis=0)    # (2,) robust sd of the local change
    z = np.hypot(*(d_s / np.maximum(spread, 1e-9))) / np.sqrt(2.0)
    return bool(z > n_sigma and np.hypot(*d_s) >= fraction * np.hypot(*step))


@dataclass
class CorrectionPolicy:
    """gain: fraction of the predicted correction applied; deadband_nm: smaller steps are
    not sent; max_sigma_nm: no correction while the GP is less sure than this;
    jump_nm / jump_sigma: a block of a frame whose median residual exceeds
    max(jump_nm, jump_sigma * predicted sigma), and stays so to the end of the frame, is a
    jump candidate; n_blocks: blocks per frame (time-ordered); max_test: at most this many of
    a frame's samples (evenly spread in time) are tested for a jump.
    abrupt_sigma: a candidate is a jump only if it is abrupt: the change of the residual across
    its time (means of ``abrupt_window`` samples on either side) exceeds ``abrupt_sigma`` times
    the robust spread of the same local change elsewhere in the frame (so a wander or a velocity
    the model did not expect, which changes the residual gradually, is not a jump), and is at
    least ``abrupt_fraction`` of the fitted step.
    miss_factor: the threshold is also at least this many times the median miss of the model
    on the last ``miss_frames`` frames without a jump (each frame's median residual, nm): while
    the model has not yet learnt a large wander, its misses are large, and a miss of that size
    is no jump (the predicted sigma alone trusts the starting hyperparameters)."""

    gain: float = 1.0
    deadband_nm: float = 0.002
    max_sigma_nm: float = 0.05
    jump_nm: float = 0.05
    jump_sigma: float = 6.0
    n_blocks: int = 8
    min_block: int = 5
    max_test: int = 64
    abrupt_sigma: float = 6.0
    abrupt_window: int = 6
    abrupt_fraction: float = 0.6
    miss_factor: float = 4.0
    miss_frames: int = 8
    jumps: list = field(default_factory=list)   # (frame, t_jump_s, step_nm) history
    misses: list = field(default_factory=list)  # median residual (nm) of the recent frames without a jump
    _last_miss: float | None = field(default=None, init=False, repr=False)  # this frame's, set by detect_jump
    jump_detected: bool = False

    def detect_jump(self, gp, obs: Observations) -> tuple[bool, float, np.ndarray]:
        """(jump?, time of the first offending sample, median step (2,)) for new samples."""
        if gp.snapshot.state is None or len(obs) < self.min_block * 2:
            return False, np.nan, np.zeros(2)
        if len(obs) > self.max_test:  # prediction costs O(window x test points): test a time-ordered subsample
            obs = obs.select(np.argsort(obs.t_s)[np.linspace(0, len(obs) - 1, self.max_test).astype(int)])
        order = np.argsort(obs.t_s)
        res, sd = gp.residuals(obs)
        res, sd = res[order], sd[order]
        recent = self.misses[-self.miss_frames:]
        floor = max(self.jump_nm, self.miss_factor * float(np.median(recent)) if recent else 0.0)
        self._last_miss = float(np.hypot(*np.median(res, axis=0)))
        nb = int(max(1, min(self.n_blocks, len(obs) // self.min_block)))
        blocks = np.array_split(np.arange(len(obs)), nb)
        bad = []
        med = []
        for b in blocks:
            m = np.median(res[b], axis=0)
            thr = max(floor, self.jump_sigma * float(np.median(sd[b])))
            bad.append(np.hypot(*m) > thr)
            med.append(m)
        bad = np.array(bad)
        # a step persists to the end of the frame: the first block of the last bad run
        if not bad[-1]:
            return False, np.nan, np.zeros(2)
        b0 = nb - 1
        while b0 > 0 and bad[b0 - 1]:
            b0 -= 1
        # refine: best single step in the residuals from the block before b0 onwards
        lo = blocks[max(b0 - 1, 0)][0]
        r = res[lo:]
        n = len(r)
        cs = np.cumsum(r, axis=0)
        cs2 = np.cumsum(np.sum(r * r, axis=1))
        k = np.arange(1, n)
        left = np.sum(cs[:-1] ** 2, axis=1) / k
        right = np.sum((cs[-1] - cs[:-1]) ** 2, axis=1) / (n - k)
        sse = cs2[-1] - left - right
        s = lo + int(np.argmin(sse)) + 1 if n > 1 else lo
        if b0 == 0 and np.hypot(*np.median(res[:s], axis=0)) > 0.5 * np.hypot(*np.median(res[s:], axis=0)):
            s = 0  # the samples before the split are off as well: the jump came before the frame
        step = np.median(res[s:], axis=0) - (np.median(res[:s], axis=0) if s > 0 else 0.0)
        # every block off: the step came before this frame's first tested sample (between
        # frames, or in lines without columns); otherwise it must be abrupt where it is
        if b0 > 0 and not is_abrupt(res, s, step, window=self.abrupt_window, n_sigma=self.abrupt_sigma,
                                    fraction=self.abrupt_fraction):
            return False, np.nan, np.zeros(2)
        t_jump = float(obs.t_s[order][s])
        return True, t_jump, np.median(res[s:], axis=0)

    def observe(self, gp, obs: Observations) -> bool:
        """Check ``obs`` for a jump, re-lock the GP if so, add the samples. Returns the flag."""
        self._last_miss = None
        jump, t_jump, step = self.detect_jump(gp, obs)
        self.jump_detected = bool(jump)
        if not jump and self._last_miss is not None:
            self.misses = (self.misses + [self._last_miss])[-self.miss_frames:]
        if jump:
            self.jumps.append((int(obs.frame[0]) if len(obs) else -1, t_jump, step))
            # the samples before the jump are kept, moved by the step: the velocity and the wander
            # learnt before it carry on, and the model is on the new level at once
            gp.relock(t_jump, step_nm=step)
            before = (obs.t_s < t_jump)[:, None]
            gp.add(replace(obs, disp_nm=obs.disp_nm + before * np.asarray(step, dtype=float).reshape(1, 2)))
        else:
            gp.add(obs)
        return self.jump_detected

    def correction(self, gp, t_start_next: float, frame_time_s: float, beam_now_nm) -> CorrectionDecision:
        """Beam shift for the next frame and the drift ramp. The target is the drift averaged
        over the next frame's scan (``AVERAGE_POINTS`` times), not its value at mid-frame: the
        mains line and the fast wander average out over a frame, and one beam shift a frame
        can only hold the frame's mean still."""
        beam = np.asarray(beam_now_nm, dtype=float).reshape(2)
        ts = t_start_next + np.linspace(0.0, 1.0, AVERAGE_POINTS) * frame_time_s
        mean_all, sd_all = gp.predict(ts)
        mid = AVERAGE_POINTS // 2
        mean = np.stack([mean_all[0], mean_all.mean(axis=0), mean_all[-1]])
        ramp = self.gain * (mean[2] - mean[0]) / max(frame_time_s, 1e-12)
        s_mid = sd_all[mid]
        if not np.all(np.isfinite(mean)) or not np.all(np.isfinite(s_mid)):
            return CorrectionDecision(False, None, np.zeros(2), None, s_mid, "no model yet", self.jump_detected)
        if np.max(s_mid) > self.max_sigma_nm:
            return CorrectionDecision(False, None, np.zeros(2), mean[1], s_mid,
                                      f"GP sigma {np.max(s_mid):.3f} nm > {self.max_sigma_nm} nm",
                                      self.jump_detected)
        step = self.gain * (mean[1] - beam)
        if np.hypot(*step) < self.deadband_nm:
            return CorrectionDecision(False, None, ramp, mean[1], s_mid, "within deadband", self.jump_detected)
        return CorrectionDecision(True, beam + step, ramp, mean[1], s_mid,
                                  "predictive drift correction (GP)"
                                  + (" after jump re-lock" if self.jump_detected else ""),
                                  self.jump_detected)
