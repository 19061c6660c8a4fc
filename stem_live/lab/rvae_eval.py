"""Scoring the rVAE on the simulator (for ``stem-live evaluate``) and ``bench_rvae``.

- :func:`eval_particles`: preset ``particles``; trains on several seeded frames (time-boxed),
  encodes a held-out frame and scores the latent angle against the true orientation with the
  Fisher-Lee circular correlation (:func:`circular_corr`) of ``n * angle`` (n = the
  particles' symmetry order), which is invariant to a constant offset of either angle. Its
  sign says whether the latent turns the same way (+) or the opposite way (-) as the truth;
  the reported value is its absolute value (the decoder's rotation convention makes the
  sign +1 in practice, see ``angle_sign`` in the report).

  The particles preset mixes two species that are mirror images of each other. No rotation
  maps one onto the other, so the angle an unsupervised model calls 0 for each species is
  its own convention (the rVAE aligns the mirror form where it overlaps best with the
  other, about 1 rad away from the simulator's "long axis" convention). The headline key
  ``rvae.angle_circular_corr`` is therefore the count-weighted mean of the per-species
  correlations; ``rvae.angle_circular_corr_pooled`` scores all particles against one
  common offset.
- :func:`eval_dopants`: graphene with Si substitutions; the AUC (rank statistic, no sklearn)
  of the best single content latent separating Si-centred from C-centred patches on a
  held-out frame (``max(AUC, 1 - AUC)``: the sign of a latent is arbitrary).
- :func:`bench_rvae`: encoder throughput (patches/s at batch 1024 through the bucketed
  :class:`~stem_live.rvae.live.LiveEncoder`), training throughput (patches/s) and the time
  of a 10,000-patch x 20-epoch training run (optional).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

__all__ = ["circular_corr", "auc", "eval_particles", "eval_dopants", "bench_rvae", "simulated_patches"]


def circular_corr(a, b) -> float:
    """Fisher-Lee circular-circular correlation of two angle arrays (rad), in [-1, 1].

    ``sum_{i<j} sin(a_i - a_j) sin(b_i - b_j) / sqrt(sum sin^2(a_i - a_j) sum sin^2(b_i - b_j))``
    computed in O(N); +1 for ``b = a + c``, -1 for ``b = -a + c``, for any constant ``c``.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape or len(a) < 2:
        return float("nan")
    sa, ca, sb, cb = np.sin(a), np.cos(a), np.sin(b), np.cos(b)
    num = (sa * sb).sum() * (ca * cb).sum() - (sa * cb).sum() * (ca * sb).sum()
    da = (sa * sa).sum() * (ca * ca).sum() - (sa * ca).sum() ** 2
    db = (sb * sb).sum() * (cb * cb).sum() - (sb * cb).sum() ** 2
    den = math.sqrt(max(da * db, 0.0))
    return float(num / den) if den > 0 else float("nan")


def auc(scores, labels) -> float:
    """Area under the ROC curve of ``scores`` for binary ``labels`` (Mann-Whitney U with
    average ranks for ties). NaN if a class is empty."""
    from scipy.stats import rankdata

    s = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return float("nan")
    r = rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def simulated_patches(preset: str, seeds, *, size: int = 1024, patch_size: int = 32, **config):
    """Patches around the true columns of one frame per seed: (patches, masks, truths)."""
    from simulator import Microscope, MicroscopeConfig
    from stem_live.rvae.patches import extract_patches

    ps, ms, truths = [], [], []
    for sd in seeds:
        scope = Microscope(MicroscopeConfig(preset=preset, size=size, seed=int(sd), **config))
        image, _, truth = scope.acquire()
        p, m = extract_patches(image, truth.columns_px, patch_size)
        ps.append(p)
        ms.append(m)
        truths.append(truth)
    return np.concatenate(ps), np.concatenate(ms), truths


def _angle_scores(angle, orientation, species, n: int) -> dict:
    a = n * np.asarray(angle, np.float64)
    o = n * np.asarray(orientation, np.float64)
    pooled = circular_corr(a, o)
    sign = 1.0 if not np.isfinite(pooled) or pooled >= 0 else -1.0
    per, weights = [], []
    for s in np.unique(species):
        k = species == s
        if k.sum() >= 3:
            per.append(abs(circular_corr(a[k], o[k])))
            weights.append(k.sum())
    per_species = float(np.average(per, weights=weights)) if per else float("nan")
    # spread of the residual angle (rad, per species offset removed)
    res = []
    for s in np.unique(species):
        k = species == s
        d = sign * a[k] - o[k]
        res.append(np.angle(np.exp(1j * (d - np.angle(np.mean(np.exp(1j * d)))))) / n)
    r = np.concatenate(res) if res else np.zeros(0)
    return {"per_species": per_species, "pooled": abs(pooled), "sign": sign,
            "residual_deg_median": float(np.degrees(np.median(np.abs(r)))) if len(r) else float("nan")}


def eval_particles(seed: int = 0, train_seconds: float = 300.0, *, frames: int = 8, size: int = 1024,
                   epochs: int = 30, batch_size: int = 128, lr: float = 1e-3,
                   progress: Callable[[str], None] | None = None) -> dict:
    """Train on ``frames`` seeded particle frames for at most ``train_seconds`` (and
    ``epochs``), score the angle on a held-out frame. Returns report keys."""
    from stem_live.rvae.live import LiveEncoder
    from stem_live.rvae.train import train

    train_seconds = min(float(train_seconds), 300.0)
    base = 1000 * int(seed)
    x, m, _ = simulated_patches("particles", range(base + 1, base + 1 + frames), size=size)
    xt, mt, (truth,) = simulated_patches("particles", [base + 999], size=size)
    n_sym = int(truth.symmetry_order or 1)
    t0 = time.perf_counter()
    params, hist = train(x, masks=m, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                         progress=progress, max_seconds=train_seconds, symmetry_order=n_sym)
    t_train = time.perf_counter() - t0
    enc = LiveEncoder(params)
    lat = enc.encode(xt, mt)
    sc = _angle_scores(lat["angle"], truth.orientation_rad, np.asarray(truth.species), n_sym)
    return {
        "rvae.angle_circular_corr": sc["per_species"],
        "rvae.angle_circular_corr_pooled": sc["pooled"],
        "rvae.angle_sign": sc["sign"],
        "rvae.angle_residual_deg_median": sc["residual_deg_median"],
        "rvae.encode_per_s": encode_rate(enc),
        "rvae.train_seconds": t_train,
        "rvae.train_epochs": len(hist),
        "rvae.train_patches": int(len(x)),
    }


def eval_dopants(seed: int = 0, *, si_fraction: float = 0.03, frames: int = 2, size: int = 1024,
                 epochs: int = 10, batch_size: int = 128, lr: float = 1e-3, latent_dim: int = 2,
                 progress: Callable[[str], None] | None = None) -> dict:
    """Graphene with Si dopants: train on ``frames`` frames, AUC of the best content latent
    separating Si-centred from C-centred patches on a held-out frame."""
    from stem_live.rvae.live import LiveEncoder
    from stem_live.rvae.train import train

    base = 1000 * int(seed)
    cfg = {"si_fraction": si_fraction}
    x, m, _ = simulated_patches("graphene", range(base + 1, base + 1 + frames), size=size, **cfg)
    xt, mt, (truth,) = simulated_patches("graphene", [base + 999], size=size, **cfg)
    params, _ = train(x, masks=m, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=progress,
                      latent_dim=latent_dim)
    lat = LiveEncoder(params).encode(xt, mt)
    names = list(truth.species_names)
    si = np.asarray(truth.species) == names.index("Si")
    aucs = [auc(lat["content"][:, j], si) for j in range(lat["content"].shape[1])]
    best = max((max(a, 1 - a) for a in aucs if np.isfinite(a)), default=float("nan"))
    return {"rvae.dopant_auc": float(best), "rvae.dopant_count": int(si.sum()),
            "rvae.dopant_patches": int(len(si))}


def encode_rate(encoder, batch: int = 1024, repeats: int = 20, seed: int = 0) -> float:
    """Patches/s of ``encoder.encode`` at ``batch`` patches per call (best of 3 rounds)."""
    s = encoder.params.config.patch_size
    x = np.random.default_rng(seed).standard_normal((batch, s, s)).astype(np.float32)
    encoder.encode(x)  # compile
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(max(1, repeats // 3)):
            encoder.encode(x)
        best = min(best, (time.perf_counter() - t) / max(1, repeats // 3))
    return batch / best


def bench_rvae(*, batch: int = 1024, train_patches: int = 10_000, train_epochs: int = 0, seed: int = 0,
               progress: Callable[[str], None] | None = None) -> dict:
    """Encoder and training throughput on this machine (random weights, random patches).

    Returns ``encode_patches_per_s`` (batch ``batch``), ``train_patches_per_s`` (batch 128,
    compile excluded) and, when ``train_epochs`` > 0, ``train_seconds`` for a full
    ``train_patches`` x ``train_epochs`` run (compile included, as a user sees it).
    """
    import jax

    from stem_live.rvae.live import LiveEncoder
    from stem_live.rvae.model import RVAEConfig, init_params
    from stem_live.rvae.train import train, train_step_fn

    say = progress or (lambda _m: None)
    params = init_params(RVAEConfig(), seed)
    enc = LiveEncoder(params)
    say("encoder: compiling and timing ...")
    out = {"encode_patches_per_s": encode_rate(enc, batch=batch)}
    say(f"encoder: {out['encode_patches_per_s']:.0f} patches/s at batch {batch}")
    step, opt = train_step_fn(1e-3)
    st = opt.init(params)
    bs = 128
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((bs, 32, 32)).astype(np.float32)
    m = np.ones_like(x)
    w = np.ones(bs, np.float32)
    key = jax.random.PRNGKey(0)
    say("training step: compiling ...")
    t0 = time.perf_counter()
    p2, st2, aux = step(params, st, x, m, w, key, np.float32(1.0))
    jax.block_until_ready(aux)
    out["train_compile_s"] = time.perf_counter() - t0
    n_steps, best = 20, float("inf")
    for _ in range(3):  # best of three rounds: the machine may be shared
        t = time.perf_counter()
        for _ in range(n_steps):
            p2, st2, aux = step(p2, st2, x, m, w, key, np.float32(1.0))
        jax.block_until_ready(aux)
        best = min(best, time.perf_counter() - t)
    out["train_patches_per_s"] = n_steps * bs / best
    say(f"training: {out['train_patches_per_s']:.0f} patches/s (batch {bs})")
    if train_epochs > 0:
        xs = rng.standard_normal((train_patches, 32, 32)).astype(np.float32)
        t = time.perf_counter()
        train(xs, epochs=train_epochs, batch_size=bs, seed=seed, progress=progress)
        out["train_seconds"] = time.perf_counter() - t
        out["train_run"] = f"{train_patches} patches x {train_epochs} epochs"
    return out
