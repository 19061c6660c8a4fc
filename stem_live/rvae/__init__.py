"""rVAE: rotationally invariant VAE on patches around columns (JAX, Flax linen, optax).

Importing this package is light; JAX and Flax load when a name below is first used.

    from stem_live.rvae import extract_patches, train, encode, decode, LiveEncoder
    patches, mask = extract_patches(image, positions_px, size=32)
    params, history = train(patches, masks=mask, epochs=20, batch_size=128, lr=1e-3, seed=0)
    latents = encode(params, patches, mask)      # angle, shift, content (+ sigmas)
    maps = latent_maps(positions_px, latents, image.shape, radius_px=10)

Modules: patches (extraction, buckets), model (config, networks, ELBO, encode/decode),
train (training, checkpoints), live (LiveEncoder, OnlineTrainer), maps (latent maps),
evaluation (simulator scores, bench), commands (train-rvae / encode-rvae).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "BUCKETS": "patches", "bucket_for": "patches", "extract_patches": "patches",
    "RVAEConfig": "model", "RVAEParams": "model", "init_params": "model", "encode": "model",
    "decode": "model", "elbo_terms": "model", "kl_normal": "model", "gaussian_nll": "model",
    "train": "train", "save_checkpoint": "train", "load_checkpoint": "train", "CheckpointError": "train",
    "params_bytes": "train",
    "LiveEncoder": "live", "OnlineTrainer": "live",
    "latent_maps": "maps",
    "eval_particles": "evaluation", "eval_dopants": "evaluation", "bench_rvae": "evaluation",
    "circular_corr": "evaluation", "auc": "evaluation",
    "train_rvae_main": "commands", "encode_rvae_main": "commands", "SourceError": "commands",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
