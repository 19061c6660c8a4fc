"""What every command shares: the one-line user error, the progress line, common options.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

DEFAULTS = {
    "frames": "tcp://127.0.0.1:5555",
    "corrections": "tcp://127.0.0.1:5556",
    "maps": "tcp://127.0.0.1:5557",
    "commands": "tcp://127.0.0.1:5558",
}


class UserError(Exception):
    """An error the user can fix; printed as one line."""


# ----------------------------------------------------------------------------- helpers


class Progress:
    """One live line per event on a terminal (carriage return), one line each otherwise."""

    def __init__(self, stream=sys.stderr) -> None:
        self.stream = stream
        self.tty = stream.isatty()

    def line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K" + text)
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def done(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{text} must be positive")
        return v

    return parse


def sim_args(p: argparse.ArgumentParser) -> None:
    from simulator import PRESETS

    p.add_argument("--preset", choices=PRESETS, default="graphene", help="specimen (default graphene)")
    p.add_argument("--size", type=positive(int), default=512, help="frame side in pixels (default 512)")
    p.add_argument("--drift-nm-per-min", type=float, default=None, help="constant drift speed (nm/min)")
    p.add_argument("--dose", type=positive(float), default=None, help="dose, electrons per square angstrom")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def sim_config(a: argparse.Namespace):
    from dataclasses import replace

    from simulator import MicroscopeConfig

    cfg = MicroscopeConfig(preset=a.preset, size=a.size, seed=a.seed)
    if a.drift_nm_per_min is not None:
        cfg = replace(cfg, drift=replace(cfg.drift, drift_nm_per_min=a.drift_nm_per_min))
    if a.dose is not None:
        cfg = replace(cfg, dose_e_per_A2=a.dose)
    return cfg


def endpoint_args(p: argparse.ArgumentParser, *names: str) -> None:
    for n in names:
        p.add_argument(f"--{n}-endpoint", dest=n, default=DEFAULTS[n], metavar="ENDPOINT",
                       help=f"{n} endpoint (default {DEFAULTS[n]})")


def limits_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-step-nm", type=positive(float), default=0.5, help="largest beam move per correction")
    p.add_argument("--max-excursion-nm", type=positive(float), default=10.0,
                   help="largest distance from the starting beam shift")


def wait_for_interrupt(stop: threading.Event) -> None:
    """Turn SIGINT/SIGTERM into ``stop`` being set."""

    def handler(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


# ----------------------------------------------------------------------------- commands


def server_keys(a: argparse.Namespace):
    from stem_live.security import ServerKeys

    if (a.server_key is None) != (a.allowed_keys is None):
        raise UserError("CURVE needs both --server-key (this side's NAME.key_secret) and --allowed-keys (a folder)")
    return None if a.server_key is None else ServerKeys(str(a.server_key), str(a.allowed_keys))


def client_keys(a: argparse.Namespace):
    from stem_live.security import ClientKeys

    if (a.client_key is None) != (a.server_public_key is None):
        raise UserError("CURVE needs both --client-key (the engine's NAME.key_secret) and --server-public-key")
    return None if a.client_key is None else ClientKeys(str(a.client_key), str(a.server_public_key))


def format_result(r, counters: dict) -> str:
    corr = "" if r.correction is None else f"  -> beam [{r.correction.beam_shift_nm[0]:+.3f}, " \
                                            f"{r.correction.beam_shift_nm[1]:+.3f}]"
    return (f"frame {r.seq:5d}  drift [{r.drift_nm[0]:+.3f}, {r.drift_nm[1]:+.3f}] nm  peak {r.peak:.2f}"
            f"  {counters['fps']:.1f} fps  skipped {counters['skipped']}  rejected {counters['rejected']}{corr}")


def engine_config(a: argparse.Namespace):
    """EngineConfig from ``--model`` and ``--rvae`` (run, demo)."""
    from stem_live.engine import EngineConfig

    if a.rvae is not None and a.model != "gp":
        raise UserError("--rvae needs columns: add --model gp")
    if a.calibration is not None and a.model != "gp":
        raise UserError("--calibration is used by the column model: add --model gp")
    return EngineConfig(model=a.model, rvae_checkpoint="" if a.rvae is None else str(a.rvae),
                        calibration="" if a.calibration is None else str(a.calibration),
                        lattice_prior=not getattr(a, "independent_frames", False))


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", choices=("rigid", "gp"), default="rigid",
                   help="drift model: rigid registration (default), or columns + online GP (needed for the rVAE)")
    p.add_argument("--rvae", type=Path, default=None, metavar="CHECKPOINT",
                   help="encode every column with this rVAE checkpoint (with --model gp); without it the "
                        "monitor's Train rVAE button trains one from scratch")
    p.add_argument("--calibration", type=Path, default=None, metavar="JSON",
                   help="a `stem-live calibrate` result (DIR/calibration.json; with --model gp): the known drift "
                        "velocity and scan distortion, used from the first frame")
    p.add_argument("--independent-frames", action="store_true",
                   help="(with --model gp) locate every frame on its own, not with the lattice of the frames "
                        "before it as the prior (the positions sent on are then each frame's own measurement)")


def has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) and \
        os.environ.get("QT_QPA_PLATFORM") != "offscreen"


def rvae_source_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("source", help="recording/image (.tif, .npy), patch stack (.npy N x H x W, .npz), or a simulator "
                                  "preset name (graphene, srtio3, mos2, particles)")
    s.add_argument("--frames", dest="count", type=positive(int), default=None, help="frames to use")
    s.add_argument("--size", type=positive(int), default=512, help="frame size for a simulator source")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--spacing-px", type=positive(float), default=None, help="column spacing (default: estimated)")
    s.add_argument("--kind", choices=("auto", "patches", "frames", "sim"), default="auto", help="what SOURCE is")
