"""Rendering benchmark: ``python -m simulator [--size N] [--preset P] [-n FRAMES]``."""
from __future__ import annotations

import time

import numpy as np

from simulator.microscope import Microscope, MicroscopeConfig


def benchmark_render(size: int = 512, preset: str = "graphene", n: int = 5, seed: int = 0) -> float:
    """Median wall time of ``acquire()`` (ms) over ``n`` frames after one warm-up; prints it."""
    scope = Microscope(MicroscopeConfig(preset=preset, size=size, seed=seed))
    scope.acquire()
    times = []
    for k in range(n):
        t = time.perf_counter()
        scope.acquire()
        times.append(time.perf_counter() - t)
        print(f"\r{preset} {size}x{size}: frame {k + 1}/{n}", end="", flush=True)
    ms = float(np.median(times) * 1e3)
    print(f"\r{preset} {size}x{size}: {ms:.1f} ms/frame (median of {n}, best {min(times) * 1e3:.1f}); "
          f"scan time {scope.frame_time_s * 1e3:.0f} ms")
    return ms
