"""``stem-live bench batch``: files per minute of ``stem-live batch`` with 1 and 2 worker
processes on the same simulated inputs, each worker pinned to one core, and the same unpinned.

- **inputs**: ``files`` simulated graphene recordings (``size`` px, ``frames`` frames each,
  seeds 0..files-1), written first, not timed;
- **pinned**: every worker process is started (Dask nanny ``env``) with ``OMP_NUM_THREADS``,
  ``MKL_NUM_THREADS``, ``OPENBLAS_NUM_THREADS`` = 1 and
  ``XLA_FLAGS=--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1`` (JAX's CPU
  backend single-threaded), then every thread of worker ``w`` is bound to core ``w mod cores``
  (``os.sched_setaffinity`` on each of ``/proc/self/task/*``, after the warm-up, so JAX's thread
  pool is bound too);
- **unpinned**: Dask's defaults only (its nannies set ``OMP_NUM_THREADS=1``; XLA uses every core;
  no affinity);
- **timing**: each worker first processes one warm-up input (compilation, or loads from the
  persistent compilation cache: reported as ``warmup_s``), then the clock runs over
  :func:`stem_live.batch.runner.run_batch` of all inputs into a fresh folder;
  ``files_per_min = files / seconds * 60``; ``scaling = files_per_min(2) / files_per_min(1)``.

Timings on a shared machine vary (other processes take cores): run it on a quiet one, and
compare numbers from one run only.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

__all__ = ["PINNED_ENV", "bench_batch", "batch_table"]

PINNED_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"}


def _pin_all_threads(core: int) -> list[int]:
    """Bind every thread of this process to ``core``; returns the affinity of the process after."""
    for tid in os.listdir("/proc/self/task"):
        try:
            os.sched_setaffinity(int(tid), {core})
        except OSError:  # a thread that just ended
            pass
    return sorted(os.sched_getaffinity(0))


def _thread_count() -> int:
    return len(os.listdir("/proc/self/task"))


def _run(inputs: list, warm: list, out_root: Path, *, workers: int, pinned: bool, say: Callable[[str], None]) -> dict:
    """One cluster: warm every worker, then time the batch of ``inputs``."""
    from dask.distributed import Client, LocalCluster

    from stem_live.batch.job import BatchOptions, process_file
    from stem_live.batch.runner import run_batch

    env = dict(PINNED_ENV) if pinned else {}
    t0 = time.perf_counter()
    cluster = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0", env=env)
    client = Client(cluster)
    try:
        client.wait_for_workers(workers, timeout=120)
        addrs = sorted(client.scheduler_info()["workers"])
        say(f"bench batch: {workers} worker(s), {'pinned' if pinned else 'unpinned'}: warming up (compilation) ...")
        futs = [client.submit(process_file, str(warm[k % len(warm)].path), str(out_root / f"warm-{k}"),
                              warm[k % len(warm)].name, BatchOptions(), workers=[a], allow_other_workers=False,
                              pure=False) for k, a in enumerate(addrs)]
        rows = client.gather(futs)
        if any(r["status"] != "ok" for r in rows):
            raise RuntimeError(f"warm-up failed: {[r['reason'] for r in rows if r['status'] != 'ok']}")
        warm_s = time.perf_counter() - t0
        affinity = {}
        if pinned:
            cores = os.cpu_count() or 1
            for k, a in enumerate(addrs):
                affinity[a] = client.run(_pin_all_threads, k % cores, workers=[a])[a]
        threads = client.run(_thread_count)
        say(f"bench batch: {workers} worker(s), {'pinned' if pinned else 'unpinned'}: {len(inputs)} files ...")
        t1 = time.perf_counter()
        rows = run_batch(inputs, out_root / f"out-{workers}-{'p' if pinned else 'u'}", client=client,
                         progress=lambda _s: None)
        seconds = time.perf_counter() - t1
    finally:
        client.close()
        cluster.close()
    failed = [r["reason"] for r in rows if r["status"] != "ok"]
    return {"workers": workers, "pinned": pinned, "files": len(inputs), "failed": failed,
            "seconds": round(seconds, 2), "files_per_min": round(len(inputs) / seconds * 60.0, 2),
            "warmup_s": round(warm_s, 1), "affinity": {a: c for a, c in affinity.items()},
            "threads_per_process": sorted(threads.values())}


def bench_batch(*, files: int = 6, size: int = 192, frames: int = 8, workers: tuple[int, ...] = (1, 2),
                progress: Callable[[str], None] | None = None) -> dict:
    """The report (module doc): inputs, ``runs`` (one per worker count and pinning), and
    ``scaling`` {"pinned", "unpinned"}: files/min with the most workers over that with one."""
    from stem_live.batch import expand_inputs
    from stem_live.lab.bench_startup import write_recording

    say = progress or (lambda _s: None)
    with tempfile.TemporaryDirectory(prefix="stem-live-bench-batch-") as tmp:
        root = Path(tmp)
        (root / "in").mkdir()
        (root / "warm").mkdir()
        say(f"bench batch: writing {files} simulated recordings ({size} px, {frames} frames) ...")
        for k in range(files):
            write_recording(root / "in" / f"g{k:02d}.tif", size=size, frames=frames, seed=k)
        for k in range(max(workers)):
            write_recording(root / "warm" / f"w{k}.tif", size=size, frames=3, seed=1000 + k)
        inputs, warm = expand_inputs([root / "in"]), expand_inputs([root / "warm"])
        runs = []
        for pinned in (True, False):
            for n in workers:
                runs.append(_run(inputs, warm, root, workers=n, pinned=pinned, say=say))
                shutil.rmtree(root / f"out-{n}-{'p' if pinned else 'u'}", ignore_errors=True)
    scaling = {}
    for pinned, label in ((True, "pinned"), (False, "unpinned")):
        rate = {r["workers"]: r["files_per_min"] for r in runs if r["pinned"] == pinned}
        scaling[label] = round(rate[max(workers)] / rate[min(workers)], 2) if rate.get(min(workers)) else None
    return {"files": files, "size": size, "frames": frames, "model": "gp", "pinning": dict(PINNED_ENV,
            affinity="os.sched_setaffinity of every thread of worker w to core w mod cores"),
            "runs": runs, "scaling": scaling}


def batch_table(report: dict) -> str:
    """Lines a person reads."""
    lines = [f"batch     {report['files']} files of {report['size']} px x {report['frames']} frames (gp model)"]
    for r in report["runs"]:
        lines.append(f"  {r['workers']} worker(s) {'pinned  ' if r['pinned'] else 'unpinned'}: "
                     f"{r['files_per_min']:6.2f} files/min ({r['seconds']:.1f} s; warm-up {r['warmup_s']:.0f} s)"
                     + (f"; {len(r['failed'])} failed" if r["failed"] else ""))
    s = report["scaling"]
    lines.append(f"  scaling 2 vs 1 worker: pinned {s.get('pinned')}x, unpinned {s.get('unpinned')}x")
    return "\n".join(lines)
