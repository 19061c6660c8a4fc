"""The live encoder (pre-compiled, bucketed, swappable params) and background fine-tuning.

:class:`LiveEncoder` pads every request to the smallest bucket that holds it (powers of two
from 64 to 4096; more patches go in chunks of the largest bucket) and runs an
ahead-of-time compiled ``jax.jit`` function of ``(params, patches, mask)`` for that bucket:
a frame never triggers a compilation once its bucket is warm (``warmup()`` compiles all
buckets up front), and a set of params with a different structure is refused rather than
silently recompiled. ``swap(params)`` replaces the params atomically (one reference
assignment); a frame being encoded keeps the params it started with.

:class:`OnlineTrainer` keeps a bounded replay buffer of recent patches (a ring of the last
``capacity`` patches) and fine-tunes a copy of the params in a background thread
(``fine_tune(steps)``), then hands the result to ``encoder.swap``. Adding patches takes a
short lock for a memory copy; a frame never waits for training.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from stem_live.rvae.patches import BUCKETS, bucket_for

__all__ = ["LiveEncoder", "OnlineTrainer"]


class LiveEncoder:
    """Bucketed, pre-compiled rVAE encoder; thread-safe ``encode`` and ``swap``."""

    def __init__(self, params, buckets: tuple[int, ...] = BUCKETS, *, warmup: bool = False):
        import jax

        self._jax = jax
        self.buckets = tuple(sorted(int(b) for b in buckets))
        if not self.buckets or self.buckets[0] < 1:
            raise ValueError("buckets must be positive sizes")
        self._params = self._device_params(params)
        self._treedef = jax.tree_util.tree_structure(self._params)
        self._compiled: dict[int, object] = {}
        self._ones: dict[int, np.ndarray] = {}
        self._compile_lock = threading.Lock()
        self.compile_count = 0
        self.version = 0
        if warmup:
            self.warmup()

    def _device_params(self, params):
        jnp = self._jax.numpy
        return self._jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float32), params)

    @property
    def params(self):
        return self._params

    @property
    def config(self):
        return self._params.config

    def _fn(self, b: int):
        fn = self._compiled.get(b)
        if fn is None:
            with self._compile_lock:
                fn = self._compiled.get(b)
                if fn is None:
                    from stem_live.rvae.model import _encode_impl

                    s = self.config.patch_size
                    spec = self._jax.ShapeDtypeStruct((b, s, s), np.float32)
                    fn = self._jax.jit(_encode_impl).lower(self._params, spec, spec).compile()
                    self._compiled[b] = fn
                    self.compile_count += 1
        return fn

    def warmup(self) -> LiveEncoder:
        """Compile every bucket now (a few seconds) so no frame ever waits for a compile."""
        for b in self.buckets:
            self._fn(b)
        return self

    def swap(self, params) -> None:
        """Atomically replace the params (same architecture: same config and tree)."""
        new = self._device_params(params)
        if new.config != self.config or self._jax.tree_util.tree_structure(new) != self._treedef:
            raise ValueError("swap needs params of the same rVAE architecture (config and tree)")
        ok = self._jax.tree_util.tree_all(self._jax.tree_util.tree_map(
            lambda a, b: a.shape == b.shape, new, self._params))
        if not ok:
            raise ValueError("swap needs params with the same shapes")
        self._params = new
        self.version += 1

    def encode(self, patches, mask=None, *, between: Callable[[], object] | None = None) -> dict:
        """Posterior means/stds for (N, S, S) patches (numpy dict as ``model.encode``).

        More patches than the largest bucket go in chunks of it; ``between`` is called
        before every chunk after the first (the service passes a wait for its frame path to
        be idle, so that the encoder never holds up a correction by more than one chunk)."""
        from stem_live.rvae.model import wrap_angles

        params = self._params  # one read: a concurrent swap does not mix two param sets
        s = params.config.patch_size
        x = np.asarray(patches, dtype=np.float32)
        if x.ndim != 3 or x.shape[1:] != (s, s):
            raise ValueError(f"patches must have shape (N, {s}, {s}), got {x.shape}")
        n = len(x)
        k = params.config.latent_dim
        if n == 0:
            z = np.zeros(0, np.float32)
            return {"angle": z, "angle_sigma": z, "shift": np.zeros((0, 2), np.float32),
                    "shift_sigma": np.zeros((0, 2), np.float32), "content": np.zeros((0, k), np.float32),
                    "content_sigma": np.zeros((0, k), np.float32)}
        m = None if mask is None else np.asarray(mask, dtype=np.float32).reshape(x.shape)
        top = self.buckets[-1]
        parts = []
        for start in range(0, n, top):
            if start and between is not None:
                between()
            xs = x[start:start + top]
            cnt = len(xs)
            b = bucket_for(cnt, self.buckets)
            if m is None:
                ms = self._ones.get(b)
                if ms is None:
                    ms = self._ones[b] = np.ones((b, s, s), np.float32)
            else:
                ms = m[start:start + top]
            if cnt != b:
                xs = np.concatenate([xs, np.zeros((b - cnt, s, s), np.float32)])
                if len(ms) != b:
                    ms = np.concatenate([ms, np.ones((b - len(ms), s, s), np.float32)])
            out = self._fn(b)(params, xs, ms)
            parts.append({key: np.asarray(v)[:cnt] for key, v in out.items()})
        res = parts[0] if len(parts) == 1 else {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
        return wrap_angles(res, params.config.symmetry_order)

    def encode_image(self, image, positions_px, *, return_patches: bool = False):
        """Extract patches around ``positions_px`` (N, 2) in ``image`` and encode them
        (latents index-matched to the positions); with ``return_patches`` returns
        ``(latents, patches, masks)`` (e.g. for ``OnlineTrainer.add``)."""
        from stem_live.rvae.patches import extract_patches

        p, m = extract_patches(image, positions_px, self.config.patch_size, buckets=self.buckets)
        lat = self.encode(p, m)
        return (lat, p, m) if return_patches else lat


class OnlineTrainer:
    """Replay buffer of recent patches + background fine-tuning that swaps into an encoder.

    ``add(patches, masks)`` from the frame loop (a copy under a short lock);
    ``fine_tune(steps)`` starts a daemon thread (returns it, or None when one is running or
    the buffer is still empty) that trains a copy of the current params for ``steps``
    batches of ``batch_size`` random buffered patches and then calls ``encoder.swap``.
    """

    def __init__(self, encoder: LiveEncoder, params=None, *, capacity: int = 20_000, batch_size: int = 128,
                 lr: float = 3e-4, seed: int = 0):
        self.encoder = encoder
        self.params = params if params is not None else encoder.params
        s = self.params.config.patch_size
        self.capacity = int(capacity)
        if self.capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.batch_size = int(batch_size)
        self.lr = float(lr)
        # filled (not np.zeros, whose pages the OS hands out lazily) so the buffer's memory is
        # taken once, here, and the resident size stays flat while it fills up
        self._x = np.full((self.capacity, s, s), 0.0, np.float32)
        self._m = np.full((self.capacity, s, s), False, np.bool_)
        self._n = 0
        self._head = 0
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._rng = np.random.default_rng(seed)
        self._seed = int(seed)
        self._opt_state = None
        self.steps_done = 0
        self.swaps = 0
        self.last_loss = float("nan")
        self.last_error: str | None = None

    def __len__(self) -> int:
        return self._n

    def add(self, patches, masks=None) -> None:
        """Append patches (N, S, S) (and masks) to the ring buffer; the oldest drop out."""
        x = np.asarray(patches, dtype=np.float32)
        if x.ndim != 3 or x.shape[1:] != self._x.shape[1:]:
            raise ValueError(f"patches must have shape (N, {self._x.shape[1]}, {self._x.shape[2]}), got {x.shape}")
        m = np.ones(x.shape, bool) if masks is None else np.asarray(masks, bool).reshape(x.shape)
        if len(x) > self.capacity:
            x, m = x[-self.capacity:], m[-self.capacity:]
        n = len(x)
        with self._lock:
            idx = (self._head + np.arange(n)) % self.capacity
            self._x[idx] = x
            self._m[idx] = m
            self._head = int((self._head + n) % self.capacity)
            self._n = min(self._n + n, self.capacity)

    def _sample(self):
        with self._lock:
            n = self._n
            idx = self._rng.integers(0, n, self.batch_size)
            return self._x[idx], self._m[idx].astype(np.float32)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def fine_tune(self, steps: int = 100, *, block: bool = False):
        """Fine-tune in a background thread (or in this one with ``block``); see class doc."""
        if self.running or self._n == 0 or steps < 1:
            return None
        self._stop.clear()
        t = threading.Thread(target=self._run, args=(int(steps),), name="rvae-fine-tune", daemon=True)
        self._thread = t
        t.start()
        if block:
            t.join()
        return t

    def stop(self, timeout: float | None = None) -> None:
        """Ask a running fine-tune to stop after its current step (no swap) and wait."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for a running fine-tune; True when none is running any more."""
        if self._thread is not None:
            self._thread.join(timeout)
        return not self.running

    def _run(self, steps: int) -> None:
        import jax

        from stem_live.rvae.train import train_step_fn

        try:
            step, optimizer = train_step_fn(self.lr)
            params = self.params
            if self._opt_state is None:
                self._opt_state = optimizer.init(params)
            opt_state = self._opt_state
            key = jax.random.PRNGKey(self._seed + 7919 * (self.swaps + 1))
            w = np.ones(self.batch_size, np.float32)
            aux = None
            for _ in range(steps):
                if self._stop.is_set():
                    return
                x, m = self._sample()
                key, sub = jax.random.split(key)
                params, opt_state, aux = step(params, opt_state, x, m, w, sub, np.float32(1.0))
                self.steps_done += 1
            if aux is not None:
                self.last_loss = float(aux["loss"])
            if not np.isfinite(self.last_loss):
                self.last_error = "fine-tuning diverged (non-finite loss); params not swapped"
                return
            self.params, self._opt_state = params, opt_state
            self.encoder.swap(params)
            self.swaps += 1
        except Exception as exc:  # noqa: BLE001  (a background failure must not kill the stream)
            self.last_error = f"{type(exc).__name__}: {exc}"
