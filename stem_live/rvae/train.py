"""Training (optax Adam, one jit-compiled step), checkpoints.

``train(patches, epochs=, batch_size=, lr=, seed=)`` shuffles with a seeded generator, runs
a fixed-shape compiled step per batch (the last, partial batch is padded and its padding
rows get weight 0 in the loss, so every patch trains and nothing recompiles), and reports
one line per epoch through ``progress``.

Checkpoints are msgpack files (``flax.serialization``) holding the format marker, the
:class:`~stem_live.rvae.model.RVAEConfig` as JSON, the variables and the training history.
The path is always the caller's: nothing is written to a default location.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["train", "save_checkpoint", "load_checkpoint", "CheckpointError", "train_step_fn",
           "params_bytes"]

FORMAT = "stem-live/rvae/1"


class CheckpointError(ValueError):
    """A checkpoint cannot be written or read; the one-line text says what to do."""


@functools.lru_cache(maxsize=16)
def train_step_fn(lr: float):
    """A jit-compiled ``step(params, opt_state, x, m, w, key) -> (params, opt_state, aux)``
    and the optimizer; cached per learning rate (compiled once per shape)."""
    import jax
    import optax

    from stem_live.rvae.model import loss_fn

    optimizer = optax.adam(lr)

    @jax.jit
    def step(params, opt_state, x, m, w, key, gate=1.0):
        (_, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, m, w, key, gate)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, aux

    return step, optimizer


def default_warmup(epochs: int, steps_per_epoch: int, steps: int = 300) -> int:
    """Epochs with the content latents switched off: at least ``steps`` optimizer steps (the
    angle needs about 150-300 to settle; with too short a warm-up the content latents can
    capture part of the rotation) or a quarter of the run, at most half of it."""
    need = -(-steps // max(int(steps_per_epoch), 1))
    return int(min(epochs // 2, max(epochs // 4, need)))


def _as_patches(patches, masks, patch_size: int | None):
    x = np.asarray(patches)
    if x.ndim == 2:
        x = x[None]
    if x.ndim != 3 or x.shape[1] != x.shape[2] or x.shape[0] == 0:
        raise ValueError(f"patches must be a non-empty (N, S, S) stack, got shape {np.shape(patches)}")
    if patch_size is not None and x.shape[1] != patch_size:
        raise ValueError(f"patches are {x.shape[1]}x{x.shape[2]}, the model expects {patch_size}x{patch_size}")
    x = x.astype(np.float32, copy=False)
    m = np.ones(x.shape, np.float32) if masks is None else np.asarray(masks, np.float32).reshape(x.shape)
    if not np.isfinite(x).all():
        bad = ~np.isfinite(x)
        x = np.where(bad, 0.0, x).astype(np.float32)
        m = np.where(bad, 0.0, m).astype(np.float32)
    return x, m


def train(patches, *, masks=None, epochs: int = 20, batch_size: int = 128, lr: float = 1e-3, seed: int = 0,
          progress: Callable[[str], None] | None = None, config=None, params=None,
          max_seconds: float | None = None, warmup_epochs: int | None = None, **config_kwargs):
    """Train an rVAE on patches (N, S, S) (optionally with validity ``masks``).

    ``config`` (an RVAEConfig) or keyword arguments of RVAEConfig (latent_dim,
    symmetry_order, angle_prior_sigma, shift_prior_sigma, content_prior_sigma, recon_sigma,
    ...) define a new model; ``params`` continues training an existing one instead.
    ``max_seconds`` stops after the epoch during which the budget ran out.

    ``warmup_epochs`` (default :func:`default_warmup`; 0 when continuing from ``params``):
    the first epochs feed the decoder zero content, so the model first explains the data by
    rotation and shift alone; this makes the angle latent reliable (without it the content
    latents often absorb part of the orientation). The loss stays the ELBO throughout.

    Returns ``(params, history)``; history is a list with one dict per epoch (epoch, loss,
    recon, kl_angle, kl_shift, kl_content, seconds).
    """
    import jax

    from stem_live.rvae.model import RVAEConfig, init_params

    if epochs < 0 or batch_size < 1 or not (lr > 0):
        raise ValueError("epochs must be >= 0, batch_size >= 1 and lr > 0")
    params_given = params is not None
    if params is None:
        if config is None:
            s = np.shape(patches)[-1] if np.ndim(patches) >= 2 else 32
            config_kwargs.setdefault("patch_size", int(s))
            config = RVAEConfig(**config_kwargs)
        elif config_kwargs:
            raise ValueError("give either config or config keyword arguments, not both")
        params = init_params(config, seed)
    cfg = params.config
    x, m = _as_patches(patches, masks, cfg.patch_size)
    n = len(x)
    bs = int(min(batch_size, max(n, 1)))
    step, optimizer = train_step_fn(float(lr))
    opt_state = optimizer.init(params)
    rng = np.random.default_rng(seed)
    key = jax.random.PRNGKey(int(seed) + 1)
    if warmup_epochs is None:
        warmup_epochs = 0 if params_given else default_warmup(int(epochs), -(-n // bs))
    history = []
    t_start = time.perf_counter()
    for epoch in range(1, int(epochs) + 1):
        t0 = time.perf_counter()
        perm = rng.permutation(n)
        sums: dict[str, float] = {}
        batches = []
        for i in range(0, n, bs):
            idx = perm[i:i + bs]
            w = np.ones(bs, np.float32)
            if len(idx) < bs:
                w[len(idx):] = 0.0
                idx = np.concatenate([idx, np.zeros(bs - len(idx), idx.dtype)])
            key, sub = jax.random.split(key)
            gate = np.float32(0.0 if epoch <= warmup_epochs else 1.0)
            params, opt_state, aux = step(params, opt_state, x[idx], m[idx], w, sub, gate)
            batches.append((aux, float(w.sum())))
        for aux, wsum in batches:  # one device sync per epoch
            for k, v in aux.items():
                sums[k] = sums.get(k, 0.0) + float(v) * wsum
        rec = {k: v / n for k, v in sums.items()}
        if not np.isfinite(rec.get("loss", 0.0)):
            raise FloatingPointError(f"training diverged at epoch {epoch} (loss is not finite); "
                                     f"try a smaller learning rate than {lr}")
        rec.update(epoch=epoch, seconds=time.perf_counter() - t0)
        history.append(rec)
        if progress is not None:
            progress(f"epoch {epoch}/{epochs}: loss {rec['loss']:.2f} (recon {rec['recon']:.2f}, "
                     f"kl angle {rec['kl_angle']:.2f} shift {rec['kl_shift']:.2f} "
                     f"content {rec['kl_content']:.2f}) {rec['seconds']:.1f} s")
        if max_seconds is not None and time.perf_counter() - t_start >= max_seconds:
            break
    return params, history


# ----------------------------------------------------------------------------- checkpoints


def params_bytes(params) -> bytes:
    """The serialized variables (``flax.serialization.to_bytes``): for equality checks."""
    from flax import serialization

    return serialization.to_bytes(params.variables)


def save_checkpoint(path, params, *, history=None) -> Path:
    """Write ``params`` (and optional training history) to ``path`` (required; msgpack).

    Written to a temporary file next to it, then renamed: a crash never leaves half a file.
    """
    from flax import serialization

    if path is None or str(path).strip() == "":
        raise CheckpointError("a checkpoint path is required (e.g. --out model.msgpack)")
    p = Path(path)
    if p.is_dir():
        raise CheckpointError(f"{p} is a directory; give a file name such as {p / 'rvae.msgpack'}")
    if not p.parent.exists():
        raise CheckpointError(f"folder {p.parent} does not exist; create it or choose another path")
    hist = json.dumps([{k: float(v) for k, v in h.items()} for h in (history or [])])
    state = {"format": FORMAT, "config": params.config.to_json(), "history": hist,
             "variables": serialization.to_state_dict(params.variables)}
    data = serialization.msgpack_serialize(state)
    tmp = p.with_name(p.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, p)
    except OSError as exc:
        raise CheckpointError(f"cannot write {p}: {exc.strerror or exc}") from None
    return p


def load_checkpoint(path, *, with_history: bool = False):
    """Read a checkpoint written by :func:`save_checkpoint` -> params (and history)."""
    from flax import serialization

    from stem_live.rvae.model import RVAEConfig, RVAEParams, init_params

    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint {p} not found; train one with `stem-live train-rvae`")
    try:
        state = serialization.msgpack_restore(p.read_bytes())
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError("not an rVAE checkpoint")
        cfg = RVAEConfig.from_json(state["config"])
        template = init_params(cfg, 0)
        variables = serialization.from_state_dict(template.variables, state["variables"])
        hist = json.loads(state.get("history") or "[]")
        import jax

        shapes_ok = jax.tree_util.tree_all(jax.tree_util.tree_map(
            lambda a, b: np.shape(a) == np.shape(b), template.variables, variables))
        if not shapes_ok:
            raise ValueError("parameter shapes do not match the config")
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read {p.name} as an rVAE checkpoint ({str(exc)[:80]}); "
                              f"pass a file written by `stem-live train-rvae`") from None
    params = RVAEParams(jax.tree_util.tree_map(lambda a: np.asarray(a, np.float32), variables), cfg)
    return (params, hist) if with_history else params
