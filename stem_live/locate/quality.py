"""Is there a lattice, and are the columns found credible? The quality gate of a frame.

A frame of pure shot noise, vacuum (a flat background with noise), a blank (constant) frame or a
contamination patch (smooth blobs) has no atomic columns, yet a locator with a low threshold
reports peaks in it. Two statistics tell such a frame from one with columns:

- ``lattice_significance``: the strongest peak of the power spectrum at column frequencies,
  relative to the median power at the same spatial frequency (all directions). Noise spreads
  its power evenly over directions (each bin ~ the exponential distribution, so the largest of
  ~10^5 bins is ~20 x the median); a lattice puts it into a few Bragg spots, hundreds to
  millions of times the median.
- the columns' significance: the median prominence of the found peaks in units of the
  band-passed noise (``Columns.confidence`` is a function of it) and their number for the
  area: a frame with columns shows many clearly significant ones.

``credible(columns, image)`` combines them into a verdict and a one-line reason.
"""

from __future__ import annotations

import numpy as np

#: ``lattice_significance`` above which a frame shows a lattice (noise: ~15-25; the simulator's
#: presets and real images: > 10^3)
MIN_LATTICE_SIGNIFICANCE = 60.0


def power_ratio(image: np.ndarray, *, min_px: float = 3.0, max_px: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The (Hann-windowed, mean-free) power spectrum of ``image`` (rfft2 layout) divided by the
    median power of its ring of equal spatial frequency (1-bin rings), and a mask of the bins at
    periods between ``min_px`` and 2 ``max_px`` (default: a quarter of the smaller side) px:
    the band where a column lattice puts its Bragg spots. A constant image gives zeros."""
    from scipy import fft, ndimage

    img = np.asarray(image, np.float64)
    img = np.where(np.isfinite(img), img, np.nanmedian(img)) if not np.isfinite(img).all() else img
    h, w = img.shape
    if max_px is None:
        max_px = min(h, w) / 4.0
    win = np.outer(np.hanning(h), np.hanning(w))
    x = (img - np.sum(img * win) / np.sum(win)) * win
    spec = fft.rfft2(x, workers=-1)
    p = spec.real**2 + spec.imag**2
    fy = np.fft.fftfreq(h)[:, None] * h
    fx = np.fft.rfftfreq(w)[None, :] * w
    fr = np.hypot(fy / h, fx / w)  # cycles per px
    ring = np.rint(np.hypot(fy * (min(h, w) / h), fx * (min(h, w) / w))).astype(int)
    n_ring = int(ring.max()) + 1
    med = np.asarray(ndimage.median(p, labels=ring, index=np.arange(n_ring)))
    denom = med[ring]
    ratio = np.where(denom > 0, p / np.where(denom > 0, denom, 1.0), 0.0)
    band = (fr >= 1.0 / (2.0 * max_px)) & (fr <= 1.0 / min_px)
    return ratio, band


def lattice_significance(image: np.ndarray, *, min_px: float = 3.0, max_px: float | None = None) -> float:
    """The strongest Bragg spot of ``image``: the largest ``power_ratio`` in the column band
    (dimensionless; noise alone ~15-25 for 256 px frames, a lattice > 10^3). 0 for a blank
    (constant) frame."""
    img = np.asarray(image)
    if img.ndim != 2 or min(img.shape) < 16:
        raise ValueError(f"lattice_significance needs a 2-D image of at least 16x16 px, got {img.shape}")
    ratio, band = power_ratio(img, min_px=min_px, max_px=max_px)
    return float(ratio[band].max()) if band.any() else 0.0


def column_snr(image: np.ndarray, positions: np.ndarray, spacing_px: float) -> np.ndarray:
    """(N,) prominence of each column in the plain band-pass of ``image`` (no denoiser: a
    lattice-periodic filter makes noise look periodic), in units of the band-passed noise std:
    the height at the column's pixel above the lowest of 8 samples on a ring of half the
    spacing (``classical.ring_prominence``). Noise peaks sit at ~1-2, columns well above."""
    from stem_live.locate.classical import _filter, noise_sigma

    img = np.asarray(image, np.float32)
    pos = np.asarray(positions, np.float64).reshape(-1, 2)
    noise = noise_sigma(img)
    if len(pos) == 0:
        return np.zeros(0)
    if noise <= 0:
        return np.full(len(pos), np.inf)
    sp = float(spacing_px)
    _, gain, _, prom = _filter(img, 0.15 * sp, max(sp, 0.225 * sp), None, None, ring_radius=0.5 * sp)
    ij = np.rint(pos).astype(int)
    ij[:, 0] = np.clip(ij[:, 0], 0, img.shape[0] - 1)
    ij[:, 1] = np.clip(ij[:, 1], 0, img.shape[1] - 1)
    return prom[ij[:, 0], ij[:, 1]] / (noise * gain)


#: median ``column_snr`` above which the columns are credible on their own, lattice or not
#: (noise, vacuum, smooth contamination: 1.3-2.2; the real graphene grain boundary 4.4; the
#: simulator's presets at a tenth of their dose >= 7)
MIN_COLUMN_SNR = 3.0


def credible(columns, image: np.ndarray, *, spacing_px: float | None = None,
             min_column_snr: float = MIN_COLUMN_SNR,
             min_lattice_significance: float = MIN_LATTICE_SIGNIFICANCE) -> tuple[bool, str]:
    """The quality gate of one frame: (True, "") where ``columns`` (a ``Columns`` of any locator)
    are credible atomic columns of ``image``, else (False, a one-line reason).

    Credible: the median column stands ``min_column_snr`` x the noise above its surroundings
    (``column_snr``), or the frame shows a lattice (``lattice_significance`` at least
    ``min_lattice_significance``) and its median column is at least at the noise level (a low
    dose lattice that the denoiser resolves). A blank (constant) frame, a frame with no column
    found, pure noise, vacuum and smooth contamination fail. ``spacing_px``: the spacing the
    columns were found with (default ``columns.meta["spacing_px"]``, else their median
    nearest-neighbour distance). About 10 ms (256 px) to 40 ms (512 px) on 2 CPU cores.
    """
    img = np.asarray(image, np.float64)
    if img.ndim != 2 or min(img.shape) < 16:
        return False, f"not a frame to locate columns in: shape {img.shape}"
    finite = np.isfinite(img)
    if not finite.any() or np.ptp(img[finite]) == 0:
        value = img[finite][0] if finite.any() else float("nan")
        return False, f"blank frame: every pixel is {value:g}"
    n = len(columns)
    if n == 0:
        return False, "no columns found"
    if spacing_px is None:
        spacing_px = columns.meta.get("spacing_px") if hasattr(columns, "meta") else None
    if spacing_px is None:
        if n < 2:
            return False, "a single column found: no lattice"
        from scipy.spatial import cKDTree

        spacing_px = float(np.median(cKDTree(columns.positions).query(columns.positions, k=2)[0][:, 1]))
    snr = float(np.median(column_snr(img, columns.positions, spacing_px)))
    if snr >= min_column_snr:
        return True, ""
    sig = lattice_significance(img)
    if sig >= min_lattice_significance and snr >= 1.0:
        return True, ""
    return False, (f"no credible columns: the median of {n} peaks stands {snr:.1f} x the noise above its "
                   f"surroundings (columns: >= {min_column_snr:g}) and the strongest lattice spot is {sig:.0f} x "
                   f"the background (a lattice: >= {min_lattice_significance:g}); noise, vacuum or contamination?")
