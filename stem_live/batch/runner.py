"""The Dask part of ``stem-live batch``: one task per input on ``dask.distributed`` (the
optional extra ``stem-live[batch]``, imported in this module only, lazily).

- the cluster: one given (``client``), an existing one (``scheduler="tcp://HOST:8786"``), or a
  ``LocalCluster`` of ``workers`` processes with one thread each (closed at the end);
- inputs whose ``OUT/NAME/results.npz`` exists are skipped (their row is read back from
  ``row.json``); a restarted batch does only what is left;
- a task whose worker dies is run again on another worker (Dask's ``allowed-failures``,
  default 3); a bad file is a failed row (:func:`stem_live.batch.job.process_file`);
- progress on ``progress`` (default stderr): files done / total, files per minute, time left;
- ``OUT/summary.csv`` is rewritten atomically after every finished input.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from stem_live.batch.inputs import BatchInput
from stem_live.batch.job import BatchOptions, is_done, process_file
from stem_live.batch.summary import write_summary

__all__ = ["run_batch", "start_client"]


def start_client(*, workers: int = 2, scheduler: str | None = None):
    """(client, cluster): a client of the scheduler at ``scheduler``, or of a new LocalCluster of
    ``workers`` processes (1 thread each, dashboard on a free port); cluster is None for an existing one.
    Raises RuntimeError (one line) without dask.distributed."""
    try:
        from dask.distributed import Client, LocalCluster
    except ImportError:
        raise RuntimeError("stem-live batch needs dask.distributed: pip install 'stem-live[batch]'") from None
    if scheduler:
        return Client(scheduler, timeout="30s"), None
    cluster = LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True, dashboard_address=":0")
    return Client(cluster), cluster


def _old_row(out_dir: Path, item: BatchInput) -> dict:
    try:
        return json.loads((out_dir / item.name / "row.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {"name": item.name, "source": str(item.path), "status": "ok", "reason": "done earlier (no row.json)"}


def _eta(done: int, total: int, t0: float) -> str:
    dt = time.perf_counter() - t0
    if done == 0 or dt <= 0:
        return f"[{done}/{total}]"
    rate = done / dt * 60.0
    left = (total - done) / rate if rate > 0 else float("inf")
    return f"[{done}/{total}] {rate:.2f} files/min, {left:.1f} min left"


def run_batch(inputs: Sequence[BatchInput], out_dir: str | os.PathLike, *, options: BatchOptions = BatchOptions(),
              client=None, workers: int = 2, scheduler: str | None = None,
              progress: Callable[[str], None] | None = None,
              task: Callable[[str, str, str, BatchOptions], dict] | None = None) -> list[dict]:
    """Process every input not done yet (module doc); returns the rows in input order (also
    written to ``OUT/summary.csv``). task: what runs for one input, ``task(path, out_dir, name,
    options) -> row`` (default :func:`stem_live.batch.job.process_file`; another one for tests of
    the scheduling, or a pipeline of one's own with the same contract: never raises for a bad
    file, writes ``OUT/NAME/results.npz`` last)."""
    say = progress or (lambda text: print(text, file=sys.stderr, flush=True))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    todo = []
    for item in inputs:
        if is_done(out, item.name):
            rows[item.name] = _old_row(out, item)
        else:
            todo.append(item)

    def ordered() -> list[dict]:
        return [rows[i.name] for i in inputs if i.name in rows]

    if len(rows):
        say(f"{len(rows)} of {len(inputs)} inputs done earlier: skipped")
    if not todo:
        write_summary(out / "summary.csv", ordered())
        return ordered()
    own = client is None
    cluster = None
    if own:
        client, cluster = start_client(workers=workers, scheduler=scheduler)
    try:
        from dask.distributed import as_completed

        futures = [client.submit(task or process_file, str(i.path), str(out), i.name, options, pure=False,
                                 key=f"stem-live-batch-{i.name}-{time.time_ns()}") for i in todo]
        t0, done = time.perf_counter(), 0
        say(f"{len(todo)} inputs on {len(client.scheduler_info().get('workers', {}))} workers")
        for fut in as_completed(futures):
            try:
                row = fut.result()
            except Exception as exc:  # the task itself failed (e.g. its workers kept dying)
                item = todo[futures.index(fut)]
                row = {"name": item.name, "source": str(item.path), "status": "failed",
                       "reason": " ".join(f"{type(exc).__name__}: {exc}".split())}
            rows[row["name"]] = row
            done += 1
            what = "ok" if row["status"] == "ok" else f"FAILED: {row['reason']}"
            say(f"{_eta(done, len(todo), t0)}  {row['name']}: {what}")
            write_summary(out / "summary.csv", ordered())
    finally:
        if own:
            client.close()
            if cluster is not None:
                cluster.close()
    return ordered()
