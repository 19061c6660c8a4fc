"""``stem-live bench``: stage and end-to-end timings (JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stem_live.cli.common import Progress, UserError, positive


def cmd_bench(a: argparse.Namespace) -> int:
    if a.stage == "startup":
        return _startup(a)
    if a.stage == "batch":
        return _batch(a)
    if a.stage == "strips":
        return _strips(a)
    from stem_live.lab.bench import run_bench

    prog = Progress()
    sizes = tuple(a.size) if a.size else ((512,) if a.stage == "overload" else (256, 512, 1024, 2048))
    report = run_bench(a.stage, sizes=sizes, seconds=a.seconds, model=a.model, rvae=not a.no_rvae,
                       rate_hz=a.rate_hz, prerender=a.prerender, progress=prog.line)
    prog.done()
    from stem_live.lab.bench import summary_table

    return _emit(a, report, summary_table(report))


def _emit(a: argparse.Namespace, report: dict, table: str) -> int:
    """The report as JSON on stdout (and in ``--json``), its table on stderr."""
    text = json.dumps(report, indent=1)
    print(text)
    print(table, file=sys.stderr)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


def _startup(a: argparse.Namespace) -> int:
    """``bench startup``: cold and warm start to the first processed frame (its own processes)."""
    from stem_live.lab.bench import machine
    from stem_live.lab.bench_startup import bench_startup, startup_table

    prog = Progress()
    if a.size and len(a.size) > 1:
        raise UserError("bench startup takes one --size")
    report = {"machine": machine(), "stage": "startup",
              "startup": bench_startup(size=a.size[0] if a.size else 512, model=a.model, warm_runs=a.warm_runs,
                                       progress=prog.line)}
    prog.done()
    return _emit(a, report, startup_table(report["startup"]))


def _strips(a: argparse.Namespace) -> int:
    """``bench strips``: the engine's time from a strip's arrival to its correction."""
    from stem_live.lab.bench import machine
    from stem_live.lab.bench_strips import bench_strips, strips_table

    if a.size and len(a.size) > 1:
        raise UserError("bench strips takes one --size")
    prog = Progress()
    report = {"machine": machine(), "stage": "strips",
              "strips": bench_strips(size=a.size[0] if a.size else 512, lines=a.lines, frames=a.frames_strips,
                                     progress=prog.line)}
    prog.done()
    return _emit(a, report, strips_table(report["strips"]))


def _batch(a: argparse.Namespace) -> int:
    """``bench batch``: files/min of ``stem-live batch`` with 1 and 2 workers, pinned and not."""
    from stem_live.lab.bench import machine
    from stem_live.lab.bench_batch import batch_table, bench_batch

    try:
        import distributed  # noqa: F401
    except ImportError:
        raise UserError("bench batch needs dask.distributed: pip install 'stem-live[batch]'") from None
    if a.size and len(a.size) > 1:
        raise UserError("bench batch takes one --size")
    if not getattr(a, "verbose", False):
        from stem_live.cli.batch import quiet_dask

        quiet_dask()
    prog = Progress()
    report = {"machine": machine(), "stage": "batch",
              "batch": bench_batch(files=a.files, size=a.size[0] if a.size else 192, frames=a.frames,
                                   progress=prog.line)}
    prog.done()
    return _emit(a, report, batch_table(report["batch"]))


def add_parser(sub) -> None:
    """Add this module's command(s) to the ``stem-live`` subparsers ``sub``."""
    s = sub.add_parser("bench", help="stage and end-to-end timings (JSON)")
    s.add_argument("stage", choices=("protocol", "register", "locate", "track", "gp", "rvae", "pipeline", "overload",
                                     "startup", "batch", "strips", "all"),
                   help="what to time; startup: cold and warm start of `stem-live replay` to its first processed "
                        "frame (--size, --model, --warm-runs; one size, default 512); batch: files/min of `stem-live batch` "
                        "with 1 and 2 workers, pinned to one core each and not (--files, --frames, --size); strips: "
                        "a strip's arrival to its correction in the strip loop (--size, --lines)")
    s.add_argument("--size", type=positive(int), nargs="+", default=None, help="frame sizes (default 256..2048)")
    s.add_argument("--seconds", type=positive(float), default=10.0,
                   metavar="S",
                   help="duration of pipeline/overload runs in seconds (1800: the 30-minute flatness run)")
    s.add_argument("--model", choices=("rigid", "gp"), default="gp", help="pipeline: engine model (default gp)")
    s.add_argument("--no-rvae", action="store_true", help="pipeline: leave the rVAE stage out")
    s.add_argument("--rate-hz", type=positive(float), default=None,
                   help="pipeline: offered frame rate (default 1.25 x the target: 25/12.5/3.75/1.25 Hz at 256/512/1024/2048 px)")
    s.add_argument("--prerender", type=int, default=60, metavar="N",
                   help="pipeline: frames the simulator renders before streaming them (0: render live)")
    s.add_argument("--warm-runs", type=positive(int), default=3, metavar="N",
                   help="startup: warm starts timed (the median is reported, with the spread)")
    s.add_argument("--files", type=positive(int), default=6, help="batch: simulated recordings (default 6)")
    s.add_argument("--frames", type=positive(int), default=8, help="batch: frames per recording (default 8)")
    s.add_argument("--lines", type=positive(int), default=64, help="strips: lines a strip (default 64)")
    s.add_argument("--strip-frames", dest="frames_strips", type=positive(int), default=20,
                   help="strips: frames scanned, the first 4 not timed (default 20)")
    s.add_argument("--json", type=Path, default=None, help="also write the report here")
    s.set_defaults(func=cmd_bench)
