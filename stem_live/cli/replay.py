"""``stem-live replay``: a recording through the engine, losslessly and in order; optional per-frame results.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from stem_live.cli.common import (
    Progress,
    UserError,
    engine_config,
    file_contrast,
    frame_timing_args,
    model_args,
    positive,
    wait_for_interrupt,
)


def cmd_replay(a: argparse.Namespace) -> int:
    from stem_live.live_engine import hold_gc

    release_gc = hold_gc()  # until the first frame (see hold_gc)
    try:
        return _replay(a, release_gc)
    finally:
        release_gc()


def _replay(a: argparse.Namespace, release_gc: Callable[[], None]) -> int:
    from instrument_adapters.base import EndOfStream
    from instrument_adapters.replay import ReplayInstrument
    from stem_live.engine import Engine, FrameRefused
    from stem_live.io import RecordError
    from stem_live.io.metadata import MIN_ANALYSIS_SIDE
    from stem_live.io.replay_loop import ReplayCounts, replay_into

    writer = None
    if a.report is not None and a.results is None:
        raise UserError("--report draws the per-frame results: add --results OUT.npz")
    if a.report is not None and a.report.suffix.lower() != ".png":
        raise UserError(f"--report {a.report}: the figure is a PNG, name it .png")
    if a.results is not None:  # per-frame results need the columns and the GP: --results implies --model gp
        from stem_live.io.results import ResultsWriter

        if a.model == "rigid":
            raise UserError("--results needs the column model (per-line drift, columns): use --model gp "
                            "or leave --model out")
        a.model = "gp"
        try:
            writer = ResultsWriter(a.results, info={"source": str(a.file), "model": "gp", "armed": True,
                                                    "corrections_applied": False})
        except ValueError as exc:
            raise UserError(str(exc)) from None
    a.model = a.model or "rigid"
    try:
        inst = ReplayInstrument(a.file, pixel_size_nm=a.pixel_size_nm, dwell_us=a.dwell_us, flyback_us=a.flyback_us,
                                realtime=a.realtime, min_side=MIN_ANALYSIS_SIDE, frame_interval_s=a.frame_period_s,
                                frame_gap_us=a.frame_gap_us)
    except (RecordError, OSError) as exc:
        raise UserError(str(exc)) from None
    # a recording's detector name is often a default: --contrast auto decides from its first image
    # (the column model locates; the rigid model registers whole frames, either contrast)
    if a.model == "gp":
        a.contrast = file_contrast(a.file, a.contrast, pixel_size_nm=a.pixel_size_nm, dwell_us=a.dwell_us,
                                   flyback_us=a.flyback_us, min_side=MIN_ANALYSIS_SIDE)
    engine = Engine(engine_config(a, live=False))
    if writer is not None:
        engine.arm()  # the corrections it would have sent are recorded; a recording cannot move: none is applied
    prog = Progress()
    stop = threading.Event()
    wait_for_interrupt(stop)
    t0 = time.perf_counter()
    total = len(inst)
    counts = ReplayCounts()

    def on_frame(n: int, frame, r) -> None:
        if isinstance(r, FrameRefused):
            prog.line(f"[{n}/{total}] {r}")
        else:
            what = (f"lost: no significant match (peak {r.peak:.2f} < {engine.config.min_peak:g})" if r.lost else
                    f"flagged: {r.flagged}" if r.flagged else
                    f"drift [{r.drift_nm[0]:+.3f}, {r.drift_nm[1]:+.3f}] nm  peak {r.peak:.2f}")
            prog.line(f"[{n}/{total}] frame {r.seq}  {what}  {n / (time.perf_counter() - t0):.1f} fps")
        release_gc()  # the start is over

    try:
        try:
            counts = replay_into(inst.acquire, engine, writer, end=EndOfStream, stop=stop, on_frame=on_frame)
        except RecordError as exc:
            raise UserError(str(exc)) from None
    finally:
        prog.done()
        if writer is not None:  # also after Ctrl-C or a bad frame: what was processed is kept
            path = writer.close()
            print(f"results of {len(writer)} frames ({writer.n_columns} columns) -> {path}", file=sys.stderr)
            if a.report is not None and len(writer):
                from stem_live.io.figures import replay_figure
                from stem_live.io.results import load_results

                print(f"report -> {replay_figure(load_results(path), a.report)['path']}", file=sys.stderr)
    n = counts.read
    if n and counts.refused == n:
        raise UserError(f"{a.file}: all {n} frames refused ({counts.last_refusal}): give a recording of STEM images")
    extra = "".join(f", {k} {getattr(counts, k)}" for k in ("refused", "lost", "flagged") if getattr(counts, k))
    print(f"replayed {n} frames from {a.file} in {time.perf_counter() - t0:.1f} s{extra}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    """Add this module's command(s) to the ``stem-live`` subparsers ``sub``."""
    s = sub.add_parser("replay", help="play a recorded stack through the engine, losslessly and in order")
    s.add_argument("file", type=Path)
    s.add_argument("--pixel-size-nm", type=positive(float), default=None)
    s.add_argument("--dwell-us", type=positive(float), default=None)
    s.add_argument("--flyback-us", type=float, default=None)
    frame_timing_args(s)
    s.add_argument("--realtime", action="store_true", help="reproduce the recorded frame timing")
    s.add_argument("--results", type=Path, default=None, metavar="OUT.npz",
                   help="write per-frame results (columns raw and undistorted, drift at every scan line with "
                        "sigma, the corrections an armed engine would have sent); implies --model gp")
    s.add_argument("--report", type=Path, default=None, metavar="OUT.png",
                   help="(with --results) a one-page figure: drift with its GP band and the corrections, columns "
                        "per frame, the learnt drift hyperparameters")
    model_args(s)
    s.set_defaults(func=cmd_replay, model=None)
