"""Hyperparameters of :class:`~.gp.OnlineDriftGP` learnt from the stream.

:func:`refit`: type-II maximum likelihood (MAP with a weak log-normal prior, sd 1.5 in log,
around the warm start) by projected Adam, one jit-compiled loop; the box is the bounds of
``gp.BOUNDS`` intersected with ``theta_now +- max_step`` (log), so one bad window moves a
hyperparameter by at most a factor ``exp(max_step)``; a fit whose objective is not better
than the current values on the same data is rejected.

:class:`HyperLearner`: every ``every_frames`` frames, in a background thread, detects the
mains frequency (:mod:`.mains`) and refits on the GP's ``history`` (longer than its
prediction window, thinned to a fixed padded size: one compilation a session), then hands
the values to the GP (``set_theta``): the next frame's conditioning uses them. No frame
waits for it: ``after_frame`` only starts the thread.
"""
from __future__ import annotations

import atexit
import copy
import threading
import time
from collections import deque

import numpy as np

from stem_live.distortion.gp_jax import BOUNDS, HYPER_NAMES, _bucket, _functions, _jax
from stem_live.distortion.mains import detect_mains
from stem_live.distortion.observations import Observations

__all__ = ["refit", "history_data", "HyperLearner"]

_LO = np.log([BOUNDS[k][0] for k in HYPER_NAMES])
_HI = np.log([BOUNDS[k][1] for k in HYPER_NAMES])
_FITS: dict = {}
_RUNNING: set = set()   # fit threads: waited for at exit (a thread inside XLA at shutdown aborts)


@atexit.register
def _join_fits(timeout_s: float = 30.0) -> None:
    for th in list(_RUNNING):
        th.join(timeout_s)


def _fit_fn(steps: int, lr: float):
    """(theta_best, nll_best, nll_start): projected Adam on the MAP objective."""
    key = (int(steps), float(lr))
    if key in _FITS:
        return _FITS[key]
    jax = _jax()
    import jax.numpy as jnp
    import optax

    nll = _functions()["nll"]
    opt = optax.adam(lr)

    @jax.jit
    def fit(theta, data, prior_var, omega, fixed, theta0, lo, hi):
        args = (data, prior_var, omega, theta0)
        start = nll(theta, *args)

        def body(carry, _):
            th, st, best, best_v = carry
            val, g = jax.value_and_grad(nll)(th, *args)
            ok = jnp.isfinite(val)
            better = ok & (val < best_v)
            best = jnp.where(better, th, best)
            best_v = jnp.where(better, val, best_v)
            g = jnp.where(jnp.isfinite(g) & (fixed == 0) & ok, g, 0.0)
            upd, st = opt.update(g, st, th)
            th = jnp.clip(optax.apply_updates(th, upd), lo, hi)
            return (th, st, best, best_v), val

        init = (theta, opt.init(theta), theta, jnp.where(jnp.isfinite(start), start, jnp.inf))
        (th, _, best, best_v), _ = jax.lax.scan(body, init, None, length=int(steps))
        last = nll(th, *args)
        use_last = jnp.isfinite(last) & (last < best_v)
        return jnp.where(use_last, th, best), jnp.where(use_last, last, best_v), start

    _FITS[key] = fit
    return fit


def refit(gp, *, steps: int = 50, lr: float = 0.05, data: dict | None = None,
          max_step: float | None = None, recondition: bool = True, min_gain: float = 0.0) -> dict:
    """Fit the free hyperparameters of ``gp`` (an :class:`~.gp.OnlineDriftGP`) on ``data``
    (default: its window).

    max_step: largest change of a log-hyperparameter (None: only the bounds); min_gain:
    the objective (per sample) must drop by more than this, else the values are kept.
    recondition: recompute the model now (else the next ``add`` uses the new values).
    Returns {"ok", "accepted", "nll_start", "nll_end", "ms", **hyperparameters}."""
    t0 = time.perf_counter()
    with gp._lock:
        if data is None:
            data = gp._window_data()
        theta = gp._theta.copy()
    if data is None:
        return {"steps": 0, "ok": False, "accepted": False}
    lo, hi = _LO.copy(), _HI.copy()
    if max_step is not None:
        lo, hi = np.maximum(lo, theta - max_step), np.minimum(hi, theta + max_step)
    theta = np.clip(theta, lo, hi)
    jax = _jax()
    with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
        th, v_end, v_start = _fit_fn(steps, lr)(theta, gp._jdata(data), gp.prior_var_for(data), gp._omega,
                                               gp._fixed.copy(), gp._theta0, lo, hi)
        th, v_end, v_start = np.asarray(th), float(v_end), float(v_start)
    ok = bool(np.all(np.isfinite(th)) and np.isfinite(v_end))
    accepted = ok and v_end < v_start - min_gain
    if accepted:
        gp.set_theta(th)
        if recondition:
            with gp._lock:
                window = gp._window_data()
                theta_now = gp._theta.copy()
            gp._snap = gp._condition(theta_now, window)
        gp.n_refits += 1
    out = dict(zip(HYPER_NAMES, np.exp(gp.learnt_theta).tolist()))
    return {"steps": int(steps), "ok": ok, "accepted": accepted, "nll_start": v_start, "nll_end": v_end,
            "ms": (time.perf_counter() - t0) * 1e3, **out}


def history_data(gp, *, max_samples: int = 4096, max_groups: int = 1024,
                 per_group: int = 4, seed: int = 0) -> dict | None:
    """The GP's ``history`` as fit data of a fixed padded size: per frame a random subset of
    its sample groups (random, so the kept lines do not alias the mains period), at most
    ``per_group`` samples of each (within-group scatter measures the white noise)."""
    with gp._lock:
        frames = list(gp.history)
        centre = None if gp._centre_px is None else gp._centre_px.copy()
    if not frames or centre is None:
        return None
    rng = np.random.default_rng(seed)
    g_budget = max(1, int(0.85 * max_groups) // len(frames))
    s_budget = max(1, max_samples // len(frames))
    kept = []
    for f in frames:
        t = f.t_s - f.t_s.min()
        gid = np.floor(t / gp.group_s).astype(np.int64)
        groups = np.unique(gid)
        n_g = min(len(groups), g_budget, max(1, s_budget // per_group))
        chosen = np.sort(rng.choice(groups, n_g, replace=False))
        idx = np.flatnonzero(np.isin(gid, chosen))
        rng.shuffle(idx)
        order = np.argsort(gid[idx], kind="stable")
        idx = idx[order]
        gsel = gid[idx]
        rank = np.arange(len(idx)) - np.searchsorted(gsel, gsel)
        kept.append(f.select(np.sort(idx[rank < per_group])))
    scratch = copy.copy(gp)
    scratch._frames = deque(kept)
    scratch.max_samples = int(max_samples)
    scratch.min_groups = int(max_groups)
    scratch._group_cap = _bucket(max_groups, max_groups)
    scratch._centre_px = centre
    return scratch._window_data()


def _unwrap(gp):
    """The :class:`~.gp.OnlineDriftGP` itself (a calibration's wrapper holds it as ``gp``)."""
    inner = gp.__dict__.get("gp")
    return gp if inner is None else inner


class HyperLearner:
    """Background hyperparameter (and mains) learning for one :class:`OnlineDriftGP`.

    every_frames: a fit starts after this many new frames (if none is running); steps, lr:
    optimiser steps and rate per fit; max_step: largest change per fit (log units; 0.5:
    a factor 1.65); max_duty: the fits take at most this fraction of the wall time (the next
    starts no sooner than its predecessor's duration / max_duty after it), so on a machine
    with few cores the frames share the CPU with a fit only now and then; max_samples, max_groups: fixed padded size of the fit data; min_history_s:
    no fit before the history spans this (s). mains: "auto" (detect 50 / 60 Hz / none from
    the stream), a frequency (Hz), or 0 / None (off); min_span_no_mains_s: "no mains" is
    decided only on a history at least this long (a line is found sooner when it is there).
    background: False runs the fit inside
    ``after_frame`` (tests, offline replays that want reproducible values)."""

    def __init__(self, gp, *, every_frames: int = 4, steps: int = 40, lr: float = 0.08, max_step: float = 0.5,
                 max_samples: int = 4096, max_groups: int = 1024, min_history_s: float = 0.5,
                 mains: str | float | None = "auto", background: bool = True, max_duty: float = 0.2,
                 min_span_no_mains_s: float = 2.0) -> None:
        self.gp = _unwrap(gp)
        self.every_frames = max(1, int(every_frames))
        self.steps, self.lr, self.max_step = int(steps), float(lr), float(max_step)
        self.max_samples, self.max_groups = int(max_samples), int(max_groups)
        self.min_history_s = float(min_history_s)
        self.mains = mains
        self.min_span_no_mains_s = float(min_span_no_mains_s)
        self.background = bool(background)
        self.max_duty = float(max_duty)
        self._next_start = 0.0      # perf_counter time before which no fit starts
        self._frames_since = 0
        self._thread: threading.Thread | None = None
        self._mains_votes: deque = deque(maxlen=2)
        self.mains_detection = None
        self.last: dict = {}
        self.n_fits = 0
        self.n_accepted = 0
        self.error: str | None = None
        if mains != "auto":
            self.gp.set_mains(float(mains) if mains else None)

    @property
    def running(self) -> bool:
        th = self._thread
        return th is not None and th.is_alive()

    def after_frame(self) -> bool:
        """Count a frame; start a fit when one is due and none runs. Returns True if started.
        Until the mains frequency is decided (``mains="auto"``), it is looked for after every
        frame (a periodogram of the line means: milliseconds), not only with the fits."""
        self._frames_since += 1
        if self.mains == "auto" and self.mains_detection_pending and not self.running:
            self.detect_mains()
        if self._frames_since < self.every_frames or self.running or \
                (self.background and time.perf_counter() < self._next_start):  # inline fits: reproducible
            return False
        with self.gp._lock:
            span = (self.gp.history[-1].t_s.max() - self.gp.history[0].t_s.min()) if self.gp.history else 0.0
        if span < self.min_history_s:
            return False
        self._frames_since = 0
        if not self.background:
            self.run_once()
            return True
        self._thread = threading.Thread(target=self._run_safe, name="drift-hyperfit", daemon=True)
        _RUNNING.add(self._thread)
        self._thread.start()
        return True

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a running fit (tests, end of a replay); True when none runs."""
        th = self._thread
        if th is not None:
            th.join(timeout)
        return not self.running

    def compile(self) -> None:
        """Compile the fit for this learner's data size now (one fit on whatever history
        there is; its values are kept), so that the first background fit of a stream does
        not compete with the frames for the CPU for seconds."""
        if self.gp.history:
            self.run_once()

    def _run_safe(self) -> None:
        import os

        try:   # a lower CPU priority for this thread: the frames come first
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
        except (AttributeError, OSError):
            pass
        t0 = time.perf_counter()
        try:
            self.run_once()
        except Exception as exc:   # a failed fit keeps the values: the stream goes on
            self.error = f"{type(exc).__name__}: {exc}"
        finally:
            t1 = time.perf_counter()
            self._next_start = t1 + (t1 - t0) * (1.0 / max(self.max_duty, 1e-3) - 1.0)
            _RUNNING.discard(threading.current_thread())

    @property
    def mains_detection_pending(self) -> bool:
        """No two equal mains decisions yet (the GP still runs on its starting frequency)."""
        v = list(self._mains_votes)
        return len(v) < 2 or v.count(v[0]) != len(v)

    def detect_mains(self) -> None:
        """Mains from the history; the GP's frequency changes after two equal decisions."""
        with self.gp._lock:
            frames = list(self.gp.history)
        if not frames:
            return
        det = detect_mains(Observations.concat(frames), group_s=self.gp.group_s)
        self.mains_detection = det
        if not det.ratio:   # too short to decide
            return
        if det.hz is None and det.span_s < self.min_span_no_mains_s:
            return          # no line yet: too short to say there is none (a weak line needs longer)
        self._vote(det.hz)

    def line_pickup_vote(self, hz: float) -> None:
        """The locator found a pick-up at the mains frequency ``hz`` (50 or 60) in a frame's scan
        lines: one vote, as a decision from the drift samples is, while the frequency is undecided
        (on slow lines the samples cannot show the line; on fast ones this decides a frame sooner)."""
        if self.mains == "auto" and self.mains_detection_pending:
            self._vote(float(hz))

    def _vote(self, hz: float | None) -> None:
        """The GP's mains frequency changes after two equal votes in a row."""
        self._mains_votes.append(hz)
        votes = list(self._mains_votes)
        current = self.gp.mains_hz if self.gp.mains_on else None
        if len(votes) == votes.count(votes[0]) and votes[0] != current:
            self.gp.set_mains(votes[0])

    def run_once(self) -> dict:
        """Mains detection (``mains="auto"``) and one bounded fit on the history."""
        if self.mains == "auto":
            self.detect_mains()
        data = history_data(self.gp, max_samples=self.max_samples, max_groups=self.max_groups, seed=self.n_fits)
        if data is None:
            return {"ok": False, "accepted": False}
        res = refit(self.gp, steps=self.steps, lr=self.lr, data=data, max_step=self.max_step, recondition=False)
        self.n_fits += 1
        self.n_accepted += int(res.get("accepted", False))
        self.last = res
        return res

    def summary(self) -> dict:
        """JSON-able: the learnt values (units of their names), mains, fit counts."""
        det = self.mains_detection
        return {"values": self.gp.learnt_hyperparameters(), "mains_hz": self.gp.mains_hz if self.gp.mains_on else None,
                "mains_mode": "auto" if self.mains == "auto" else "set",
                "mains_ratio": None if det is None else {str(k): round(v, 2) for k, v in det.ratio.items()},
                "fits": self.n_fits, "accepted": self.n_accepted, "running": self.running,
                "last_fit_ms": self.last.get("ms"), "error": self.error}
