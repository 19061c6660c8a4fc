"""The operator's window: live frame, drift trace, distortion, latents, controls (Qt + pyqtgraph).

It runs in its own process and talks to the engine only through the protocol: a SUB socket on
the engine's ``maps`` endpoint and a REQ socket on its ``command`` endpoint. Nothing here is
imported by ``import stem_live``; Qt is imported only when the monitor starts::

    python -m stem_live.monitor --maps tcp://127.0.0.1:5557 --commands tcp://127.0.0.1:5558
"""

from __future__ import annotations

from collections.abc import Sequence

DEFAULT_MAPS = "tcp://127.0.0.1:5557"
DEFAULT_COMMANDS = "tcp://127.0.0.1:5558"


def run_monitor(maps_endpoint: str = DEFAULT_MAPS, commands_endpoint: str = DEFAULT_COMMANDS) -> int:
    """Open the monitor window on these endpoints; return the exit code when it is closed."""
    from stem_live.monitor.app import run_monitor as _run

    return _run(maps_endpoint, commands_endpoint)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m stem_live.monitor [--maps ENDPOINT] [--commands ENDPOINT]``; returns the exit code."""
    from stem_live.monitor.app import main as _main

    return _main(argv)
