"""Nearest-neighbour column spacing from the image autocorrelation."""

from __future__ import annotations

import numpy as np


def _radial_max(ac: np.ndarray, r_max: int):
    """Maximum of the (fft-shifted) autocorrelation over 1-px rings, and where it is."""
    h, w = ac.shape
    cy, cx = h // 2, w // 2
    sub = ac[cy - r_max : cy + r_max + 1, cx - r_max : cx + r_max + 1]
    yy, xx = np.mgrid[-r_max : r_max + 1, -r_max : r_max + 1]
    rr = np.hypot(yy, xx)
    ring = np.rint(rr).astype(int).ravel()
    vals = sub.ravel()
    prof = np.full(r_max + 1, -np.inf)
    np.maximum.at(prof, ring[ring <= r_max], vals[ring <= r_max])
    return prof, sub, rr


def estimate_spacing(image: np.ndarray, *, min_px: float = 4.0, max_px: float | None = None,
                     check_peaks: bool = True) -> float:
    """Estimate the nearest-neighbour distance between atomic columns, in pixels.

    First the lattice scale L: the nearest strong ring of the (Hann-windowed, high-passed)
    image autocorrelation. In a honeycomb (graphene) that ring is the lattice constant,
    sqrt(3) x the bond length, since the bond-length ring is weak on noisy data. So, with
    ``check_peaks``, columns are then found with a spacing guess of L / 2 and their
    nearest-neighbour distance (``first_shell_distance``) is returned when it lies in
    [0.45 L, 1.05 L].

    Raises ``ValueError`` with a one-line message when no lattice is visible: the strongest
    spot of the power spectrum (``quality.lattice_significance``) below
    ``quality.MIN_LATTICE_SIGNIFICANCE`` (noise, vacuum, a blank frame, contamination).
    """
    from stem_live.locate.quality import MIN_LATTICE_SIGNIFICANCE, lattice_significance

    img = np.asarray(image)
    if img.ndim != 2 or min(img.shape) < 16:
        raise ValueError(f"estimate_spacing needs a 2-D image of at least 16x16 px, got {img.shape}")
    sig = lattice_significance(img, min_px=0.75 * min_px, max_px=max_px)
    if sig < MIN_LATTICE_SIGNIFICANCE:
        raise ValueError(f"no lattice found in the image (strongest spot of its power spectrum {sig:.0f} x the "
                         f"background, a lattice gives >= {MIN_LATTICE_SIGNIFICANCE:g}): give the column spacing "
                         f"(--spacing-px)")
    lat = _autocorr_spacing(img, min_px=min_px, max_px=max_px)
    if not check_peaks:
        return lat
    from stem_live.locate.classical import locate_classical

    cols = locate_classical(image, 0.5 * lat, refine=False, threshold=3.0, saturation="auto")
    if len(cols) < 8:
        return lat
    nn = first_shell_distance(cols.positions)
    if 0.45 * lat <= nn <= 1.05 * lat:
        return nn
    return lat


def first_shell_distance(positions: np.ndarray, *, k: int = 3, shell: float = 1.3) -> float:
    """The nearest-neighbour distance of a set of columns (px): the median of every column's
    distances to its ``k`` nearest columns that lie within ``shell`` x the median nearest
    distance. Not the median nearest distance alone: with noisy positions the nearest of three
    equal neighbours (graphene) is the minimum of three noisy distances, about 5 % short at a
    grain boundary. The second shell (sqrt 2 x on a square lattice, sqrt 3 x on a honeycomb)
    lies beyond ``shell``."""
    from scipy.spatial import cKDTree

    pos = np.asarray(positions, np.float64).reshape(-1, 2)
    k = min(k, len(pos) - 1)
    if k < 1:
        raise ValueError("need at least two columns to measure their spacing")
    d, _ = cKDTree(pos).query(pos, k=k + 1)
    d = d[:, 1:]
    nn1 = float(np.median(d[:, 0]))
    return float(np.median(d[d <= shell * nn1]))


def _autocorr_spacing(image: np.ndarray, *, min_px: float = 4.0, max_px: float | None = None) -> float:
    """Estimate the nearest-neighbour distance between atomic columns, in pixels.

    The (Hann-windowed, high-passed) image autocorrelation has a peak at every
    inter-column vector; the nearest ring of peaks beyond the central lobe is the
    nearest-neighbour distance. Its sub-pixel position is the mean length of the
    interpolated 2-D peaks on that ring.

    Raises ``ValueError`` with a one-line message when no lattice is visible.
    """
    from scipy import fft

    img = np.asarray(image, dtype=np.float64)
    if img.ndim != 2 or min(img.shape) < 16:
        raise ValueError(f"estimate_spacing needs a 2-D image of at least 16x16 px, got {img.shape}")
    img = np.where(np.isfinite(img), img, np.nanmedian(img))
    h, w = img.shape
    if max_px is None:
        max_px = min(h, w) / 4.0
    r_max = int(min(max_px, min(h, w) / 2 - 2))
    win = np.outer(np.hanning(h), np.hanning(w))
    x = (img - img.mean()) * win
    spec = fft.rfft2(x, s=(2 * h, 2 * w), workers=-1)
    # high-pass: drop structure larger than ~2 * max spacing (background, contamination)
    fy = np.fft.fftfreq(2 * h)[:, None]
    fx = np.fft.rfftfreq(2 * w)[None, :]
    f2 = fy**2 + fx**2
    sig = 2.0 * max_px
    hp = 1.0 - np.exp(-2 * np.pi**2 * sig**2 * f2)
    ac = fft.irfft2(np.abs(spec) ** 2 * hp**2, s=(2 * h, 2 * w), workers=-1)
    ac = np.fft.fftshift(ac)
    ac /= ac[h, w]
    prof, sub, rr = _radial_max(ac, r_max)
    r0 = int(np.ceil(min_px))
    # the central lobe must have decayed: start after the first ring minimum
    start = r0
    while start < r_max - 1 and prof[start + 1] < prof[start]:
        start += 1
    seg = prof[start : r_max + 1]
    if len(seg) < 3 or not np.isfinite(seg).all():
        raise ValueError("no lattice found in the image: give the column spacing (--spacing-px)")
    top = seg.max()
    if top <= 0.02:
        raise ValueError("no lattice found in the image: give the column spacing (--spacing-px)")
    # first local maximum that reaches a tenth of the strongest ring (in a honeycomb the
    # nearest-neighbour ring is only ~1/5 as strong as the lattice-vector ring)
    r_peak = None
    for i in range(1, len(seg) - 1):
        if seg[i] >= seg[i - 1] and seg[i] >= seg[i + 1] and seg[i] >= 0.1 * top:
            r_peak = start + i
            break
    if r_peak is None:
        r_peak = start + int(np.argmax(seg))
    # sub-pixel: local maxima of the 2-D autocorrelation within the ring r_peak +- 1.5
    from scipy import ndimage as ndi

    ring = (rr >= r_peak - 1.5) & (rr <= r_peak + 1.5)
    locmax = (ndi.maximum_filter(sub, size=3) == sub) & ring & (sub >= 0.5 * prof[r_peak])
    pk = np.argwhere(locmax)
    c = sub.shape[0] // 2
    lengths = []
    for i, j in pk:
        if 0 < i < sub.shape[0] - 1 and 0 < j < sub.shape[1] - 1:
            a, b_, d = sub[i - 1, j], sub[i, j], sub[i + 1, j]
            den = a - 2 * b_ + d
            dy = 0.5 * (a - d) / den if den < 0 else 0.0
            a, d = sub[i, j - 1], sub[i, j + 1]
            den = a - 2 * b_ + d
            dx = 0.5 * (a - d) / den if den < 0 else 0.0
            lengths.append(np.hypot(i + np.clip(dy, -0.5, 0.5) - c, j + np.clip(dx, -0.5, 0.5) - c))
    if lengths:
        return float(np.median(lengths))
    return float(r_peak)
