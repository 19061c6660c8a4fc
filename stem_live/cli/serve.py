"""``stem-live sim`` and ``stem-live serve``: an instrument (simulated, replayed, Nion, AutoScript) on the frames/corrections endpoints.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from stem_live.cli.common import (
    Progress,
    UserError,
    endpoint_args,
    limits_args,
    positive,
    server_keys,
    sim_args,
    sim_config,
    wait_for_interrupt,
)


def _run_bridge(bridge, inst, a: argparse.Namespace, *, header: str, label: str, close: bool) -> int:
    """Serve ``inst`` through ``bridge`` until Ctrl-C or the end of its frames: a progress line
    twice a second, then the true totals once the bridge stopped (``close``: close the instrument).
    Returns the exit status: 1 when ``--restore-on-exit`` could not restore the beam (it says where it is)."""
    stop = threading.Event()
    wait_for_interrupt(stop)
    prog = Progress()
    bridge.start()
    print(f"{header}: frames on {bridge.frames_endpoint}, corrections on {bridge.corrections_endpoint}"
          " (Ctrl-C stops)", file=sys.stderr)
    try:
        while not stop.is_set() and not bridge.finished:
            s = bridge.stats
            b = inst.get_beam_shift()
            err = f"  last error: {s.last_error}" if s.acquire_errors else ""
            budget = f"  WARNING: {s.budget_warning}" if s.budget_warning else ""
            strips = f" ({s.strips_published} strips)" if s.strips_published else ""
            prog.line(f"published {s.frames_published}{strips}  dropped {s.frames_dropped}  corrections {s.corrections_applied}"
                      f" (clamped {s.corrections_clamped}, refused {s.corrections_refused})  "
                      f"beam shift [{b[0]:+.3f}, {b[1]:+.3f}] nm  excursion {s.excursion_nm:.2f}/"
                      f"{bridge.limits.max_excursion_nm:g} nm{err}{budget}")
            stop.wait(0.5)
    finally:
        bridge.stop()
        status = 0
        if a.restore_on_exit:
            status = _restore(bridge, inst, prog)
        if close:
            inst.close()
        prog.done()
        s = bridge.stats  # after the bridge stopped: the true totals
        strips = f" in {s.strips_published} strips" if s.strips_published else ""
        print(f"{label}: published {s.frames_published} frames{strips}, dropped {s.frames_dropped}, corrections "
              f"{s.corrections_applied} (clamped {s.corrections_clamped}, refused {s.corrections_refused}), "
              f"excursion budget reached {s.budget_reached}x, stage handovers {s.stage_handovers}", file=sys.stderr)
    return status


def _restore(bridge, inst, prog: Progress) -> int:
    """Set the beam back to where the bridge started; 0 when done, 1 (and where the beam is) when not."""
    start = bridge.start_shift_nm
    try:
        bridge.restore()
        return 0
    except Exception as exc:  # noqa: BLE001 - any instrument failure: say where the beam is
        try:
            b = inst.get_beam_shift()
            where = f"the instrument reports the beam at [{b[0]:+.3f}, {b[1]:+.3f}] nm"
        except Exception:  # noqa: BLE001
            where = "the instrument does not answer, so where the beam is now is unknown"
        prog.done()
        print(f"stem-live: error: could not restore the starting beam shift [{start[0]:+.3f}, {start[1]:+.3f}] nm "
              f"({exc}); {where}: set it back by hand", file=sys.stderr)
        return 1


def _wrap(inst, a: argparse.Namespace):
    """``inst`` with the measured actuator taken out when ``--actuator-calibration FILE`` is given."""
    if a.actuator_calibration is None:
        return inst
    from instrument_adapters.actuator import CalibratedInstrument, load_matrix

    try:
        matrix = load_matrix(a.actuator_calibration)
    except BaseException:
        inst.close()
        raise
    return CalibratedInstrument(inst, matrix)


def safety_args(s: argparse.ArgumentParser) -> None:
    """``--actuator-calibration`` and ``--stage-handover`` (serve, sim)."""
    s.add_argument("--actuator-calibration", type=Path, default=None, metavar="JSON",
                   help="a `stem-live calibrate --actuator` file: corrections are mapped through its inverse "
                        "matrix, so that the engine sees a perfect actuator")
    s.add_argument("--stage-handover", action="store_true",
                   help="when the excursion budget (--max-excursion-nm) is reached, hand the accumulated shift to "
                        "the stage (Nion), set the beam back to the start and let the engine re-reference; without "
                        "it (or where the instrument cannot) correction disarms at the budget")


def cmd_sim(a: argparse.Namespace) -> int:
    from instrument_adapters.bridge import Bridge
    from instrument_adapters.safety import Limits
    from instrument_adapters.simulated import SimulatedInstrument

    if a.prerender < 0:
        raise UserError(f"--prerender must be >= 0, got {a.prerender}")
    inst = _wrap(SimulatedInstrument(sim_config(a), speed=a.speed or None, frames=a.count, prerender=a.prerender), a)
    bridge = Bridge(inst, frames_endpoint=a.frames, corrections_endpoint=a.corrections, keys=server_keys(a),
                    limits=Limits(max_step_nm=a.max_step_nm, max_excursion_nm=a.max_excursion_nm,
                                  max_step_per_line_nm=a.max_step_per_line_nm),
                    stage_handover=a.stage_handover)
    return _run_bridge(bridge, inst, a, header="simulated microscope", label="sim", close=False)


ADAPTERS = {"sim": "simulated", "replay": "replay", "nion": "nion", "autoscript": "autoscript"}


def _adapter(name: str):
    """The adapter module for ``--instrument NAME``: it provides add_args(parser) and from_args(args)."""
    import importlib

    return importlib.import_module(f"instrument_adapters.{ADAPTERS[name]}")


def cmd_serve(a: argparse.Namespace) -> int:
    from instrument_adapters.bridge import Bridge
    from instrument_adapters.safety import Limits
    from stem_live.io import RecordError

    try:
        inst = _wrap(_adapter(a.instrument).from_args(a), a)
    except RecordError as exc:  # replay of a bad file
        raise UserError(str(exc)) from None
    try:
        bridge = Bridge(inst, frames_endpoint=a.frames, corrections_endpoint=a.corrections, keys=server_keys(a),
                        limits=Limits(max_step_nm=a.max_step_nm, max_excursion_nm=a.max_excursion_nm,
                                      max_step_per_line_nm=a.max_step_per_line_nm),
                        stage_handover=a.stage_handover)
    except BaseException:
        inst.close()
        raise
    return _run_bridge(bridge, inst, a, header=a.instrument, label=a.instrument, close=True)


def add_parser(sub) -> None:
    """Add this module's command(s) to the ``stem-live`` subparsers ``sub``."""
    s = sub.add_parser("sim", help="run the simulated microscope on the frames/corrections endpoints")
    sim_args(s)
    endpoint_args(s, "frames", "corrections")
    limits_args(s)
    s.add_argument("--speed", type=float, default=1.0, help="scan speed: 1 = real scan rate, 0 = as fast as possible")
    s.add_argument("--frames", dest="count", type=positive(int), default=None, help="stop after N frames")
    s.add_argument("--restore-on-exit", action="store_true", help="restore the starting beam shift on exit")
    s.add_argument("--server-key", type=Path, default=None, help="CURVE: this instrument's NAME.key_secret")
    s.add_argument("--allowed-keys", type=Path, default=None, help="CURVE: folder of allowed engines' NAME.key")
    s.add_argument("--prerender", type=int, default=0, metavar="N",
                   help="benchmarks: render N frames first, then stream them back and forth (corrections are "
                        "acked but do not move the pre-rendered images)")
    safety_args(s)
    s.set_defaults(func=cmd_sim)

    s = sub.add_parser("serve", help="serve an instrument (sim, replay, nion, autoscript) on the frames/corrections endpoints")
    s.add_argument("--instrument", choices=tuple(ADAPTERS), default="sim", help="which adapter (default sim)")
    for name in ADAPTERS:
        _adapter(name).add_args(s)
    endpoint_args(s, "frames", "corrections")
    limits_args(s)
    s.add_argument("--frames", dest="count", type=positive(int), default=None, help="stop after N frames")
    s.add_argument("--restore-on-exit", action="store_true", help="restore the starting beam shift on exit")
    s.add_argument("--server-key", type=Path, default=None, help="CURVE: this instrument's NAME.key_secret")
    s.add_argument("--allowed-keys", type=Path, default=None, help="CURVE: folder of allowed engines' NAME.key")
    safety_args(s)
    s.set_defaults(func=cmd_serve)
