"""PCA of atomic-column displacement fields over a frame series (arXiv:2009.05635)."""
from __future__ import annotations

import numpy as np

__all__ = ["trajectory_pca"]


def trajectory_pca(traj, n_modes: int = 3, n_iter: int = 30, tol: float = 1e-9):
    """PCA of column trajectories.

    traj: (frames, columns, 2) displacement (any unit) of every column in every frame;
        NaN where a column was not tracked in a frame.
    Returns (modes (n_modes, columns, 2) unit-norm, time_series (frames, n_modes),
    explained_variance_ratio (n_modes,)). The per-column mean over frames is removed first;
    missing entries are imputed iteratively by the rank-n_modes reconstruction (EM-PCA),
    so they do not bias the modes. Sign: each mode's largest entry is positive.
    """
    X = np.asarray(traj, dtype=float)
    if X.ndim != 3 or X.shape[2] != 2:
        raise ValueError(f"traj must be (frames, columns, 2), got {X.shape}")
    F, C, _ = X.shape
    X = X.reshape(F, 2 * C)
    miss = ~np.isfinite(X)
    keep = ~np.all(miss, axis=0)                      # never-seen coordinates drop out
    Xk = X[:, keep]
    mk = miss[:, keep]
    k = int(min(n_modes, F, Xk.shape[1]))
    if k < 1:
        raise ValueError("no tracked columns in traj")
    mean = np.nanmean(np.where(mk, np.nan, Xk), axis=0)
    Y = np.where(mk, 0.0, Xk - mean)
    prev = None
    for _ in range(n_iter if mk.any() else 1):
        U, S, Vt = np.linalg.svd(Y, full_matrices=False)
        R = (U[:, :k] * S[:k]) @ Vt[:k]
        if not mk.any():
            break
        Y = np.where(mk, R, Y)
        if prev is not None and np.linalg.norm(R - prev) <= tol * max(np.linalg.norm(R), 1e-300):
            break
        prev = R
    U, S, Vt = np.linalg.svd(Y, full_matrices=False)
    var = S ** 2
    evr = var[:k] / max(var.sum(), 1e-300)
    modes_k = Vt[:k]
    ts = U[:, :k] * S[:k]
    for i in range(k):
        j = np.argmax(np.abs(modes_k[i]))
        if modes_k[i, j] < 0:
            modes_k[i] *= -1
            ts[:, i] *= -1
    modes = np.zeros((k, 2 * C))
    modes[:, keep] = modes_k
    out_modes = np.zeros((n_modes, C, 2))
    out_modes[:k] = modes.reshape(k, C, 2)
    out_ts = np.zeros((F, n_modes))
    out_ts[:, :k] = ts
    out_evr = np.zeros(n_modes)
    out_evr[:k] = evr
    return out_modes, out_ts, out_evr
