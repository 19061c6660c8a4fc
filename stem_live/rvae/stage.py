"""The engine's rVAE stage: encode the columns of every frame, fine-tune in the background.

    stage = RvaeStage("rvae.msgpack")            # or RvaeStage(params), or RvaeStage(None)
    latents = stage.process(image, positions_px)  # per-column dict (index-matched), or None
    stage.train(200)                              # background fine-tuning -> one-line message
    arrays = stage.maps(positions_px, latents, image.shape, step)   # for the ``maps`` message

Nothing here makes a frame wait:

- the :class:`~stem_live.rvae.live.LiveEncoder` compiles its buckets in a background thread;
  until that is done (a few seconds) ``process`` only buffers patches and returns None;
- fine-tuning (:class:`~stem_live.rvae.live.OnlineTrainer`) runs in its own thread on a bounded
  replay buffer of the most recent patches and swaps the new params into the encoder atomically
  (``encoder.version`` counts the swaps);
- without a checkpoint the stage starts from seeded random params and reports no latents until
  the first fine-tune has finished; a ``train`` request made before enough patches are buffered
  starts by itself once they are.

The cost that remains in the frame path: patch extraction (one compiled JAX call; its first call
for a new image size compiles it, about 0.5 s), a memory copy into the buffer, and the encode.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np

from stem_live.rvae.patches import BUCKETS

__all__ = ["RvaeStage", "latent_arrays", "stage_buckets"]


def stage_buckets() -> tuple[int, ...]:
    """The live stage's padded batch sizes for the device JAX uses: on a CPU at most 256
    patches a call (measured on 2 cores: 8 calls of 256 take 10 ms where one of 2048 takes
    26-45 ms, the large batch falls out of cache; and the encoder can pause between
    chunks), on an accelerator up to 4096 (big batches are what it is fast at)."""
    import jax

    return tuple(b for b in BUCKETS if b <= 256) if jax.default_backend() == "cpu" else BUCKETS


class RvaeStage:
    """rVAE encoding + background fine-tuning for a stream of frames with located columns.

    ``source``: a checkpoint path (read now: a bad file fails here, with a one-line message),
    an ``RVAEParams``, or None to start from random params (``config``, ``seed``) and train on
    the buffer when asked. ``buffer``: replay-buffer capacity (patches); ``steps``: default
    fine-tuning steps per ``train``; ``min_patches``: patches needed before training starts;
    ``buckets``: the encoder's padded batch sizes (all compiled in the background; default
    ``stage_buckets()``);
    ``max_columns``: at most this many columns are encoded per frame (evenly spread, a
    different subset each frame); the others get NaN latents, so the latents stay
    index-matched to the columns.
    """

    def __init__(self, source=None, *, buffer: int = 8192, batch_size: int = 128, lr: float = 3e-4,
                 seed: int = 0, steps: int = 200, min_patches: int = 256, config=None,
                 buckets: tuple[int, ...] | None = None, warmup: bool = True, max_columns: int = 4096) -> None:
        from stem_live.rvae.live import LiveEncoder, OnlineTrainer
        from stem_live.rvae.model import RVAEConfig, RVAEParams, init_params

        if isinstance(source, (str, Path)):
            from stem_live.rvae.train import load_checkpoint

            params, self.trained, self.origin = load_checkpoint(source), True, f"checkpoint {Path(source).name}"
        elif isinstance(source, RVAEParams):
            params, self.trained, self.origin = source, True, "given params"
        elif source is None:
            params = init_params(config or RVAEConfig(), seed)
            self.trained, self.origin = False, f"random init (seed {seed})"
        else:
            raise TypeError(f"RvaeStage needs a checkpoint path, RVAEParams or None, got {type(source).__name__}")
        self.max_columns = max(1, int(max_columns))
        self._frames_seen = 0
        self.default_steps = int(steps)
        self.min_patches = max(1, int(min_patches))
        self.encoder = LiveEncoder(params, buckets or stage_buckets())
        self.trainer = OnlineTrainer(self.encoder, params, capacity=buffer, batch_size=batch_size, lr=lr, seed=seed)
        self.patch_size = params.config.patch_size
        self.error: str | None = None  # the stage cannot run (warm-up failed)
        self.frame_error: str | None = None  # the last frame that gave no latents, and why
        self._pending_steps = 0  # a train request waiting for enough patches
        self._ready = threading.Event()
        self._warm_thread = None
        if warmup:
            self._warm_thread = threading.Thread(target=self._warm, name="rvae-warmup", daemon=True)
            self._warm_thread.start()
        else:
            self._ready.set()  # buckets then compile on first use

    # ------------------------------------------------------------------ state

    def _warm(self) -> None:
        try:
            self.encoder.warmup()
        except Exception as exc:  # noqa: BLE001  (a background failure must not kill the stream)
            self.error = f"rVAE warm-up failed: {type(exc).__name__}: {exc}"
        finally:
            self._ready.set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait for the background compilation of the encoder; True when done."""
        return self._ready.wait(timeout)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def available(self) -> bool:
        """True when latents are produced: compiled, and trained (a checkpoint or one fine-tune)."""
        return self._ready.is_set() and self.error is None and (self.trained or self.trainer.swaps > 0)

    @property
    def version(self) -> int:
        """How often fine-tuned params were swapped into the encoder."""
        return self.encoder.version

    @property
    def training(self) -> bool:
        return self.trainer.running

    def status(self) -> dict:
        t = self.trainer
        return {"origin": self.origin, "ready": self.ready, "available": self.available, "version": self.version,
                "buffered": len(t), "training": t.running, "pending_steps": self._pending_steps,
                "steps_done": t.steps_done, "last_loss": None if not np.isfinite(t.last_loss) else t.last_loss,
                "error": self.error or t.last_error, "frame_error": self.frame_error}

    # ------------------------------------------------------------------ per frame

    def process(self, image, positions_px, *, between: Callable[[], object] | None = None) -> dict | None:
        """Encode the patches around ``positions_px`` (N, 2) (row, col) and buffer them.

        Returns the latents (``angle``, ``shift``, ``content`` and their sigmas), index-matched
        to ``positions_px``, or None while the encoder is compiling or untrained. Never waits
        for training; ``between`` is called between encoder chunks (``LiveEncoder.encode``)."""
        from stem_live.rvae.patches import extract_patches

        pos = np.asarray(positions_px, dtype=np.float64).reshape(-1, 2)
        pos = pos[:0] if len(pos) and not np.isfinite(pos).all() else pos
        if len(pos) == 0:
            return None
        n = len(pos)
        self._frames_seen += 1
        sel = None
        if n > self.max_columns:  # an even subset, shifted every frame so every column gets its turn
            stride = n / self.max_columns
            sel = (np.floor(np.arange(self.max_columns) * stride) + self._frames_seen % int(np.ceil(stride))) % n
            sel = np.unique(sel.astype(np.int64))
            pos = pos[sel]
        patches, masks = extract_patches(image, pos, self.patch_size, buckets=self.encoder.buckets)
        self.trainer.add(patches, masks)
        if self._pending_steps and len(self.trainer) >= self.min_patches and not self.trainer.running:
            steps, self._pending_steps = self._pending_steps, 0
            self.trainer.fine_tune(steps)
        if not self.available:
            return None
        lat = self.encoder.encode(patches, masks, between=between)
        if sel is None:
            return lat
        full = {}
        for key, v in lat.items():
            out = np.full((n,) + v.shape[1:], np.nan, np.float32)
            out[sel] = v
            full[key] = out
        return full

    def train(self, steps: int | None = None) -> str:
        """Start fine-tuning in the background; a one-line message says what happens.

        Raises ValueError when it cannot start (already running is not an error)."""
        steps = self.default_steps if steps is None else int(steps)
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        t = self.trainer
        if self.error:
            raise ValueError(f"{self.error}; restart the engine")
        if t.running:
            return f"rVAE fine-tuning already running ({t.steps_done} steps done so far, encoder version {self.version})"
        what = "fine-tuning" if self.trained or t.swaps else "training from scratch"
        if len(t) < self.min_patches:
            self._pending_steps = steps
            return (f"rVAE {what}: {steps} steps start once {self.min_patches} patches are buffered "
                    f"({len(t)} so far)")
        if t.fine_tune(steps) is None:  # lost a race with a starting run
            return "rVAE fine-tuning already running"
        return (f"rVAE {what} started: {steps} steps on {len(t)} buffered patches in the background; "
                f"the encoder switches to version {self.version + 1} when done")

    def close(self, timeout: float = 5.0) -> None:
        """Stop a running fine-tune (no swap)."""
        self._pending_steps = 0
        self.trainer.stop(timeout)

    # ------------------------------------------------------------------ maps

    def maps(self, positions_px, latents: dict, shape, step: int = 1) -> dict:
        """The latent arrays of the ``maps`` message, downsampled by ``step`` like the preview."""
        return latent_arrays(positions_px, latents, shape, step)


def latent_arrays(positions_px, latents: dict, shape, step: int = 1, *, max_points: int = 4096) -> dict:
    """``latent_angle``, ``latent_<k>`` (float32 images of the preview's size ``ceil(shape / step)``:
    each pixel within half the column spacing shows its column's value, NaN elsewhere) and
    ``latent_scatter`` ((N, 2): the first two content latents; the angle stands in when there
    are fewer), at most ``max_points`` columns (evenly subsampled)."""
    from stem_live.rvae.maps import latent_maps

    step = max(1, int(step))
    pos = np.asarray(positions_px, dtype=np.float64).reshape(-1, 2)
    angle = np.asarray(latents["angle"], np.float32).reshape(-1)
    content = np.asarray(latents.get("content", np.zeros((len(angle), 0))), np.float32).reshape(len(angle), -1)
    if len(angle) != len(pos):
        raise ValueError(f"{len(angle)} latents for {len(pos)} columns")
    h, w = -(-int(shape[0]) // step), -(-int(shape[1]) // step)
    radius = 0.5 * _spacing(pos) / step
    lm = latent_maps(pos / step, {"angle": angle, "content": content}, (h, w), radius_px=max(radius, 1.0))
    out = {"latent_angle": lm["angle"]}
    for j in range(content.shape[1]):
        out[f"latent_{j}"] = lm[f"content_{j}"]
    sc = np.concatenate([content, angle[:, None]], axis=1)[:, :2]
    if sc.shape[1] < 2:
        sc = np.concatenate([sc, np.zeros((len(sc), 1), np.float32)], axis=1)
    sc = sc[np.all(np.isfinite(sc), axis=1)]  # columns not encoded this frame (``max_columns``)
    if len(sc) > max_points:
        sc = sc[np.linspace(0, len(sc) - 1, max_points).round().astype(int)]
    out["latent_scatter"] = np.ascontiguousarray(sc, np.float32)
    return out


def _spacing(pos: np.ndarray) -> float:
    """Median nearest-neighbour distance (px); 8 px with fewer than two columns."""
    if len(pos) < 2:
        return 8.0
    from scipy.spatial import cKDTree

    d, _ = cKDTree(pos).query(pos, k=2)
    return float(np.median(d[:, 1]))

