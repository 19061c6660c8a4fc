"""``stem-live run``, ``demo`` and ``monitor``: the engine against an instrument, the all-in-one demo, the operator's window.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from stem_live.cli.common import (
    Progress,
    UserError,
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
    from stem_live.live_engine import hold_gc

    release_gc = hold_gc()  # until the first frame's result (see hold_gc)
    try:
        return _run(a, release_gc)
    finally:
        release_gc()


def _run(a: argparse.Namespace, release_gc: Callable[[], None]) -> int:
    from stem_live.service import EngineService

    prog = Progress()

    def say(text: str) -> None:
        done = text.startswith("compiled in")
        prog.line(f"{text}; {svc.counters.skipped} frames skipped meanwhile" if done else text)

    engine = compiling_engine(engine_config(a), say=say)
    if a.arm:
        engine.arm()
    done = threading.Event()
    stop = threading.Event()
    wait_for_interrupt(stop)

    def on_result(frame, result) -> None:
        prog.line(format_result(result, svc.counters.as_dict()))
        release_gc()  # the start is over
        if a.count and svc.counters.processed + 1 >= a.count:
            done.set()

    from stem_live.io.session_report import session_report

    on_result, finish_report = session_report(a.report, engine, on_result, source=a.frames)
    svc = EngineService(engine, frames_endpoint=a.frames, corrections_endpoint=a.corrections,
                        maps_endpoint=a.maps, commands_endpoint=a.commands, on_result=on_result, keys=client_keys(a))
    svc.start()
    print(f"engine: frames from {a.frames}, corrections to {a.corrections}, maps on {svc.maps_endpoint}, "
          f"commands on {svc.commands_endpoint} ({'armed' if a.arm else 'disarmed'}; Ctrl-C stops)", file=sys.stderr)
    status = 0
    shown = 0.0  # when the waiting line was last written
    every = 1.0 if prog.tty else 5.0
    try:
        while not stop.is_set() and not done.is_set():
            stop.wait(0.2)
            line = svc.waiting()
            if line is not None and time.monotonic() - shown >= every:
                prog.line(line)
                shown = time.monotonic()
    finally:
        if a.restore_on_exit:  # while the receiver still tracks the newest frame (corrections must be fresh)
            if svc.restore_beam():
                print("starting beam shift restored", file=sys.stderr)
            else:
                status = 1
                prog.done()
                print(f"stem-live: error: could not restore the starting beam shift: {beam_report(svc)}",
                      file=sys.stderr)
        svc.stop()
        prog.done()
        finish_report()
        print(json.dumps(svc.counters.as_dict()), file=sys.stderr)
    return status


def compiling_engine(config, *, say: Callable[[str], None] = print, warm_frames: int = 3,
                     models: tuple[str, ...] = ("gp",)):
    """The engine of ``run``: :func:`stem_live.live_engine.compiling_engine` (compiles for the
    stream's first frame before taking it)."""
    from stem_live.live_engine import compiling_engine as make

    return make(config, say=say, warm_frames=warm_frames, models=models)


def beam_report(svc) -> str:
    """Where the beam is, as far as the engine knows, for a failed restore (one line)."""
    start = svc.start_beam_nm
    last = svc.last_beam_nm
    if last is None:
        return "no frame arrived, so the beam was never moved by this engine"
    seq, (y, x) = last
    target = "" if start is None else f" (start [{start[0]:+.3f}, {start[1]:+.3f}] nm)"
    return (f"the beam was at [{y:+.3f}, {x:+.3f}] nm in the last frame (seq {seq}){target}; the instrument "
            f"did not answer: set the beam shift back by hand")


def cmd_demo(a: argparse.Namespace) -> int:
    """Simulator + engine (+ monitor when a display exists), on loopback, in one process: by
    default the gp model with an rVAE trained from scratch on the stream's first columns."""
    from instrument_adapters.bridge import Bridge
    from instrument_adapters.simulated import SimulatedInstrument
    from stem_live.live_engine import LiveEngine
    from stem_live.service import EngineService

    if a.no_rvae and a.rvae is not None:
        raise UserError("--no-rvae and --rvae CHECKPOINT contradict each other: give one")
    inst = SimulatedInstrument(sim_config(a), speed=a.speed or None, frames=a.count, strip_lines=a.strips)
    bridge = Bridge(inst, frames_endpoint="tcp://127.0.0.1:*", corrections_endpoint="tcp://127.0.0.1:*",
                    wait_for_subscriber=True)
    engine = LiveEngine(engine_config(a))
    if engine.config.model == "gp":  # compile on simulated frames of this size first: no stalled first frame
        from dataclasses import replace

        print(f"demo: compiling the gp model for {a.size}x{a.size} frames ...", file=sys.stderr, flush=True)
        warm = SimulatedInstrument(replace(sim_config(a), seed=a.seed + 1), speed=None, frames=3)
        took = engine.warm_up([warm.acquire() for _ in range(3)], strip_lines=a.strips)
        print(f"demo: compiled in {took:.1f} s", file=sys.stderr)
    engine.arm()
    auto_train = engine.config.model == "gp" and engine.rvae is None and not a.no_rvae
    if auto_train:  # built and compiled while the first frames stream; trains once enough patches are buffered
        print(f"demo: {engine.train()}", file=sys.stderr, flush=True)
    prog = Progress(sys.stdout)
    stop = threading.Event()
    wait_for_interrupt(stop)
    motion = TrueMotion()
    state: dict = {"latents_from": None}

    def on_result(frame, result) -> None:
        n_cols = None if result.columns is None else len(result.columns.positions)
        latents = rvae_status(engine, asked=auto_train)
        if latents.startswith("latents") and state["latents_from"] is None:
            state["latents_from"] = (frame.seq, time.monotonic() - t_start)
        line = demo_line(result, svc.counters.as_dict(), n_cols, latents)
        truth = inst.truth_for(frame.seq)
        if truth is not None:
            closed, opened = motion.add(truth.drift_nm, truth.beam_shift_nm)
            line += f"  true image motion {closed * 1e3:6.1f} pm (open loop {opened * 1e3:6.1f} pm)"
        prog.line(line)

    from stem_live.io.session_report import session_report

    on_result, finish_report = session_report(a.report, engine, on_result, source="simulator")
    svc = EngineService(engine, frames_endpoint=bridge.frames_endpoint, corrections_endpoint=bridge.corrections_endpoint,
                        maps_endpoint=a.maps, commands_endpoint=a.commands, on_result=on_result)
    svc.start()
    bridge.start()
    t_start = time.monotonic()
    monitor = None
    if has_display() and not a.no_monitor:
        import subprocess

        monitor = subprocess.Popen([sys.executable, "-m", "stem_live.monitor", "--maps", svc.maps_endpoint,
                                    "--commands", svc.commands_endpoint])
    what = (f"model {engine.config.model}" + ("" if engine.config.model != "gp" else
            ", rVAE from scratch after the first frames" if auto_train else
            ", rVAE off" if engine.rvae is None else ", rVAE checkpoint"))
    print(f"demo: simulated {a.preset} {a.size}x{a.size}, {what}, engine armed; maps on {svc.maps_endpoint}, "
          f"commands on {svc.commands_endpoint}; {'monitor opened' if monitor else 'headless'} (Ctrl-C stops)",
          file=sys.stderr)
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
        finish_report()
        if monitor is not None:
            monitor.terminate()
        if engine.rvae is not None:
            engine.rvae.close()
    c = svc.counters.as_dict()
    closed, opened = motion.rms()
    ratio = f"{closed / opened:.0%} of" if opened > 0 else "vs"
    lat = state["latents_from"]
    lat_text = ("no latents" if lat is None else f"latents from frame {lat[0]} ({lat[1]:.0f} s into the run)")
    print(f"summary: {c['processed']} frames processed, {c['skipped']} skipped, {c['rejected']} rejected, "
          f"{c['corrections_sent']} corrections sent; true image motion RMS {closed * 1e3:.1f} pm closed loop "
          f"(max {motion.max_closed * 1e3:.1f} pm), {ratio} the open-loop {opened * 1e3:.1f} pm "
          f"(max {motion.max_open * 1e3:.1f} pm: the drift uncorrected); {lat_text}; beam shift restored")
    return 0


class TrueMotion:
    """The simulator's truth over a demo run: the image motion with the engine's corrections
    (closed loop: drift less beam shift) and without them (open loop: the drift alone), each
    frame's mean over its lines relative to the first frame's (nm)."""

    def __init__(self) -> None:
        import numpy as np

        self._np = np
        self.first_closed = None
        self.first_open = None
        self.closed: list[float] = []
        self.open: list[float] = []

    def add(self, drift_nm, beam_shift_nm) -> tuple[float, float]:
        """One frame's true per-line drift and beam shift (rows, 2), nm; returns its (closed, open) motion, nm."""
        np = self._np
        d = np.mean(np.asarray(drift_nm, dtype=np.float64), axis=0)
        app = d - np.mean(np.asarray(beam_shift_nm, dtype=np.float64), axis=0)
        if self.first_closed is None:
            self.first_closed, self.first_open = app, d
        self.closed.append(float(np.hypot(*(app - self.first_closed))))
        self.open.append(float(np.hypot(*(d - self.first_open))))
        return self.closed[-1], self.open[-1]

    def rms(self) -> tuple[float, float]:
        """RMS (closed, open) motion over the frames so far, nm (NaN before any)."""
        np = self._np
        if not self.closed:
            return float("nan"), float("nan")
        return float(np.sqrt(np.mean(np.square(self.closed)))), float(np.sqrt(np.mean(np.square(self.open))))

    @property
    def max_closed(self) -> float:
        return max(self.closed, default=float("nan"))

    @property
    def max_open(self) -> float:
        return max(self.open, default=float("nan"))


def rvae_status(engine, *, asked: bool) -> str:
    """The rVAE stage in a few words: off, building, compiling, buffering, training, or the
    encoder version producing latents."""
    stage = engine.rvae
    if stage is None:
        return "rvae building" if asked else "rvae off"
    st = stage.status()
    if st["error"]:
        return "rvae error"
    if st["available"]:
        return f"latents v{st['version']}" + (" (training)" if st["training"] else "")
    if not st["ready"]:
        return "rvae compiling"
    if st["training"]:
        return f"rvae training ({st['steps_done']} steps)"
    return f"rvae buffering ({st['buffered']} patches)"


def demo_line(r, counters: dict, n_columns: int | None, latents: str) -> str:
    """One demo progress line: frame, columns found, drift (nm), the correction sent, the rVAE's status."""
    cols = "" if n_columns is None else f"  columns {n_columns:4d}"
    corr = ("none" if r.correction is None else
            f"[{r.correction.beam_shift_nm[0]:+.3f}, {r.correction.beam_shift_nm[1]:+.3f}] nm")
    return (f"frame {r.seq:5d}{cols}  drift [{r.drift_nm[0]:+.3f}, {r.drift_nm[1]:+.3f}] nm  beam -> {corr}"
            f"  {latents}  {counters['fps']:.1f} fps  skipped {counters['skipped']}")


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
    s.add_argument("--report", type=Path, default=None, metavar="OUT.png",
                   help="at the end, the one-page figure of replay --report (gp model)")
    model_args(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("monitor", help="the operator's window (Qt); closing it never stops acquisition")
    endpoint_args(s, "maps", "commands")
    s.set_defaults(func=cmd_monitor)

    s = sub.add_parser("demo", help="simulator + engine (+ monitor) on loopback")
    sim_args(s)
    endpoint_args(s, "maps", "commands")
    s.add_argument("--frames", dest="count", type=positive(int), default=None, help="stop after N frames")
    s.add_argument("--speed", type=float, default=1.0, help="scan speed: 1 = real scan rate, 0 = as fast as possible")
    s.add_argument("--no-monitor", action="store_true", help="do not open the monitor even with a display")
    s.add_argument("--report", type=Path, default=None, metavar="OUT.png",
                   help="at the end, the one-page figure of replay --report (gp model)")
    s.add_argument("--no-rvae", action="store_true",
                   help="(gp model) no rVAE; by default one is trained from scratch on the first frames' columns")
    s.add_argument("--strips", type=positive(int), default=0, metavar="LINES",
                   help="(gp model) the simulator sends every frame as strips of LINES lines and the engine "
                        "corrects after each with a beam path (--strip-corrections)")
    model_args(s)
    for action in s._actions:  # the demo shows the whole mission: the gp model unless asked otherwise
        if action.dest == "model":
            action.help = "drift model: columns + online GP (default, with the rVAE), or rigid registration"
    s.set_defaults(func=cmd_demo, model="gp")
