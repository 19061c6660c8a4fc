"""What ``stem-live train-rvae`` / ``encode-rvae`` do, as functions (the CLI only parses).

A *source* is one of:

- a simulator preset name (``graphene``, ``particles``, ...): ``frames`` seeded frames of
  ``size`` px; columns at the simulator's true positions;
- a recording or image: a TIFF stack, ImageJ TIFF or ``.npy`` (N, H, W) / (H, W), read with
  ``stem_live.io.read_frames``; columns from ``stem_live.locate.locate_classical``
  (spacing estimated unless ``spacing_px`` is given);
- a patch stack ``.npy`` (N, S, S) with S <= 128 (``kind="frames"`` reads it as frames) or an ``.npz``
  holding ``patches`` (or ``x``, ``images``, ``data``, or its only 3-D array), optionally
  ``mask``/``masks``: as other rVAE tools write them (``kind="patches"`` forces this reading).

Every error a user can cause raises :class:`SourceError` or
:class:`~stem_live.rvae.train.CheckpointError` (both ValueError) with a one-line message.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["SourceError", "load_source", "train_rvae_main", "encode_rvae_main"]

_PATCH_KEYS = ("patches", "x", "images", "imgdata", "data")
_MASK_KEYS = ("mask", "masks")


class SourceError(ValueError):
    """A training / encoding source cannot be used; the message says what to do."""


def _load_patch_file(p: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        if p.suffix.lower() == ".npz":
            with np.load(p, allow_pickle=False) as z:
                names = list(z.files)
                key = next((k for k in _PATCH_KEYS if k in names), None)
                if key is None:
                    three = [k for k in names if z[k].ndim == 3]
                    if len(three) != 1:
                        raise SourceError(f"{p.name}: no 'patches' array (found {', '.join(names) or 'nothing'}); "
                                          f"save the (N, S, S) stack as 'patches'")
                    key = three[0]
                x = np.asarray(z[key])
                mk = next((k for k in _MASK_KEYS if k in names), None)
                m = np.asarray(z[mk]) if mk else None
        else:
            x = np.load(p, allow_pickle=False)
            m = None
    except SourceError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise SourceError(f"cannot read {p.name} ({type(exc).__name__}): the file is damaged or not .npy/.npz") from None
    if x.ndim == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.ndim != 3 or x.shape[1] != x.shape[2] or len(x) == 0:
        raise SourceError(f"{p.name}: patches must be a non-empty (N, S, S) stack, got shape {x.shape}")
    if not np.issubdtype(x.dtype, np.number) or np.iscomplexobj(x):
        raise SourceError(f"{p.name}: patches must be real numbers, got dtype {x.dtype}")
    x = x.astype(np.float32)
    if m is not None:
        if m.shape != x.shape:
            raise SourceError(f"{p.name}: mask shape {m.shape} does not match patches {x.shape}")
        m = m.astype(bool)
    valid = np.isfinite(x) & (True if m is None else m)
    # normalise each patch like extract_patches does (zero mean, unit std over valid pixels)
    cnt = np.maximum(valid.sum(axis=(1, 2), keepdims=True), 1)
    xv = np.where(valid, x, 0.0)
    mean = xv.sum(axis=(1, 2), keepdims=True) / cnt
    std = np.sqrt((np.where(valid, x - mean, 0.0) ** 2).sum(axis=(1, 2), keepdims=True) / cnt)
    std = np.where(std > 0, std, 1.0)
    x = np.where(valid, (x - mean) / std, 0.0).astype(np.float32)
    return x, valid


def _frames_from_file(p: Path, frames: int | None):
    from stem_live.io import RecordError, read_frames

    try:
        it = read_frames(p, pixel_size_nm=1.0, dwell_us=1.0, flyback_us=0.0)
        out = []
        for f in it:
            out.append(np.asarray(f.image, dtype=np.float32))
            if frames is not None and len(out) >= frames:
                break
    except RecordError as exc:
        raise SourceError(str(exc)) from None
    if not out:
        raise SourceError(f"{p.name} holds no frames")
    return out


def _locate(image: np.ndarray, spacing_px: float | None) -> np.ndarray:
    try:
        from stem_live.locate import locate_classical
    except ImportError:  # pragma: no cover - locate is part of the package
        raise SourceError("column finding (stem_live.locate) is not available; pass a patch stack instead") from None
    try:
        cols = locate_classical(image, spacing_px)
    except ValueError as exc:
        raise SourceError(f"column finding failed: {exc}; pass --spacing-px") from None
    return np.asarray(cols.positions, dtype=np.float64).reshape(-1, 2)


def load_source(source, *, patch_size: int = 32, frames: int | None = None, size: int = 512, seed: int = 0,
                spacing_px: float | None = None, kind: str = "auto",
                progress: Callable[[str], None] | None = None) -> dict:
    """Patches (N, S, S), masks, and where they come from: ``positions`` (N, 2) px and
    ``frame`` (N,) index (both None for a patch stack), ``truth`` (simulator) and ``what``."""
    from simulator import PRESETS
    from stem_live.rvae.patches import extract_patches

    say = progress or (lambda _m: None)
    if kind not in ("auto", "patches", "frames", "sim"):
        raise SourceError(f"unknown source kind {kind!r}; use auto, patches, frames or sim")
    src = str(source)
    p = Path(src)
    if kind == "sim" or (kind == "auto" and src in PRESETS and not p.exists()):
        if src not in PRESETS:
            raise SourceError(f"unknown simulator preset {src!r}; choose one of {', '.join(PRESETS)}")
        from simulator import Microscope, MicroscopeConfig

        n = int(frames or 4)
        ps, ms, pos, fr, truths = [], [], [], [], []
        for i in range(n):
            scope = Microscope(MicroscopeConfig(preset=src, size=int(size), seed=int(seed) + i))
            image, _, truth = scope.acquire()
            x, m = extract_patches(image, truth.columns_px, patch_size)
            ps.append(x), ms.append(m), pos.append(truth.columns_px), fr.append(np.full(len(x), i)), truths.append(truth)
            say(f"simulator {src}: frame {i + 1}/{n}, {len(x)} columns")
        return {"patches": np.concatenate(ps), "masks": np.concatenate(ms), "positions": np.concatenate(pos),
                "frame": np.concatenate(fr), "truth": truths, "what": f"simulator {src} x {n} frames",
                "symmetry_order": truths[0].symmetry_order}
    if not p.exists():
        raise SourceError(f"{src} not found: give a recording, an image, a patch stack (.npy/.npz) "
                          f"or a simulator preset ({', '.join(PRESETS)})")
    if p.is_dir():
        raise SourceError(f"{src} is a folder; give a file")
    is_patches = kind == "patches" or (kind == "auto" and p.suffix.lower() == ".npz")
    if kind == "auto" and p.suffix.lower() == ".npy":
        try:
            shape = np.load(p, mmap_mode="r", allow_pickle=False).shape
        except Exception:  # noqa: BLE001
            raise SourceError(f"cannot read {p.name}: the file is damaged or not a .npy array") from None
        is_patches = len(shape) == 3 and shape[1] == shape[2] <= 128
    if is_patches:
        x, m = _load_patch_file(p)
        say(f"{p.name}: {len(x)} patches of {x.shape[1]}x{x.shape[2]}")
        return {"patches": x, "masks": m, "positions": None, "frame": None, "truth": None,
                "what": f"patch stack {p.name}", "symmetry_order": None}
    images = _frames_from_file(p, frames)
    ps, ms, pos, fr = [], [], [], []
    for i, img in enumerate(images):
        xy = _locate(img, spacing_px)
        x, m = extract_patches(img, xy, patch_size)
        ps.append(x), ms.append(m), pos.append(xy), fr.append(np.full(len(x), i))
        say(f"{p.name}: frame {i + 1}/{len(images)}, {len(x)} columns")
    x = np.concatenate(ps)
    if len(x) == 0:
        raise SourceError(f"no columns found in {p.name}; pass --spacing-px or a patch stack")
    return {"patches": x, "masks": np.concatenate(ms), "positions": np.concatenate(pos),
            "frame": np.concatenate(fr), "truth": None, "what": f"{p.name} x {len(images)} frames",
            "symmetry_order": None}


def train_rvae_main(source, out_path, *, epochs: int = 20, batch_size: int = 128, lr: float = 1e-3,
                    seed: int = 0, latent_dim: int = 2, symmetry_order: int | None = None, patch_size: int = 32,
                    angle_prior_sigma: float | None = None, shift_prior_sigma=(1.0, 1.0),
                    content_prior_sigma: float = 1.0, recon_sigma: float = 0.5,
                    frames: int | None = None, size: int = 512, spacing_px: float | None = None,
                    kind: str = "auto", max_seconds: float | None = None,
                    progress: Callable[[str], None] | None = print, **config_kwargs) -> dict:
    """Train an rVAE on ``source`` and save it to ``out_path`` (required). Returns a summary.

    Further keyword arguments go to :class:`~stem_live.rvae.model.RVAEConfig` (e.g.
    ``canvas_size``, ``decoder_hidden``, ``encoder_features``)."""
    from stem_live.rvae.model import RVAEConfig
    from stem_live.rvae.train import CheckpointError, save_checkpoint, train

    if out_path is None or str(out_path).strip() == "":
        raise CheckpointError("an output path is required (e.g. --out rvae.msgpack)")
    out = Path(out_path)
    if out.is_dir() or not out.parent.exists():
        raise CheckpointError(f"cannot write {out}: give a file name in an existing folder")
    say = progress or (lambda _m: None)
    data = load_source(source, patch_size=patch_size, frames=frames, size=size, seed=seed,
                       spacing_px=spacing_px, kind=kind, progress=say)
    x, m = data["patches"], data["masks"]
    if symmetry_order is None:
        symmetry_order = int(data.get("symmetry_order") or 1)
    cfg = RVAEConfig(patch_size=int(x.shape[1]), latent_dim=int(latent_dim), symmetry_order=int(symmetry_order),
                     angle_prior_sigma=angle_prior_sigma, shift_prior_sigma=tuple(np.broadcast_to(
                         np.asarray(shift_prior_sigma, float), (2,))),
                     content_prior_sigma=content_prior_sigma, recon_sigma=recon_sigma, **config_kwargs)
    say(f"training on {len(x)} patches from {data['what']}: {epochs} epochs, batch {batch_size}, lr {lr}, seed {seed}")
    t0 = time.perf_counter()
    params, hist = train(x, masks=m, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, progress=say,
                         config=cfg, max_seconds=max_seconds)
    seconds = time.perf_counter() - t0
    save_checkpoint(out, params, history=hist)
    say(f"saved {out} ({out.stat().st_size / 1024:.0f} KiB) after {seconds:.1f} s")
    return {"checkpoint": str(out), "patches": int(len(x)), "epochs": len(hist),
            "final_loss": float(hist[-1]["loss"]) if hist else float("nan"), "seconds": seconds}


def encode_rvae_main(source, checkpoint, out_npz, *, frames: int | None = None, size: int = 512, seed: int = 0,
                     spacing_px: float | None = None, kind: str = "auto",
                     progress: Callable[[str], None] | None = print) -> dict:
    """Encode ``source`` with a checkpoint; write ``out_npz`` with angle, angle_sigma, shift,
    shift_sigma, content, content_sigma (and positions, frame where known)."""
    from stem_live.rvae.live import LiveEncoder
    from stem_live.rvae.train import load_checkpoint

    if out_npz is None or str(out_npz).strip() == "":
        raise SourceError("an output path is required (e.g. --out latents.npz)")
    out = Path(out_npz)
    if out.suffix.lower() != ".npz":
        out = out.with_name(out.name + ".npz")
    if out.is_dir() or not out.parent.exists():
        raise SourceError(f"cannot write {out}: give a file name in an existing folder")
    say = progress or (lambda _m: None)
    params = load_checkpoint(checkpoint)
    data = load_source(source, patch_size=params.config.patch_size, frames=frames, size=size, seed=seed,
                       spacing_px=spacing_px, kind=kind, progress=say)
    x, m = data["patches"], data["masks"]
    if x.shape[1] != params.config.patch_size:
        raise SourceError(f"patches are {x.shape[1]} px, the model was trained on {params.config.patch_size} px")
    t0 = time.perf_counter()
    lat = LiveEncoder(params).encode(x, m)
    seconds = time.perf_counter() - t0
    arrays = dict(lat)
    if data["positions"] is not None:
        arrays["positions"] = np.asarray(data["positions"], np.float32)
        arrays["frame"] = np.asarray(data["frame"], np.int32)
    arrays["symmetry_order"] = np.int32(params.config.symmetry_order)
    tmp = out.with_name(out.name + ".tmp.npz")
    try:
        np.savez(tmp, **arrays)
        tmp.replace(out)
    except OSError as exc:
        raise SourceError(f"cannot write {out}: {exc.strerror or exc}") from None
    say(f"encoded {len(x)} patches in {seconds:.2f} s -> {out}")
    return {"out": str(out), "patches": int(len(x)), "seconds": seconds}
