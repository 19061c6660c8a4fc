"""The jit-compiled JAX functions of :class:`~.gp.OnlineDriftGP` (built once, lazily:
jax, tinygp and optax are imported on first use). Model and notation: :mod:`.gp`."""
from __future__ import annotations

import numpy as np

__all__ = ["_functions", "_jax", "BOUNDS", "HYPER_NAMES", "BASIS"]

#: hyperparameters, all fitted in log space
HYPER_NAMES = ("sigma_long_nm", "ell_long_s", "sigma_short_nm", "ell_short_s",
               "sigma_white_nm", "flyback_tau_s", "sigma_mains_nm", "mains_q", "sigma_line_nm")
#: allowed ranges (box bounds of the fit, in log space)
BOUNDS = _BOUNDS = {"sigma_long_nm": (1e-4, 1.0), "ell_long_s": (0.2, 100.0),
                    "sigma_short_nm": (1e-5, 1.0), "ell_short_s": (1e-3, 2.0),
                    "sigma_white_nm": (1e-5, 0.1), "flyback_tau_s": (1e-6, 1e-3),
                    "sigma_mains_nm": (1e-6, 0.1), "mains_q": (0.5, 1e4), "sigma_line_nm": (1e-6, 0.05)}
#: basis: offset, velocity, a_y*, a_*x, flyback, and the mains line as a sinusoid of the set
#: frequency with its own amplitude and phase on each axis (zero when the mains term is off)
BASIS = ("offset", "velocity", "y", "x", "flyback", "mains_sin", "mains_cos")
_N_BASIS = len(BASIS)
_PAD_VAR = 1e8
_PAD_SIZES = (128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def _bucket(n: int, minimum: int) -> int:
    """The padded size (one of ``_PAD_SIZES``) for ``n`` points, at least ``minimum``."""
    n = max(int(n), minimum)
    return next((p for p in _PAD_SIZES if p >= n), int(np.ceil(n / 32768) * 32768))


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

    def mains_basis(t, omega):
        """sin, cos of the mains phase at t (n, 2); zeros without a mains term."""
        if omega is None:
            return jnp.zeros((t.shape[0], 2))
        return jnp.stack([jnp.sin(omega * t), jnp.cos(omega * t)], axis=1)

    def features(tau, t, pos_nm, centre_nm, t_line, omega, smear):
        """Basis phi (n, 7): the model is disp = phi @ beta + GP (signs folded in); the mains
        columns attenuated by each sample's averaging over its lines (``smear``, s)."""
        fb = jnp.exp(-jnp.maximum(t_line, 0.0) / tau)
        att = 1.0 if omega is None else jnp.exp(-0.5 * (omega * smear) ** 2)[:, None]
        return jnp.concatenate([jnp.stack([jnp.ones_like(t), t, -(pos_nm[:, 0] - centre_nm[0]),
                                           -(pos_nm[:, 1] - centre_nm[1]), -fb], axis=1),
                                mains_basis(t, omega) * att], axis=1)

    def time_features(t, omega):
        """The basis of the drift d(t) alone (offset, velocity, mains; no distortion) (m, 7)."""
        m = t.shape[0]
        return (jnp.zeros((m, _N_BASIS)).at[:, 0].set(1.0).at[:, 1].set(t)
                .at[:, 5:7].set(mains_basis(t, omega)))

    def time_kernel(h, omega):
        k = qs.Exp(scale=h[1], sigma=h[0]) + qs.Matern32(scale=h[3], sigma=h[2])
        if omega is not None:
            k = k + qs.SHO(omega=omega, quality=h[7], sigma=h[6])
        return k

    def stages(theta, data, prior_var, omega):
        """Both stages: within-group beta posterior, then the GP factor over groups."""
        h = unpack(theta)
        G = data["tg"].shape[0]
        gid = data["gid"]
        w = data["mask"] / (data["var"] + h[4] ** 2)                 # (R,)
        phi = features(h[5], data["t"], data["pos"], data["centre"], data["tline"], omega, data["smear"])
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
        phi_s = time_features(t_test, omega)
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
        phi_s = time_features(t_test, omega)
        mean = phi_s @ state["beta"] + ss_mean(state, t_test, omega)
        return mean, jnp.sqrt(variance(state, t_test, omega))

    @jax.jit
    def predict_mean(state, t_test, omega):
        """The posterior mean alone, from the state-space form: O(m) after conditioning."""
        phi_s = time_features(t_test, omega)
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

    _FN.update(condition=condition, predict=predict, predict_mean=predict_mean, make_fit=make_fit, fits={},
               nll=nll)
    return _FN
