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
                          progress=lambda i, f: prog.line(f"recorded {i} frames (last seq {f.seq})"), stop=stop,
                          on_wait=lambda s: (prog.tty or round(s) % 10 == 0) and
                          prog.line(f"waiting for frames from {a.frames} ({s:.0f} s)"))
    except (RecordError, OSError) as exc:
        raise UserError(str(exc)) from None
    finally:
        prog.done()
    if n == 0:
        why = f"in {a.timeout:g} s" if a.timeout is not None and not stop.is_set() else "before the stop"
        raise UserError(f"no frame arrived from {a.frames} {why}: nothing recorded ({a.out} not written); is an "
                        f"instrument publishing there (stem-live serve)?")
    print(f"recorded {n} frames to {a.out}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    """Add this module's command(s) to the ``stem-live`` subparsers ``sub``."""
    s = sub.add_parser("record", help="record a frame stream to a TIFF stack")
    s.add_argument("out", type=Path, help="output .tif")
    endpoint_args(s, "frames")
    s.add_argument("--frames", dest="count", type=positive(int), default=None, help="stop after N frames")
    s.add_argument("--timeout", type=positive(float), default=None, metavar="S",
                   help="stop when no frame arrived for this many seconds (default: wait until Ctrl-C)")
    s.set_defaults(func=cmd_record)
