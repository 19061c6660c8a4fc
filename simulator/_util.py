"""Seeding helpers: counter-based hashing and named random streams.

Everything random in the simulator is derived from the config seed through either
``stream_rng(seed, stream, *counters)`` (a fresh ``np.random.Generator`` per
named stream and counter, so results never depend on call order) or
``uhash(seed, stream, *int_arrays)`` (a vectorised counter-based hash giving uniform
floats in [0, 1) per integer key, used for per-lattice-site decisions).
"""
from __future__ import annotations

import numpy as np

__all__ = ["stream_rng", "uhash", "STREAMS"]

#: Fixed integer ids of the random streams (never renumber: changes every image).
STREAMS = {
    "ou": 1,
    "jitter": 2,
    "line_jitter": 3,
    "noise": 4,
    "actuator": 5,
    "defects": 6,
    "dynamics": 7,
    "particles": 8,
    "nanoparticle": 9,
    "support": 10,
}

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLD = np.uint64(0x9E3779B97F4A7C15)


def stream_rng(seed: int, stream: str, *counters: int) -> np.random.Generator:
    """A reproducible generator for (seed, named stream, counters...)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, STREAMS[stream], *(int(c) for c in counters)])


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on a uint64 array (wrapping arithmetic)."""
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


def uhash(seed: int, stream: str, *keys: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1), one per element of the broadcast integer ``keys``.

    A pure function of (seed, stream, keys): the same site always gets the same number.
    """
    keys = np.broadcast_arrays(*[np.asarray(k, dtype=np.int64) for k in keys])
    base = np.uint64((int(seed) & 0xFFFFFFFF) * 1_000_003 + STREAMS[stream])
    with np.errstate(over="ignore"):
        h = _mix(np.full(keys[0].shape, base, dtype=np.uint64) + _GOLD)
        for k in keys:
            h = _mix(h ^ (k.view(np.uint64) + _GOLD))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / 9007199254740992.0)
