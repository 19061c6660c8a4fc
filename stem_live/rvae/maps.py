"""Latent maps: every column's latents painted into image-sized maps for the monitor.

Each pixel within ``radius_px`` of a column takes that column's value (a disk stencil for all
columns at once, written from the outer ring inwards so the nearer column wins where disks
overlap); pixels farther than that get ``fill`` (NaN by default). With ``radius_px=None``
every pixel takes its nearest column (a Voronoi tessellation from one Euclidean distance
transform). No loop over columns either way.
"""

from __future__ import annotations

import numpy as np

__all__ = ["latent_maps", "owner_map"]


def owner_map(positions_px, shape, radius_px: float | None = None) -> np.ndarray:
    """(H, W) int32: index of the nearest column (within ``radius_px``), -1 elsewhere.

    Columns whose rounded position lies outside the image own no pixel."""
    from scipy.ndimage import distance_transform_edt

    h, w = int(shape[0]), int(shape[1])
    pos = np.asarray(positions_px, dtype=np.float64).reshape(-1, 2)
    owner = np.full((h, w), -1, np.int32)
    if len(pos) == 0 or h == 0 or w == 0:
        return owner
    r = np.rint(pos).astype(np.int64)
    inside = (r[:, 0] >= 0) & (r[:, 0] < h) & (r[:, 1] >= 0) & (r[:, 1] < w) & np.isfinite(pos).all(axis=1)
    if not inside.any():
        return owner
    idx = np.flatnonzero(inside)
    if radius_px is not None and np.isfinite(radius_px):
        return _owner_disks(pos, idx, r, (h, w), float(radius_px))
    seeds = np.full((h, w), -1, np.int64)
    seeds[r[idx, 0], r[idx, 1]] = idx
    _, (iy, ix) = distance_transform_edt(seeds < 0, return_distances=True, return_indices=True)
    owner = seeds[iy, ix].astype(np.int32)
    if radius_px is not None:
        yy, xx = np.mgrid[0:h, 0:w]
        d2 = (yy - pos[owner, 0]) ** 2 + (xx - pos[owner, 1]) ** 2
        owner[d2 > float(radius_px) ** 2] = -1
    return owner


def _owner_disks(pos, idx, r, shape, radius: float) -> np.ndarray:
    """Disks of ``radius`` around the (rounded) columns ``idx``, written from the outermost
    stencil ring inwards, so where disks overlap the column whose centre is nearer (to the
    pixel's integer grid) wins; a column's own centre pixel is always its own."""
    h, w = shape
    rr = int(np.ceil(radius))
    dy, dx = np.mgrid[-rr:rr + 1, -rr:rr + 1]
    d2 = (dy * dy + dx * dx).ravel()
    keep = d2 <= radius * radius + 1e-9
    order = np.argsort(-d2[keep], kind="stable")             # far -> near
    dy, dx = dy.ravel()[keep][order], dx.ravel()[keep][order]
    yy = r[idx, 0][None, :] + dy[:, None]                      # (n_offsets, n_columns)
    xx = r[idx, 1][None, :] + dx[:, None]
    ok = (yy >= 0) & (yy < h) & (xx >= 0) & (xx < w)
    # exact sub-pixel distance limit
    ok &= (yy - pos[idx, 0][None, :]) ** 2 + (xx - pos[idx, 1][None, :]) ** 2 <= radius * radius + 1e-9
    ok[-1] = True  # the centre pixel (inside the image by construction)
    owner = np.full(h * w, -1, np.int32)
    flat = (yy * w + xx)[ok]
    owner[flat] = np.broadcast_to(idx[None, :], yy.shape)[ok]  # sequential: later (nearer) wins
    return owner.reshape(h, w)


def latent_maps(positions_px, latents: dict, shape, radius_px: float | None = None, *,
                fill: float = np.nan) -> dict:
    """Image-sized float32 maps of the column latents.

    ``latents``: a dict as returned by ``encode`` (``angle`` (N,), ``content`` (N, k), ...).
    Returns ``{"angle": (H, W), "content_0": (H, W), ...}`` (and ``angle_sigma`` if given);
    each pixel shows its nearest column's value within ``radius_px`` (None = no limit),
    ``fill`` elsewhere.
    """
    pos = np.asarray(positions_px, dtype=np.float64).reshape(-1, 2)
    owner = owner_map(pos, shape, radius_px)
    valid = owner >= 0
    safe = np.where(valid, owner, 0)
    out = {}
    cols: dict[str, np.ndarray] = {}
    if "angle" in latents:
        cols["angle"] = np.asarray(latents["angle"], np.float32).reshape(-1)
    if "angle_sigma" in latents:
        cols["angle_sigma"] = np.asarray(latents["angle_sigma"], np.float32).reshape(-1)
    if "content" in latents:
        c = np.asarray(latents["content"], np.float32)
        c = c.reshape(len(c), -1)
        for j in range(c.shape[1]):
            cols[f"content_{j}"] = c[:, j]
    for name, v in cols.items():
        if len(v) != len(pos):
            raise ValueError(f"latent {name!r} has {len(v)} values for {len(pos)} positions")
        if len(v) == 0:
            out[name] = np.full(owner.shape, fill, np.float32)
            continue
        out[name] = np.where(valid, v[safe], np.float32(fill)).astype(np.float32)
    return out
