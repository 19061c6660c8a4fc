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


def available_bytes() -> int | None:
    """Memory available to a new computation (bytes): /proc/meminfo MemAvailable, else the
    physical memory; None where neither is known."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(need_bytes: int, what: str, fix: str, *, available: int | None = None) -> None:
    """UserError before work that cannot fit: ``what`` needs about ``need_bytes``, more than
    the memory available (``available``, default :func:`available_bytes`); ``fix`` says what to change."""
    have = available_bytes() if available is None else available
    if have is not None and need_bytes > have:
        raise UserError(f"{what} needs about {need_bytes / 1e9:.1f} GB of memory, {have / 1e9:.1f} GB is available: "
                        f"{fix}")


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
    p.add_argument("--drift-nm-per-min", type=float, default=None, metavar="NM_PER_MIN",
                   help="constant drift speed in nm/min (default: the simulator's drift model)")
    p.add_argument("--dose", type=positive(float), default=None, metavar="E_PER_A2",
                   help="dose in electrons per square angstrom (default: the preset's, 5e5 for graphene, 1e5 for srtio3 and mos2, 5e4 for particles)")
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
    p.add_argument("--max-step-nm", type=positive(float), default=0.5, metavar="NM",
                   help="safety limit: largest beam move per correction, nm")
    p.add_argument("--max-excursion-nm", type=positive(float), default=10.0, metavar="NM",
                   help="safety limit: largest distance from the starting beam shift, nm")
    p.add_argument("--max-step-per-line-nm", type=positive(float), default=0.02, metavar="NM",
                   help="safety limit: along a correction's trajectory, largest move from one scan line to the next, nm")


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


def engine_config(a: argparse.Namespace, *, live: bool = True):
    """EngineConfig from ``--model``, ``--rvae``, ``--calibration``, ``--mains-hz`` (run, demo,
    replay); ``live`` False: the drift model's hyperparameter fits run inline (reproducible)."""
    from stem_live.engine import EngineConfig

    if a.rvae is not None and a.model != "gp":
        raise UserError("--rvae needs columns: add --model gp")
    if a.calibration is not None and a.model != "gp":
        raise UserError("--calibration is used by the column model: add --model gp")
    strips = bool(getattr(a, "strip_corrections", False) or getattr(a, "strips", 0))
    if strips and a.model != "gp":
        raise UserError("corrections after every strip come from the column model: add --model gp")
    return EngineConfig(model=a.model, strip_corrections=strips, trajectory=strips, rvae_checkpoint="" if a.rvae is None else str(a.rvae),
                        calibration="" if a.calibration is None else str(a.calibration),
                        lattice_prior=not getattr(a, "independent_frames", False),
                        mains_hz=getattr(a, "mains_hz", None), hyperfit_background=live,
                        contrast=getattr(a, "contrast", "bright"))


def contrast_arg(p: argparse.ArgumentParser, default: str = "auto") -> None:
    """``--contrast bright|dark|auto`` (``EngineConfig.contrast``)."""
    p.add_argument("--contrast", choices=("bright", "dark", "auto"), default=default,
                   help="bright columns (HAADF/ADF), dark columns (ABF/BF: every frame is inverted before its columns "
                        "are located), or auto (default): from the frames' detector name where it is a known one "
                        "(HAADF, ADF, ABF, BF, ...), else from the image; said on stderr")


def file_contrast(path: Path, contrast: str, **read_options) -> str:
    """``contrast`` for a recording: "bright" / "dark" as given; "auto": decided from the image of
    its first frame (``locate.contrast.decide_contrast``; a file's detector name is often a default),
    said on stderr. ``read_options``: as ``io.read_frames`` takes them."""
    if contrast != "auto":
        return contrast
    import numpy as np

    from stem_live.io import RecordError, read_frames
    from stem_live.locate.contrast import decide_contrast

    try:
        frame = next(iter(read_frames(path, **read_options)), None)
    except (RecordError, OSError) as exc:
        raise UserError(str(exc).splitlines()[0] if str(exc) else f"cannot read {path}") from None
    if frame is None:
        return "bright"
    try:
        decided, why = decide_contrast(np.asarray(frame.image, np.float32))
    except ValueError as exc:
        decided, why = "bright", f"bright columns assumed ({exc})"
    print(f"--contrast auto: {why}", file=sys.stderr)
    return decided


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
    p.add_argument("--mains-hz", type=_mains, default=None, metavar="auto|0|50|60",
                   help="(with --model gp) the mains frequency of the drift model's periodic term: auto (detected "
                        "from the stream: 50 Hz, 60 Hz or none), 0 (none), or a frequency in Hz (default auto)")
    p.add_argument("--strip-corrections", action="store_true",
                   help="(with --model gp) an instrument that sends strips (partial frames) gets a correction "
                        "with a beam path after every strip, not only after every frame")
    contrast_arg(p)


def _mains(text: str) -> float | None:
    if text.strip().lower() == "auto":
        return None
    try:
        hz = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give auto, 0, 50 or 60") from None
    if not (hz == 0 or 1.0 <= hz <= 1000.0):
        raise argparse.ArgumentTypeError(f"{text}: a mains frequency is 0 (none) or 1-1000 Hz, usually 50 or 60")
    return hz


def frame_timing_args(p: argparse.ArgumentParser) -> None:
    """Frame times for files that have none (``.npy``, plain TIFF, vendor files without a time axis)."""
    p.add_argument("--frame-period-s", type=positive(float), default=None, metavar="S",
                   help="file without frame times: frame start to start (s); default: frames back to back")
    p.add_argument("--frame-gap-us", type=float, default=None, metavar="US",
                   help="file without frame times: the pause after each frame's scan (us); default 0")


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
