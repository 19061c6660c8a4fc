"""Entry points: ``main(argv)`` (``python -m stem_live.monitor``) and ``run_monitor(maps, commands)``."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence

from stem_live.monitor import DEFAULT_COMMANDS, DEFAULT_MAPS


def apply_dark_theme(app) -> None:
    """Fusion style with a dark palette (the plots are dark too)."""
    from qtpy.QtGui import QColor, QPalette

    app.setStyle("Fusion")
    pal = QPalette()
    colours = {
        QPalette.Window: "#1b2026", QPalette.WindowText: "#d0d7de", QPalette.Base: "#12161b",
        QPalette.AlternateBase: "#1f252c", QPalette.ToolTipBase: "#2a3138", QPalette.ToolTipText: "#e6edf3",
        QPalette.Text: "#d0d7de", QPalette.Button: "#262d35", QPalette.ButtonText: "#d0d7de",
        QPalette.BrightText: "#ff5252", QPalette.Highlight: "#2f81f7", QPalette.HighlightedText: "#ffffff",
        QPalette.Link: "#58a6ff", QPalette.PlaceholderText: "#6e7781",
    }
    for role, c in colours.items():
        pal.setColor(role, QColor(c))
    for role in (QPalette.WindowText, QPalette.Text, QPalette.ButtonText):
        pal.setColor(QPalette.Disabled, role, QColor("#6e7781"))
    app.setPalette(pal)
    app.setStyleSheet("QGroupBox { font-weight: bold; border: 1px solid #30363d; border-radius: 4px; "
                      "margin-top: 8px; padding-top: 6px; } "
                      "QGroupBox::title { subcontrol-origin: margin; left: 8px; padding: 0 3px; } "
                      "QStatusBar { border-top: 1px solid #30363d; }")


def make_app(argv: Sequence[str] | None = None):
    """The QApplication (created once), themed."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    if app is None:
        app = QApplication([sys.argv[0] if sys.argv else "stem-live-monitor", *(argv or [])])
        app.setApplicationName("stem-live monitor")
    apply_dark_theme(app)
    return app


def run_monitor(maps_endpoint: str = DEFAULT_MAPS, commands_endpoint: str = DEFAULT_COMMANDS) -> int:
    """Show the window until it is closed (or Ctrl-C); return the exit code. Never stops the engine."""
    from qtpy.QtWidgets import QApplication

    if QApplication.instance() is None and sys.platform.startswith("linux") and not (
            os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY") or os.environ.get("QT_QPA_PLATFORM")):
        print("stem-live monitor: error: no display found (set DISPLAY, or QT_QPA_PLATFORM=offscreen to run "
              "without one)", file=sys.stderr)
        return 2
    import zmq
    from qtpy.QtCore import QTimer

    app = make_app()
    from stem_live.monitor.window import MonitorWindow

    try:
        win = MonitorWindow(maps_endpoint, commands_endpoint)
    except zmq.ZMQError as exc:
        print(f"stem-live monitor: error: cannot connect to {maps_endpoint} / {commands_endpoint}: {exc} "
              "(give endpoints like tcp://127.0.0.1:5557)", file=sys.stderr)
        return 2
    win.resize(1400, 900)
    win.show()
    # let Python see Ctrl-C while Qt's loop runs
    try:
        previous = signal.signal(signal.SIGINT, lambda *_: win.close())
    except ValueError:  # not the main thread: no Ctrl-C handling
        previous = None
    keepalive = QTimer()
    keepalive.timeout.connect(lambda: None)
    keepalive.start(200)
    try:
        return int(app.exec())
    finally:
        keepalive.stop()
        if previous is not None:
            signal.signal(signal.SIGINT, previous)
        win.shutdown()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m stem_live.monitor",
                                description="The stem-live operator's window: live frame, drift, distortion, latents, "
                                            "controls. Closing it never stops acquisition.")
    p.add_argument("--maps", "--maps-endpoint", dest="maps", metavar="ENDPOINT", default=DEFAULT_MAPS, help=f"engine maps endpoint (default {DEFAULT_MAPS})")
    p.add_argument("--commands", "--commands-endpoint", dest="commands", metavar="ENDPOINT", default=DEFAULT_COMMANDS, help=f"engine commands endpoint (default {DEFAULT_COMMANDS})")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import pyqtgraph  # noqa: F401
        from qtpy import QtCore  # noqa: F401  (raises if no Qt binding is installed)
    except ImportError as exc:
        print(f"stem-live monitor: error: the monitor needs Qt: {exc} (pip install 'stem-live[gui]')", file=sys.stderr)
        return 2
    return run_monitor(args.maps, args.commands)
