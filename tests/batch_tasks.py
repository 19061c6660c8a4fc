"""A light task for the scheduling tests of ``stem-live batch`` on worker processes
(``run_batch(..., task=light_task)``): the contract of :func:`stem_live.batch.job.process_file`
(a row, never an exception for a bad file; ``results.npz`` last and atomic) without the engine,
whose compilation (~20-40 s per fresh worker process on 2 cores) would not fit a test's 30 s."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

SLOW_S = 4.0   # seconds a file whose name starts with "slow" takes: time for a test to kill its worker


def light_task(path: str, out_dir: str, name: str, options) -> dict:
    """Read every frame of ``path`` (a corrupt file fails here), note this worker's pid in
    ``OUT/NAME/.started-PID``, sleep :data:`SLOW_S` for a ``slow*`` file, then write ``row.json``
    and ``results.npz`` (frame-mean intensity per frame) atomically; returns the row."""
    from stem_live.batch.job import RESULTS, _reason
    from stem_live.batch.outputs import atomic_write, write_text
    from stem_live.io import read_frames

    t0 = time.perf_counter()
    folder = Path(out_dir) / name
    row = {"name": name, "source": str(path), "status": "ok", "reason": "", "pid": os.getpid()}
    try:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f".started-{os.getpid()}").write_text(str(time.time()))
        means = [float(np.mean(f.image)) for f in read_frames(path, min_side=32)]
        if name.startswith("slow"):
            time.sleep(SLOW_S)
        row.update(frames=len(means), seconds=time.perf_counter() - t0)
        write_text(folder / "row.json", json.dumps(row))
        atomic_write(folder / RESULTS, lambda fh: np.savez(fh, mean=np.asarray(means)))
    except Exception as exc:
        row.update(status="failed", reason=_reason(exc), seconds=time.perf_counter() - t0)
    return row
