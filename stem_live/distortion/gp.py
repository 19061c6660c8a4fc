"""Online Gaussian-process model of specimen drift (a function of scan time) and a fixed
scan distortion (a function of position in the frame), for predictive drift correction.

Model, per sample k (see :mod:`.observations` for the sign conventions)::

    disp_k = d(t_k) - S(pos_k) + eps_k,      eps_k ~ N(0, sigma_k^2 + sigma_white^2)

* ``d(t) = c + v (t - t_c) + f_long(t) + f_short(t)``: offset and velocity with broad
  Gaussian priors, and two Matern-3/2 processes (a slow wander on seconds, a fast one on
  tens of ms). The two components (y, x) share one kernel and one factorisation (a
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
``refit()`` (optax Adam on the negative log marginal likelihood, one jit-compiled loop);
``refit`` may run in a background thread: ``add``/``predict`` use an immutable snapshot
that is swapped atomically and never wait for a refit.

All JAX work runs in float64 (``jax.enable_x64`` as a context, not globally) on the CPU.
"""
from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from stem_live.distortion.observations import Observations

__all__ = ["OnlineDriftGP", "GPSnapshot", "HYPER_NAMES"]

#: hyperparameters, all fitted in log space
HYPER_NAMES = ("sigma_long_nm", "ell_long_s", "sigma_short_nm", "ell_short_s",
               "sigma_white_nm", "flyback_tau_s", "sigma_mains_nm", "mains_q", "sigma_line_nm")
#: allowed ranges (clipped in the fit)
_BOUNDS = {"sigma_long_nm": (1e-4, 1.0), "ell_long_s": (0.2, 100.0),
           "sigma_short_nm": (1e-5, 1.0), "ell_short_s": (1e-3, 2.0),
           "sigma_white_nm": (1e-5, 0.1), "flyback_tau_s": (1e-6, 1e-3),
           "sigma_mains_nm": (1e-6, 0.1), "mains_q": (0.5, 1e4), "sigma_line_nm": (1e-6, 0.05)}
#: basis: offset, velocity, a_y*, a_*x, flyback
BASIS = ("offset", "velocity", "y", "x", "flyback")
_N_BASIS = len(BASIS)
_PAD_SIZES = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_PAD_VAR = 1e8
_MEAN_CHUNKS = (16, 1024)  # padded sizes of the prediction (each compiles once per window size)
_N_VAR = 32            # points of the posterior-sd grid computed with each conditioning



def _jax():
    import jax
    return jax


# ----------------------------------------------------------------------------- jax code
_FN: dict = {}


def _functions():
    """Build (once) the jit-compiled functions; imports jax/tinygp lazily.

    Exact grouping: samples scanned within ``group_s`` of each other (one or two lines)
    are taken to see the same GP drift value. Per group, the likelihood factorises exactly
    into the weighted group mean (which sees d(t_g) + mean(phi) beta) and the within-group
    deviations (which see only (phi - mean(phi)) beta). The deviations give a Gaussian
    posterior on beta (prior for the GP stage); the GP runs over group means only, so its
    O(N) scan has a few points per line instead of one per column.
    """
    if _FN:
        return _FN
    import jax
    import jax.numpy as jnp
    import optax
    from tinygp.kernels import quasisep as qs

    lo = np.log(np.array([_BOUNDS[k][0] for k in HYPER_NAMES]))
    hi = np.log(np.array([_BOUNDS[k][1] for k in HYPER_NAMES]))

    def unpack(theta):
        return jnp.exp(jnp.clip(theta, lo, hi))

    def features(tau, t, pos_nm, centre_nm, t_line):
        """Basis phi (n, 5): the model is disp = phi @ beta + GP (signs folded in)."""
        fb = jnp.exp(-jnp.maximum(t_line, 0.0) / tau)
        return jnp.stack([jnp.ones_like(t), t, -(pos_nm[:, 0] - centre_nm[0]),
                          -(pos_nm[:, 1] - centre_nm[1]), -fb], axis=1)

    def time_kernel(h, omega):
        k = qs.Matern32(scale=h[1], sigma=h[0]) + qs.Matern32(scale=h[3], sigma=h[2])
        if omega is not None:
            k = k + qs.SHO(omega=omega, quality=h[7], sigma=h[6])
        return k

    def stages(theta, data, prior_var, omega):
        """Both stages: within-group beta posterior, then the GP factor over groups."""
        h = unpack(theta)
        G = data["tg"].shape[0]
        gid = data["gid"]
        w = data["mask"] / (data["var"] + h[4] ** 2)                 # (R,)
        phi = features(h[5], data["t"], data["pos"], data["centre"], data["tline"])
        y = data["y"]
        seg = lambda v: jax.ops.segment_sum(v, gid, num_segments=G)  # noqa: E731
        Wg = seg(w)
        Wg_safe = jnp.where(Wg > 0, Wg, 1.0)
        ybar = seg(w[:, None] * y) / Wg_safe[:, None]                # (G, 2)
        pbar = seg(w[:, None] * phi) / Wg_safe[:, None]              # (G, 5)
        yd = y - ybar[gid]
        pd = phi - pbar[gid]
        H = (w[:, None] * pd).T @ pd                                  # (5, 5)
        g = (w[:, None] * pd).T @ yd                                  # (5, 2)
        Syy = jnp.sum(w[:, None] * yd * yd, axis=0)                   # (2,)
        P = jnp.diag(1.0 / prior_var) + H
        Pc = jnp.linalg.cholesky(P)
        mu = jax.scipy.linalg.cho_solve((Pc, True), g)                # (5, 2)
        n_raw = jnp.sum(data["mask"])
        gmask = (Wg > 0).astype(y.dtype)
        n_grp = jnp.sum(gmask)
        logdet_P = 2.0 * jnp.sum(jnp.log(jnp.diag(Pc)))
        ll_within = (-0.5 * jnp.sum(Syy - jnp.sum(g * mu, axis=0))
                     + 2 * (-0.5 * jnp.sum(jnp.log(prior_var)) - 0.5 * logdet_P)
                     + 2 * 0.5 * (jnp.sum(jnp.where(w > 0, jnp.log(jnp.where(w > 0, w, 1.0)), 0.0))
                                  - jnp.sum(jnp.where(Wg > 0, jnp.log(Wg_safe), 0.0)))
                     - (n_raw - n_grp) * np.log(2 * np.pi))
        # GP stage over the group means: r = d(t_g) + pbar (beta - mu) + noise, with
        # beta - mu ~ N(0, P^-1) marginalised by Woodbury (the scan only carries the
        # stationary GP state; well conditioned), one factorisation for both outputs.
        tg = data["tg"]
        K = time_kernel(h, omega).to_symm_qsm(tg)
        nv = jnp.where(Wg > 0, 1.0 / Wg_safe + h[8] ** 2, _PAD_VAR)
        K = qs.SymmQSM(diag=qs.DiagQSM(d=K.diag.d + nv), lower=K.lower)
        L = K.cholesky()
        Phi = pbar * gmask[:, None]
        r = (ybar - pbar @ mu) * gmask[:, None]                      # (G, 2)
        Z = L.solve(jnp.concatenate([r, Phi], axis=1))               # one scan for both
        Zr, Zp = Z[:, :2], Z[:, 2:]                                  # (G, 2), (G, 5)
        M = P + Zp.T @ Zp
        Mc = jnp.linalg.cholesky(M)
        c = Zp.T @ Zr                                                # (5, 2)
        delta = jax.scipy.linalg.cho_solve((Mc, True), c)            # posterior beta - mu
        logdet = jnp.sum(jnp.log(L.diag.d) * gmask)
        logdet_M = 2.0 * jnp.sum(jnp.log(jnp.diag(Mc)))
        ll_gp = (-0.5 * jnp.sum(jnp.sum(Zr * Zr, axis=0) - jnp.sum(c * delta, axis=0))
                 - 2.0 * logdet - (logdet_M - logdet_P) - n_grp * np.log(2 * np.pi))
        return dict(h=h, L=L, Zr=Zr, Zp=Zp, Mc=Mc, delta=delta, mu=mu, Phi=Phi, r=r, ll=ll_within + ll_gp)

    def nll(theta, data, prior_var, omega, theta0):
        # MAP: a weak log-normal prior (sd 1.5 in log) around the initial values
        n = jnp.maximum(jnp.sum(data["mask"]), 1.0)
        return (-stages(theta, data, prior_var, omega)["ll"]
                + 0.5 * jnp.sum(((theta - theta0) / 1.5) ** 2)) / n

    def dense(M):
        """A (nested) tinygp Block as a dense block-diagonal array."""
        if hasattr(M, "blocks"):
            return jax.scipy.linalg.block_diag(*(dense(b) for b in M.blocks))
        return M

    def mean_states(kern, tg, alpha):
        """State-space form of the posterior mean sum_g k(t, t_g) alpha_g (tinygp's
        GeneralQSM product with the two scans done once per conditioning): forward states
        F[g] = sum_{g' <= g} (transition g' -> g) h alpha_g', backward states B[g] likewise
        from the right. A test time then costs O(1) (see ``ss_mean``)."""
        a = jax.vmap(lambda x1, x2: dense(kern.transition_matrix(x1, x2)))(
            jnp.append(tg[0], tg[:-1]), tg)                              # (G, J, J)
        h2 = jax.vmap(kern.observation_model)(tg)                        # (G, J)
        pinf = dense(kern.stationary_covariance())
        pu = h2 @ pinf

        def fwd(f, d):
            q, a_, x = d
            f = a_ @ f + jnp.outer(q, x)
            return f, f

        _, F = jax.lax.scan(fwd, jnp.zeros((h2.shape[1], alpha.shape[1])), (h2, a, alpha))

        def bwd(c, d):
            f, ap = c
            p, a_, x = d
            f = ap.T @ f + jnp.outer(p, x)
            return (f, a_), f

        _, B = jax.lax.scan(bwd, (jnp.zeros((h2.shape[1], alpha.shape[1])), a[0]), (pu, a, alpha),
                            reverse=True)
        return F, B

    def ss_mean(state, t_test, omega):
        """GP part of the posterior mean at t_test from the precomputed states: O(m)."""
        kern = time_kernel(state["h"], omega)
        tg, F, B = state["tg"], state["F"], state["B"]
        G = tg.shape[0]
        idx = jnp.searchsorted(tg, t_test, side="right") - 1
        pinf = dense(kern.stationary_covariance())
        h1 = jax.vmap(kern.observation_model)(t_test)                     # (m, J)
        i0 = jnp.clip(idx, 0, G - 1)
        i1 = jnp.clip(idx + 1, 0, G - 1)
        pl = jax.vmap(lambda h, x0, x1: (h @ pinf) @ dense(kern.transition_matrix(x0, x1)))(
            h1, tg[i0], t_test)
        qu = jax.vmap(lambda h, x0, x1: dense(kern.transition_matrix(x0, x1)) @ h)(
            h1, t_test, tg[i1])
        lower = jnp.where((idx >= 0)[:, None], jnp.einsum("mj,mjk->mk", pl, F[i0]), 0.0)
        upper = jnp.where((idx < G - 1)[:, None], jnp.einsum("mj,mjk->mk", qu, B[i1]), 0.0)
        return lower + upper

    def cross_cov(kern, tg, t_test):
        """K(tg, t_test) (G, m) through the quasiseparable form: O((G + m) m), no dense
        kernel evaluation (t_test sorted)."""
        return kern.to_general_qsm(tg, t_test) @ jnp.eye(t_test.shape[0])

    def variance(state, t_test, omega):
        """Posterior variance of d(t) at sorted t_test, with the uncertainty of the linear
        terms (Rasmussen & Williams eq. 2.42): one quasiseparable solve with m columns."""
        h, L = state["h"], state["L"]
        m = t_test.shape[0]
        phi_s = jnp.zeros((m, _N_BASIS)).at[:, 0].set(1.0).at[:, 1].set(t_test)
        A = L.solve(cross_cov(time_kernel(h, omega), state["tg"], t_test))
        Rm = phi_s.T - state["Zp"].T @ A                             # (5, m)
        V = jax.scipy.linalg.solve_triangular(state["Mc"], Rm, lower=True)
        kss = h[0] ** 2 + h[2] ** 2
        if omega is not None:
            kss = kss + h[6] ** 2
        return jnp.maximum(kss - jnp.sum(A * A, axis=0) + jnp.sum(V * V, axis=0), 1e-14)

    @jax.jit
    def condition(theta, data, prior_var, omega):
        st = stages(theta, data, prior_var, omega)
        L, Mc = st["L"], st["Mc"]
        beta = st["mu"] + st["delta"]
        # K^-1 (r - Phi delta), reusing the forward solves: L^-1 (r - Phi delta) = Zr - Zp delta
        alpha = L.transpose().solve(st["Zr"] - st["Zp"] @ st["delta"])   # (G, 2)
        beta_cov = jax.scipy.linalg.cho_solve((Mc, True), jnp.eye(Mc.shape[0]))
        F, B = mean_states(time_kernel(st["h"], omega), data["tg"], alpha)
        state = {"h": st["h"], "L": L, "beta": beta, "beta_cov": beta_cov,
                 "Zp": st["Zp"], "Mc": Mc, "tg": data["tg"], "ll": st["ll"], "F": F, "B": B,
                 "tvar": data["tvar"]}
        # the posterior sd on a grid over the newest frame and the next two (interpolated
        # by ``predict``): computed here, in the same call, once per conditioning
        state["svar"] = jnp.sqrt(variance(state, data["tvar"], omega))
        return state

    @jax.jit
    def predict(state, t_test, omega):
        """Drift d(t) at sorted t_test and its sd (exact; one solve with m columns)."""
        m = t_test.shape[0]
        phi_s = jnp.zeros((m, _N_BASIS)).at[:, 0].set(1.0).at[:, 1].set(t_test)
        mean = phi_s @ state["beta"] + ss_mean(state, t_test, omega)
        return mean, jnp.sqrt(variance(state, t_test, omega))

    @jax.jit
    def predict_mean(state, t_test, omega):
        """The posterior mean alone, from the state-space form: O(m) after conditioning."""
        m = t_test.shape[0]
        phi_s = jnp.zeros((m, _N_BASIS)).at[:, 0].set(1.0).at[:, 1].set(t_test)
        return phi_s @ state["beta"] + ss_mean(state, t_test, omega)

    def make_fit(steps, lr):
        opt = optax.adam(lr)

        @jax.jit
        def fit(theta, data, prior_var, omega, fixed, theta0):
            def body(carry, _):
                th, st = carry
                val, g = jax.value_and_grad(nll)(th, data, prior_var, omega, theta0)
                g = jnp.where(jnp.isfinite(g) & (fixed == 0), g, 0.0)
                upd, st = opt.update(g, st, th)
                return (optax.apply_updates(th, upd), st), val

            (th, _), vals = jax.lax.scan(body, (theta, opt.init(theta)), None, length=steps)
            return th, vals
        return fit

    _FN.update(condition=condition, predict=predict, predict_mean=predict_mean, make_fit=make_fit, fits={})
    return _FN


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


def _bucket(n: int, minimum: int) -> int:
    n = max(int(n), minimum)
    return next((p for p in _PAD_SIZES if p >= n), int(np.ceil(n / 32768) * 32768))


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
    centre_px: origin (row, col) of the distortion terms; None = the mean position of the
        first frame's samples (rounded to a pixel).
    fit_distortion: False pins the distortion coefficients to 0.
    min_groups: the GP stage is padded to a power of two >= this (each size compiles once,
        a few seconds; raise it to compile once per session).
    max_groups: the padded group count is capped here (None: no cap): a window with more
        groups is trimmed, oldest frames first, then coarser groups within one frame, so a
        session compiles one size and no later frame waits for a compilation.
    """

    def __init__(self, window_frames: int = 20, max_samples: int = 4000, *,
                 group_s: float = 1e-3, mains_hz: float | None = 50.0,
                 sigma_long_nm: float = 0.02, ell_long_s: float = 5.0,
                 sigma_short_nm: float = 0.003, ell_short_s: float = 0.05,
                 sigma_white_nm: float = 0.001, flyback_tau_us: float = 20.0,
                 sigma_mains_nm: float = 0.003, mains_q: float = 50.0, sigma_line_nm: float = 0.001,
                 prior_sd: tuple[float, float, float, float, float] = (0.3, 0.1, 0.05, 0.05, 0.05),
                 centre_px: tuple[float, float] | None = None, fit_distortion: bool = True,
                 min_groups: int = 256, max_groups: int | None = None):
        if window_frames < 1 or max_samples < 16 or group_s <= 0:
            raise ValueError("need window_frames >= 1, max_samples >= 16 and group_s > 0")
        self.window_frames = int(window_frames)
        self.max_samples = int(max_samples)
        self.group_s = float(group_s)
        self.min_groups = int(min_groups)     # smallest padded GP size (fewer compilations)
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
        # fitted by refit(): all but the slow length scale and the SHO quality (a few
        # seconds of data cannot pin them down), and the SHO amplitude when it is off
        fixed = {"ell_long_s", "mains_q"} | ({"sigma_mains_nm"} if self._omega is None else set())
        self._fixed = np.array([k in fixed for k in HYPER_NAMES], dtype=float)
        pv = np.asarray(prior_sd, dtype=float) ** 2
        if not fit_distortion:
            pv[2:] = 1e-16
        self._prior_var = pv
        self._centre_px = None if centre_px is None else np.asarray(centre_px, dtype=float)
        self._pixel_size = np.ones(2)
        self._frames: deque[Observations] = deque()
        self._lock = threading.Lock()          # guards the window and _theta
        self._snap = GPSnapshot(self._theta.copy(), None, np.zeros(2), 0.0, 0)
        self.timings_ms: dict[str, float] = {}
        self.n_refits = 0

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
            self._snap = GPSnapshot(self._theta.copy(), None, np.zeros(2), 0.0, 0)

    def relock(self, t_from_s: float) -> None:
        """Drop every sample scanned before ``t_from_s`` (after a jump) and recondition."""
        with self._lock:
            kept = [f.select(f.t_s >= t_from_s) for f in self._frames]
            self._frames = deque(f for f in kept if len(f))
            data = self._window_data()
            theta = self._theta.copy()
        self._snap = self._condition(theta, data)

    def add(self, obs: Observations) -> None:
        """Add one frame's samples and recondition on the window (O(N))."""
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
            self._frames.append(obs)
            while len(self._frames) > self.window_frames:
                self._frames.popleft()
            data = self._window_data()
            theta = self._theta.copy()
        t1 = time.perf_counter()
        self._snap = self._condition(theta, data)
        self._warm_up(self._snap)
        t2 = time.perf_counter()
        self.timings_ms = {"window": (t1 - t0) * 1e3, "condition": (t2 - t1) * 1e3,
                           "add": (t2 - t0) * 1e3}

    def _window_data(self) -> dict | None:
        """The window, thinned to max_samples (oldest frames first), grouped and padded."""
        frames = list(self._frames)
        if not frames:
            return None
        budget = self.max_samples
        keep = []
        for f in reversed(frames):                      # newest first, keep all of them
            if budget <= 0:
                break
            if len(f) <= budget:
                keep.append(f)
                budget -= len(f)
            else:
                keep.append(f.select(slice(None, None, int(np.ceil(len(f) / budget)))))
                budget = 0
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
            if len(first) > 1:   # more groups than the padded size: drop the oldest frame
                w = w.select(w.frame != w.frame[first[0]])
            else:                # one frame alone: coarser groups
                coarsen *= 2
        wt = 1.0 / w.sigma_nm ** 2
        tg = np.bincount(gid, wt * t, n_g) / np.bincount(gid, wt, n_g)
        R = _bucket(max(n, self.max_samples), 256)     # fixed: one compilation
        G = _bucket(n_g, self.min_groups)
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
                fn["predict_mean"](snap.mean_state, np.zeros(m), self._omega)
            jax.block_until_ready(fn["predict"](snap.state, np.zeros(16), self._omega))

    @staticmethod
    def _jdata(data: dict) -> dict:
        return {k: v for k, v in data.items() if not k.startswith("_")}

    def _condition(self, theta: np.ndarray, data: dict | None) -> GPSnapshot:
        if data is None:
            return GPSnapshot(theta.copy(), None, np.zeros(2), 0.0, 0)
        jax = _jax()
        fn = _functions()
        with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
            st = fn["condition"](theta, self._jdata(data), self._prior_var, self._omega)
            beta = np.asarray(st["beta"])
            bsd = np.sqrt(np.maximum(np.diag(np.asarray(st["beta_cov"])), 0.0))
            mean_state = {k: st[k] for k in ("h", "beta", "tg", "F", "B")}
        return GPSnapshot(theta.copy(), st, data["_y_mean"], data["_tc"], data["_n"], data["_ng"],
                          data["_frames"], data["_t_range"], beta, np.stack([bsd, bsd], axis=1),
                          mean_state, np.asarray(st["tvar"]), np.asarray(st["svar"]))

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
                means.append(np.asarray(fn["predict_mean"](snap.mean_state, tp, self._omega))[:len(tt)])
            tv = snap.tvar
            if rel.min() >= tv[0] and rel.max() <= tv[-1]:
                # the sd grid over the newest frame and the next two, from the conditioning
                sd = np.interp(rel, tv, snap.svar)
            else:
                # elsewhere: a solve (one O(window) scan) at <= 16 points, interpolated; the
                # sd varies slowly between samples
                tk = np.sort(rel) if m <= 16 else np.linspace(rel.min(), rel.max(), 16)
                tp = np.concatenate([tk, np.full(16 - len(tk), tk[-1])])
                sk = np.asarray(fn["predict"](snap.state, tp, self._omega)[1])[:len(tk)]
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
    def refit(self, steps: int = 50, lr: float = 0.05) -> dict:
        """Fit the hyperparameters on the current window (optax Adam on the negative log
        marginal likelihood, one jit-compiled loop), then swap them in atomically.
        Safe to call from a background thread while ``add``/``predict`` go on."""
        t0 = time.perf_counter()
        with self._lock:
            data = self._window_data()
            theta = self._theta.copy()
        if data is None:
            return {"steps": 0, "ok": False}
        jax = _jax()
        fn = _functions()
        key = (int(steps), float(lr))
        if key not in fn["fits"]:
            fn["fits"][key] = fn["make_fit"](int(steps), float(lr))
        with jax.enable_x64(True), jax.default_device(jax.devices("cpu")[0]):
            th, vals = fn["fits"][key](theta, self._jdata(data), self._prior_var, self._omega,
                                       self._fixed, self._theta0)
            th, vals = np.asarray(th), np.asarray(vals)
        if not np.all(np.isfinite(th)):
            return {"steps": int(steps), "ok": False}
        lo = np.log([_BOUNDS[k][0] for k in HYPER_NAMES])
        hi = np.log([_BOUNDS[k][1] for k in HYPER_NAMES])
        th = np.clip(th, lo, hi)
        with self._lock:
            self._theta = th
            data = self._window_data()          # the window may have moved meanwhile
        self._snap = self._condition(th, data)
        self.n_refits += 1
        return {"steps": int(steps), "ok": True, "nll_start": float(vals[0]), "nll_end": float(vals[-1]),
                "ms": (time.perf_counter() - t0) * 1e3, **self.hyperparameters}
