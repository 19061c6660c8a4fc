"""Bright or dark columns: which way round a frame shows its atomic columns.

HAADF / ADF frames show columns bright on a dark background; bright-field and annular
bright-field (ABF) frames show them dark on a bright one. The locators find bright peaks, so a
dark-column frame is inverted first (``as_bright``).

``decide_contrast`` tells them apart without knowing the spacing: columns are compact peaks (or
dips) on a wide background, so the band-passed frame (column scale, from the autocorrelation's
lattice scale) has a long tail towards the columns: a positive skewness for bright columns, a
negative one for dark columns. The power spectrum and the autocorrelation cannot tell: they are
the same for a frame and its inverse.
"""

from __future__ import annotations

import numpy as np

#: |skewness| below which the band-passed frame does not say which way round it is
MIN_SKEW = 0.15

CONTRASTS = ("bright", "dark", "auto")


def contrast_skewness(image: np.ndarray, *, scale_px: float | None = None) -> float:
    """Skewness of ``image`` band-passed at the column scale (dimensionless; bright columns > 0,
    dark columns < 0). ``scale_px``: the lattice scale (px); default: the autocorrelation's
    nearest strong ring (``spacing._autocorr_spacing``), the image's shorter side / 16 where
    it finds none."""
    from scipy import ndimage

    img = np.asarray(image, np.float64)
    if img.ndim != 2 or min(img.shape) < 16:
        raise ValueError(f"contrast_skewness needs a 2-D image of at least 16x16 px, got {img.shape}")
    img = np.where(np.isfinite(img), img, np.nanmedian(img))
    if scale_px is None:
        from stem_live.locate.spacing import _autocorr_spacing

        try:
            scale_px = _autocorr_spacing(img)
        except ValueError:
            scale_px = min(img.shape) / 16.0
    scale = float(max(scale_px, 4.0))
    # column-matched smoothing (also takes most of the shot noise) less a background of the lattice scale
    band = ndimage.gaussian_filter(img, 0.1 * scale) - ndimage.gaussian_filter(img, 0.5 * scale)
    m = 2 * int(np.ceil(scale))  # away from the reflect-padded edges
    core = band[m:-m, m:-m] if min(img.shape) > 4 * m + 16 else band
    core = core - core.mean()
    sd = core.std()
    if sd <= 0:
        return 0.0
    return float(np.mean(core**3) / sd**3)


def decide_contrast(image: np.ndarray, *, scale_px: float | None = None,
                    min_skew: float = MIN_SKEW) -> tuple[str, str]:
    """("bright" | "dark", a one-line reason) for ``image`` (see the module docstring). Where the
    skewness is within +-``min_skew`` the frame does not tell, and "bright" is taken (the reason
    says so)."""
    skew = contrast_skewness(image, scale_px=scale_px)
    if skew <= -min_skew:
        return "dark", f"dark columns (band-passed skewness {skew:+.2f}): the image is inverted"
    if skew >= min_skew:
        return "bright", f"bright columns (band-passed skewness {skew:+.2f})"
    return "bright", (f"contrast unclear (band-passed skewness {skew:+.2f}, |skewness| < {min_skew:g}): "
                      f"bright columns assumed; give --contrast dark for BF/ABF frames")


def as_bright(image: np.ndarray, contrast: str) -> np.ndarray:
    """``image`` with bright columns: as it is for "bright", mirrored about its value range
    (max + min - image, so counts stay >= 0 and the Poisson weights of the fit stay sensible)
    for "dark". float32."""
    img = np.asarray(image, np.float32)
    if contrast == "bright":
        return img
    if contrast != "dark":
        raise ValueError(f"contrast must be 'bright' or 'dark', got {contrast!r}")
    finite = np.isfinite(img)
    if not finite.any():
        return img
    lo, hi = float(img[finite].min()), float(img[finite].max())
    return (hi + lo - img).astype(np.float32)


#: detector names (upper case, as frames carry them) and the contrast their columns show
DETECTOR_CONTRAST = {"HAADF": "bright", "ADF": "bright", "DF": "bright", "MAADF": "bright", "LAADF": "bright",
                     "ABF": "dark", "BF": "dark", "EABF": "dark"}


def detector_contrast(detector: str) -> str | None:
    """"bright" | "dark" for a known detector name (``DETECTOR_CONTRAST``, case and spaces
    ignored, "HAADF-STEM" style suffixes allowed), None for an unknown one."""
    name = str(detector).strip().upper().replace(" ", "").replace("_", "-").split("-")[0]
    return DETECTOR_CONTRAST.get(name)


def frame_contrast(image: np.ndarray, contrast: str, detector: str = "") -> tuple[str, str]:
    """("bright" | "dark", a one-line reason) for one frame: ``contrast`` as given where it is
    "bright" or "dark"; for "auto" the frame's ``detector`` name where it is a known one
    (free), else ``decide_contrast`` on the image (tens of ms at 512 px)."""
    if contrast in ("bright", "dark"):
        return contrast, f"{contrast} columns (as given)"
    if contrast != "auto":
        raise ValueError(f"contrast must be one of {', '.join(CONTRASTS)}, got {contrast!r}")
    known = detector_contrast(detector) if detector else None
    if known is not None:
        return known, f"{known} columns (the frames' detector is {detector})"
    return decide_contrast(image)
