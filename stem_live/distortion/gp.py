"""Online Gaussian-process model of specimen drift (a function of scan time) and a fixed
scan distortion (a function of position in the frame), for predictive drift correction.

Model, per sample k (see :mod:`.observations` for the sign conventions)::

    disp_k = d(t_k) - S(pos_k) + eps_k,      eps_k ~ N(0, sigma_k^2 + sigma_white^2)

* ``d(t) = c + v (t - t_c) + m_s sin(w t) + m_c cos(w t) + f_long(t) + f_short(t) + f_mains(t)``:
  offset, velocity and the coherent mains line (its own amplitude and phase per axis) with
  broad Gaussian priors, an Ornstein-Uhlenbeck (exponential kernel) wander on seconds, a
  Matern-3/2 process on tens of ms and a quasi-periodic (SHO) term at the mains frequency w. The two components (y, x) share one kernel and one factorisation (a
  "parallel" GP, arXiv:2005.10507): same hyperparameters, two right-hand sides.
* ``S(pos)``: scan distortion, linear in its coefficients (Gaussian priors)::

      S_y = a_yy (y - y_c) + a_yx (x - x_c) + f_y exp(-t_line / tau)
      S_x = a_xy (y - y_c) + a_xx (x - x_c) + f_x exp(-t_line / tau)

  ``a_yy``, ``a_xx``: scale errors (``simulator.ScanConfig.scale_error``); ``a_xy``: shear;
  ``f_x``, ``tau``: flyback ringing at the line start; ``y, x`` nm in the frame,
  ``t_line`` = col * dwell. Drift is a function of time that keeps increasing, the
  distortion a function of position that repeats every frame: several frames separate them.

The linear terms are marginalised exactly: samples scanned within ``group_s`` (about a
line) share one GP value; their within-group deviations constrain only the linear
coefficients (closed form), the group means go to a stationary quasiseparable GP over
sorted scan time (tinygp's O(N) quasiseparable Cholesky, one factorisation for both
outputs) with the coefficients marginalised by Woodbury (a 5x5 system).

State is bounded: a sliding window of the last ``window_frames`` frames (thinned to at
most ``max_samples`` samples), padded to a few fixed sizes so nothing recompiles.
Hyperparameters (amplitudes, length scales, white noise, flyback tau) are fitted by
``refit()`` (:mod:`.hyperfit`: bounded type-II maximum likelihood) on the window, or on
the longer ``history`` of frames (:class:`~.hyperfit.HyperLearner`, a background thread);
``add``/``predict`` use an immutable snapshot that is swapped atomically and never wait
for a fit. The mains frequency of the SHO term can change (``set_mains``) without a
recompilation: each snapshot carries the frequency it was conditioned with.

All JAX work runs in float64 (``jax.enable_x64`` as a context, not globally) on the CPU.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from stem_live.distortion.gp_jax import (  # noqa: F401
    _BOUNDS,
    _N_BASIS,
    _PAD_SIZES,
    BASIS,
    BOUNDS,
    HYPER_NAMES,
    _bucket,
    _functions,
    _jax,
)
from stem_live.distortion.observations import Observations

__all__ = ["OnlineDriftGP", "GPSnapshot", "HYPER_NAMES", "BOUNDS"]

#: the model follows the mains line only where the samples see at least this fraction of it
#: (a column's scan times spread over less than about 1/6 of a mains period); elsewhere its
#: coherent term is pinned to zero and the lines get the model averaged over a mains period
#: (``column_model.line_drift``), the locator's line-by-line pick-up carrying the line
#: (``ColumnModel._pickup_model``). docs/drift-model.md, "Mains seen through the columns", has
#: the scenarios behind the value
MIN_MAINS_ATTENUATION = 0.6
_MEAN_CHUNKS = (16, 1024)  # padded sizes of the prediction (each compiles once per window size)
_N_VAR = 32            # points of the posterior-sd grid computed with each conditioning


# ----------------------------------------------------------------------------- python API
@dataclass(frozen=True)
class GPSnapshot:
    """Immutable conditioned state (swapped atomically by ``add`` / ``refit``)."""

    theta: np.ndarray
    state: dict | None            # jax arrays from ``condition``
    y_mean: np.ndarray            # (2,) subtracted from disp before the fit
    tc: float                     # time origin of the window (s)
    n: int                        # real samples in the window
    n_groups: int = 0             # GP points (sample groups) in the window
    frames: tuple = ()
    t_range: tuple = (np.nan, np.nan)
    beta: np.ndarray = field(default_factory=lambda: np.zeros((_N_BASIS, 2)))
    beta_sd: np.ndarray = field(default_factory=lambda: np.full((_N_BASIS, 2), np.inf))
    mean_state: dict | None = None   # the few arrays ``predict_mean`` needs (cheap to pass per call)
    tvar: np.ndarray | None = None   # times (rel. to tc) of the posterior-sd grid, host copy
    svar: np.ndarray | None = None   # posterior sd on that grid (nm)
    omega: float | None = None       # mains angular frequency (rad/s) it was conditioned with


class OnlineDriftGP:
    """Online drift + scan-distortion GP. Units nm, s; pairs (y, x).

        gp = OnlineDriftGP(window_frames=20, max_samples=4000)
        gp.add(obs)                        # condition on a new frame's samples (O(N))
        mean, sigma = gp.predict(t_s)      # drift d(t) (n, 2) and its 1-sigma (n, 2)
        gp.distortion(pos_px)              # S(pos) (n, 2) nm; gp.distortion_params (dict)
        gp.refit(steps=50)                 # hyperparameters (safe from a background thread)

    window_frames, max_samples: the window (older frames are thinned first).
    group_s: samples scanned within this time of each other share one GP drift value
        (exact factorisation, see ``_functions``); about one or two line times.
    mains_hz: frequency of mains jitter, modelled by a quasi-periodic SHO term (None: off).
    prior_sd: Gaussian prior std of the linear terms: offset (nm), velocity (nm/s),
        a_y* and a_*x (dimensionless), flyback amplitude (nm).
    mains_prior_sd_nm: prior std of the mains sinusoid's sin and cos amplitudes on each axis
        (nm): the coherent part of the mains line, fitted per axis (the mains field moves the
        beam along one direction), over the window; the SHO term carries what is not
        coherent (the grid's frequency wanders by ~0.05 Hz).
    centre_px: origin (row, col) of the distortion terms; None = the mean position of the
        first frame's samples (rounded to a pixel).
    fit_distortion: False pins the distortion coefficients to 0.
    min_groups: the GP stage is padded to a power of two >= this (each size compiles once,
        a few seconds; raise it to compile once per session).
    max_groups: the padded group count is capped here (None: no cap): a window with more
        groups is trimmed, oldest frames first down to ``min_window_frames``, then coarser
        groups, so a session compiles a few sizes (``compile_sizes``: all of them ahead).
        ``size_for_frames`` sets it from the frames' line count and line time.
    min_window_frames: frames the window keeps however many groups they hold: the velocity
        comes from the steps between frames (within one frame it is the skew of the
        reference, which the model itself removes), so one frame alone cannot give it.
    history_s: frames of the last this many seconds are kept in ``history`` (the data of
        the background hyperparameter fit, :class:`~.hyperfit.HyperLearner`).
    """

    def __init__(self, window_frames: int = 20, max_samples: int = 4000, *,
                 group_s: float = 1e-3, mains_hz: float | None = 50.0,
                 sigma_long_nm: float = 0.02, ell_long_s: float = 5.0,
                 sigma_short_nm: float = 0.003, ell_short_s: float = 0.05,
                 sigma_white_nm: float = 0.001, flyback_tau_us: float = 20.0,
                 sigma_mains_nm: float = 0.003, mains_q: float = 50.0, sigma_line_nm: float = 0.001,
                 prior_sd: tuple[float, float, float, float, float] = (0.3, 0.5, 0.05, 0.05, 0.05),
                 mains_prior_sd_nm: float = 0.05,
                 centre_px: tuple[float, float] | None = None, fit_distortion: bool = True,
                 min_groups: int = 256, max_groups: int | None = None, history_s: float = 12.0,
                 min_window_frames: int = 3):
        if window_frames < 1 or max_samples < 16 or group_s <= 0:
            raise ValueError("need window_frames >= 1, max_samples >= 16 and group_s > 0")
        self.window_frames = int(window_frames)
        self.max_samples = int(max_samples)
        self.group_s = float(group_s)
        self.min_groups = int(min_groups)     # smallest padded GP size (fewer compilations)
        self.min_window_frames = max(1, int(min_window_frames))
        # the largest padded group count a window may use (None: any)
        self._group_cap: int | None = None if max_groups is None else _bucket(max_groups, self.min_groups)
        self._warm: set[int] = set()  # padded sizes whose every jit function has been compiled
        self._omega = None if not mains_hz else float(2 * np.pi * mains_hz)
        h0 = dict(sigma_long_nm=sigma_long_nm, ell_long_s=ell_long_s, sigma_short_nm=sigma_short_nm,
                  ell_short_s=ell_short_s, sigma_white_nm=sigma_white_nm,
                  flyback_tau_s=flyback_tau_us * 1e-6, sigma_mains_nm=sigma_mains_nm, mains_q=mains_q,
                  sigma_line_nm=sigma_line_nm)
        self._theta = np.log(np.array([h0[k] for k in HYPER_NAMES], dtype=float))
        self._theta0 = self._theta.copy()
        # fitted by refit(): all but the SHO quality (the mains line is narrower than the
        # frequency resolution of a window), and the SHO amplitude when it is off
        fixed = {"mains_q"} | ({"sigma_mains_nm"} if self._omega is None else set())
        self._fixed = np.array([k in fixed for k in HYPER_NAMES], dtype=float)
        pv = np.asarray(prior_sd, dtype=float) ** 2
        if not fit_distortion:
            pv[2:] = 1e-16
        self._prior_var = np.concatenate([pv, np.full(2, float(mains_prior_sd_nm) ** 2)])
        self._centre_px = None if centre_px is None else np.asarray(centre_px, dtype=float)
        self._pixel_size = np.ones(2)
        self._frames: deque[Observations] = deque()
        self._partial: int | None = None   # frame number of the newest window entry while it is partial
        self.history_s = float(history_s)
        self.history: deque[Observations] = deque()   # frames of the last history_s (guarded by _lock)
        self._lock = threading.Lock()          # guards the window and _theta
        self._snap = GPSnapshot(self._theta.copy(), None, np.zeros(2), 0.0, 0)
        self.timings_ms: dict[str, float] = {}
        self.n_refits = 0
        self.mains_on = self._omega is not None

    # ------------------------------------------------------------------ window
    @property
    def n_samples(self) -> int:
        """Samples the current model is conditioned on (bounded by max_samples)."""
        return self._snap.n

    @property
    def snapshot(self) -> GPSnapshot:
        return self._snap

    @property
    def frames(self) -> tuple:
        """Frame numbers in the current window."""
        return self._snap.frames

    def size_for_frames(self, rows: int, line_time_s: float, *, frames: int = 4,
                        largest: int = 4096) -> None:
        """Before the first sample: cap the GP's padded size at ``frames`` frames of ``rows``
        lines of ``line_time_s`` at full resolution (a group per ``group_s``, at most one per
        line), between the current ``min_groups`` and ``largest`` groups. A window pads to the
        smallest size that holds its groups (the cost of a conditioning grows with it: a window
        of 384 groups conditions in a quarter of the time at 512 as at 2,048); the sizes up to
        the cap are a few, each compiled once (``compile_sizes`` compiles them all ahead)."""
        if self._frames:
            return
        per_frame = rows * min(1.0, float(line_time_s) / self.group_s)
        self._group_cap = _bucket(int(min(max(frames * per_frame, self.min_groups), largest)), self.min_groups)

    def compile_sizes(self) -> list[int]:
        """Compile the conditioning and the predictions for every padded size up to the cap on
        the current window (the model itself is not changed), so that no frame of a stream
        waits for a compilation when its window grows into the next size. Returns the sizes."""
        with self._lock:
            theta = self._theta.copy()
            data = self._window_data()
        if data is None:
            return []
        smallest = int(data["tg"].shape[0])   # the window's own padded size
        sizes = [s for s in _PAD_SIZES if smallest <= s <= (self._group_cap or 0)]
        for g in sizes:
            if g != smallest:
                with self._lock:
                    data = self._window_data(groups=g)
            if data is not None:
                self._warm_up(self._condition(theta, data))
        return sizes

    def set_velocity_prior_sd(self, sd_nm_per_s: float) -> None:
        """Narrow (or widen) the prior std of the velocity term (nm/s), e.g. when a
        calibration already knows the drift velocity; used from the next conditioning on."""
        pv = self._prior_var.copy()
        pv[1] = float(sd_nm_per_s) ** 2
        self._prior_var = pv

    @property
    def hyperparameters(self) -> dict[str, float]:
        lo = np.array([_BOUNDS[k][0] for k in HYPER_NAMES])
        hi = np.array([_BOUNDS[k][1] for k in HYPER_NAMES])
        return dict(zip(HYPER_NAMES, np.clip(np.exp(self._snap.theta), lo, hi).tolist()))

    def reset(self) -> None:
        """Forget every sample (hyperparameters are kept)."""
        with self._lock:
            self._frames.clear()
            self._partial = None
            self.history.clear()
            self._snap = GPSnapshot(self._theta.copy(), None, np.zeros(2), 0.0, 0)

    def relock(self, t_from_s: float, step_nm=None) -> None:
        """After a jump at ``t_from_s``: without ``step_nm``, drop every sample scanned before it;
        with the step (y, x) nm, keep them moved by the step, so the velocity and the wander
        learnt before the jump carry on. Reconditions."""
        def cut(f: Observations) -> Observations:
            if step_nm is None:
                return f.select(f.t_s >= t_from_s)
            before = (f.t_s < t_from_s)[:, None]
            return replace(f, disp_nm=f.disp_nm + before * np.asarray(step_nm, dtype=float).reshape(1, 2))

        with self._lock:
            self._frames = deque(g for g in map(cut, self._frames) if len(g))
            self.history = deque(g for g in map(cut, self.history) if len(g))
            data = self._window_data()
            theta = self._theta.copy()
        self._snap = self._condition(theta, data)

    def drop_partial(self, frame: int) -> bool:
        """Forget frame ``frame``'s partial samples (``add(partial=True)``) and recondition on the
        rest: the model as it was before the frame, e.g. for checking the whole frame against it.
        Returns whether there were any."""
        with self._lock:
            if self._partial != int(frame) or not self._frames or int(self._frames[-1].frame[0]) != int(frame):
                return False
            self._frames.pop()
            self._partial = None
            data = self._window_data()
            theta = self._theta.copy()
        self._snap = self._condition(theta, data)
        return True

    def add(self, obs: Observations, *, partial: bool = False) -> None:
        """Add one frame's samples and recondition on the window (O(N)).

        ``partial``: samples of a frame still being scanned (a strip's, all of one frame):
        they join that frame's earlier partial samples; the frame's whole samples (added
        later without ``partial``) replace them. Partial samples stay out of ``history`` (the
        hyperparameter fit's data)."""
        t0 = time.perf_counter()
        ok = (np.all(np.isfinite(obs.disp_nm), axis=1) & np.isfinite(obs.t_s)
              & np.all(np.isfinite(obs.pos_px), axis=1) & (obs.sigma_nm > 0))
        obs = obs.select(ok)
        if not len(obs):
            return
        with self._lock:
            if self._centre_px is None:
                self._centre_px = np.round(np.mean(obs.pos_px, axis=0))
            self._pixel_size = np.asarray(obs.pixel_size_nm, dtype=float)
            frame = int(obs.frame[0])
            if self._partial == frame and self._frames and int(self._frames[-1].frame[0]) == frame:
                earlier = self._frames.pop()
                if partial:
                    obs = Observations.concat([earlier, obs])
            self._partial = frame if partial else None
            self._frames.append(obs)
            while len(self._frames) > self.window_frames:
                self._frames.popleft()
            if not partial:
                self.history.append(obs)
                while self.history and self.history[0].t_s.max() < obs.t_s.max() - self.history_s:
                    self.history.popleft()
            data = self._window_data()
            theta = self._theta.copy()
        t1 = time.perf_counter()
        self._snap = self._condition(theta, data)
        self._warm_up(self._snap)
        t2 = time.perf_counter()
        self.timings_ms = {"window": (t1 - t0) * 1e3, "condition": (t2 - t1) * 1e3,
                           "add": (t2 - t0) * 1e3}

    def _window_data(self, *, groups: int = 0) -> dict | None:
        """The window, thinned to max_samples (oldest frames first), grouped and padded (to at
        least ``groups`` groups)."""
        frames = list(self._frames)
        if not frames:
            return None
        budget = self.max_samples
        # the newest min_window_frames frames share the budget (thinned evenly where a frame
        # alone would fill it); older frames take what is left
        share = self.max_samples // min(len(frames), self.min_window_frames)
        keep = []
        for i, f in enumerate(reversed(frames)):        # newest first
            if budget <= 0:
                break
            room = min(budget, share) if i < self.min_window_frames else budget
            if len(f) <= room:
                keep.append(f)
                budget -= len(f)
            else:
                keep.append(f.select(slice(None, None, int(np.ceil(len(f) / room)))))
                budget -= room
        w = Observations.concat(keep[::-1])
        w = w.select(np.argsort(w.t_s, kind="stable"))
        coarsen = 1
        while True:
            n = len(w)
            tc = float(w.t_s[-1])                           # time origin: the newest sample
            t = w.t_s - tc
            # groups: time bins of group_s from each frame's first sample (never across frames)
            _, first = np.unique(w.frame, return_index=True)
            f0 = t[first][np.searchsorted(w.frame[first], w.frame)]
            b = np.floor((t - f0) / (self.group_s * coarsen))
            new = np.r_[True, (np.diff(w.frame) != 0) | (np.diff(b) != 0)]
            gid = np.cumsum(new) - 1
            n_g = int(gid[-1]) + 1
            cap = self._group_cap
            if cap is None or n_g <= cap:
                break
            if len(first) > self.min_window_frames:   # more groups than the padded size: drop the oldest frame
                w = w.select(w.frame != w.frame[first[0]])
            else:                # the fewest frames the window keeps: coarser groups
                coarsen *= 2
        wt = 1.0 / w.sigma_nm ** 2
        tg = np.bincount(gid, wt * t, n_g) / np.bincount(gid, wt, n_g)
        R = _bucket(max(n, self.max_samples), 256)     # fixed: one compilation
        G = _bucket(max(n_g, groups), self.min_groups)
        pr, pg = R - n, G - n_g
        tg = np.concatenate([tg, tg[-1] + 1e-3 * np.arange(1, pg + 1)])
        # grid for the posterior sd (computed with the conditioning): the newest frame and
        # the next two (their period from the frames' first samples)
        t_new0 = t[first[-1]]
        period = t_new0 - t[first[-2]] if len(first) > 1 else 0.0
        if not period > 0:
            period = max(1.1 * (t[-1] - t_new0), 1e-3)
        # (from a little before its first sample: its first lines hold no column centre)
        tvar = t_new0 + np.linspace(-0.25 * period, 3.2 * period, _N_VAR)
        psz = np.asarray(w.pixel_size_nm, dtype=float)
        y_mean = np.average(w.disp_nm, axis=0, weights=wt)
        return {"t": np.concatenate([t, np.zeros(pr)]), "tg": tg, "tvar": tvar,
                "gid": np.concatenate([gid, np.full(pr, G - 1)]).astype(np.int32),
                "pos": np.concatenate([w.pos_px * psz, np.zeros((pr, 2))]),
                "centre": self._centre_px * psz,
                "tline": np.concatenate([w.t_line_s, np.zeros(pr)]),
                "smear": np.concatenate([w.smear_s, np.zeros(pr)]),
                "y": np.concatenate([w.disp_nm - y_mean, np.zeros((pr, 2))]),
                "var": np.concatenate([w.sigma_nm ** 2, np.ones(pr)]),
                "mask": np.concatenate([np.ones(n), np.zeros(pr)]),
                "_n": n, "_ng": n_g, "_y_mean": y_mean, "_tc": tc,
                "_frames": tuple(sorted(set(w.frame.tolist()))),
                "_t_range": (float(w.t_s[0]), float(w.t_s[-1]))}

    def _warm_up(self, snap: GPSnapshot) -> None:
        """With the first window of a padded size, compile every prediction that size needs
        (the sd fallback of ``predict`` and both chunk sizes), so that no later frame does."""
        if snap.state is None:
            return
        g = int(snap.state["tg"].shape[0])
        if g in self._warm:
            return
        self._warm.add(g)
        jax = _jax()
        fn = _functions()
        with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
            for m in _MEAN_CHUNKS:
                fn["predict_mean"](snap.mean_state, np.zeros(m), snap.omega)
            jax.block_until_ready(fn["predict"](snap.state, np.zeros(16), snap.omega))

    def follows_mains(self, smear_s: float) -> bool:
        """Whether the model follows the mains line in samples that average over ``smear_s``
        (s, rms spread of their scan times): the term on and at least ``MIN_MAINS_ATTENUATION``
        of it seen (not on slow lines, where a column spans several mains periods)."""
        return self.mains_on and self._omega is not None and self._mains_seen(smear_s)

    def _mains_seen(self, smear_s: float) -> bool:
        """Samples averaging over ``smear_s`` (s, rms) see at least ``MIN_MAINS_ATTENUATION`` of the mains line."""
        return bool(np.exp(-0.5 * (self._omega * float(smear_s)) ** 2) >= MIN_MAINS_ATTENUATION)

    def mains_hidden(self, data: dict) -> bool:
        """Whether a window's samples (median spread of their scan times) see less than
        ``MIN_MAINS_ATTENUATION`` of the mains line: slow lines, where a column averages over
        a large part of a mains period and the line-by-line mains cannot be followed."""
        if self._omega is None or not data["_n"]:
            return False
        return not self._mains_seen(float(np.median(data["smear"][:data["_n"]])))

    def prior_var_for(self, data: dict) -> np.ndarray:
        """The linear terms' prior variances for a window: the mains sinusoid pinned to zero
        where the samples hide the mains line (``mains_hidden``)."""
        pv = self._prior_var
        if not self.mains_hidden(data):
            return pv
        pv = pv.copy()
        pv[5:7] = 1e-16
        return pv

    @staticmethod
    def _jdata(data: dict) -> dict:
        return {k: v for k, v in data.items() if not k.startswith("_")}

    def _condition(self, theta: np.ndarray, data: dict | None) -> GPSnapshot:
        if data is None:
            return GPSnapshot(theta.copy(), None, np.zeros(2), 0.0, 0)
        jax = _jax()
        fn = _functions()
        omega = self._omega
        with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
            st = fn["condition"](theta, self._jdata(data), self.prior_var_for(data), omega)
            beta = np.asarray(st["beta"])
            bsd = np.sqrt(np.maximum(np.diag(np.asarray(st["beta_cov"])), 0.0))
            mean_state = {k: st[k] for k in ("h", "beta", "tg", "F", "B")}
        return GPSnapshot(theta.copy(), st, data["_y_mean"], data["_tc"], data["_n"], data["_ng"],
                          data["_frames"], data["_t_range"], beta, np.stack([bsd, bsd], axis=1),
                          mean_state, np.asarray(st["tvar"]), np.asarray(st["svar"]), omega)

    # ------------------------------------------------------------------ prediction
    def predict(self, t_s) -> tuple[np.ndarray, np.ndarray]:
        """Drift d(t) (n, 2) nm and its 1-sigma (n, 2) at scan times ``t_s`` (s).

        In the frame of the observations (see :mod:`.observations`: relative to the
        reference, with the absolute beam shift added in, so that the predicted value is
        the beam shift that holds the columns at their reference positions).
        Before any data: zeros and inf.
        """
        t = np.atleast_1d(np.asarray(t_s, dtype=float)).ravel()
        snap = self._snap
        m = len(t)
        if snap.state is None or m == 0:
            return np.zeros((m, 2)), np.full((m, 2), np.inf)
        jax = _jax()
        fn = _functions()
        rel = t - snap.tc
        means = []
        with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
            # the mean is O(1) per point (state-space form): chunks of a few fixed sizes
            for a in range(0, m, _MEAN_CHUNKS[-1]):
                tt = rel[a:a + _MEAN_CHUNKS[-1]]
                mp = next(b for b in _MEAN_CHUNKS if b >= len(tt))
                tp = np.concatenate([tt, np.full(mp - len(tt), tt[-1])])
                means.append(np.asarray(fn["predict_mean"](snap.mean_state, tp, snap.omega))[:len(tt)])
            tv = snap.tvar
            if rel.min() >= tv[0] and rel.max() <= tv[-1]:
                # the sd grid over the newest frame and the next two, from the conditioning
                sd = np.interp(rel, tv, snap.svar)
            else:
                # elsewhere: a solve (one O(window) scan) at <= 16 points, interpolated; the
                # sd varies slowly between samples
                tk = np.sort(rel) if m <= 16 else np.linspace(rel.min(), rel.max(), 16)
                tp = np.concatenate([tk, np.full(16 - len(tk), tk[-1])])
                sk = np.asarray(fn["predict"](snap.state, tp, snap.omega)[1])[:len(tk)]
                sd = np.interp(rel, tk, sk)
        mean = np.concatenate(means) + snap.y_mean
        return mean, np.stack([sd, sd], axis=1)

    def residuals(self, obs: Observations) -> tuple[np.ndarray, np.ndarray]:
        """(residual (n, 2), predicted sigma (n, 2)) of new samples against the current
        model: disp - (d(t) - S(pos)); call before ``add``."""
        mean, sd = self.predict(obs.t_s)
        return obs.disp_nm - (mean - self.distortion(obs.pos_px, obs.t_line_s)), sd

    # ------------------------------------------------------------------ distortion
    def distortion(self, pos_px, t_line_s=None) -> np.ndarray:
        """Scan distortion S(pos) (n, 2) nm: the probe is at nominal + S when the image
        says ``pos_px`` (row, col), up to a constant (absorbed by the drift offset).
        ``t_line_s`` (time into the line, col * dwell) adds the flyback term."""
        pos = np.atleast_2d(np.asarray(pos_px, dtype=float))
        snap = self._snap
        if snap.state is None or self._centre_px is None:
            return np.zeros(pos.shape)
        b = snap.beta
        dy, dx = ((pos - self._centre_px) * self._pixel_size).T
        out = dy[:, None] * b[2][None, :] + dx[:, None] * b[3][None, :]
        if t_line_s is not None:
            tau = self.hyperparameters["flyback_tau_s"]
            fb = np.exp(-np.maximum(np.asarray(t_line_s, dtype=float), 0.0) / tau)
            out = out + fb[:, None] * b[4][None, :]
        return out

    @property
    def distortion_params(self) -> dict[str, float]:
        """Fitted scan distortion (simulator ScanConfig conventions) and 1-sigma of each."""
        b, s = self._snap.beta, self._snap.beta_sd
        h = self.hyperparameters
        return {"scale_y": float(b[2, 0]), "scale_x": float(b[3, 1]), "shear": float(b[2, 1]),
                "shear_yx": float(b[3, 0]), "flyback_amp_nm": float(b[4, 1]),
                "flyback_amp_y_nm": float(b[4, 0]), "flyback_tau_us": h["flyback_tau_s"] * 1e6,
                "velocity_nm_per_s": [float(b[1, 0]), float(b[1, 1])],
                "sd_scale_y": float(s[2, 0]), "sd_scale_x": float(s[3, 1]), "sd_shear": float(s[2, 1]),
                "sd_flyback_amp_nm": float(s[4, 1])}

    # ------------------------------------------------------------------ hyperparameters
    @property
    def mains_hz(self) -> float | None:
        """Frequency of the SHO (mains) term in use (Hz); None: off."""
        return None if self._omega is None else self._omega / (2 * np.pi)

    @property
    def learnt_theta(self) -> np.ndarray:
        """log-hyperparameters (``HYPER_NAMES`` order) the next conditioning will use."""
        with self._lock:
            return self._theta.copy()

    def learnt_hyperparameters(self) -> dict[str, float]:
        """The hyperparameters (units of their names) the next conditioning will use."""
        return dict(zip(HYPER_NAMES, np.exp(self.learnt_theta).tolist()))

    def set_theta(self, theta: np.ndarray) -> None:
        """Use ``theta`` (log, ``HYPER_NAMES`` order, clipped to the bounds) from the next
        conditioning on (``add`` / ``relock``); never waits for, nor recomputes, a model."""
        lo = np.log([_BOUNDS[k][0] for k in HYPER_NAMES])
        hi = np.log([_BOUNDS[k][1] for k in HYPER_NAMES])
        with self._lock:
            self._theta = np.clip(np.asarray(theta, dtype=float), lo, hi)

    def set_hyperparameters(self, *, warm_start: bool = True, **values: float) -> None:
        """Set hyperparameters by name (``HYPER_NAMES``, units of the names), e.g. from a
        calibration; ``warm_start`` also makes them the centre of the fit's weak prior."""
        unknown = set(values) - set(HYPER_NAMES)
        if unknown:
            raise ValueError(f"unknown hyperparameter(s) {sorted(unknown)}; known: {HYPER_NAMES}")
        th = self.learnt_theta
        for k, v in values.items():
            if v is not None and np.isfinite(v) and v > 0:
                th[HYPER_NAMES.index(k)] = np.log(float(v))
        self.set_theta(th)
        if warm_start:
            self._theta0 = self.learnt_theta

    def set_mains(self, hz: float | None) -> None:
        """Mains frequency of the SHO term (Hz) from the next conditioning on; None or 0: off
        (its amplitude pinned at the lower bound: no recompilation, unlike a GP built with
        ``mains_hz=None``). A GP built without the term keeps it off."""
        i = HYPER_NAMES.index("sigma_mains_nm")
        if self._omega is None:
            return
        th = self.learnt_theta
        if hz:
            self._omega = float(2 * np.pi * hz)
            self._fixed[i] = 0.0
            if th[i] <= np.log(_BOUNDS["sigma_mains_nm"][0]) + 1e-9:
                th[i] = self._theta0[i]
        else:
            self._fixed[i] = 1.0
            th[i] = np.log(_BOUNDS["sigma_mains_nm"][0])
        self.set_theta(th)
        self.mains_on = bool(hz)

    def refit(self, steps: int = 50, lr: float = 0.05, **kw) -> dict:
        """Fit the hyperparameters on the current window and recondition (see
        :func:`~.hyperfit.refit` for ``max_step``, ``data``, ``recondition``). Safe to call
        from a background thread while ``add``/``predict`` go on."""
        from stem_live.distortion.hyperfit import refit

        return refit(self, steps=steps, lr=lr, **kw)
