"""``stem-live bench rvae``: encoder and training throughput (see ``evaluation.bench_rvae``)."""

from __future__ import annotations

from typing import Callable

__all__ = ["bench_rvae"]


def bench_rvae(*, train_epochs: int = 20, train_patches: int = 10_000, batch: int = 1024, seed: int = 0,
               progress: Callable[[str], None] | None = None) -> dict:
    """``encode_patches_per_s`` (32x32 patches, batch 1024), ``train_patches_per_s`` (batch 128)
    and, unless ``train_epochs=0``, ``train_seconds`` of a 10,000-patch x 20-epoch run
    (compile included; about 20-60 s on a 2-core CPU)."""
    from .evaluation import bench_rvae as _bench

    return _bench(batch=batch, train_patches=train_patches, train_epochs=train_epochs, seed=seed, progress=progress)
