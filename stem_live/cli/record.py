"""``stem-live record``: a live frame stream to a TIFF stack.
"""

from __future__ import annotations

import argparse
import sys
import threading
from pathlib import Path

from stem_live.cli.common import Progress, UserError, endpoint_args, positive, wait_for_interrupt


def cmd_record(a: argparse.Namespace) -> int:
    from stem_live.io import RecordError
    from stem_live.recorder import record_stream

    prog = Progress()
    stop = threading.Event()
    wait_for_interrupt(stop)
    try:
        n = record_stream(a.frames, Path(a.out), frames=a.count, timeout_s=a.timeout,
                          progress=lambda i, f: prog.line(f"recorded {i} frames (last seq {f.seq})"), stop=stop)
    except (RecordError, OSError) as exc:
        raise UserError(str(exc)) from None
    finally:
        prog.done()
    print(f"recorded {n} frames to {a.out}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    """Add this module's command(s) to the ``stem-live`` subparsers ``sub``."""
    s = sub.add_parser("record", help="record a frame stream to a TIFF stack")
    s.add_argument("out", type=Path, help="output .tif")
    endpoint_args(s, "frames")
    s.add_argument("--frames", dest="count", type=positive(int), default=None, help="stop after N frames")
    s.add_argument("--timeout", type=positive(float), default=None, help="stop after this many seconds")
    s.set_defaults(func=cmd_record)
