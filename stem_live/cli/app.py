"""The ``stem-live`` command: the parser and the entry point. Every user error ends in one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from stem_live.cli import bench, calibrate, evaluate, keys, locate, record, replay, run, serve, train
from stem_live.cli.common import UserError

# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stem-live", description="In-line STEM acquisition: drift tracking and correction.")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    for module in (serve, run, replay, record, locate, train, bench, keys, evaluate, calibrate):
        module.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="stem-live: %(levelname)s: %(message)s")
    from instrument_adapters.base import InstrumentError
    from stem_live.security import KeyFileError

    try:
        return args.func(args)
    except (UserError, InstrumentError, KeyFileError, RuntimeError, OSError, ValueError) as exc:
        print(f"stem-live: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
