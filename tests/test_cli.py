"""The ``stem-live`` command as a user runs it: subprocesses, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ENV = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}


def stem_live(*args: str, timeout: float = 60, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stem_live.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=cwd)


def _free_endpoints(n: int) -> list[str]:
    import socket

    out = []
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        out.append(f"tcp://127.0.0.1:{s.getsockname()[1]}")
    for s in socks:
        s.close()
    return out


def test_demo_headless_runs_n_frames_and_summarises():
    maps, commands = _free_endpoints(2)
    r = stem_live("demo", "--frames", "12", "--size", "128", "--speed", "8", "--maps-endpoint", maps,
                  "--commands-endpoint", commands)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("frame ")]
    assert len(lines) == 12  # one progress line per frame (no terminal: one line each)
    assert "summary: 12 frames processed" in r.stdout
    assert "Traceback" not in r.stderr


def test_demo_stops_cleanly_on_ctrl_c():
    maps, commands = _free_endpoints(2)
    p = subprocess.Popen([sys.executable, "-m", "stem_live.cli", "demo", "--size", "128", "--speed", "4",
                          "--maps-endpoint", maps, "--commands-endpoint", commands],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        t0 = time.monotonic()
        first = p.stdout.readline()
        while not first.startswith("frame "):
            assert time.monotonic() - t0 < 30, "demo printed no progress"
            first = p.stdout.readline()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, err
    assert "summary:" in out and "Traceback" not in err


def test_evaluate_writes_the_report(tmp_path):
    out = tmp_path / "r.json"
    r = stem_live("evaluate", "--preset", "srtio3", "--size", "128", "--frames", "25", "--drift-nm-per-min", "20",
                  "--seed", "4", "--json", str(out))
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep == json.loads(r.stdout)
    assert rep["frames_processed"] == 25 and rep["frames_dropped"] == 0 and rep["engine_fps"] > 0
    assert rep["open_loop"]["residual_rms_nm"] > 0.05
    assert rep["closed_loop"]["residual_rms_nm"] < 0.25 * rep["open_loop"]["residual_rms_nm"]


@pytest.mark.parametrize("args, needle", [
    (["replay", "/nonexistent/file.tif"], "file.tif"),
    (["evaluate", "--size", "-5"], "must be positive"),
    (["sim", "--frames-endpoint", "tcp://0.0.0.0:5555"], "loopback"),
    (["evaluate", "--preset", "unobtainium"], "invalid choice"),
])
def test_user_errors_are_one_line(args, needle):
    r = stem_live(*args)
    assert r.returncode == 2
    assert needle in r.stderr
    assert "Traceback" not in r.stderr
    assert len([ln for ln in r.stderr.splitlines() if "error" in ln]) == 1


def test_port_in_use_is_a_one_line_error():
    import zmq

    ctx = zmq.Context()
    s = ctx.socket(zmq.PUB)
    s.bind("tcp://127.0.0.1:*")
    busy = s.getsockopt_string(zmq.LAST_ENDPOINT)
    try:
        r = stem_live("sim", "--frames-endpoint", busy, "--corrections-endpoint", _free_endpoints(1)[0])
        assert r.returncode == 2 and "cannot bind" in r.stderr and "Traceback" not in r.stderr
    finally:
        s.close(0)
        ctx.term()
