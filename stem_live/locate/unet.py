"""Learned column locator: a small U-Net (Flax linen) that maps a frame to a per-pixel
"column here" probability, followed by the same peak finding, sub-pixel refinement and
intensity classes as the classical locator (``classical.find_peaks``,
``classical._refine_fixed``, ``classes.classify_intensity``).

    from stem_live.locate.unet import locate_unet
    cols = locate_unet(image)            # committed weights, spacing estimated
    cols = locate_unet(image, 12.1)      # known nearest-neighbour spacing (px)

The network is fully convolutional (16-32-64 channels, two 2x downsamplings), so any frame
size works: the frame is reflect-padded to a multiple of 4 and the forward pass is one
``jax.jit`` call per frame shape. Weights: ``weights/unet.msgpack`` (see ``weights/MODEL.md``;
retrain with ``python -m stem_live.lab.train_unet``).

Importing this module is light; JAX / Flax are imported on first use.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from stem_live.locate.columns import Columns

WEIGHTS = Path(__file__).parent / "weights" / "unet.msgpack"
FEATURES = (16, 32, 64)
STRIDE = 2 ** (len(FEATURES) - 1)


# ----------------------------------------------------------------------------- model
@functools.cache
def _module_class():
    import flax.linen as nn
    import jax.numpy as jnp

    class ConvBlock(nn.Module):
        features: int

        @nn.compact
        def __call__(self, x):
            x = nn.relu(nn.Conv(self.features, (3, 3), padding="SAME")(x))
            return nn.relu(nn.Conv(self.features, (3, 3), padding="SAME")(x))

    class UNet(nn.Module):
        """(B, H, W, 1) normalised frame -> (B, H, W, out) logits; H, W multiples of 4."""

        features: Sequence[int] = FEATURES
        out: int = 1

        @nn.compact
        def __call__(self, x):
            skips = []
            for f in self.features[:-1]:
                x = ConvBlock(f)(x)
                skips.append(x)
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
            x = ConvBlock(self.features[-1])(x)
            for f, skip in zip(reversed(self.features[:-1]), reversed(skips)):
                x = nn.ConvTranspose(f, (2, 2), strides=(2, 2))(x)
                x = ConvBlock(f)(jnp.concatenate([x, skip], axis=-1))
            return nn.Conv(self.out, (1, 1), bias_init=nn.initializers.constant(-3.0))(x)

    return UNet


def make_model(out: int = 1):
    """The U-Net module (flax.linen)."""
    return _module_class()(features=FEATURES, out=out)


def init_params(seed: int = 0, out: int = 1):
    """Fresh random parameters (a pytree of numpy-compatible arrays)."""
    import jax
    import jax.numpy as jnp

    # jit: eager flax init dispatches (and compiles) every initializer op by op
    init = jax.jit(make_model(out).init)
    return init(jax.random.PRNGKey(seed), jnp.zeros((1, 32, 32, 1), jnp.float32))["params"]


def save_params(params, path) -> int:
    """Write ``params`` with flax.serialization (msgpack); returns the size in bytes."""
    from flax import serialization

    data = serialization.to_bytes(params)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return len(data)


def load_params(path):
    """Parameters from a msgpack file written by ``save_params``."""
    from flax import serialization

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no U-Net weights at {path}: train them with "
                                f"'python -m stem_live.lab.train_unet --out {path}'")
    try:
        d = serialization.msgpack_restore(path.read_bytes())
    except Exception as e:  # noqa: BLE001 - any decode error means a bad file
        raise ValueError(f"{path} is not a U-Net weights file (msgpack): {e}") from None
    if isinstance(d, dict) and set(d) == {"params"}:
        d = d["params"]
    return d


def calibrated_threshold(weights_path) -> float | None:
    """The detection threshold calibrated for the weights at ``weights_path`` (the
    ``eval.threshold_calibration.best`` of the metrics.json that ``train_unet`` writes beside
    them), or None when there is none (use ``THRESHOLD`` then, calibrated for the committed
    weights)."""
    import json

    try:
        m = json.loads(Path(weights_path).with_name("metrics.json").read_text())
        return float(m["eval"]["threshold_calibration"]["best"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


@functools.lru_cache(maxsize=1)
def load_default():
    """The committed weights (``stem_live/locate/weights/unet.msgpack``), cached."""
    return load_params(WEIGHTS)


@functools.cache
def _forward_fn(out: int = 1):
    import jax

    model = make_model(out)

    def fwd(params, x):
        return jax.nn.sigmoid(model.apply({"params": params}, x))

    return jax.jit(fwd)


CLIP = (-4.0, 16.0)  # normalised input range (hot pixels, saturated contamination)
TILE = 32  # px: the normalisation's statistics are taken over tiles of this size
FLAT_IQR = 0.5  # a tile whose IQR is below this x the frame's median IQR is flat (vacuum, saturation)
SATURATED_FRAC = 0.02  # a tile with more than this fraction of pixels at the frame's maximum is saturated


def _tile_blocks(img: np.ndarray, tile: int) -> np.ndarray:
    """(ny, nx, tile * tile) pixels of every tile x tile block (the frame edge-padded to a
    multiple of ``tile``)."""
    h, w = img.shape
    x = np.pad(img, ((0, (-h) % tile), (0, (-w) % tile)), mode="edge")
    ny, nx = x.shape[0] // tile, x.shape[1] // tile
    return x.reshape(ny, tile, nx, tile).transpose(0, 2, 1, 3).reshape(ny, nx, tile * tile)


def _tile_stats(img: np.ndarray, tile: int) -> tuple[np.ndarray, np.ndarray]:
    """Median and interquartile range of every tile x tile block (the frame edge-padded to
    a multiple of ``tile``): two (ceil(H / tile), ceil(W / tile)) arrays."""
    q1, med, q3 = np.percentile(_tile_blocks(img, tile), [25.0, 50.0, 75.0], axis=2)
    return med, q3 - q1


def _interp_matrix(n: int, tile: int, n_tiles: int) -> np.ndarray:
    """(n, n_tiles) linear-interpolation weights from tile centres to pixels 0..n-1 (constant
    beyond the first and last centre)."""
    u = np.clip((np.arange(n) - (tile - 1) / 2.0) / tile, 0.0, n_tiles - 1.0)
    i0 = np.minimum(u.astype(int), n_tiles - 1)
    i1 = np.minimum(i0 + 1, n_tiles - 1)
    f = (u - i0).astype(np.float32)
    wts = np.zeros((n, n_tiles), np.float32)
    np.add.at(wts, (np.arange(n), i0), 1.0 - f)
    np.add.at(wts, (np.arange(n), i1), f)
    return wts


def _tile_field(values: np.ndarray, shape: tuple[int, int], tile: int) -> np.ndarray:
    """Bilinear interpolation of per-tile values (tile centres) to every pixel of ``shape``:
    separable, two small matrix products."""
    wy = _interp_matrix(shape[0], tile, values.shape[0])
    wx = _interp_matrix(shape[1], tile, values.shape[1])
    return wy @ values.astype(np.float32) @ wx.T


def normalise(image: np.ndarray) -> np.ndarray:
    """Robust local normalisation: (x - M) / S, clipped to ``CLIP``. M and S are each 32 x 32
    px tile's median and interquartile range, interpolated between tile centres, so a slowly
    varying background (a thicker support, the rim of contamination) is flattened and a
    nanoparticle's heavy columns (a tile whose median and IQR are 10-100 x the support's)
    keep their contrast. A flat tile (IQR below ``FLAT_IQR`` x the frame's median IQR s: a
    vacuum hole, the inside of a saturated blob) or a saturated one (more than
    ``SATURATED_FRAC`` of its pixels at the frame's maximum: a blob's rim) takes the frame's
    median tile median m and s instead, so a hole stays dark and a blob does not squash
    the columns beside it. The standard deviation stands in for s when the quartiles
    coincide (sparse counts)."""
    img = np.asarray(image, np.float32)
    h, w = img.shape
    tile = min(TILE, h, w)
    blocks = _tile_blocks(img, tile)
    q1, med, q3 = np.percentile(blocks, [25.0, 50.0, 75.0], axis=2)
    iqr = q3 - q1
    m = float(np.median(med))
    scale = float(np.median(iqr))
    floor = 1e-6 * max(abs(m), 1.0)
    if not scale > floor:
        scale = max(float(np.std(img)), floor, 1e-12)
        return np.clip((img - np.float32(m)) / np.float32(scale), *CLIP)
    top = float(img.max())
    saturated = np.mean(blocks >= top, axis=2) > SATURATED_FRAC
    ok = (iqr >= FLAT_IQR * scale) & ~saturated
    loc_m = _tile_field(np.where(ok, med, m), img.shape, tile)
    loc_s = _tile_field(np.where(ok, iqr, scale), img.shape, tile)
    return np.clip((img - loc_m) / loc_s, *CLIP)



#: detection threshold on the column probability: the maximum of the per-frame mean F1 on held-out
#: simulated frames (``train_unet.calibrate_threshold``, recorded in weights/metrics.json; keep the two in step)
THRESHOLD = 0.05
#: columns lower than this fraction of the 99th-percentile column height are dropped (``locate_unet``):
#: an amorphous support beside Au columns (< 0.8 %), the O columns of PbTiO3 that HAADF does not show at
#: real doses (1-3 %); SrTiO3's O stand at >= 5.2 % (as ``spacing.BRIGHT_FRACTION``)
MIN_HEIGHT_FRAC = 0.04
SPACING_THRESHOLD = 0.5  # peaks used to estimate the spacing when it is not given
BIN_TARGET_PX = 10.0  # px: larger spacings are binned down to about this (see ``binning_for``)


def binning_for(spacing_px: float) -> int:
    """Integer binning that brings a column spacing to ~``BIN_TARGET_PX`` (6.7-13.3 px).
    The network is best at spacings of 4-15 px (held-out F1 >= 0.97) and poor beyond 20 px
    (its receptive field is ~40 px; a low dose per pixel): a 6 pm graphene frame (24 px) is
    located at 2 x 2 binning, a nanoparticle field (35-130 px) at 4-13."""
    return max(1, int(round(float(spacing_px) / BIN_TARGET_PX)))


def bin_image(image: np.ndarray, b: int) -> np.ndarray:
    """Mean over b x b blocks (edge-padded to a multiple of b): (ceil(H / b), ceil(W / b)).
    Block (i, j) is centred at full-frame pixel ((i + 0.5) b - 0.5, (j + 0.5) b - 0.5)."""
    img = np.asarray(image, np.float32)
    if b <= 1:
        return img
    h, w = img.shape
    img = np.pad(img, ((0, (-h) % b), (0, (-w) % b)), mode="edge")
    return img.reshape(img.shape[0] // b, b, img.shape[1] // b, b).mean(axis=(1, 3))


def probability_map(image: np.ndarray, params=None, *, binning: int = 1) -> np.ndarray:
    """Per-pixel column probability for one frame: (H, W) float32, or on the
    ``bin_image(image, binning)`` grid (ceil(H / binning), ceil(W / binning))."""
    if params is None:
        params = load_default()
    x = normalise(bin_image(image, int(binning)))
    h, w = x.shape
    ph, pw = (-h) % STRIDE, (-w) % STRIDE
    if ph or pw:
        x = np.pad(x, ((0, ph), (0, pw)), mode="reflect")
    prob = _forward_fn(1)(params, x[None, :, :, None])
    return np.asarray(prob)[0, :h, :w, 0]


# ----------------------------------------------------------------------------- locator
def _nn_spacing(pts: np.ndarray) -> float | None:
    from scipy.spatial import cKDTree

    if len(pts) < 4:
        return None
    d, _ = cKDTree(pts).query(pts, k=2)
    return float(np.median(d[:, 1]))


def locate_unet(
    image: np.ndarray,
    spacing_px: float | None = None,
    *,
    params=None,
    threshold: float = THRESHOLD,
    min_distance_frac: float = 0.6,
    refine: bool = True,
    refine_on: str = "image",
    window_px: int | None = None,
    n_iter: int = 3,
    max_fit_std: float = 0.25,
    max_fit_shift: float = 0.75,
    n_classes: int = 1,
    thresholds: Sequence[float] | None = None,
    classifier=None,
    saturation: float | str | None = "auto",
    refine_method: str = "fixed",
    min_amp_snr: float = 3.0,
    line_jitter: bool = True,
    flyback_px: tuple[float, float] | None = None,
    prior=None,
    min_height_frac: float | None = MIN_HEIGHT_FRAC,
) -> Columns:
    """Find atomic columns in one frame with the U-Net; same result type as
    ``locate_classical``.

    Parameters
    ----------
    image : (H, W) frame (any real dtype, any size >= 8).
    spacing_px : nearest-neighbour column spacing (px); when None it is the median
        nearest-neighbour distance of the network's own detections.
    params : network weights (default: the committed ``load_default()``).
    threshold : minimum column probability at a peak of the probability map (default
        ``THRESHOLD``, calibrated with the committed weights; see weights/MODEL.md).
    min_distance_frac : non-maximum suppression radius as a fraction of the spacing.
    refine, refine_on, refine_method : sub-pixel position. Default (``refine_on="image"``,
        ``refine_method="fixed"``): the classical locator's refinement on the raw frame
        (``classical._refine_fixed``: probe width from the brightest columns, fixed-width
        neighbour-subtracted Poisson-weighted fit), starting from the probability peaks; a
        peak whose fitted amplitude is below ``min_amp_snr`` standard errors, or whose fitted
        centre is outside the frame, is dropped; a fit that is not trusted (position std >
        ``max_fit_std`` px away from the frame edge, moved by more than half the suppression
        radius, failed) keeps the probability-map position. ``refine_method="free"``: a
        free-width Gaussian fit (``refine_positions``) instead, nothing dropped, untrusted
        beyond ``max_fit_shift`` px of movement; ``refine_on="map"``: that fit on the
        probability map.
        refine=False: quadratic interpolation of the map peak.
    n_classes, thresholds, classifier : intensity classes, as in ``locate_classical``
        (intensity = band-passed frame at the final position).
    saturation : as in ``locate_classical``: peaks beside a saturated region (not a clipped
        column top) are dropped.
    line_jitter : with the default refinement, the scan-line de-jitter of
        ``locate_classical`` (``meta``: ``line_jitter_px``, ``line_shift_px``).
    flyback_px : with the default refinement, the scan's known flyback (amplitude, decay) px,
        as in ``locate_classical``.
    prior : with the default refinement, where the columns are expected from the earlier
        frames (a ``lattice_prior.LatticePrior``), as in ``locate_classical``.
    min_height_frac : a column whose height in the frame (smoothed over 0.1 spacing, above its
        1st percentile: ``spacing._peak_heights``) is below this fraction of the 99th percentile
        of the columns' heights is dropped (the texture of an amorphous support beside heavy
        columns: < 0.8 % of the Au columns of a nanoparticle; PbTiO3's O columns in HAADF 1-3 %;
        SrTiO3's O columns stand at >= 5.2 % (at a twentieth of the default dose 2 % of them
        fall below), the C beside a Si in graphene at ~25 %); None keeps every column.

    Returns
    -------
    ``Columns``; ``confidence`` is the network's probability at the peak; ``meta`` holds
    the spacing and the threshold used.
    """
    from stem_live.locate.classes import classify_intensity
    from stem_live.locate.classical import (
        _bilinear,
        _fit_trusted,
        _inside_frame,
        _merge_duplicates,
        _refine_fixed,
        _subpixel,
        bandpass,
        find_peaks,
        near_saturation,
    )
    from stem_live.locate.refine import refine_positions, window_for_spacing

    img = np.asarray(image)
    if img.ndim != 2:
        raise ValueError(f"locate_unet needs a 2-D image, got shape {img.shape}")
    if min(img.shape) < 8:
        raise ValueError(f"image too small for column finding: {img.shape}")
    if refine_on not in ("image", "map"):
        raise ValueError(f"refine_on must be 'image' or 'map', got {refine_on!r}")
    if refine_method not in ("fixed", "free"):
        raise ValueError(f"refine_method must be 'fixed' or 'free', got {refine_method!r}")
    if flyback_px is not None:
        from stem_live.locate.flyback import check

        flyback_px = check(flyback_px)
    img = img.astype(np.float32, copy=False)
    if not np.isfinite(img).all():
        img = np.where(np.isfinite(img), img, np.nanmedian(img)).astype(np.float32)

    prob = None
    if spacing_px is None:
        prob = probability_map(img, params)
        # spacing from the confident peaks only: a low detection threshold admits noise peaks
        pts0, _ = find_peaks(np.pad(prob, 1), max(threshold, SPACING_THRESHOLD), 2.0)
        spacing_px = _nn_spacing(pts0.astype(float))
        if spacing_px is None:
            spacing_px = 8.0
    spacing_px = float(spacing_px)
    if not np.isfinite(spacing_px) or spacing_px < 2.0:
        raise ValueError(f"column spacing must be >= 2 px, got {spacing_px}")
    sigma_px = 0.15 * spacing_px
    b = binning_for(spacing_px) if refine and refine_on == "image" else 1
    meta = {"spacing_px": spacing_px, "sigma_px": sigma_px, "threshold": float(threshold),
            "binning": b, "locator": "unet"}
    if prob is None or b > 1:
        prob = probability_map(img, params, binning=b)
    probp = np.pad(prob, 1)
    pts, heights = find_peaks(probp, threshold, min_distance_frac * spacing_px / b)
    # peaks of the (binned) map -> full-frame pixels
    start = np.clip((_subpixel(probp, pts) + 0.5) * b - 0.5, 0.0, np.array(img.shape) - 1.0)
    pts = np.rint(start).astype(int)
    if len(pts):
        near = near_saturation(img, pts, saturation, spacing_px)
        pts, heights, start = pts[~near], heights[~near], start[~near]
    if len(pts) == 0:
        return Columns(np.zeros((0, 2)), np.zeros(0, int), np.zeros(0), np.zeros(0),
                       np.zeros(0, bool), meta)
    conf = heights.astype(np.float64)
    window_given = window_px is not None
    if window_px is None:
        window_px = window_for_spacing(spacing_px)
    window_px = int(window_px) | 1
    line_dx = np.zeros(len(start))  # the line de-jitter's shift (fixed-width refinement only)
    if refine and refine_on == "image" and refine_method == "fixed":
        # the classical locator's refinement of the network's peaks: fixed-width, neighbour-
        # subtracted, Poisson-weighted fit on the raw frame; a peak with no significant column
        # under it, or whose column is centred outside the frame (only its tail shows, as a
        # peak on the edge), is dropped, as in ``locate_classical``
        pos, _, border, good, width, real, judge, line_dx, line_meta, _ = _refine_fixed(
            img, start, conf, spacing_px, sigma_px, window_px, window_given, None, n_iter, max_fit_std,
            0.5 * min_distance_frac * spacing_px, min_amp_snr, line_jitter, flyback_px, prior)
        meta["probe_sigma_px"] = width
        meta.update(line_meta)
        keep = real & _inside_frame(judge, img.shape)
        conf = conf * np.where(good, 1.0, 0.5)
        pos, border, conf, line_dx = pos[keep], border[keep], conf[keep], line_dx[keep]
    elif refine:
        target = img if refine_on == "image" else prob
        pos, _, border, info = refine_positions(target, start, window_px, sigma_px=sigma_px,
                                                n_iter=n_iter, return_info=True)
        good = _fit_trusted(info, pos, start, border, max_fit_shift, max_fit_std)
        pos = np.where(good[:, None], pos, start)
    else:
        pos = start
        r = window_px // 2
        h, w = img.shape
        border = ((pts[:, 0] < r) | (pts[:, 0] > h - 1 - r) | (pts[:, 1] < r) | (pts[:, 1] > w - 1 - r))
    filt, _ = bandpass(img, sigma_px, spacing_px, wiener=None)
    intensity = _bilinear(filt, pos + 1.0)
    if refine:
        pos, keep = _merge_duplicates(pos, conf, 0.25 * spacing_px)
        pos, intensity, border, conf, line_dx = pos[keep], intensity[keep], border[keep], conf[keep], line_dx[keep]
    if min_height_frac is not None and len(pos) >= 10:
        from stem_live.locate.spacing import _peak_heights

        h = _peak_heights(img.astype(np.float64), pos, 0.1 * spacing_px)
        keep = h >= float(min_height_frac) * np.percentile(h, 99)
        pos, intensity, border, conf, line_dx = pos[keep], intensity[keep], border[keep], conf[keep], line_dx[keep]
    if classifier is not None:
        klass = classifier(intensity)
    else:
        klass, _ = classify_intensity(intensity, thresholds=thresholds, n_classes=n_classes)
    return Columns(pos, klass, intensity, np.clip(conf, 0.0, 1.0), border, meta, line_dx)
