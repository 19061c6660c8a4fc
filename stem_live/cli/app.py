"""The ``stem-live`` command: the parser and the entry point. Every user error ends in one line on
stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from typing import NoReturn

from stem_live.cli import batch, bench, calibrate, evaluate, keys, locate, record, replay, run, serve, train
from stem_live.cli.common import UserError

# ----------------------------------------------------------------------------- parser


class DefaultsFormatter(argparse.HelpFormatter):
    """``--help`` with every option's default: " (default: X)" where the help text names none
    (flags and options without a default say nothing more)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text or default is None or default is argparse.SUPPRESS or isinstance(default, bool)
                or not action.option_strings):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, ``stem-live COMMAND: error: ...`` (exit status 2),
    and whose ``--help`` shows the defaults. Subparsers are of this class too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", DefaultsFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        text = " ".join(message.split())
        self.exit(2, f"{self.prog}: error: {text} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="stem-live", description="In-line STEM acquisition: drift tracking and correction.")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)

    for module in (serve, run, replay, batch, record, locate, train, bench, keys, evaluate, calibrate):
        module.add_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="stem-live: %(levelname)s: %(message)s")
    from stem_live.jax_cache import enable

    enable()  # what an earlier start compiled is loaded, not compiled again ($STEM_LIVE_JAX_CACHE=off: none)
    from instrument_adapters.base import InstrumentError
    from stem_live.security import KeyFileError

    try:
        return args.func(args)
    except (UserError, InstrumentError, KeyFileError, RuntimeError, OSError, ValueError) as exc:
        print(f"stem-live: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
