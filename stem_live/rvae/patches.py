"""Sub-images ("patches") centred on columns, for the rVAE.

``extract_patches`` samples a ``size`` x ``size`` patch around every position in one
vectorised, jit-compiled JAX call: bilinear interpolation at sub-pixel offsets, so that the
column sits exactly on the patch centre ``((size - 1) / 2, (size - 1) / 2)``. Each patch is
normalised on its own (zero mean, unit standard deviation over its valid pixels). A patch
that crosses the image border is kept, never dropped: the pixels outside the image are 0
and ``False`` in the mask. Patch ``i`` always belongs to ``positions_px[i]``.

The number of positions is padded to a bucket (powers of two from 64 to 4096; larger sets
are processed in chunks of 4096) so that a stream of frames with a varying number of
columns compiles at most a handful of shapes per image size.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["BUCKETS", "bucket_for", "extract_patches", "patch_trace_count"]

#: padded batch lengths (powers of two from 64 to 4096)
BUCKETS: tuple[int, ...] = tuple(2**k for k in range(6, 13))

_TRACES = 0


def patch_trace_count() -> int:
    """How often the jit'd extraction has been traced (one per new bucket / image shape / size)."""
    return _TRACES


def bucket_for(n: int, buckets: tuple[int, ...] = BUCKETS) -> int:
    """The smallest bucket that holds ``n`` (the largest bucket if none does: chunk by it)."""
    for b in buckets:
        if n <= b:
            return b
    return buckets[-1]


@functools.cache
def _extractor(size: int):
    import jax
    import jax.numpy as jnp

    def fn(image, pos):
        global _TRACES
        _TRACES += 1
        h, w = image.shape
        c = (size - 1) / 2.0
        off = jnp.arange(size, dtype=jnp.float32) - c
        y = pos[:, 0, None, None] + off[None, :, None]          # (N, S, 1)
        x = pos[:, 1, None, None] + off[None, None, :]          # (N, 1, S)
        y = jnp.broadcast_to(y, (pos.shape[0], size, size))
        x = jnp.broadcast_to(x, (pos.shape[0], size, size))
        valid = (y >= 0) & (y <= h - 1) & (x >= 0) & (x <= w - 1)
        y0 = jnp.clip(jnp.floor(y), 0, h - 2)
        x0 = jnp.clip(jnp.floor(x), 0, w - 2)
        wy = jnp.clip(y - y0, 0.0, 1.0)
        wx = jnp.clip(x - x0, 0.0, 1.0)
        iy = y0.astype(jnp.int32)
        ix = x0.astype(jnp.int32)
        flat = image.reshape(-1)
        i00 = iy * w + ix
        v = (flat[i00] * (1 - wy) * (1 - wx) + flat[i00 + 1] * (1 - wy) * wx
             + flat[i00 + w] * wy * (1 - wx) + flat[i00 + w + 1] * wy * wx)
        m = valid.astype(jnp.float32)
        cnt = jnp.maximum(m.sum(axis=(1, 2), keepdims=True), 1.0)
        mean = (v * m).sum(axis=(1, 2), keepdims=True) / cnt
        var = (((v - mean) * m) ** 2).sum(axis=(1, 2), keepdims=True) / cnt
        std = jnp.sqrt(var)
        std = jnp.where(std > 1e-6 * (jnp.abs(mean) + 1.0), std, 1.0)
        p = jnp.where(valid, (v - mean) / std, 0.0)
        return p.astype(jnp.float32), valid

    return jax.jit(fn)


def extract_patches(image, positions_px, size: int = 32, *, buckets: tuple[int, ...] = BUCKETS
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Patches centred (sub-pixel) on ``positions_px`` (N, 2) (row, col).

    Returns ``(patches, mask)``: float32 (N, size, size), each normalised to zero mean and
    unit std over its valid pixels, and bool (N, size, size), False where the patch lies
    outside the image (those pixels are 0). Order and length match ``positions_px``.
    """
    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"extract_patches needs a 2-D image, got shape {img.shape}")
    if min(img.shape) < 2:
        raise ValueError(f"image too small for patches: {img.shape}")
    size = int(size)
    if size < 2:
        raise ValueError(f"patch size must be >= 2, got {size}")
    pos = np.asarray(positions_px, dtype=np.float32).reshape(-1, 2)
    n = len(pos)
    if n == 0:
        return np.zeros((0, size, size), np.float32), np.zeros((0, size, size), bool)
    if not np.isfinite(pos).all():
        raise ValueError("positions_px contains non-finite values")
    img = img.astype(np.float32, copy=False)
    if not np.isfinite(img).all():
        img = np.where(np.isfinite(img), img, np.nanmedian(img)).astype(np.float32)
    fn = _extractor(size)
    outs_p, outs_m = [], []
    chunk = buckets[-1]
    for s in range(0, n, chunk):
        part = pos[s:s + chunk]
        b = bucket_for(len(part), buckets)
        padded = np.zeros((b, 2), np.float32)
        padded[:len(part)] = part
        p, m = fn(img, padded)
        outs_p.append(np.asarray(p)[:len(part)])
        outs_m.append(np.asarray(m)[:len(part)])
    if len(outs_p) == 1:
        return outs_p[0], outs_m[0]
    return np.concatenate(outs_p), np.concatenate(outs_m)
