"""Train the U-Net column locator (``unet.py``) on simulated frames, within a wall-clock
budget, and evaluate it.

    python -m stem_live.lab.train_unet --out stem_live/locate/weights/unet.msgpack --minutes 20

Training frames are rendered on the fly by the virtual STEM (``simulator``): every preset
(graphene, srtio3, mos2, particles, nanoparticle: Au on amorphous carbon, perovskite: PbTiO3),
detector HAADF, ABF or BF (the bright-field frames inverted to bright columns as the locators
invert them, ``contrast.as_bright``), nearest-neighbour column spacings 4-40 px (log-uniform;
a frame the locator bins, ``unet.binning_for``, is rendered at the binned pixel size, the same
dose per area), doses 0.05-5 x the preset default, probe sizes 0.75-1.5 x default, random scan
rotation, drift (linear, OU walk, jitter) and scan distortion (scale error, shear, flyback, line
jitter), random background (up to 4 x the brightest column) and readout noise, then detector
artefacts (``detector_artefacts``: a saturated contamination blob, clipped highlights,
fast-scan smear).
Target: Gaussian blobs (sigma = 0.15 x nearest-neighbour spacing, clipped to 1-2 px; max over
columns) at the columns the detector shows (``truth.visible``: no O columns in HAADF
perovskite; the amorphous carbon of the nanoparticle support is background). Loss: binary
cross-entropy. Optimiser: Adam with a cosine learning-rate decay over the time budget.
Everything is seeded; with ``--steps`` the run does not depend on the machine's speed, with ``--minutes``
up to how many steps fit in the budget.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

PRESETS = ("graphene", "srtio3", "mos2", "particles", "nanoparticle", "perovskite")
PRESET_P = (0.2, 0.15, 0.12, 0.05, 0.28, 0.2)
DETECTORS = ("haadf", "abf", "bf")
DETECTOR_P = (0.6, 0.28, 0.12)
#: nearest-neighbour distance of the columns a preset's detector shows (nm): graphene C-C, SrTiO3
#: a / 2, MoS2 a / sqrt 3, Au [110] a sqrt(3/8), PbTiO3 a / 2 (HAADF: Pb-Ti, a / sqrt 2); particles:
#: its own pixel-size range instead (a 2 nm grid of particles)
NN_NM = {"graphene": 0.142, "srtio3": 0.3905 / 2, "mos2": 0.316 / np.sqrt(3), "nanoparticle": 0.4078 * np.sqrt(3 / 8),
         "perovskite": 0.39 / 2}
SPACING_RANGE = (4.0, 40.0)  # px, log-uniform
#: the frames the evaluation scores: (name, preset, detector)
EVAL_CASES = (("graphene", "graphene", "haadf"), ("srtio3", "srtio3", "haadf"), ("mos2", "mos2", "haadf"),
              ("particles", "particles", "haadf"), ("nanoparticle", "nanoparticle", "haadf"),
              ("perovskite", "perovskite", "haadf"), ("graphene_abf", "graphene", "abf"),
              ("perovskite_abf", "perovskite", "abf"))
CROP = 128
BATCH = 8
MINUTES = 20.0  # default wall-clock training budget (`stem-live train-locator` too)
EVAL_SEED0 = 1_000_000  # held-out simulator seeds start here (training uses < 1e6)
DOSE_RANGE = (0.05, 5.0)  # x the preset's default dose, log-uniform
#: brightest-column counts per pixel at the preset's default dose and pixel size (simulator, HAADF;
#: nanoparticle: a mid-thickness Au column, perovskite: Pb)
PEAK_COUNTS = {"graphene": 35.0, "srtio3": 175.0, "mos2": 220.0, "particles": 120.0, "nanoparticle": 8000.0,
               "perovskite": 800.0}
HIGH_BACKGROUND_P, HIGH_BACKGROUND_X = 0.4, (0.3, 4.0)  # background = U(0.3, 4) x peak counts
BLOB_P = 0.25  # a saturated contamination blob covering 3-30 % of the frame
CLIP_P = 0.25  # the top 0.01-1 % of the intensities clipped (an 8-bit export, a saturated detector)
LINE_BLUR_P = 0.3  # detector bandwidth: each pixel mixes 10-40 % of the previous one along the fast scan
#: real-image data (the graphene grain boundary): the shared data folder beside the repository, else tests/data
DATA_DIRS = (Path(__file__).resolve().parents[3] / "shared" / "data", Path(__file__).resolve().parents[2] / "tests" / "data")


# ----------------------------------------------------------------------------- data
def random_config(rng: np.random.Generator, size: int = CROP):
    """A random MicroscopeConfig covering the training distribution."""
    from simulator import PRESET_DEFAULTS, DriftConfig, MicroscopeConfig, ScanConfig
    from stem_live.locate.unet import binning_for

    preset = PRESETS[rng.choice(len(PRESETS), p=PRESET_P)]
    detector = DETECTORS[rng.choice(len(DETECTORS), p=DETECTOR_P)]
    d = PRESET_DEFAULTS[preset]
    if preset in NN_NM:
        nn_nm = NN_NM[preset] * (np.sqrt(2.0) if preset == "perovskite" and detector == "haadf" else 1.0)
        spacing = float(np.exp(rng.uniform(*np.log(SPACING_RANGE))))
        pix = nn_nm / spacing * binning_for(spacing)  # the binned frame the network sees at inference
    else:
        pix = float(np.exp(rng.uniform(np.log(0.005), np.log(0.04))))
    dose_frac = float(np.exp(rng.uniform(np.log(DOSE_RANGE[0]), np.log(DOSE_RANGE[1]))))
    dose = d["dose_e_per_A2"] * dose_frac
    probe = d["probe_fwhm_nm"] * float(rng.uniform(0.75, 1.5))
    if rng.random() < HIGH_BACKGROUND_P:  # MADF on a thick support: the background dwarfs the columns
        peak = PEAK_COUNTS[preset] * dose_frac * (pix / d["pixel_size_nm"]) ** 2
        background = float(peak * rng.uniform(*HIGH_BACKGROUND_X))
    else:
        background = float(rng.uniform(0.0, 20.0))
    kw = {}
    if preset == "nanoparticle":  # the particle's centre, its rim or the bare support in view
        off = rng.uniform(-0.6, 0.6, 2) * size * pix
        kw["origin_nm"] = tuple((0.5 * size * pix + off).tolist())
    scan = ScanConfig(
        scale_error=tuple(rng.uniform(-0.02, 0.02, 2).tolist()),
        shear=float(rng.uniform(-0.03, 0.03)),
        flyback_amp_nm=float(rng.uniform(0.0, 0.05)),
        flyback_tau_us=float(rng.uniform(5.0, 50.0)),
        flyback_ring_khz=float(rng.choice([0.0, rng.uniform(5.0, 30.0)])),
        line_jitter_nm=float(rng.uniform(0.0, 0.004)),
    )
    drift = DriftConfig(
        drift_nm_per_min=float(rng.uniform(0.0, 3.0)),
        direction_rad=float(rng.uniform(0, 2 * np.pi)),
        ou_sigma_nm=float(rng.uniform(0.0, 0.03)),
        jitter_amp_nm=float(rng.uniform(0.0, 0.01)),
        jitter_hz=float(rng.uniform(20.0, 80.0)),
    )
    return MicroscopeConfig(
        preset=preset, size=size, pixel_size_nm=pix, dose_e_per_A2=dose, probe_fwhm_nm=probe,
        dwell_us=float(rng.uniform(1.0, 8.0)), flyback_us=float(rng.uniform(20.0, 200.0)),
        readout_noise=float(rng.uniform(0.3, 3.0)), background_counts=background,
        scan_rotation_rad=float(rng.uniform(0, 2 * np.pi)), seed=int(rng.integers(0, EVAL_SEED0)),
        drift=drift, scan=scan, detector=detector, specimen_kwargs=kw,
    )


def visible_px(truth) -> np.ndarray:
    """(N, 2) px: the true columns the frame's detector shows (``truth.visible``)."""
    tp = np.asarray(truth.columns_px, float).reshape(-1, 2)
    vis = getattr(truth, "visible", None)
    return tp if vis is None else tp[np.asarray(vis, bool)]


def acquire_bright(cfg) -> tuple[np.ndarray, np.ndarray]:
    """One simulated frame with bright columns (a BF / ABF frame inverted by ``as_bright``, as
    the locators see it: float32) and the (N, 2) px columns its detector shows."""
    from simulator import Microscope
    from stem_live.locate.contrast import as_bright

    img, _, truth = Microscope(cfg).acquire()
    contrast = "bright" if cfg.detector == "haadf" else "dark"
    return as_bright(np.asarray(img, np.float32), contrast), visible_px(truth)


def target_map(shape, columns_px: np.ndarray) -> np.ndarray:
    """Max over Gaussian blobs at the columns; sigma = 0.15 x NN spacing in [1, 2] px."""
    from scipy.spatial import cKDTree

    h, w = shape
    out = np.zeros(shape, np.float32)
    pts = np.asarray(columns_px, float).reshape(-1, 2)
    if len(pts) == 0:
        return out
    if len(pts) > 1:
        nn = float(np.median(cKDTree(pts).query(pts, k=2)[0][:, 1]))
    else:
        nn = 10.0
    sigma = float(np.clip(0.15 * nn, 1.0, 2.0))
    rad = int(np.ceil(3 * sigma))
    oy, ox = np.mgrid[-rad : rad + 1, -rad : rad + 1]
    for y, x in pts:
        iy, ix = int(round(y)), int(round(x))
        g = np.exp(-((oy + iy - y) ** 2 + (ox + ix - x) ** 2) / (2 * sigma * sigma)).astype(np.float32)
        y0, y1 = max(iy - rad, 0), min(iy + rad + 1, h)
        x0, x1 = max(ix - rad, 0), min(ix + rad + 1, w)
        if y0 >= y1 or x0 >= x1:
            continue
        sub = g[y0 - (iy - rad) : y1 - (iy - rad), x0 - (ix - rad) : x1 - (ix - rad)]
        np.maximum(out[y0:y1, x0:x1], sub, out=out[y0:y1, x0:x1])
    return out


def detector_artefacts(rng: np.random.Generator, img: np.ndarray, target: np.ndarray):
    """What real detectors and specimens add to a simulated frame (counts, rows = slow scan):
    a bright, noisy, saturated contamination blob (``BLOB_P``; the target is cleared under
    it: no column is visible there), clipping of the brightest pixels (``CLIP_P``) and a
    detector bandwidth that smears each pixel into the next along the fast scan
    (``LINE_BLUR_P``). Returns new (image float32, target) arrays."""
    from scipy.ndimage import gaussian_filter

    x = np.asarray(img, np.float32).copy()
    y = target.copy()
    h, w = x.shape
    if rng.random() < LINE_BLUR_P:
        a = np.float32(rng.uniform(0.1, 0.4))
        x[:, 1:] = (1 - a) * x[:, 1:] + a * x[:, :-1]
    if rng.random() < BLOB_P:
        field = gaussian_filter(rng.standard_normal((h, w)), sigma=max(h, w) / rng.uniform(4.0, 8.0))
        cut = np.quantile(field, 1.0 - rng.uniform(0.03, 0.3))
        edge = max(float(np.std(field)) * 0.15, 1e-12)
        blob = np.clip((field - cut) / edge, 0.0, 1.0).astype(np.float32)
        lo, hi = np.percentile(x, [50.0, 99.5])
        amp = float(max(hi - lo, 1.0) * rng.uniform(1.5, 6.0))
        x += blob * amp + rng.standard_normal((h, w)).astype(np.float32) * np.sqrt(blob * amp)
        x = np.minimum(x, np.float32(lo + 0.8 * amp))  # the blob saturates the detector
        y[blob > 0.2] = 0.0
    elif rng.random() < CLIP_P:
        x = np.minimum(x, np.float32(np.percentile(x, 100.0 - rng.uniform(0.01, 1.0))))
    return np.maximum(x, 0.0), y


def make_sample(rng: np.random.Generator, size: int = CROP):
    """One (normalised image, target) pair with detector artefacts, randomly flipped / transposed."""
    from stem_live.locate.unet import normalise

    img, cols = acquire_bright(random_config(rng, size))
    img, y = detector_artefacts(rng, img, target_map(img.shape, cols))
    x = normalise(img)
    k = int(rng.integers(0, 8))
    if k & 1:
        x, y = x[::-1], y[::-1]
    if k & 2:
        x, y = x[:, ::-1], y[:, ::-1]
    if k & 4:
        x, y = x.T, y.T
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def make_batch(rng: np.random.Generator, batch: int = BATCH, size: int = CROP):
    xs, ys = zip(*(make_sample(rng, size) for _ in range(batch)))
    return np.stack(xs)[..., None], np.stack(ys)[..., None]


def _augment(rng: np.random.Generator, x: np.ndarray, y: np.ndarray):
    """Random flips / transpose of a batch (B, H, W, 1) (one draw for the whole batch)."""
    k = int(rng.integers(0, 8))
    if k & 1:
        x, y = x[:, ::-1], y[:, ::-1]
    if k & 2:
        x, y = x[:, :, ::-1], y[:, :, ::-1]
    if k & 4:
        x, y = x.transpose(0, 2, 1, 3), y.transpose(0, 2, 1, 3)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


# ----------------------------------------------------------------------------- training
def make_train_step(optimizer):
    import jax
    import optax

    from stem_live.locate.unet import make_model

    model = make_model(1)

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.sigmoid_binary_cross_entropy(logits, y).mean()

    @jax.jit
    def step(params, opt_state, x, y, lr):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        opt_state.hyperparams["learning_rate"] = lr
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def train(out_path, *, minutes: float = MINUTES, seed: int = 0, progress=print, lr: float = 3e-3,
          batch: int = BATCH, size: int = CROP, pool_size: int = 64, refresh: int = 1, crop: int = 96, evaluate_after: bool = True, max_steps: int | None = None,
          model_card: bool = True) -> dict:
    """Train for ``minutes`` of wall-clock time (or ``max_steps``), save the weights to
    ``out_path`` (msgpack), evaluate and (``model_card``) write MODEL.md and metrics.json next
    to them (metrics.json holds the calibrated threshold that ``stem-live locate --weights``
    uses). Returns the metrics dict."""
    import jax
    import optax

    from stem_live.locate.unet import init_params, save_params

    t0 = time.perf_counter()
    budget = float(minutes) * 60.0
    rng = np.random.default_rng(seed)
    params = init_params(seed)
    optimizer = optax.inject_hyperparams(optax.adam)(learning_rate=lr)
    opt_state = optimizer.init(params)
    step_fn = make_train_step(optimizer)
    n_params = int(sum(np.size(p) for p in jax.tree_util.tree_leaves(params)))
    progress(f"train_unet: {n_params} parameters, batch {batch} x {crop}x{crop} crops of {size}x{size} frames, "
             f"{f'{max_steps} steps' if max_steps is not None else f'budget {minutes:g} min'}, seed {seed}")
    pool_x, pool_y = make_batch(rng, pool_size, size)
    progress(f"  pool of {pool_size} frames rendered in {time.perf_counter() - t0:.0f} s")
    step, losses, t_last = 0, [], t0
    while True:
        el = time.perf_counter() - t0
        if (max_steps is not None and step >= max_steps) or (max_steps is None and el >= budget):
            break
        frac = min(el / budget, 1.0) if max_steps is None else step / max(max_steps, 1)
        cur_lr = lr * (0.02 + 0.98 * 0.5 * (1.0 + np.cos(np.pi * frac)))
        for _ in range(refresh):  # replace a few pool frames by fresh ones
            k = int(rng.integers(0, pool_size))
            xk, yk = make_sample(rng, size)
            pool_x[k, ..., 0], pool_y[k, ..., 0] = xk, yk
        idx = rng.choice(pool_size, batch, replace=False)
        i0, j0 = rng.integers(0, size - crop + 1, 2)
        x, y = _augment(rng, pool_x[idx, i0 : i0 + crop, j0 : j0 + crop],
                        pool_y[idx, i0 : i0 + crop, j0 : j0 + crop])
        params, opt_state, loss = step_fn(params, opt_state, x, y, np.float32(cur_lr))
        losses.append(float(loss))
        step += 1
        now = time.perf_counter()
        if now - t_last >= 30.0 or step == 1:
            t_last = now
            progress(f"  step {step:5d}  {el / 60:5.1f}/{minutes:g} min  loss {np.mean(losses[-50:]):.4f}  lr {cur_lr:.1e}")
    train_s = time.perf_counter() - t0
    size_b = save_params(params, out_path)
    progress(f"train_unet: {step} steps in {train_s / 60:.1f} min, final loss "
             f"{np.mean(losses[-100:]):.4f}; saved {size_b / 1024:.0f} KiB to {out_path}")
    metrics = {"steps": step, "train_minutes": round(train_s / 60, 2), "seed": seed, "batch": batch,
               "frame": size, "crop": crop, "pool": pool_size, "refresh": refresh, "final_loss": float(np.mean(losses[-100:])) if losses else None,
               "n_params": n_params, "weights_bytes": size_b, "budget_minutes": minutes, "max_steps": max_steps}
    if evaluate_after:
        metrics["eval"] = calibrate_and_evaluate(params, progress=progress)
    if model_card:
        write_model_card(Path(out_path).with_name("MODEL.md"), metrics)
        Path(out_path).with_name("metrics.json").write_text(json.dumps(metrics, indent=1, default=float))
    return metrics


# ----------------------------------------------------------------------------- evaluation
def match(found: np.ndarray, truth: np.ndarray, tol: float):
    """One-to-one matching within ``tol`` (Hungarian on the pairs within tol)."""
    from scipy.optimize import linear_sum_assignment
    from scipy.spatial import cKDTree

    if len(found) == 0 or len(truth) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    pairs = cKDTree(found).sparse_distance_matrix(cKDTree(truth), tol, output_type="ndarray")
    if len(pairs) == 0:
        return np.zeros(0, int), np.zeros(0, int)
    d = np.full((len(found), len(truth)), 1e6)
    d[pairs["i"], pairs["j"]] = pairs["v"]
    r, c = linear_sum_assignment(d)
    ok = d[r, c] <= tol
    return r[ok], c[ok]


def score_sim(cols, truth_px: np.ndarray) -> dict:
    from scipy.spatial import cKDTree

    nn = float(np.median(cKDTree(truth_px).query(truth_px, k=2)[0][:, 1]))
    r, c = match(cols.positions, truth_px, 0.3 * nn)
    err = np.linalg.norm(cols.positions[r] - truth_px[c], axis=1)
    inner = ~cols.border[r]
    return {"n_truth": len(truth_px), "n_found": len(cols), "recall": len(r) / max(len(truth_px), 1),
            "precision": len(r) / max(len(cols), 1),
            "rmse_px": float(np.sqrt(np.mean(err**2))) if len(err) else float("nan"),
            "rmse_inner_px": float(np.sqrt(np.mean(err[inner] ** 2))) if inner.any() else float("nan"),
            "rmse_border_px": float(np.sqrt(np.mean(err[~inner] ** 2))) if (~inner).any() else float("nan"),
            "nn_px": nn}


def score_real(cols, ref: np.ndarray, shape, tol: float = 3.0, edge_px: float = 5.0) -> dict:
    """F1 vs the reference; unmatched detections within ``edge_px`` of the frame edge are
    not false positives (the reference leaves that band unannotated), as in test_locate."""
    r, _ = match(cols.positions, ref, tol)
    tp = len(r)
    un = np.setdiff1d(np.arange(len(cols)), r)
    p = cols.positions[un]
    edge = np.minimum.reduce([p[:, 0], shape[0] - 1 - p[:, 0], p[:, 1], shape[1] - 1 - p[:, 1]]) if len(p) else np.zeros(0)
    fp = int(np.sum(edge >= edge_px))
    fn = len(ref) - tp
    return {"tp": tp, "fp": fp, "fn": fn, "f1": 2 * tp / max(2 * tp + fp + fn, 1)}


CALIBRATION_THRESHOLDS = (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6)


def calibrate_threshold(params=None, *, n_frames: int = 64, size: int = 256, seed: int = 7,
                        thresholds=CALIBRATION_THRESHOLDS, progress=print) -> dict:
    """F1 of ``locate_unet`` (given spacing) against the visible true columns (``score_real``
    within 0.3 x spacing), averaged over
    ``n_frames`` held-out frames of the training distribution (``random_config`` with
    simulator seeds >= EVAL_SEED0, ``detector_artefacts``), for every detection threshold.
    Detections within 3 px of the edge that match nothing are not counted. Returns
    {"thresholds", "f1", "best"}: the decision threshold is part of the model, chosen here
    and not on any test image."""
    import dataclasses

    from scipy.spatial import cKDTree

    from stem_live.locate.unet import locate_unet

    rng = np.random.default_rng(seed)
    per_frame = []  # F1 of every frame at every threshold
    for k in range(n_frames):
        cfg = dataclasses.replace(random_config(rng, size), seed=EVAL_SEED0 + 10_000 + k)
        img, t = acquire_bright(cfg)
        img, y = detector_artefacts(rng, img, target_map(img.shape, t))
        ij = np.rint(t).astype(int)
        inside = (ij >= 0).all(1) & (ij[:, 0] < size) & (ij[:, 1] < size)
        t, ij = t[inside], ij[inside]
        t = t[y[ij[:, 0], ij[:, 1]] > 0.3]  # not under a contamination blob
        if len(t) < 4:
            continue
        nn = float(np.median(cKDTree(t).query(t, k=2)[0][:, 1]))
        per_frame.append([score_real(locate_unet(img, nn, params=params, threshold=th), t, img.shape,
                                     tol=0.3 * nn, edge_px=3.0)["f1"] for th in thresholds])
    # every frame weighs the same: pooled counts would let a 40 pm frame with thousands of
    # columns drown the false positives of a sparse nanoparticle field
    f1 = np.mean(per_frame, axis=0)
    best = float(thresholds[int(np.argmax(f1))])
    progress(f"  threshold calibration (F1, {n_frames} held-out frames): "
             + ", ".join(f"{th:g}: {f:.4f}" for th, f in zip(thresholds, f1)) + f"; best {best:g}")
    return {"thresholds": [float(t) for t in thresholds], "f1": [float(f) for f in f1], "best": best}


def sim_frame(preset: str, seed: int, size: int = 512, **kw):
    """(image as the detector gives it, FrameTruth) of one simulated frame."""
    from simulator import Microscope, MicroscopeConfig

    img, _, truth = Microscope(MicroscopeConfig(preset=preset, size=size, seed=seed, **kw)).acquire()
    return img, truth


def real_data_dir() -> Path | None:
    """The folder holding the real graphene image and its reference columns, or None."""
    return next((d for d in DATA_DIRS if (d / "graphene_gb_6nm.npy").is_file()), None)


def calibrate_and_evaluate(params, *, progress=print) -> dict:
    """The model card's "eval": the detection threshold calibrated for ``params``
    (``calibrate_threshold``), then ``evaluate`` at it."""
    cal = calibrate_threshold(params, progress=progress)
    ev = evaluate(params, threshold=cal["best"], progress=progress)
    ev["threshold_calibration"] = cal
    return ev


def evaluate(params=None, *, threshold: float | None = None, seeds=(0, 1), progress=print) -> dict:
    """Held-out simulator frames (512x512, each of ``EVAL_CASES`` at its preset's default pixel
    size, dose and scan; seeds EVAL_SEED0 + s; BF / ABF inverted by ``as_bright``) and the real
    graphene image, at the detection ``threshold`` (default ``unet.THRESHOLD``), the spacing
    estimated (``estimate_spacing``, as `stem-live locate` and `evaluate` do)."""
    from stem_live.locate import estimate_spacing
    from stem_live.locate.contrast import as_bright
    from stem_live.locate.unet import THRESHOLD, locate_unet

    threshold = THRESHOLD if threshold is None else float(threshold)
    out = {}
    for name, preset, detector in EVAL_CASES:
        rows = []
        for s in seeds:
            img, truth = sim_frame(preset, EVAL_SEED0 + s, detector=detector)
            img = as_bright(np.asarray(img, np.float32), "bright" if detector == "haadf" else "dark")
            t = time.perf_counter()
            try:
                sp = estimate_spacing(img)
            except ValueError:
                sp = None
            cols = locate_unet(img, sp, params=params, threshold=threshold)
            sc = score_sim(cols, visible_px(truth))
            sc["ms"] = (time.perf_counter() - t) * 1e3
            rows.append(sc)
        agg = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        agg["min_recall"] = float(min(r["recall"] for r in rows))
        agg["min_precision"] = float(min(r["precision"] for r in rows))
        out[name] = agg
        progress(f"  eval {name:14s} recall {agg['recall']:.4f} precision {agg['precision']:.4f} "
                 f"rmse {agg['rmse_px']:.3f} px (inner {agg['rmse_inner_px']:.3f}, border "
                 f"{agg['rmse_border_px']:.3f})")
    data = real_data_dir()
    if data is not None:
        img = np.load(data / "graphene_gb_6nm.npy")
        ref = np.load(data / "graphene_gb_6nm_reference_columns.npy").astype(float)
        meta = json.loads((data / "graphene_gb_6nm.json").read_text())
        given = 0.142 / meta["pixel_size_nm"]
        for name, sp in (("given_spacing", given), ("auto_spacing", estimate_spacing(img))):
            cols = locate_unet(img, sp, params=params, threshold=threshold)
            out[f"real_graphene_{name}"] = sc = score_real(cols, ref, img.shape, tol=0.3 * sp)
            progress(f"  eval real graphene ({name}): F1 {sc['f1']:.4f} (tp {sc['tp']}, fp {sc['fp']}, fn {sc['fn']})")
    return out


def write_model_card(path: Path, m: dict) -> None:
    ev = m.get("eval", {})
    lines = [
        "# U-Net column locator (`unet.msgpack`)",
        "",
        "Flax linen U-Net, channels 16-32-64, two 2x max-pool downsamplings, ConvTranspose",
        "upsampling, skip connections, ReLU, no normalisation layers; 1 output (column",
        f"probability, sigmoid). {m['n_params']} parameters, {m['weights_bytes'] / 1024:.0f} KiB (flax.serialization msgpack).",
        "Input: one frame, normalised locally (`unet.normalise`): (x - M) / S clipped to [-4, 16], M and S",
        "each 32 x 32 px tile's median and interquartile range interpolated between tile centres; flat",
        "tiles (a vacuum hole, a saturated blob's inside) and saturated ones (a blob's rim) take the frame's values.",
        "Bright-field (BF / ABF) frames are inverted to bright columns first (`contrast.as_bright`).",
        "Frames whose column spacing exceeds ~15 px are binned to ~10 px first (`unet.binning_for`).",
        "",
        "## Training",
        f"- Data: rendered on the fly by `simulator` (no stored data set; a pool of {m.get('pool')} frames, {m.get('refresh')} replaced by fresh ones every step): presets",
        "  " + ", ".join(f"{p} {q:g}" for p, q in zip(PRESETS, PRESET_P)) + " (probability; nanoparticle: Au [110] on amorphous",
        "  carbon, the carbon is background; perovskite: PbTiO3), detector " + ", ".join(f"{d} {q:g}" for d, q in zip(DETECTORS, DETECTOR_P)),
        "  (BF / ABF inverted by `contrast.as_bright`), 128x128 frames (random 96x96 crops), nearest-neighbour spacing",
        f"  {SPACING_RANGE[0]:g}-{SPACING_RANGE[1]:g} px log-uniform (rendered at the binned pixel size where `binning_for` bins; particles:",
        f"  pixel 5-40 pm), dose {DOSE_RANGE[0]:g}-{DOSE_RANGE[1]:g}x preset default (log-uniform), probe FWHM 0.75-1.5x default, random scan",
        "  rotation, drift (linear 0-3 nm/min, OU 0-0.03 nm, 20-80 Hz jitter 0-0.01 nm), scan",
        "  distortion (scale error +-2 %, shear +-0.03, flyback 0-0.05 nm / 5-50 us, optional ringing,",
        f"  line jitter 0-0.004 nm), background 0-20 counts or (p = {HIGH_BACKGROUND_P:g}) {HIGH_BACKGROUND_X[0]:g}-{HIGH_BACKGROUND_X[1]:g}x the brightest",
        "  column's counts, readout noise 0.3-3; detector artefacts (`detector_artefacts`): a saturated",
        f"  contamination blob over 3-30 % of the frame (p = {BLOB_P:g}; no target under it), or the top 0.01-1 %",
        f"  of intensities clipped (p = {CLIP_P:g}); fast-scan smear of 10-40 % (p = {LINE_BLUR_P:g}); random flips/transpose.",
        "- Target: max over Gaussian blobs at the columns the detector shows (`truth.visible`: no O in HAADF PbTiO3), sigma = 0.15 x NN spacing clipped",
        "  to [1, 2] px. Loss: sigmoid binary cross-entropy. Adam, lr 3e-3 with cosine decay over the",
        "  steps (`--steps`) or the wall-clock budget (`--minutes`).",
        f"- Seed {m['seed']}, batch {m['batch']} x {m['crop']}x{m['crop']}, {m['steps']} steps in "
        f"{m['train_minutes']} min on the 2-core CPU (shared with other jobs); final loss {m['final_loss']:.4f}.",
        "- Reproduce: `nice -n 19 python -m stem_live.lab.train_unet --out stem_live/locate/weights/unet.msgpack"
        + (f" --steps {m['max_steps']}" if m.get("max_steps") else f" --minutes {m.get('budget_minutes', m['train_minutes'])}")
        + f" --seed {m['seed']}`",
        "",
        "## Evaluation (held-out simulator seeds 1e6 and 1e6 + 1, 512x512, preset default pixel size, dose, scan)",
        "Matching one-to-one within 0.3 x NN spacing; `locate_unet(image, estimate_spacing(image))` with defaults",
        "(Gaussian refinement on the raw frame). RMSE vs the visible",
        "`truth.columns_px`; border = refinement window crosses the frame edge.",
        "",
        "| preset | recall | precision | RMSE px | RMSE inner | RMSE border | NN px |",
        "|---|---|---|---|---|---|---|",
    ]
    for p, _, _ in EVAL_CASES:
        if p in ev:
            e = ev[p]
            lines.append(f"| {p} | {e['recall']:.4f} | {e['precision']:.4f} | {e['rmse_px']:.3f} | "
                         f"{e['rmse_inner_px']:.3f} | {e['rmse_border_px']:.3f} | {e['nn_px']:.1f} |")
    lines.append("")
    cal = ev.get("threshold_calibration")
    if cal:
        lines += ["Detection threshold (`unet.THRESHOLD`): the maximum of the per-frame mean F1 over held-out frames of the training",
                  "distribution (`calibrate_threshold`: 64 frames, 256 px, given spacing, detector artefacts):", "",
                  "| threshold | " + " | ".join(f"{t:g}" for t in cal["thresholds"]) + " |",
                  "|---|" + "---|" * len(cal["thresholds"]),
                  "| F1 | " + " | ".join(f"{f:.4f}" for f in cal["f1"]) + " |", ""]
    for k in ("real_graphene_given_spacing", "real_graphene_auto_spacing"):
        if k in ev:
            e = ev[k]
            lines.append(f"- Real graphene (`graphene_gb_6nm.npy` vs AtomNet reference, 0.3 x spacing, "
                         f"{k.split('_', 2)[2].replace('_', ' ')}): F1 {e['f1']:.4f} (tp {e['tp']}, fp {e['fp']}, fn {e['fn']})")
    for extra in m.get("notes", []):
        lines.append(extra)
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stem_live.lab.train_unet",
                                 description="train the U-Net column locator on simulated frames")
    ap.add_argument("--out", default=str(Path(__file__).parent / "weights" / "unet.msgpack"),
                    help="weights file to write (msgpack); MODEL.md is written next to it")
    ap.add_argument("--minutes", type=float, default=MINUTES, help="wall-clock training budget")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=None,
                    help="train for this many steps instead of --minutes (a length independent of the machine's speed)")
    ap.add_argument("--no-eval", action="store_true", help="skip the evaluation")
    ap.add_argument("--eval-only", action="store_true",
                    help="no training: re-evaluate the weights at --out (after a change to the locator) and "
                         "rewrite the evaluation in their metrics.json and MODEL.md")
    a = ap.parse_args(argv)
    if a.eval_only:
        return reevaluate(Path(a.out))
    if not a.minutes > 0:
        print("error: --minutes must be > 0", file=sys.stderr)
        return 2
    out = Path(a.out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"error: cannot write to {out.parent}: {e.strerror}", file=sys.stderr)
        return 2
    if a.steps is not None and a.steps < 1:
        print("error: --steps must be >= 1", file=sys.stderr)
        return 2
    train(out, minutes=a.minutes, seed=a.seed, evaluate_after=not a.no_eval, max_steps=a.steps,
          progress=lambda s: print(s, flush=True))
    return 0


def reevaluate(out: Path) -> int:
    """``--eval-only``: the training record of ``out``'s metrics.json kept, its "eval" redone."""
    from stem_live.locate.unet import load_params

    metrics_path = out.with_name("metrics.json")
    try:
        params = load_params(out)
        m = json.loads(metrics_path.read_text())
        missing = [k for k in ("n_params", "weights_bytes", "seed", "batch", "crop", "steps", "train_minutes",
                                "final_loss") if k not in m]
        if missing:
            raise KeyError(f"{metrics_path} lacks {', '.join(missing)}")
    except (OSError, ValueError, KeyError) as e:
        print(f"error: --eval-only needs weights and the metrics.json written with them beside {out}: {e}",
              file=sys.stderr)
        return 2
    m["eval"] = calibrate_and_evaluate(params, progress=lambda s: print(s, flush=True))
    write_model_card(out.with_name("MODEL.md"), m)
    metrics_path.write_text(json.dumps(m, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
