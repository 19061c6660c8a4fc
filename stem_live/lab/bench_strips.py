"""``stem-live bench strips``: the engine's time from a strip's arrival to its correction.

A simulated session (graphene, 3 nm/min, the simulator's default drift otherwise) is scanned as
strips of ``lines`` rows (``Microscope.acquire_strips``); every strip goes to
``Engine.process_strip`` (armed, gp model), its path is clamped as the bridge would and
followed by the simulated scan, and every whole frame goes to ``Engine.process``. The engine is
warmed up first as ``run``/``demo`` do (``Engine.warm_up`` on three frames of another seed, with
strips: the compiled sizes and the background fit's compilation); the strips of the first
``warm_frames`` frames (the model's start) are not timed. The time
is the engine's alone (no sockets, no simulator): what a strip waits for its correction on
this machine, where nothing else holds the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np


def bench_strips(*, size: int = 512, lines: int = 64, frames: int = 20, warm_frames: int = 4,
                 preset: str = "graphene", seed: int = 0,
                 progress: Callable[[str], None] | None = None) -> dict:
    """``latency_ms`` (median, p90, p99, max over the timed strips), the median of each stage
    (``stages_ms``: locate, link, gp, path), strips timed and paths sent."""
    from instrument_adapters.safety import Limits, clamp_path
    from simulator import DriftConfig, Microscope, MicroscopeConfig
    from stem_live.engine import Engine, EngineConfig
    from stem_live.lab.evaluate import frame_from_sim
    from stem_live.strips import strip_from_meta

    def config(s: int) -> MicroscopeConfig:
        return MicroscopeConfig(preset=preset, size=size, seed=s, drift=DriftConfig(drift_nm_per_min=3.0))

    scope = Microscope(config(seed))
    engine = Engine(EngineConfig(model="gp", trajectory=True))
    warm = Microscope(config(seed + 1))
    engine.warm_up([frame_from_sim(*warm.acquire()[:2]) for _ in range(3)], strip_lines=lines)
    engine.arm()
    start, limits = np.asarray(scope.beam_shift_nm, float).copy(), Limits()
    times: list[float] = []
    stages: list[dict] = []
    paths = [0]
    k = [0]

    def on_strip(rows: np.ndarray, meta, row0: int) -> None:
        t0 = time.perf_counter()
        res = engine.process_strip(strip_from_meta(rows, meta, row0))
        if k[0] >= warm_frames:
            times.append((time.perf_counter() - t0) * 1e3)
            stages.append(res.timings_ms)
        if res.correction is not None:
            paths[0] += 1
            traj = res.correction.trajectory
            d = clamp_path(traj.t_s, traj.beam_shift_nm, meta.line_time_s, np.asarray(scope.beam_shift_nm), start,
                           limits)
            if not d.error:
                scope.set_beam_path(d.t_s, d.applied_nm)

    for k[0] in range(frames):
        image, meta, _ = scope.acquire_strips(lines, on_strip)
        res = engine.process(frame_from_sim(image, meta))
        c = res.correction
        if c is not None and c.trajectory is not None:
            d = clamp_path(c.trajectory.t_s, c.trajectory.beam_shift_nm, meta.line_time_s,
                           np.asarray(scope.beam_shift_nm), start, limits)
            if not d.error:
                scope.set_beam_path(d.t_s, d.applied_nm)
        if progress is not None:
            progress(f"strips: frame {k[0] + 1}/{frames}" + (f", median {np.median(times):.1f} ms" if times else ""))
    t = np.asarray(times) if times else np.full(1, np.nan)
    names = ("locate", "link", "gp", "path")
    return {"size": int(size), "lines": int(lines), "frames": int(frames), "warm_frames": int(warm_frames),
            "strips_timed": len(times), "paths": paths[0],
            "latency_ms": {"median": round(float(np.median(t)), 2), "p90": round(float(np.percentile(t, 90)), 2),
                           "p99": round(float(np.percentile(t, 99)), 2), "max": round(float(np.max(t)), 2)},
            "stages_ms": {n: round(float(np.nanmedian([s.get(n, np.nan) for s in stages])), 2) if stages else None
                          for n in names},
            "target": "p99 < 20 ms for 64-line strips of 512 px on a 2-core CPU"}


def strips_table(rep: dict) -> str:
    """One line a person reads."""
    lat, st = rep["latency_ms"], rep["stages_ms"]
    return (f"strips of {rep['lines']} lines at {rep['size']} px: strip to correction median {lat['median']} ms, "
            f"p99 {lat['p99']} ms, max {lat['max']} ms over {rep['strips_timed']} strips "
            f"(locate {st['locate']}, link {st['link']}, gp {st['gp']}, path {st['path']} ms)")
