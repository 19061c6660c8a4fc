"""Static shapes for the jit-compiled fits: column counts padded into a few bucket sizes (4 per
octave), the chunk size of a stream's fit, and a count of how often a fit was traced.

The fixed-width fit of a stream goes in chunks of :func:`fit_chunk` columns; below one chunk it
pads with headroom and reuses a larger size it has already compiled (:func:`stream_bucket`), so a
column count that wanders across a bucket edge does not recompile. :func:`trace_count` tells how
often a fit has been traced (compiled). In a live engine (:func:`compiling_in_background`) a side
fit of a new size compiles in a background thread (:func:`side_fit_ready`) while the frames go on.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Callable
from contextlib import contextmanager

import numpy as np

_STREAM_SIZES: dict[tuple, set[int]] = {}  # padded sizes compiled per fit (window, iterations, image shape)
_TRACES = [0]  # how often a fit was traced (compiled), for tests and benchmarks
_BACKGROUND = threading.local()  # .on: side fits of a new size compile in a background thread (this thread)
_READY: set[tuple] = set()    # side fits (function and argument shapes) compiled
_PENDING: set[tuple] = set()  # ... compiling in the background
_LOCK = threading.Lock()
_THREADS: list[threading.Thread] = []
MIN_BUCKET = 64


def trace_count() -> int:
    """How many times the jit'd fit has been traced (one per new bucket / image shape)."""
    return _TRACES[0]


def bucket_size(n: int) -> int:
    """The padded length used for ``n`` columns: the smallest of 2**k * (4, 5, 6, 7) / 4
    (k >= 4, so 64, 80, 96, 112, 128, 160, ...) that holds ``n``: at most 25 % padding and
    only four compiled sizes per octave."""
    n = max(int(n), 1)
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    k = (n - 1).bit_length() - 1  # 2**k < n <= 2**(k+1)
    for m in (5, 6, 7, 8):
        b = (1 << k) * m // 4
        if b >= n:
            return b
    return 1 << (k + 1)


def stream_bucket(n: int, key: tuple, *, headroom: float = 1.1, max_overpad: float = 1.5,
                  cap: int | None = None) -> int:
    """The padded length for ``n`` columns in a stream of frames fitted with ``key``.

    A size already compiled for ``key`` is reused when it holds ``n`` and is at most
    ``max_overpad`` times ``bucket_size(n)``; otherwise a new one is chosen with ``headroom``
    (``bucket_size(headroom * n)``, at most ``cap`` where that holds ``n``: the chunk size of a
    chunked fit, compiled already when an earlier frame had more columns than a chunk). A
    column count that wanders across a bucket edge, as columns enter and leave the field, then
    compiles once (the first frame) instead of stalling a live frame for a second every time it
    crosses."""
    n = max(int(n), 1)
    sizes = _STREAM_SIZES.setdefault(key, set())
    fits = [b for b in sizes if n <= b <= max_overpad * bucket_size(n)]
    if fits:
        return min(fits)
    b = bucket_size(int(np.ceil(headroom * n)))
    if cap is not None and n <= cap < b:
        b = int(cap)
    sizes.add(b)
    return b


def note_bucket(key: tuple, size: int) -> None:
    """Record that a fit with ``key`` was compiled for ``size`` columns (a chunked fit's chunk),
    so that :func:`stream_bucket` reuses it."""
    _STREAM_SIZES.setdefault(key, set()).add(int(size))


def fit_chunk() -> int:
    """Columns per call of the fixed-width fit: 1024 on a CPU (measured on 2 cores: no slower
    per column than one call of 4096-5120, 15 % faster in a synthetic test; a frame of any larger
    count pads only its last chunk and never compiles a new size), 16384 on an accelerator."""
    import jax

    return 1024 if jax.default_backend() == "cpu" else 16384


def count_trace() -> None:
    """Called by a fit while JAX traces it (at compile time only)."""
    _TRACES[0] += 1


@contextmanager
def compiling_in_background():
    """Within it (in this thread; a live engine's frames): a side fit (the columns near the left
    edge on the flyback grid, those beside columns outside the frame) that needs an argument
    shape not compiled yet compiles in a background thread, and the frame goes on without it
    (those columns keep the main fit's result) instead of waiting 1-4 s for XLA. Outside it (the
    default: replays, evaluations) a fit compiles where it is needed and every run gives the
    same result."""
    before = getattr(_BACKGROUND, "on", False)
    _BACKGROUND.on = True
    try:
        yield
    finally:
        _BACKGROUND.on = before


def side_fit_ready(key: tuple, call: Callable[[], object]) -> bool:
    """Whether a side fit with ``key`` (its function and argument shapes) can run now: always
    when not compiling in the background; otherwise once compiled. The first time a key is
    seen, ``call`` (the fit itself, its result dropped) runs in a background thread and this
    returns False."""
    if not getattr(_BACKGROUND, "on", False):
        _READY.add(key)
        return True
    with _LOCK:
        if key in _READY:
            return True
        if key in _PENDING:
            return False
        _PENDING.add(key)

    def compile_it() -> None:
        try:
            call()
        except Exception:  # noqa: BLE001 - the next frame runs it where it is needed and reports it
            pass
        finally:
            with _LOCK:
                _PENDING.discard(key)
                _READY.add(key)

    th = threading.Thread(target=compile_it, name="stem-live-compile", daemon=True)
    if not _THREADS:
        atexit.register(_join_compiles)
    _THREADS.append(th)
    th.start()
    return False


def _join_compiles() -> None:
    """At exit: wait for the background compilations (XLA aborts the process when the
    interpreter goes away under a compiling thread)."""
    for th in list(_THREADS):
        th.join(timeout=60.0)
