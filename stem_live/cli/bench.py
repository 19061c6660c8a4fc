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
    from stem_live.lab.bench import run_bench

    prog = Progress()
    sizes = tuple(a.size) if a.size else ((512,) if a.stage == "overload" else (256, 512, 1024, 2048))
    report = run_bench(a.stage, sizes=sizes, seconds=a.seconds, model=a.model, rvae=not a.no_rvae,
                       rate_hz=a.rate_hz, prerender=a.prerender, progress=prog.line)
    prog.done()
    text = json.dumps(report, indent=1)
    print(text)
    from stem_live.lab.bench import summary_table

    print(summary_table(report), file=sys.stderr)
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
              "startup": bench_startup(size=a.size[0] if a.size else 512, model=a.model, progress=prog.line)}
    prog.done()
    text = json.dumps(report, indent=1)
    print(text)
    print(startup_table(report["startup"]), file=sys.stderr)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


def add_parser(sub) -> None:
    """Add this module's command(s) to the ``stem-live`` subparsers ``sub``."""
    s = sub.add_parser("bench", help="stage and end-to-end timings (JSON)")
    s.add_argument("stage", choices=("protocol", "register", "locate", "track", "gp", "rvae", "pipeline", "overload",
                                     "startup", "all"),
                   help="what to time; startup: cold and warm start of `stem-live replay` to its first processed "
                        "frame (--size, --model; one size, default 512)")
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
    s.add_argument("--json", type=Path, default=None, help="also write the report here")
    s.set_defaults(func=cmd_bench)
