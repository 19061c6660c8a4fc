"""The ``stem-live`` command, one module per command (or small group of commands)."""

from stem_live.cli.app import build_parser, main

__all__ = ["build_parser", "main"]
