"""Nearest-neighbour column spacing from the image autocorrelation."""

from __future__ import annotations

import numpy as np

#: peaks lower than this fraction of the 99th-percentile peak height (smoothed frame, above its
#: 1st percentile) are left out of a second spacing measurement: an amorphous support's texture
#: under a nanoparticle (< 0.5 %), the O columns HAADF does not show in PbTiO3 (1-3 %); the
#: simulator's SrTiO3 O columns (5-7 %) stay in
BRIGHT_FRACTION = 0.04
#: a peak distance between SHORT_NN and 0.96 x the lattice scale L is no lattice's first shell (a
#: honeycomb bond is L / sqrt 3, SrTiO3 cation-O L / sqrt 2; a first shell near L makes the ring at L): spurious peaks (an
#: amorphous support's texture in a BF / ABF frame of a particle, 0.87-0.95 L) shortened it: the strong
#: peaks' first shell is taken
SHORT_NN = 0.8
#: ... and the peaks at least this fraction of the 99th-percentile peak height give the spacing then
STRONG_FRACTION = 0.2
#: ... beyond 1.05 L up to LONG_NN x L the peaks are trusted over L (the autocorrelation ring of a
#: bright-field frame at 30-40 px spacing lies 7-25 % short, its halo rings interfering)
LONG_NN = 1.3
#: a lattice vector is a peak of the histogram of the vectors between peaks (VECTOR_LO-VECTOR_HI x
#: the scale) with a partner for at least VECTOR_FRACTION of the peaks within VECTOR_RADIUS x the scale
VECTOR_LO, VECTOR_HI, VECTOR_FRACTION, VECTOR_RADIUS = 0.8, 1.25, 0.25, 0.15
#: a peak is on the lattice when, for at least half of the lattice vectors that keep it inside the
#: frame, a peak lies within LATTICE_TOL x L of it shifted by the vector
LATTICE_TOL = 0.2
#: the lattice peaks' first shell replaces all peaks' where it is more than OFF_LATTICE longer and
#: the peaks off the lattice are weaker (median height below WEAK_OFF x the lattice peaks': an
#: amorphous support's texture) or it is more than OFF_LATTICE_FAR longer (maxima between the
#: columns of an inverted BF frame); off-lattice peaks as high as the lattice's and a shell up to
#: OFF_LATTICE_FAR longer are a jittered lattice of particles (the first shell of all peaks is its own)
OFF_LATTICE, OFF_LATTICE_FAR, WEAK_OFF = 0.1, 0.2, 0.5
#: a first shell between SHORT_NN and 0.96 x L is the peaks' where fewer than this fraction of the
#: peaks have a neighbour within 0.6 x it (a jittered lattice of particles); more: columns split
#: into two maxima (flat-topped BF columns under noise) or texture, and the strong peaks' / L is taken
SPLIT_FRACTION = 0.1


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
    sqrt(3) x the bond length, since the bond-length ring is weak on noisy data (where the power
    spectrum shows no Bragg spot at L's frequencies, L is measured on the frame binned 2 or 4 x:
    ``_binned_if_noise``). So, with
    ``check_peaks``, columns are then found with a spacing guess of L / 2 and their
    nearest-neighbour distance (``first_shell_distance``) is returned when it lies in
    [0.45 L, ``SHORT_NN`` L] or [0.96 L, ``LONG_NN`` L]; between those, the first shell of
    the strong peaks (``STRONG_FRACTION``); L otherwise. Where the brighter columns alone (peak height >= ``BRIGHT_FRACTION``
    of the 99th percentile, ``_peak_heights``, with hardly any peaks just above that cut, and
    L >= 8 px) give a first shell more than 10 % from all of them (a lattice on an
    amorphous support, whose texture makes peaks at its own scale; faint light columns between
    heavy ones), the brighter columns' distance is returned.

    Raises ``ValueError`` with a one-line message when no lattice is visible: the strongest
    spot of the power spectrum (``quality.lattice_significance``) below
    ``quality.MIN_LATTICE_SIGNIFICANCE`` (noise, vacuum, a blank frame, contamination).
    """
    from stem_live.locate.quality import MIN_LATTICE_SIGNIFICANCE, lattice_significance

    img = np.asarray(image)
    if img.ndim != 2 or min(img.shape) < 16:
        raise ValueError(f"estimate_spacing needs a 2-D image of at least 16x16 px, got {img.shape}")
    sig = lattice_significance(img, min_px=0.75 * min_px, max_px=max_px)
    for b in (2, 4):  # a low-count lattice of wide columns shows its spots once binned (bright field, 40 px)
        if sig >= MIN_LATTICE_SIGNIFICANCE or min(img.shape) < 64 * b:
            break
        sig = max(sig, lattice_significance(_bin(img, b), min_px=0.75 * min_px,
                                            max_px=None if max_px is None else max_px / b))
    if sig < MIN_LATTICE_SIGNIFICANCE:
        raise ValueError(f"no lattice found in the image (strongest spot of its power spectrum {sig:.0f} x the "
                         f"background, a lattice gives >= {MIN_LATTICE_SIGNIFICANCE:g}): give the column spacing "
                         f"(--spacing-px)")
    try:
        lat = _autocorr_spacing(img, min_px=min_px, max_px=max_px)
    except ValueError:
        lat = None  # no ring above the shot noise at full resolution: binned below
    lat = _binned_if_noise(img, lat, min_px=min_px, max_px=max_px)
    if not check_peaks or 0.5 * lat < 2.0:  # no peak search below 2 px: the lattice scale is the spacing
        return lat
    from stem_live.locate.classical import locate_classical

    cols = locate_classical(image, 0.5 * lat, refine=False, threshold=3.0, saturation="auto")
    if len(cols) < 8:
        return lat
    pos = cols.positions
    height = _peak_heights(np.asarray(image, np.float64), pos, 0.1 * lat)
    nn = first_shell_distance(pos)
    vectors = lattice_vectors(pos, lat)
    on = _on_lattice(pos, vectors, LATTICE_TOL * lat, np.shape(image))
    if on.sum() >= 8 and (~on).any():
        nn_on = first_shell_distance(pos[on])
        weak = np.median(height[~on]) < WEAK_OFF * np.median(height[on])
        if nn_on > (1.0 + (OFF_LATTICE if weak else OFF_LATTICE_FAR)) * nn:
            # peaks off the lattice (maxima between the columns, a support's texture) made the first shell
            pos, height, nn = pos[on], height[on], nn_on
    ref = np.percentile(height, 99)
    bright = height >= BRIGHT_FRACTION * ref
    # only where the faint peaks are a separate population (hardly any between 1 and 2.5 x the cut)
    # and the lattice is resolved well enough for the frame's 1st percentile to be the background
    # between the columns (at L < 8 px it is the level of faint columns: SrTiO3's O at 4 px)
    # (counted away from the frame edge, where a cut column is lower)
    m = 0.25 * lat
    inner = np.all((pos >= m) & (pos <= np.array(np.shape(image)) - 1 - m), axis=1)
    gap = lat >= 8.0 and inner.any() and np.mean((bright & (height < 2.5 * BRIGHT_FRACTION * ref))[inner]) < 0.05
    if gap and 8 <= bright.sum() < len(pos):
        nn_bright = first_shell_distance(pos[bright])
        if abs(nn_bright - nn) > 0.1 * nn and 0.45 * lat <= nn_bright <= 1.05 * lat:
            return nn_bright
    if 0.45 * lat <= nn <= SHORT_NN * lat or 0.96 * lat <= nn <= LONG_NN * lat:
        return nn
    if nn > LONG_NN * lat and not len(vectors) and len(lattice_vectors(pos, nn)):
        return nn  # L is no distance between the peaks (a noise ring) and their first shell is a lattice's
    if SHORT_NN * lat < nn < 0.96 * lat:
        if _split_fraction(pos, nn) < SPLIT_FRACTION:
            return nn
        strong = height >= STRONG_FRACTION * ref
        if 8 <= strong.sum() < 0.95 * len(pos):
            # the strong peaks alone: an amorphous support's weak texture peaks left out (HAADF, ABF;
            # in BF the support's peaks are as high as the columns: L then)
            return first_shell_distance(pos[strong])
    return lat


def lattice_vectors(positions: np.ndarray, scale_px: float) -> np.ndarray:
    """(K, 2) px: the vectors (row, col) between peaks that most peaks share, of length
    ``VECTOR_LO``-``VECTOR_HI`` x ``scale_px``: maxima of the histogram of the vectors between all
    pairs, counted within ``VECTOR_RADIUS`` x the scale, with a partner for at least
    ``VECTOR_FRACTION`` of the peaks; each the mean of the vectors within that radius. Both signs.
    Empty where the peaks show no lattice at that scale (texture, noise, a wrong scale)."""
    from scipy import ndimage
    from scipy.spatial import cKDTree

    pos = np.asarray(positions, np.float64).reshape(-1, 2)
    empty = np.empty((0, 2))
    if len(pos) < 8 or not scale_px > 0:
        return empty
    pairs = cKDTree(pos).query_pairs(VECTOR_HI * scale_px, output_type="ndarray")
    if not len(pairs):
        return empty
    v = pos[pairs[:, 1]] - pos[pairs[:, 0]]
    v = np.concatenate([v, -v])
    r = np.hypot(v[:, 0], v[:, 1])
    v = v[(r >= VECTOR_LO * scale_px) & (r <= VECTOR_HI * scale_px)]
    if not len(v):
        return empty
    b = 0.05 * scale_px  # histogram bin, px
    n = int(np.ceil(VECTOR_HI / 0.05)) + 1
    hist = np.zeros((2 * n + 1, 2 * n + 1))
    ij = np.clip(np.rint(v / b).astype(int) + n, 0, 2 * n)
    np.add.at(hist, (ij[:, 0], ij[:, 1]), 1.0)
    k = int(np.ceil(VECTOR_RADIUS / 0.05))
    yy, xx = np.mgrid[-k : k + 1, -k : k + 1]
    count = ndimage.convolve(hist, (np.hypot(yy, xx) <= k).astype(float), mode="constant")
    peak = (ndimage.maximum_filter(count, size=2 * k + 1, mode="constant") == count) & (
        count >= VECTOR_FRACTION * len(pos))
    idx = np.argwhere(peak)
    centre = (idx - n) * b
    rc = np.hypot(centre[:, 0], centre[:, 1])
    keep = (rc >= VECTOR_LO * scale_px) & (rc <= VECTOR_HI * scale_px)
    centre, c = centre[keep], count[tuple(idx[keep].T)]
    if not len(centre):
        return empty
    # one vector per maximum: of maxima closer than the radius (a plateau) the first of the highest
    d = np.hypot(*(centre[:, None, :] - centre[None, :, :]).transpose(2, 0, 1))
    order = np.lexsort((np.arange(len(c)), -c))
    rank = np.empty(len(c), int)
    rank[order] = np.arange(len(c))
    beaten = (d <= VECTOR_RADIUS * scale_px) & (rank[None, :] < rank[:, None])
    centre = centre[~beaten.any(axis=1)]
    near = np.hypot(*(v[:, None, :] - centre[None, :, :]).transpose(2, 0, 1)) <= VECTOR_RADIUS * scale_px
    count = near.sum(axis=0)
    near = near[:, count > 0]   # a maximum at a bin's edge can hold no vector itself
    return (near.T.astype(float) @ v) / count[count > 0][:, None]


def _on_lattice(positions: np.ndarray, vectors: np.ndarray, tol_px: float, shape: tuple[int, ...]) -> np.ndarray:
    """(N,) bool: the peaks that the lattice ``vectors`` (K, 2 px) map onto peaks: for at least half
    of the vectors that keep a peak inside the frame, another peak lies within ``tol_px`` of the
    shifted position. All False without vectors."""
    from scipy.spatial import cKDTree

    pos = np.asarray(positions, np.float64).reshape(-1, 2)
    if not len(vectors) or len(pos) < 2:
        return np.zeros(len(pos), bool)
    target = pos[:, None, :] + np.asarray(vectors, np.float64)[None, :, :]
    inside = np.all((target >= 0) & (target <= np.array(shape[:2]) - 1), axis=2)
    d, _ = cKDTree(pos).query(target.reshape(-1, 2), distance_upper_bound=tol_px)
    hit = np.isfinite(d).reshape(inside.shape) & inside
    n_in = inside.sum(axis=1)
    return (n_in > 0) & (2 * hit.sum(axis=1) >= n_in)


def _split_fraction(positions: np.ndarray, nn_px: float) -> float:
    """Fraction of the peaks with a neighbour closer than 0.6 x ``nn_px`` (px)."""
    from scipy.spatial import cKDTree

    pos = np.asarray(positions, np.float64).reshape(-1, 2)
    d, _ = cKDTree(pos).query(pos, k=2)
    return float(np.mean(d[:, 1] < 0.6 * nn_px))


def _bin(image: np.ndarray, b: int) -> np.ndarray:
    """Mean over b x b blocks (the frame cropped to a multiple of b), float64."""
    x = np.asarray(image, np.float64)
    h, w = (x.shape[0] // b) * b, (x.shape[1] // b) * b
    return x[:h, :w].reshape(h // b, b, w // b, b).mean(axis=(1, 3))


def _band_significance(image: np.ndarray, lattice_px: float) -> float:
    """The strongest Bragg spot (``quality.power_ratio``) at the spatial frequencies a lattice of
    scale ``lattice_px`` (its nearest autocorrelation ring, px) puts them: 0.8-1.3 / L cycles/px
    (square 1 / L, triangular and honeycomb 1.15 / L). Noise: ~15-25."""
    from stem_live.locate.quality import power_ratio

    ratio, _ = power_ratio(image)
    h, w = np.shape(image)
    fr = np.hypot(np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :])
    band = (fr >= 0.8 / lattice_px) & (fr <= 1.3 / lattice_px)
    return float(ratio[band].max()) if band.any() else 0.0


def _binned_if_noise(img: np.ndarray, lat: float | None, *, min_px: float, max_px: float | None) -> float:
    """``lat``, or where the power spectrum shows no Bragg spot at the frequencies of ``lat``
    (``_band_significance`` below ``quality.MIN_LATTICE_SIGNIFICANCE``: the autocorrelation ring
    was shot noise, as in a bright-field frame at 30-40 px spacing, a few % contrast on a low
    count) the lattice scale measured on the frame binned 2 x 2, else 4 x 4, where that one
    shows its Bragg spots (px of the full frame). ``lat`` None (no ring at full resolution):
    the binned frames' only; ``ValueError`` where none shows a lattice."""
    from stem_live.locate.quality import MIN_LATTICE_SIGNIFICANCE

    if lat is not None and (min(img.shape) < 128 or _band_significance(img, lat) >= MIN_LATTICE_SIGNIFICANCE):
        return lat
    for b in (2, 4):
        small = _bin(img, b)
        try:
            lb = _autocorr_spacing(small, min_px=min_px, max_px=None if max_px is None else max_px / b)
        except ValueError:
            continue
        if _band_significance(small, lb) >= MIN_LATTICE_SIGNIFICANCE:
            return b * lb
    if lat is None:
        raise ValueError("no lattice found in the image: give the column spacing (--spacing-px)")
    return lat


def _peak_heights(image: np.ndarray, positions: np.ndarray, smooth_px: float) -> np.ndarray:
    """(N,) the frame smoothed by a Gaussian of ``smooth_px`` (>= 1) at each position (row, col),
    above its 1st percentile: a column's height over the lowest background, whatever its
    neighbours (a band-pass gives a faint column between bright ones a negative value)."""
    from scipy import ndimage

    img = np.where(np.isfinite(image), image, np.nanmedian(image))
    sm = ndimage.gaussian_filter(img, max(1.0, smooth_px))
    idx = np.clip(np.rint(positions).astype(int), 0, np.array(sm.shape) - 1)
    return sm[idx[:, 0], idx[:, 1]] - np.percentile(sm, 1)


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
