"""Timing of the classical locator (filter + peaks + JAX refinement) per frame.

    python -m stem_live.locate.bench            # 512 and 1024 px, prints a table
"""

from __future__ import annotations

import sys
import time

import numpy as np


def bench_locate(sizes=(512, 1024), repeats: int = 20, *, spacing_px: float = 12.0,
                 dose: float = 200.0, seed: int = 0, progress: bool = False, **locate_kw) -> dict:
    """Time ``locate_classical`` (with refinement) on synthetic honeycomb frames.

    Every size gets one warm-up call (JIT compilation, FFT plans; excluded) and then
    ``repeats`` timed calls on fresh noisy frames. Returns
    ``{size: {"median_ms", "p99_ms", "min_ms", "n_columns", "repeats"}}``.
    """
    from .classical import locate_classical
    from .synthetic import honeycomb, render_columns

    rng = np.random.default_rng(seed)
    out = {}
    for size in sizes:
        shape = (int(size), int(size))
        truth = honeycomb(shape, spacing_px, angle_rad=0.3, origin=(1.3, 2.9))
        truth = truth + rng.uniform(-0.3, 0.3, truth.shape)
        frames = [render_columns(shape, truth, sigma_px=0.18 * spacing_px, dose=dose, rng=seed + k)
                  for k in range(min(repeats, 4) + 1)]
        cols = locate_classical(frames[0], spacing_px, **locate_kw)  # warm-up
        times = []
        for k in range(repeats):
            img = frames[1 + k % (len(frames) - 1)]
            t0 = time.perf_counter()
            cols = locate_classical(img, spacing_px, **locate_kw)
            times.append(time.perf_counter() - t0)
            if progress:
                print(f"\r{size} px: {k + 1}/{repeats}", end="", file=sys.stderr, flush=True)
        if progress:
            print(file=sys.stderr)
        t = np.asarray(times) * 1e3
        out[int(size)] = {"median_ms": float(np.median(t)), "p99_ms": float(np.percentile(t, 99)),
                          "min_ms": float(t.min()), "n_columns": int(len(cols)), "repeats": int(repeats)}
    return out


def main() -> None:
    res = bench_locate(progress=True)
    for size, r in res.items():
        print(f"{size:5d} px  {r['n_columns']:5d} columns  median {r['median_ms']:6.1f} ms  "
              f"p99 {r['p99_ms']:6.1f} ms  min {r['min_ms']:6.1f} ms")


if __name__ == "__main__":
    main()
