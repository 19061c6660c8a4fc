"""``stem-live keys``: a CURVE key pair for endpoints beyond loopback.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def cmd_keys(a: argparse.Namespace) -> int:
    from stem_live.security import make_keys

    public, secret = make_keys(a.folder, a.name)
    print(f"public key {public} (give it to the other side)\nsecret key {secret} (keep it; mode 600)")
    return 0


def add_parser(sub) -> None:
    """Add this module's command(s) to the ``stem-live`` subparsers ``sub``."""
    s = sub.add_parser("keys", help="make a CURVE key pair for endpoints beyond loopback")
    s.add_argument("folder", type=Path)
    s.add_argument("--name", default="stem-live", help="file name stem (default stem-live)")
    s.set_defaults(func=cmd_keys)
