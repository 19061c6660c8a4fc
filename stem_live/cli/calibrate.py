"""``stem-live calibrate``: a drift-calibration session -> report folder.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from stem_live.cli.common import Progress, UserError, contrast_arg, file_contrast, frame_timing_args, positive


def cmd_calibrate(a: argparse.Namespace) -> int:
    """A calibration session on a known lattice -> report folder (calibration.json + figures);
    with ``--actuator``, the beam-shift actuator of an instrument -> a JSON file."""
    if a.actuator:
        from stem_live.cli.calibrate_actuator import cmd_actuator

        return cmd_actuator(a)
    from stem_live.calibration import calibrate_frames
    from stem_live.io import RecordError, count_frames, read_frames
    from stem_live.io.report import write_report
    from stem_live.lab.calibration import SIM_SCALE_ERROR, SIM_SHEAR, calibrate_simulator
    from stem_live.lattices import LATTICES, lattice_by_name, parse_lattice_vectors

    if (a.file is None) == (a.preset is None):
        raise UserError("give a recorded stack FILE or --preset NAME (the simulator), not " +
                        ("both" if a.file is not None else "neither"))
    if a.lattice is not None and a.lattice_vectors is not None:
        raise UserError("give the lattice once: --lattice NAME or --lattice-vectors AY,AX,BY,BX")
    if a.refit_steps < 0:
        raise UserError(f"--refit-steps must be >= 0, got {a.refit_steps}")
    if a.file is not None and (a.scale_error is not None or a.shear is not None or a.drift_nm_per_min is not None):
        raise UserError("--scale-error, --shear and --drift-nm-per-min plant a distortion on the simulator: "
                        "use them with --preset")
    if a.preset is not None and a.contrast == "dark":
        raise UserError("the simulator's calibration session is HAADF (bright columns): --contrast dark is for a "
                        "recorded FILE of a BF/ABF series")
    try:
        lattice = (parse_lattice_vectors(a.lattice_vectors) if a.lattice_vectors is not None else
                   lattice_by_name(a.lattice) if a.lattice is not None else None)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    prog = Progress()
    t0 = time.perf_counter()

    def progress(label: str, i: int, n: int) -> None:
        prog.line(f"calibrate: {label} {i}/{n}  ({time.perf_counter() - t0:.0f} s)")

    try:
        if a.preset is not None:
            run = calibrate_simulator(a.preset, a.count or 60, seed=a.seed, size=a.size,
                                      scale_error=tuple(a.scale_error or SIM_SCALE_ERROR),
                                      shear=SIM_SHEAR if a.shear is None else a.shear,
                                      drift_nm_per_min=a.drift_nm_per_min, lattice=lattice,
                                      refit_steps=a.refit_steps, max_samples=a.max_samples, progress=progress)
        else:
            if lattice is None:
                raise UserError(f"{a.file}: say which lattice it shows: --lattice NAME ({', '.join(LATTICES)}) "
                                f"or --lattice-vectors AY,AX,BY,BX (nm)")
            if not a.file.exists():
                raise UserError(f"{a.file} does not exist")
            try:
                total = count_frames(a.file)
                read = dict(pixel_size_nm=a.pixel_size_nm, dwell_us=a.dwell_us, flyback_us=a.flyback_us,
                            frame_interval_s=a.frame_period_s, frame_gap_us=a.frame_gap_us)
                frames = _bright_frames(read_frames(a.file, **read), file_contrast(a.file, a.contrast, **read))
                run = calibrate_frames(frames, lattice, max_frames=a.count, total=min(total, a.count or total),
                                       source=str(a.file), refit_steps=a.refit_steps,
                                       max_samples=a.max_samples, progress=progress)
            except (RecordError, OSError) as exc:
                raise UserError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        paths = write_report(run, a.out)
    finally:
        prog.done()
    print(json.dumps(run.calibration.summary(), indent=1))
    print(f"calibration of {run.calibration.meta['frames']} frames in {time.perf_counter() - t0:.1f} s -> "
          f"{', '.join(str(p) for p in paths)}; use it with `stem-live run --model gp --calibration "
          f"{paths[0]}`", file=sys.stderr)
    return 0


def _bright_frames(frames, contrast: str):
    """``frames`` with bright columns: each image inverted (``locate.contrast.as_bright``) for "dark"."""
    if contrast != "dark":
        yield from frames
        return
    from dataclasses import replace

    from stem_live.locate.contrast import as_bright

    for f in frames:
        yield replace(f, image=as_bright(f.image, "dark"))


def add_parser(sub) -> None:
    """Add this module's command(s) to the ``stem-live`` subparsers ``sub``."""
    s = sub.add_parser("calibrate", help="drift-calibration session on a known lattice (simulator or a recorded "
                                         "stack): report folder (JSON + figures) for `run --calibration`")
    s.add_argument("file", type=Path, nargs="?", default=None,
                   help="recorded stack (.tif, .npy, vendor file) of a known lattice; or use --preset")
    s.add_argument("--preset", choices=("graphene", "srtio3", "mos2"), default=None,
                   help="calibrate on the simulator with this specimen (a planted scan distortion, seeded)")
    s.add_argument("--frames", dest="count", type=positive(int), default=None,
                   help="frames to use (default: 60 on the simulator, all of a file)")
    s.add_argument("--size", type=positive(int), default=512, help="simulator frame side in pixels (default 512)")
    s.add_argument("--seed", type=int, default=0, help="simulator seed (default 0)")
    s.add_argument("--drift-nm-per-min", type=float, default=None, help="simulator drift speed (default 1 nm/min)")
    s.add_argument("--scale-error", type=float, nargs=2, default=None, metavar=("SY", "SX"),
                   help="simulator: planted fractional scan-step errors (default 0.01 -0.015)")
    s.add_argument("--shear", type=float, default=None, help="simulator: planted shear, x per y (default 0.02)")
    s.add_argument("--lattice", default=None, help="the lattice by name: graphene, srtio3, mos2 (default: the preset)")
    s.add_argument("--lattice-vectors", default=None, metavar="AY,AX,BY,BX",
                   help="the column lattice as two vectors in nm, image axes (y down, x right)")
    s.add_argument("--pixel-size-nm", type=positive(float), default=None, help="file: pixel size if it has none")
    s.add_argument("--dwell-us", type=positive(float), default=None, help="file: pixel dwell if it has none")
    s.add_argument("--flyback-us", type=float, default=None, help="file: line flyback if it has none")
    frame_timing_args(s)
    contrast_arg(s)
    s.add_argument("--refit-steps", type=int, default=60,
                   help="optimiser steps of the GP hyperparameter fit (0: keep the defaults; faster)")
    s.add_argument("--max-samples", type=positive(int), default=24000,
                   help="column samples the session GP is conditioned on (thinned evenly above; default 24000)")
    s.add_argument("--out", type=Path, required=True,
                   help="report folder to write (created); with --actuator: the JSON file (or DIR/actuator.json)")
    from stem_live.cli.calibrate_actuator import add_args as actuator_args

    actuator_args(s)
    s.set_defaults(func=cmd_calibrate)
