"""``stem-live run``, ``demo`` and ``monitor``: the engine against an instrument, the all-in-one demo, the operator's window.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from stem_live.cli.common import (
    Progress,
    client_keys,
    endpoint_args,
    engine_config,
    format_result,
    has_display,
    model_args,
    positive,
    sim_args,
    sim_config,
    wait_for_interrupt,
)


def cmd_run(a: argparse.Namespace) -> int:
    from stem_live.engine import Engine
    from stem_live.service import EngineService

    engine = Engine(engine_config(a))
    if a.arm:
        engine.arm()
    prog = Progress()
    done = threading.Event()
    stop = threading.Event()
    wait_for_interrupt(stop)

    def on_result(frame, result) -> None:
        prog.line(format_result(result, svc.counters.as_dict()))
        if a.count and svc.counters.processed + 1 >= a.count:
            done.set()

    svc = EngineService(engine, frames_endpoint=a.frames, corrections_endpoint=a.corrections,
                        maps_endpoint=a.maps, commands_endpoint=a.commands, on_result=on_result, keys=client_keys(a))
    svc.start()
    print(f"engine: frames from {a.frames}, corrections to {a.corrections}, maps on {svc.maps_endpoint}, "
          f"commands on {svc.commands_endpoint} ({'armed' if a.arm else 'disarmed'}; Ctrl-C stops)", file=sys.stderr)
    try:
        while not stop.is_set() and not done.is_set():
            stop.wait(0.2)
    finally:
        if a.restore_on_exit:  # while the receiver still tracks the newest frame (corrections must be fresh)
            ok = svc.restore_beam()
            print("starting beam shift restored" if ok else
                  "stem-live: error: could not restore the starting beam shift (instrument unreachable?)",
                  file=sys.stderr)
        svc.stop()
        prog.done()
        print(json.dumps(svc.counters.as_dict()), file=sys.stderr)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """Simulator + engine (+ monitor when a display exists), on loopback, in one process."""
    import numpy as np

    from instrument_adapters.bridge import Bridge
    from instrument_adapters.simulated import SimulatedInstrument
    from stem_live.engine import Engine
    from stem_live.service import EngineService

    inst = SimulatedInstrument(sim_config(a), speed=a.speed or None, frames=a.count)
    bridge = Bridge(inst, frames_endpoint="tcp://127.0.0.1:*", corrections_endpoint="tcp://127.0.0.1:*",
                    wait_for_subscriber=True)
    engine = Engine(engine_config(a))
    if engine.config.model == "gp":  # compile on simulated frames of this size first: no stalled first frame
        from dataclasses import replace

        print(f"demo: compiling the gp model for {a.size} px frames ...", file=sys.stderr, flush=True)
        warm = SimulatedInstrument(replace(sim_config(a), seed=a.seed + 1), speed=None, frames=3)
        print(f"demo: compiled in {engine.warm_up([warm.acquire() for _ in range(3)]):.1f} s", file=sys.stderr)
    engine.arm()
    prog = Progress(sys.stdout)
    stop = threading.Event()
    wait_for_interrupt(stop)
    state: dict = {"first": None, "res": []}

    def on_result(frame, result) -> None:
        truth = inst.truth_for(frame.seq)
        extra = ""
        if truth is not None:
            app = np.mean(np.asarray(truth.drift_nm) - np.asarray(truth.beam_shift_nm), axis=0)
            state["first"] = app if state["first"] is None else state["first"]
            res = float(np.hypot(*(app - state["first"])))
            state["res"].append(res)
            extra = f"  true image motion {res * 1e3:6.1f} pm"
        prog.line(format_result(result, svc.counters.as_dict()) + extra)

    svc = EngineService(engine, frames_endpoint=bridge.frames_endpoint, corrections_endpoint=bridge.corrections_endpoint,
                        maps_endpoint=a.maps, commands_endpoint=a.commands, on_result=on_result)
    svc.start()
    bridge.start()
    monitor = None
    if has_display() and not a.no_monitor:
        import subprocess

        monitor = subprocess.Popen([sys.executable, "-m", "stem_live.monitor", "--maps", svc.maps_endpoint,
                                    "--commands", svc.commands_endpoint])
    print(f"demo: simulated {a.preset} {a.size}x{a.size}, engine armed; maps on {svc.maps_endpoint}, commands on "
          f"{svc.commands_endpoint}; {'monitor opened' if monitor else 'headless'} (Ctrl-C stops)", file=sys.stderr)
    try:
        while not stop.is_set():
            c = svc.counters
            if bridge.finished and c.processed + c.skipped >= bridge.stats.frames_published:
                break
            stop.wait(0.05)
    finally:
        bridge.stop(restore=True)
        time.sleep(0.1)
        svc.stop()
        prog.done()
        if monitor is not None:
            monitor.terminate()
    r = np.array(state["res"]) if state["res"] else np.array([np.nan])
    c = svc.counters.as_dict()
    print(f"summary: {c['processed']} frames processed, {c['skipped']} skipped, {c['rejected']} rejected, "
          f"{c['corrections_sent']} corrections sent; true image motion RMS {np.sqrt(np.nanmean(r**2)) * 1e3:.1f} pm, "
          f"max {np.nanmax(r) * 1e3:.1f} pm; beam shift restored")
    return 0


def cmd_monitor(a: argparse.Namespace) -> int:
    """The operator's window on an engine's maps/commands endpoints."""
    from stem_live.monitor import run_monitor

    return run_monitor(a.maps, a.commands)


def add_parser(sub) -> None:
    """Add this module's command(s) to the ``stem-live`` subparsers ``sub``."""
    s = sub.add_parser("run", help="run the engine against an instrument's endpoints")
    endpoint_args(s, "frames", "corrections", "maps", "commands")
    s.add_argument("--arm", action="store_true", help="send corrections from the first frame")
    s.add_argument("--restore-on-exit", action="store_true",
                   help="on Ctrl-C, send the beam back to where it was at the first frame")
    s.add_argument("--client-key", type=Path, default=None, help="CURVE: this engine's NAME.key_secret")
    s.add_argument("--server-public-key", type=Path, default=None, help="CURVE: the instrument's NAME.key")
    s.add_argument("--frames", dest="count", type=positive(int), default=None, help="stop after N processed frames")
    model_args(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("monitor", help="the operator's window (Qt); closing it never stops acquisition")
    endpoint_args(s, "maps", "commands")
    s.set_defaults(func=cmd_monitor)

    s = sub.add_parser("demo", help="simulator + engine (+ monitor) on loopback")
    sim_args(s)
    endpoint_args(s, "maps", "commands")
    s.add_argument("--frames", dest="count", type=positive(int), default=None, help="stop after N frames")
    s.add_argument("--speed", type=float, default=1.0, help="1 = real scan rate, 0 = as fast as possible")
    s.add_argument("--no-monitor", action="store_true", help="do not open the monitor even with a display")
    model_args(s)
    s.set_defaults(func=cmd_demo)
