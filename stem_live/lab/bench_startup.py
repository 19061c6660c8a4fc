"""``stem-live bench startup``: seconds from starting a command to its first processed frame,
cold (an empty compilation cache folder) and warm (later processes on the same folder).

The command is ``stem-live replay REC --model gp`` on a short simulated recording (written
first, not timed); the first processed frame is the first progress line it writes
(``[1/N] frame ...``). Each start is a fresh process, so the times include Python's and JAX's
imports, the compilation (cold) or the loads from JAX's persistent cache (warm), and the first
frame itself. The warm start runs ``warm_runs`` times (the median is reported, with every run:
the spread on a shared machine); each start also reports the process's CPU seconds to its
first frame (less sensitive to other work on the machine than the wall time) and the load
average before it. A last, untimed warm start logs JAX's compilations (``JAX_LOG_COMPILES``):
``warm_jit`` counts the functions traced before the first frame, the persistent-cache hits, and
the functions compiled (0 on a warm cache: every entry is kept, whatever its size or
compilation time).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

FIRST_FRAME = "[1/"  # the start of `replay`'s progress line of its first processed frame
# JAX_LOG_COMPILES lines: one per traced function, per persistent-cache hit, per backend compilation (hits too)
JIT_LINES = {"traces": "Finished tracing ", "cache_hits": "Persistent compilation cache hit",
             "backend": "Finished XLA compilation"}


def write_recording(path: Path, *, size: int = 512, frames: int = 3, preset: str = "graphene", seed: int = 0) -> Path:
    """A short simulated recording (TIFF stack, ``size`` px a side) at ``path``."""
    from simulator import Microscope, MicroscopeConfig
    from stem_live.io import StackWriter
    from stem_live.lab.evaluate import frame_from_sim

    scope = Microscope(MicroscopeConfig(preset=preset, size=size, seed=seed))
    with StackWriter(path, overwrite=True) as w:
        for _ in range(frames):
            image, meta, _truth = scope.acquire()
            w.write(frame_from_sim(image, meta))
    return path


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a running process, all its threads (Linux /proc); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def load_1min() -> float | None:
    """The 1-minute load average (other work on the machine), None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def time_to_first_frame(argv: Sequence[str], *, env: dict | None = None, marker: str = FIRST_FRAME,
                        timeout_s: float = 600.0, count: Mapping[str, str] | None = None) -> dict:
    """Start ``argv`` and time it (s) until a line of its stderr starts with ``marker``; the
    process is then stopped. ``seconds`` None when it exited or timed out first (``error``:
    its last lines); ``cpu_s``: its CPU seconds by then (None where unknown); ``load_1min``:
    the load average before it started. ``count``: {key: text}: ``counts[key]`` is the number
    of stderr lines before the marker that contain ``text``."""
    load = load_1min()
    counts = dict.fromkeys(count or {}, 0)
    t0 = time.perf_counter()
    p = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    tail: list[str] = []
    seconds = cpu = None
    try:
        deadline = t0 + timeout_s
        for line in p.stderr:  # type: ignore[union-attr]
            if line.startswith(marker):
                seconds = time.perf_counter() - t0
                cpu = cpu_seconds(p.pid)
                break
            for key, text in (count or {}).items():
                counts[key] += text in line
            tail = (tail + [line.rstrip()])[-5:]
            if time.perf_counter() > deadline:
                break
    finally:
        if p.poll() is None:
            p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
        if p.stderr is not None:
            p.stderr.close()
    out: dict = {"seconds": None if seconds is None else round(seconds, 2),
                 "cpu_s": None if cpu is None else round(cpu, 2), "load_1min": load}
    if count:
        out["counts"] = counts
    if seconds is None:
        out["error"] = " | ".join(tail) or f"exited with status {p.returncode} before its first frame"
    return out


def _median_run(runs: list[dict]) -> dict:
    """The warm report: the median of the runs' seconds and CPU seconds, and every run."""
    ok = [r for r in runs if r.get("seconds") is not None]
    if not ok:
        return {**runs[-1], "runs": runs}
    cpu = [r["cpu_s"] for r in ok if r.get("cpu_s") is not None]
    return {"seconds": round(statistics.median(r["seconds"] for r in ok), 2),
            "cpu_s": round(statistics.median(cpu), 2) if cpu else None,
            "min_s": min(r["seconds"] for r in ok), "max_s": max(r["seconds"] for r in ok), "runs": runs}


def bench_startup(*, size: int = 512, model: str = "gp", cache_dir: Path | None = None, warm_runs: int = 3,
                  jit_log: bool = True, progress: Callable[[str], None] | None = None) -> dict:
    """Cold and warm start to the first processed frame of ``stem-live replay --model MODEL``
    on a 3-frame ``size`` px recording. ``cache_dir``: the compilation cache folder to use
    (emptied first: the cold start is cold; default a temporary folder); ``warm_runs``: warm
    starts timed (median reported); ``jit_log``: one more warm start counting JAX's work
    (``warm_jit``)."""
    say = progress or (lambda _s: None)
    with tempfile.TemporaryDirectory(prefix="stem-live-startup-") as tmp:
        rec = write_recording(Path(tmp) / "startup.tif", size=size)
        cache = Path(tmp) / "jax" if cache_dir is None else Path(cache_dir)
        if cache.exists():
            import shutil

            shutil.rmtree(cache)
        env = dict(os.environ, STEM_LIVE_JAX_CACHE=str(cache))
        argv = [sys.executable, "-m", "stem_live.cli", "replay", str(rec), "--model", model]
        report: dict = {"size": size, "model": model, "command": "stem-live replay REC --model " + model}
        say(f"bench startup: cold start of `{report['command']}` ({size} px) ...")
        report["cold"] = time_to_first_frame(argv, env=env)
        runs = []
        for k in range(max(1, warm_runs)):
            say(f"bench startup: warm start {k + 1}/{max(1, warm_runs)} of `{report['command']}` ({size} px) ...")
            runs.append(time_to_first_frame(argv, env=env))
        report["warm"] = _median_run(runs)
        if jit_log:
            say("bench startup: one more warm start, counting JAX's compilations ...")
            r = time_to_first_frame(argv, env=dict(env, JAX_LOG_COMPILES="1"), count=JIT_LINES)
            c = r.get("counts", {})
            report["warm_jit"] = {"traces": c.get("traces"), "cache_hits": c.get("cache_hits"),
                                  "compiled": None if not c else c["backend"] - c["cache_hits"],
                                  "seconds": r.get("seconds")}
        report["cache_mb"] = round(sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 1e6, 1)
    return report


def startup_table(report: dict) -> str:
    """One line a person reads."""
    def fmt(r: dict) -> str:
        if r.get("seconds") is None:
            return f"failed ({r.get('error')})"
        cpu = f", {r['cpu_s']:.1f} s CPU" if r.get("cpu_s") is not None else ""
        spread = f", {r['min_s']:.1f}-{r['max_s']:.1f} s over {len(r['runs'])}" if len(r.get("runs", ())) > 1 else ""
        return f"{r['seconds']:.1f} s{cpu}{spread}"

    jit = report.get("warm_jit") or {}
    jit_text = (f"; warm: {jit['traces']} functions traced, {jit['cache_hits']} loaded from the cache, "
                f"{jit['compiled']} compiled" if jit.get("traces") is not None else "")
    return (f"startup   {report['size']} px {report['model']}: cold {fmt(report['cold'])}, warm {fmt(report['warm'])} "
            f"to the first processed frame ({report['command']}; cache {report['cache_mb']} MB{jit_text})")
