"""Column classes by intensity (e.g. Si dopants vs C in graphene, Sr vs Ti-O in SrTiO3).

Thresholds are given by the user or learned by an exact 1-D k-means on the intensities
(dynamic programming over 256 equal-count bins, then a few Lloyd steps on the raw values).
Class 0 is the dimmest. A learned split whose classes are not clearly separated is dropped,
so a single population is not cut in two.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _kmeans_1d(x: np.ndarray, k: int, n_bins: int = 256) -> np.ndarray:
    """Sorted class means of an (almost) optimal 1-D k-means of ``x``."""
    x = np.sort(np.asarray(x, np.float64))
    n = len(x)
    if k <= 1 or n <= k:
        return np.array([x.mean()]) if k <= 1 else np.unique(x)
    # equal-count bins (adaptive resolution, robust to outliers)
    edges = np.unique(np.linspace(0, n, min(n_bins, n) + 1).astype(int))
    cnt = np.diff(edges).astype(np.float64)
    cs = np.concatenate([[0.0], np.cumsum(x)])
    cs2 = np.concatenate([[0.0], np.cumsum(x * x)])
    s1 = cs[edges[1:]] - cs[edges[:-1]]
    s2 = cs2[edges[1:]] - cs2[edges[:-1]]
    b = len(cnt)
    pw = np.concatenate([[0.0], np.cumsum(cnt)])
    p1 = np.concatenate([[0.0], np.cumsum(s1)])
    p2 = np.concatenate([[0.0], np.cumsum(s2)])
    i = np.arange(b)[:, None]
    j = np.arange(b)[None, :]
    with np.errstate(divide="ignore", invalid="ignore"):
        ww = pw[j + 1] - pw[i]
        ss = p1[j + 1] - p1[i]
        cost = (p2[j + 1] - p2[i]) - np.where(ww > 0, ss * ss / ww, 0.0)
    cost = np.where(j >= i, np.maximum(cost, 0.0), np.inf)  # cost[i, j]: bins i..j in one class
    dp = cost[0].copy()  # dp[j]: best cost of bins 0..j in 1 class
    back = []
    for _ in range(1, k):
        # new[j] = min_i dp[i-1] + cost[i, j], i >= 1
        tot = dp[:-1, None] + cost[1:, :]
        arg = np.argmin(tot, axis=0) + 1
        new = tot[arg - 1, np.arange(b)]
        back.append(arg)
        dp = new
    # backtrack the class starts (in bins)
    starts = []
    jj = b - 1
    for arg in reversed(back):
        s = int(arg[jj])
        starts.append(s)
        jj = s - 1
    starts = sorted(starts)
    cuts = [edges[s] for s in starts]
    groups = np.split(x, cuts)
    means = np.array([g.mean() for g in groups if len(g)])
    # a few Lloyd steps on the raw values
    for _ in range(5):
        thr = 0.5 * (means[1:] + means[:-1])
        lab = np.searchsorted(thr, x, side="right")
        new = np.array([x[lab == c].mean() if np.any(lab == c) else means[c] for c in range(len(means))])
        if np.allclose(new, means):
            break
        means = new
    return np.sort(means)


def _separation(x: np.ndarray, thr: np.ndarray) -> np.ndarray:
    """Separation of adjacent classes: mean difference / rms of the class stds."""
    lab = np.searchsorted(thr, x, side="right")
    out = []
    for c in range(len(thr)):
        a, b = x[lab == c], x[lab == c + 1]
        if len(a) < 1 or len(b) < 1:
            out.append(0.0)
            continue
        sa = a.std() if len(a) > 1 else 0.0
        sb = b.std() if len(b) > 1 else 0.0
        pooled = np.sqrt(0.5 * (sa**2 + sb**2))
        out.append(np.inf if pooled == 0 else (b.mean() - a.mean()) / pooled)
    return np.asarray(out)


def learn_thresholds(intensity, n_classes: int = 2, *, min_separation: float | None = 3.0) -> np.ndarray:
    """Class thresholds (length n_classes - 1, increasing) learned by 1-D k-means.

    Splits whose adjacent classes are separated by less than ``min_separation`` (mean
    difference over rms class std; a single Gaussian cut in two gives about 2.7) are not
    trusted: the number of classes is reduced until all splits pass, and the missing
    thresholds are ``+inf`` (so the top classes stay empty).
    """
    x = np.asarray(intensity, np.float64).ravel()
    x = x[np.isfinite(x)]
    n_classes = int(n_classes)
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    out = np.full(n_classes - 1, np.inf)
    if n_classes == 1 or len(x) < 2:
        return out
    for k in range(n_classes, 1, -1):
        means = _kmeans_1d(x, k)
        if len(means) < k:
            continue
        thr = 0.5 * (means[1:] + means[:-1])
        if min_separation is None or np.all(_separation(x, thr) >= min_separation):
            out[: k - 1] = thr
            return out
    return out


def classify_intensity(
    intensity,
    thresholds: Sequence[float] | None = None,
    n_classes: int = 2,
    *,
    min_separation: float | None = 3.0,
):
    """Class index per column (0 = dimmest) and the thresholds used.

    With ``thresholds`` (increasing), class c holds ``thresholds[c-1] <= I < thresholds[c]``;
    otherwise the thresholds are learned from these intensities (``learn_thresholds``).
    Returns ``(klass (N,) int32, thresholds (n_classes-1,) float64)``.
    """
    x = np.asarray(intensity, np.float64).ravel()
    if thresholds is None:
        thr = learn_thresholds(x, n_classes, min_separation=min_separation)
    else:
        thr = np.asarray(thresholds, np.float64).ravel()
        if np.any(np.diff(thr) < 0):
            raise ValueError(f"class thresholds must increase, got {list(thr)}")
    klass = np.searchsorted(thr, np.nan_to_num(x, nan=-np.inf), side="right").astype(np.int32)
    return klass, thr


class IntensityClassifier:
    """Classes by intensity with thresholds learned from the first frames, then fixed.

    ``clf(intensity)`` classifies one frame; during the first ``learn_frames`` frames it
    also adds that frame's intensities to the training set and re-learns the thresholds.
    Given ``thresholds`` it never learns.
    """

    def __init__(self, n_classes: int = 2, thresholds: Sequence[float] | None = None, *,
                 learn_frames: int = 5, min_separation: float | None = 3.0,
                 max_samples: int = 200_000):
        self.n_classes = int(n_classes)
        self.learn_frames = int(learn_frames)
        self.min_separation = min_separation
        self.max_samples = int(max_samples)
        self._samples: list[np.ndarray] = []
        self.frames_seen = 0
        if thresholds is not None:
            thr = np.asarray(thresholds, np.float64).ravel()
            if len(thr) != self.n_classes - 1:
                raise ValueError(f"{self.n_classes} classes need {self.n_classes - 1} thresholds, got {len(thr)}")
            self.thresholds = thr
            self.fixed = True
        else:
            self.thresholds = None
            self.fixed = False

    @property
    def learning(self) -> bool:
        return not self.fixed and self.frames_seen < self.learn_frames

    def update(self, intensity) -> None:
        """Add one frame's intensities (while learning) and re-learn the thresholds."""
        if not self.learning:
            return
        x = np.asarray(intensity, np.float64).ravel()
        x = x[np.isfinite(x)]
        self._samples.append(x)
        self.frames_seen += 1
        allx = np.concatenate(self._samples)
        if len(allx) > self.max_samples:
            allx = np.random.default_rng(0).choice(allx, self.max_samples, replace=False)
        self.thresholds = learn_thresholds(allx, self.n_classes, min_separation=self.min_separation)
        if not self.learning:
            self._samples = []  # frozen: free the training set

    def classify(self, intensity) -> np.ndarray:
        if self.thresholds is None:
            return np.zeros(np.shape(intensity), np.int32).ravel()
        klass, _ = classify_intensity(intensity, self.thresholds)
        return klass

    def __call__(self, intensity) -> np.ndarray:
        self.update(intensity)
        return self.classify(intensity)

    def reset(self) -> None:
        self._samples = []
        self.frames_seen = 0
        if not self.fixed:
            self.thresholds = None
