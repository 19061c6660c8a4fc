"""Timing of the online GP over a long session: ``python -m stem_live.lab.bench_gp``."""
from __future__ import annotations

import sys
import time

import numpy as np

__all__ = ["bench_gp"]


def bench_gp(frames: int = 2000, size: int = 512, seed: int = 0, progress: bool = True) -> dict:
    """The engine's GP stage (``ColumnModel.gp_stage``: samples in, correction decision out,
    exactly what ``gp.update_ms`` of ``stem-live evaluate`` times) over a ``frames``-frame session.

    The columns and scan timing come from one simulator frame (graphene, ``size`` x ``size``);
    later frames move those columns with the simulator's true drift at their scan times plus
    0.05 px noise (no rendering or locating, so 2000 frames take about a minute). Returns the
    median / max stage time around frame 100 and over the last 100 frames, and the window size.
    """
    from simulator import DriftConfig, Microscope, MicroscopeConfig
    from stem_live.column_model import ColumnModel
    from stem_live.engine import EngineConfig
    from stem_live.heap import SETTLE_AFTER_FRAMES, settle_heap
    from stem_live.protocol import Frame

    scope = Microscope(MicroscopeConfig(preset="graphene", size=size, seed=seed, noise=False,
                                        drift=DriftConfig(drift_nm_per_min=3.0)))
    _, meta, truth = scope.acquire()
    ref = truth.columns_px
    lt, dwell, ft = meta.line_time_s, meta.dwell_us * 1e-6, scope.frame_time_s
    psz = np.array(meta.pixel_size_nm)
    rng = np.random.default_rng(seed)
    model = ColumnModel(EngineConfig(model="gp"))
    image = np.zeros((size, size), np.uint16)
    matched = np.arange(len(ref))
    ms, n_win = [], []
    t_start = time.perf_counter()
    for k in range(frames):
        t0 = k * ft
        t = t0 + ref[:, 0] * lt + ref[:, 1] * dwell
        pos = ref + (scope.drift_at(t) - scope.drift_at(np.zeros(1))) / psz + rng.normal(0, 0.05, ref.shape)
        frame = Frame(seq=k, image=image, t_start=t0, pixel_size_nm=tuple(psz), dwell_us=meta.dwell_us,
                      flyback_us=meta.flyback_us)
        if k == SETTLE_AFTER_FRAMES:
            settle_heap()  # as the service does
        c0 = time.perf_counter()
        model.gp_stage(frame, ref, pos, matched)
        ms.append((time.perf_counter() - c0) * 1e3)
        n_win.append(model.gp.n_samples)
        if progress and (k % 100 == 0 or k == frames - 1):
            print(f"\rbench_gp: frame {k + 1}/{frames}, {ms[-1]:.1f} ms, window {model.gp.n_samples} samples",
                  end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    ms = np.array(ms)
    early = ms[max(1, min(90, frames - 20)):min(110, frames)] if frames > 20 else ms[1:]
    late = ms[-min(100, len(ms) - 1):]
    return {"frames": frames, "size": size, "samples_per_frame": int(len(ref)),
            "median_ms_at_100": round(float(np.median(early)), 2), "max_ms_at_100": round(float(np.max(early)), 2),
            "median_ms_at_end": round(float(np.median(late)), 2), "max_ms_at_end": round(float(np.max(late)), 2),
            "median_ms": round(float(np.median(ms[20:] if frames > 40 else ms)), 2),
            "max_window_samples": int(max(n_win)), "final_window_samples": int(n_win[-1]),
            "total_s": round(time.perf_counter() - t_start, 1)}


if __name__ == "__main__":
    import json
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    print(json.dumps(bench_gp(n), indent=1))
