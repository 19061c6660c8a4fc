"""Screenshot of the monitor on a live simulated acquisition -> docs/monitor.png.

Starts the simulator bridge and the engine service in this process (threads, free loopback ports),
opens the monitor offscreen, arms the correction from the window, waits for ~40 frames and saves
the window. Usage::

    QT_QPA_PLATFORM=offscreen python scripts/screenshot_monitor.py [--out docs/monitor.png]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "monitor.png")
    p.add_argument("--frames", type=int, default=40, help="frames to wait for after arming")
    p.add_argument("--size", type=int, default=256, help="frame side (px)")
    p.add_argument("--width", type=int, default=1400)
    p.add_argument("--height", type=int, default=900)
    a = p.parse_args(argv)

    import zmq
    from qtpy.QtCore import QCoreApplication, Qt
    from qtpy.QtTest import QTest

    from instrument_adapters.bridge import Bridge
    from instrument_adapters.simulated import SimulatedInstrument
    from simulator import DriftConfig, MicroscopeConfig
    from stem_live.engine import Engine
    from stem_live.monitor.app import make_app
    from stem_live.monitor.window import MonitorWindow
    from stem_live.service import EngineService

    app = make_app()  # noqa: F841 - the QApplication must outlive the window
    any_ = "tcp://127.0.0.1:*"
    ctx = zmq.Context()
    cfg = MicroscopeConfig(preset="graphene", size=a.size, seed=7, drift=DriftConfig(drift_nm_per_min=30.0))
    inst = SimulatedInstrument(cfg, speed=2.0)
    bridge = Bridge(inst, frames_endpoint=any_, corrections_endpoint=any_, context=ctx)
    svc = EngineService(Engine(), frames_endpoint=bridge.frames_endpoint, corrections_endpoint=bridge.corrections_endpoint,
                        maps_endpoint=any_, commands_endpoint=any_, context=ctx)
    win = MonitorWindow(svc.maps_endpoint, svc.commands_endpoint, context=ctx)
    win.resize(a.width, a.height)
    win.show()

    def pump(seconds: float, until=lambda: False) -> bool:
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            QCoreApplication.processEvents()
            if until():
                return True
            time.sleep(0.01)
        return until()

    try:
        svc.start()
        pump(0.3)
        bridge.start()
        if not pump(30, lambda: win.maps_seen >= 5):
            print("no maps from the engine", file=sys.stderr)
            return 1
        QTest.mouseClick(win.controls.arm_button, Qt.LeftButton)
        pump(5, lambda: svc.engine.armed)
        start = svc.counters.processed
        pump(120, lambda: svc.counters.processed >= start + a.frames and win.drift_panel.__len__() >= a.frames // 2)
        QTest.mouseClick(win.controls.status_button, Qt.LeftButton)
        pump(1.0)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        if not win.grab().save(str(a.out)):
            print(f"could not write {a.out}", file=sys.stderr)
            return 1
        print(f"wrote {a.out} ({svc.counters.processed} frames processed, {win.maps_seen} maps shown)")
        return 0
    finally:
        win.close()
        bridge.stop(restore=True)
        svc.stop()
        ctx.term()


if __name__ == "__main__":
    sys.exit(main())
