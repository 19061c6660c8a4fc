"""``stem-live calibrate --actuator``: measure the beam-shift actuator (gain, rotation, skew) of an
instrument (the simulator, Nion, AutoScript) -> a JSON file for ``--actuator-calibration``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

from stem_live.cli.common import Progress, UserError

INSTRUMENTS = ("sim", "nion", "autoscript")


def add_args(s: argparse.ArgumentParser) -> None:
    """The ``--actuator`` options of ``stem-live calibrate`` (adapters' own options included)."""
    from stem_live.cli.serve import _adapter

    g = s.add_argument_group("actuator calibration (--actuator)")
    g.add_argument("--actuator", action="store_true",
                   help="measure the beam-shift actuator (gain, rotation, skew) instead of the scan: moves the beam "
                        "by test shifts on the instrument, writes --out FILE.json for --actuator-calibration")
    g.add_argument("--instrument", choices=INSTRUMENTS, default="sim", help="which instrument (default sim)")
    g.add_argument("--field-fraction", type=float, default=0.2, metavar="F",
                   help="largest test step, as a fraction of the field of view (default 0.2)")
    g.add_argument("--max-test-step-nm", type=float, default=None, metavar="NM", help="cap on the largest test step")
    g.add_argument("--repeats", type=int, default=3, help="repeats of the +-y, +-x pattern per step size (default 3)")
    g.add_argument("--settle-frames", type=int, default=1, metavar="N",
                   help="frames discarded after every move (default 1: the frame in flight is mixed)")
    for name in INSTRUMENTS:
        _adapter(name).add_args(s)


def cmd_actuator(a: argparse.Namespace) -> int:
    """Run the test pattern on the instrument, fit the matrix, write ``a.out`` (JSON)."""
    from instrument_adapters.base import InstrumentError
    from stem_live.calibration.actuator import ActuatorCalibrationError, measure_actuator, now_stamp
    from stem_live.cli.serve import _adapter

    if a.file is not None or a.preset is not None:
        raise UserError("--actuator measures a live instrument: drop FILE/--preset and pick --instrument")
    if not 0 < a.field_fraction <= 0.5 or a.repeats < 1 or a.settle_frames < 0:
        raise UserError("--field-fraction must be in (0, 0.5], --repeats >= 1 and --settle-frames >= 0")
    out = a.out if a.out.suffix == ".json" else a.out / "actuator.json"
    inst = _adapter(a.instrument).from_args(argparse.Namespace(**{**vars(a), "count": None}))
    prog = Progress()
    t0 = time.perf_counter()

    def progress(label: str, i: int, n: int) -> None:
        prog.line(f"calibrate --actuator: {label}, frame {i}/{n}  ({time.perf_counter() - t0:.0f} s)")

    try:
        cal = measure_actuator(inst, field_fraction=a.field_fraction, max_step_nm=a.max_test_step_nm,
                               repeats=a.repeats, settle_frames=a.settle_frames,
                               source=f"{a.instrument} {now_stamp()}", progress=progress)
    except (ActuatorCalibrationError, InstrumentError) as exc:
        raise UserError(str(exc)) from None
    finally:
        prog.done()
        inst.close()
    cal.save(out)
    print(json.dumps({k: v for k, v in asdict(cal).items() if k != "kind"}, indent=1))
    print(f"actuator: gain {cal.gain:.4f}, rotation {cal.rotation_deg:+.2f} deg, skew {cal.skew:+.4f}, "
          f"anisotropy {cal.anisotropy:.4f} (residual {cal.residual_nm * 1e3:.1f} pm over {cal.steps} steps) -> {out}; "
          f"use it with `stem-live serve --actuator-calibration {out}`", file=sys.stderr)
    return 0
