"""Timing of the online GP over a long session: ``python -m stem_live.distortion.bench``."""
from __future__ import annotations

import sys
import time

import numpy as np

__all__ = ["bench_gp"]


def bench_gp(frames: int = 2000, size: int = 256, window_frames: int = 20, max_samples: int = 4000,
             refit_every: int = 0, seed: int = 0, progress: bool = True) -> dict:
    """Feed ``frames`` frames of drift samples to an OnlineDriftGP; time add + predict.

    The column lattice and scan timing come from one simulator frame (graphene,
    ``size`` x ``size``); later frames reuse its columns with the simulator's drift at
    their scan times (no rendering, so a 2000-frame session takes seconds).
    Returns median / max update ms (add + predict over the next frame) near frame 100 and
    over the last 100 frames, window sizes, and refit ms if ``refit_every``.
    """
    from simulator import DriftConfig, Microscope, MicroscopeConfig

    from .gp import OnlineDriftGP
    from .observations import Observations

    scope = Microscope(MicroscopeConfig(preset="graphene", size=size, seed=seed, noise=False,
                                        drift=DriftConfig()))
    _, meta, truth = scope.acquire()
    pos0 = truth.columns_px
    lt, dwell, ft = meta.line_time_s, meta.dwell_us * 1e-6, scope.frame_time_s
    psz = np.array(meta.pixel_size_nm)
    rng = np.random.default_rng(seed)
    gp = OnlineDriftGP(window_frames=window_frames, max_samples=max_samples)
    ms, n_win, refit_ms = [], [], []
    t_start = time.perf_counter()
    for k in range(frames):
        t0 = k * ft
        t = t0 + pos0[:, 0] * lt + pos0[:, 1] * dwell
        d = scope.drift_at(t)
        pos = pos0 + d / psz + rng.normal(0, 0.05, pos0.shape)
        obs = Observations(t_s=t, pos_px=pos, disp_nm=(pos - pos0) * psz,
                           sigma_nm=np.full(len(t), 0.05 * psz.mean()), frame=np.full(len(t), k),
                           t_line_s=pos[:, 1] * dwell, pixel_size_nm=tuple(psz))
        c0 = time.perf_counter()
        gp.add(obs)
        gp.predict(t0 + ft + np.array([0.0, 0.5, 1.0]) * ft)
        ms.append((time.perf_counter() - c0) * 1e3)
        n_win.append(gp.n_samples)
        if refit_every and k and k % refit_every == 0:
            refit_ms.append(gp.refit(steps=30)["ms"])
        if progress and (k % 100 == 0 or k == frames - 1):
            print(f"\rbench_gp: frame {k + 1}/{frames}, {ms[-1]:.1f} ms, window {gp.n_samples} samples",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    ms = np.array(ms)
    early = ms[max(1, min(90, frames - 20)):min(110, frames)] if frames > 20 else ms[1:]
    late = ms[-min(100, len(ms) - 1):]
    return {"frames": frames, "samples_per_frame": int(len(pos0)),
            "median_ms_at_100": float(np.median(early)), "max_ms_at_100": float(np.max(early)),
            "median_ms_at_end": float(np.median(late)), "max_ms_at_end": float(np.max(late)),
            "max_window_samples": int(max(n_win)), "final_window_samples": int(n_win[-1]),
            "refit_ms_median": float(np.median(refit_ms)) if refit_ms else None,
            "total_s": time.perf_counter() - t_start}


if __name__ == "__main__":
    import json
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    print(json.dumps(bench_gp(n), indent=1))
