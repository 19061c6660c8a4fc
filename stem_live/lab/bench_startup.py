"""``stem-live bench startup``: seconds from starting a command to its first processed frame,
cold (an empty compilation cache folder) and warm (a second process on the same folder).

The command is ``stem-live replay REC --model gp`` on a short simulated recording (written
first, not timed); the first processed frame is the first progress line it writes
(``[1/N] frame ...``). Each start is a fresh process, so the times include Python's and JAX's
imports, the compilation (cold) or the loads from JAX's persistent cache (warm), and the first
frame itself.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

FIRST_FRAME = "[1/"  # the start of `replay`'s progress line of its first processed frame


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


def time_to_first_frame(argv: Sequence[str], *, env: dict | None = None, marker: str = FIRST_FRAME,
                        timeout_s: float = 600.0) -> dict:
    """Start ``argv`` and time it (s) until a line of its stderr starts with ``marker``; the
    process is then stopped. ``seconds`` None when it exited or timed out first (``error``:
    its last lines)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(list(argv), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    tail: list[str] = []
    seconds = None
    try:
        deadline = t0 + timeout_s
        for line in p.stderr:  # type: ignore[union-attr]
            if line.startswith(marker):
                seconds = time.perf_counter() - t0
                break
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
    out: dict = {"seconds": None if seconds is None else round(seconds, 2)}
    if seconds is None:
        out["error"] = " | ".join(tail) or f"exited with status {p.returncode} before its first frame"
    return out


def bench_startup(*, size: int = 512, model: str = "gp", cache_dir: Path | None = None,
                  progress: Callable[[str], None] | None = None) -> dict:
    """Cold and warm start to the first processed frame of ``stem-live replay --model MODEL``
    on a 3-frame ``size`` px recording. ``cache_dir``: the compilation cache folder to use
    (emptied first: the cold start is cold; default a temporary folder)."""
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
        for kind in ("cold", "warm"):
            say(f"bench startup: {kind} start of `{report['command']}` ({size} px) ...")
            report[kind] = time_to_first_frame(argv, env=env)
        report["cache_mb"] = round(sum(f.stat().st_size for f in cache.rglob("*") if f.is_file()) / 1e6, 1)
    return report


def startup_table(report: dict) -> str:
    """One line a person reads."""
    def fmt(r: dict) -> str:
        return f"{r['seconds']:.1f} s" if r.get("seconds") is not None else f"failed ({r.get('error')})"

    return (f"startup   {report['size']} px {report['model']}: cold {fmt(report['cold'])}, warm {fmt(report['warm'])} "
            f"to the first processed frame ({report['command']}; cache {report['cache_mb']} MB)")
