"""``stem-live batch``'s scheduling on a real LocalCluster of two worker *processes* (nannies):
a worker killed mid-file, a restarted batch, a corrupt file. The task is
``tests.batch_tasks.light_task`` (the contract of ``process_file`` without the engine: a fresh
worker process compiles the gp model for 20-40 s on 2 cores, beyond a test's 30 s; the engine
path, on in-process workers, is ``tests/test_batch.py``)."""

from __future__ import annotations

import csv
import json
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dask.distributed")

from tests.batch_tasks import SLOW_S, light_task  # noqa: E402


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """a.tif, b.tif, slow.tif (3 frames of 64 px each) and bad.tif (a TIFF header, then nonsense)."""
    from stem_live.io import StackWriter
    from stem_live.protocol import Frame

    root = tmp_path_factory.mktemp("in")
    rng = np.random.default_rng(0)
    for name in ("a", "b", "slow"):
        with StackWriter(root / f"{name}.tif") as w:
            for k in range(3):
                w.write(Frame(seq=k, image=rng.poisson(20.0, (64, 64)).astype(np.uint16), t_start=0.1 * k,
                              dwell_us=2.0, flyback_us=20.0))
    (root / "bad.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    return root


@pytest.fixture(scope="module")
def client():
    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=":0")
    c = Client(cluster)
    c.wait_for_workers(2, timeout=20)
    yield c
    c.close()
    cluster.close()


def _kill_when_started(folder: Path, client, seen: dict, timeout_s: float = 15.0) -> None:
    """Wait for the task of ``folder`` to start on a worker (its ``.started-PID`` file), then kill
    that worker process (SIGKILL: no clean-up); ``seen["killed"]`` = its pid."""
    pids = set(client.run(os.getpid).values())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        started = [int(p.name.split("-")[1]) for p in folder.glob(".started-*")] if folder.is_dir() else []
        if started:
            assert started[0] in pids   # a worker process of this cluster, not this one
            seen["killed"] = started[0]
            os.kill(started[0], signal.SIGKILL)
            return
        time.sleep(0.05)


def test_worker_killed_mid_file_then_restart(inputs, client, tmp_path):
    from stem_live.batch import expand_inputs
    from stem_live.batch.runner import run_batch

    out = tmp_path / "out"
    items = expand_inputs([inputs])
    seen: dict = {}
    killer = threading.Thread(target=_kill_when_started, args=(out / "slow", client, seen))
    killer.start()
    t0 = time.perf_counter()
    rows = run_batch(items, out, client=client, task=light_task, progress=lambda _s: None)
    killer.join()
    assert "killed" in seen
    by = {r["name"]: r for r in rows}
    assert sorted(by) == ["a", "b", "bad", "slow"]                 # every file has its row
    assert [by[n]["status"] for n in ("a", "b", "slow")] == ["ok"] * 3 and by["slow"]["frames"] == 3
    assert by["slow"]["pid"] != seen["killed"]                     # finished by another process
    assert len(list((out / "slow").glob(".started-*"))) == 2       # tried twice: killed, then done
    assert time.perf_counter() - t0 >= 2 * SLOW_S * 0.5            # the retry's own sleep happened
    assert by["bad"]["status"] == "failed" and by["bad"]["reason"] and "\n" not in by["bad"]["reason"]
    assert not (out / "bad" / "results.npz").exists()
    with open(out / "summary.csv", newline="") as fh:
        table = {r["name"]: r for r in csv.DictReader(fh)}
    assert table["bad"]["status"] == "failed" and table["slow"]["frames"] == "3"
    assert not list(out.rglob(".*.partial*"))                      # nothing half-written is left

    # a restart skips what is done (the killed worker's nanny has started a fresh one meanwhile)
    (out / "b" / "results.npz").unlink()                           # as if stopped before b ended
    before = {n: (out / n / "results.npz").stat().st_mtime_ns for n in ("a", "slow")}
    lines: list[str] = []
    rows2 = run_batch(items, out, client=client, task=light_task, progress=lines.append)
    assert lines[0] == "2 of 4 inputs done earlier: skipped"
    assert [r["status"] for r in rows2] == ["ok", "ok", "failed", "ok"]   # a, b, bad, slow
    assert {n: (out / n / "results.npz").stat().st_mtime_ns for n in ("a", "slow")} == before
    assert rows2[3] == json.loads((out / "slow" / "row.json").read_text())
    assert rows2[1]["pid"] in set(client.run(os.getpid).values())
