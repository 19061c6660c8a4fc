"""The ``stem-live`` command. Every user error ends in one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Sequence

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


def _positive(kind: Callable[[str], float]) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"{text} must be positive")
        return v

    return parse


def _sim_args(p: argparse.ArgumentParser) -> None:
    from simulator import PRESETS

    p.add_argument("--preset", choices=PRESETS, default="graphene", help="specimen (default graphene)")
    p.add_argument("--size", type=_positive(int), default=512, help="frame side in pixels (default 512)")
    p.add_argument("--drift-nm-per-min", type=float, default=None, help="constant drift speed (nm/min)")
    p.add_argument("--dose", type=_positive(float), default=None, help="dose, electrons per square angstrom")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")


def _sim_config(a: argparse.Namespace):
    from dataclasses import replace

    from simulator import MicroscopeConfig

    cfg = MicroscopeConfig(preset=a.preset, size=a.size, seed=a.seed)
    if a.drift_nm_per_min is not None:
        cfg = replace(cfg, drift=replace(cfg.drift, drift_nm_per_min=a.drift_nm_per_min))
    if a.dose is not None:
        cfg = replace(cfg, dose_e_per_A2=a.dose)
    return cfg


def _endpoint_args(p: argparse.ArgumentParser, *names: str) -> None:
    for n in names:
        p.add_argument(f"--{n}-endpoint", dest=n, default=DEFAULTS[n], metavar="ENDPOINT",
                       help=f"{n} endpoint (default {DEFAULTS[n]})")


def _limits_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-step-nm", type=_positive(float), default=0.5, help="largest beam move per correction")
    p.add_argument("--max-excursion-nm", type=_positive(float), default=10.0,
                   help="largest distance from the starting beam shift")


def _wait_for_interrupt(stop: threading.Event) -> None:
    """Turn SIGINT/SIGTERM into ``stop`` being set."""

    def handler(signum: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


# ----------------------------------------------------------------------------- commands


def _server_keys(a: argparse.Namespace):
    from .protocol import ServerKeys

    if (a.server_key is None) != (a.allowed_keys is None):
        raise UserError("CURVE needs both --server-key (this side's NAME.key_secret) and --allowed-keys (a folder)")
    return None if a.server_key is None else ServerKeys(str(a.server_key), str(a.allowed_keys))


def _client_keys(a: argparse.Namespace):
    from .protocol import ClientKeys

    if (a.client_key is None) != (a.server_public_key is None):
        raise UserError("CURVE needs both --client-key (the engine's NAME.key_secret) and --server-public-key")
    return None if a.client_key is None else ClientKeys(str(a.client_key), str(a.server_public_key))


def cmd_keys(a: argparse.Namespace) -> int:
    from .protocol import make_keys

    public, secret = make_keys(a.folder, a.name)
    print(f"public key {public} (give it to the other side)\nsecret key {secret} (keep it; mode 600)")
    return 0


def cmd_sim(a: argparse.Namespace) -> int:
    from instrument_adapters.bridge import Bridge
    from instrument_adapters.safety import Limits
    from instrument_adapters.simulated import SimulatedInstrument

    if a.prerender < 0:
        raise UserError(f"--prerender must be >= 0, got {a.prerender}")
    inst = SimulatedInstrument(_sim_config(a), speed=a.speed or None, frames=a.count, prerender=a.prerender)
    bridge = Bridge(inst, frames_endpoint=a.frames, corrections_endpoint=a.corrections, keys=_server_keys(a),
                    limits=Limits(max_step_nm=a.max_step_nm, max_excursion_nm=a.max_excursion_nm))
    stop = threading.Event()
    _wait_for_interrupt(stop)
    prog = Progress()
    bridge.start()
    print(f"simulated microscope: frames on {bridge.frames_endpoint}, corrections on {bridge.corrections_endpoint}"
          " (Ctrl-C stops)", file=sys.stderr)
    try:
        while not stop.is_set() and not bridge.finished:
            s = bridge.stats
            b = inst.get_beam_shift()
            prog.line(f"published {s.frames_published}  dropped {s.frames_dropped}  corrections {s.corrections_applied}"
                      f" (clamped {s.corrections_clamped}, refused {s.corrections_refused})  "
                      f"beam shift [{b[0]:+.3f}, {b[1]:+.3f}] nm")
            stop.wait(0.5)
    finally:
        bridge.stop(restore=a.restore_on_exit)
        prog.done()
    return 0


ADAPTERS = {"sim": "simulated", "replay": "replay", "nion": "nion", "autoscript": "autoscript"}


def _adapter(name: str):
    """The adapter module for ``--instrument NAME``: it provides add_args(parser) and from_args(args)."""
    import importlib

    return importlib.import_module(f"instrument_adapters.{ADAPTERS[name]}")


def cmd_serve(a: argparse.Namespace) -> int:
    from instrument_adapters.bridge import Bridge
    from instrument_adapters.safety import Limits

    from .record import RecordError

    try:
        inst = _adapter(a.instrument).from_args(a)
    except RecordError as exc:  # replay of a bad file
        raise UserError(str(exc)) from None
    try:
        bridge = Bridge(inst, frames_endpoint=a.frames, corrections_endpoint=a.corrections, keys=_server_keys(a),
                        limits=Limits(max_step_nm=a.max_step_nm, max_excursion_nm=a.max_excursion_nm))
    except BaseException:
        inst.close()
        raise
    stop = threading.Event()
    _wait_for_interrupt(stop)
    prog = Progress()
    bridge.start()
    print(f"{a.instrument}: frames on {bridge.frames_endpoint}, corrections on {bridge.corrections_endpoint}"
          " (Ctrl-C stops)", file=sys.stderr)
    try:
        while not stop.is_set() and not bridge.finished:
            s = bridge.stats
            b = inst.get_beam_shift()
            err = f"  last error: {s.last_error}" if s.acquire_errors else ""
            prog.line(f"published {s.frames_published}  dropped {s.frames_dropped}  corrections {s.corrections_applied}"
                      f" (clamped {s.corrections_clamped}, refused {s.corrections_refused})  "
                      f"beam shift [{b[0]:+.3f}, {b[1]:+.3f}] nm{err}")
            stop.wait(0.5)
    finally:
        bridge.stop(restore=a.restore_on_exit)
        inst.close()
        prog.done()
    return 0


def _format_result(r, counters: dict) -> str:
    corr = "" if r.correction is None else f"  -> beam [{r.correction.beam_shift_nm[0]:+.3f}, " \
                                            f"{r.correction.beam_shift_nm[1]:+.3f}]"
    return (f"frame {r.seq:5d}  drift [{r.drift_nm[0]:+.3f}, {r.drift_nm[1]:+.3f}] nm  peak {r.peak:.2f}"
            f"  {counters['fps']:.1f} fps  skipped {counters['skipped']}  rejected {counters['rejected']}{corr}")


def _engine_config(a: argparse.Namespace):
    """EngineConfig from ``--model`` and ``--rvae`` (run, demo)."""
    from .engine import EngineConfig

    if a.rvae is not None and a.model != "gp":
        raise UserError("--rvae needs columns: add --model gp")
    if a.calibration is not None and a.model != "gp":
        raise UserError("--calibration is used by the column model: add --model gp")
    return EngineConfig(model=a.model, rvae_checkpoint="" if a.rvae is None else str(a.rvae),
                        calibration="" if a.calibration is None else str(a.calibration),
                        lattice_prior=not getattr(a, "independent_frames", False))


def _model_args(p: argparse.ArgumentParser) -> None:
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


def cmd_run(a: argparse.Namespace) -> int:
    from .engine import Engine
    from .service import EngineService

    engine = Engine(_engine_config(a))
    if a.arm:
        engine.arm()
    prog = Progress()
    done = threading.Event()
    stop = threading.Event()
    _wait_for_interrupt(stop)

    def on_result(frame, result) -> None:
        prog.line(_format_result(result, svc.counters.as_dict()))
        if a.count and svc.counters.processed + 1 >= a.count:
            done.set()

    svc = EngineService(engine, frames_endpoint=a.frames, corrections_endpoint=a.corrections,
                        maps_endpoint=a.maps, commands_endpoint=a.commands, on_result=on_result, keys=_client_keys(a))
    svc.start()
    print(f"engine: frames from {a.frames}, corrections to {a.corrections}, maps on {svc.maps_endpoint}, "
          f"commands on {svc.commands_endpoint} ({'armed' if a.arm else 'disarmed'}; Ctrl-C stops)", file=sys.stderr)
    try:
        while not stop.is_set() and not done.is_set():
            stop.wait(0.2)
    finally:
        if a.restore_on_exit:  # while the receiver still tracks the newest frame (corrections must be fresh)
            ok = svc.restore_beam()
            print("starting beam shift restored" if ok else
                  "stem-live: error: could not restore the starting beam shift (instrument unreachable?)",
                  file=sys.stderr)
        svc.stop()
        prog.done()
        print(json.dumps(svc.counters.as_dict()), file=sys.stderr)
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    """Simulator + engine (+ monitor when a display exists), on loopback, in one process."""
    import numpy as np

    from instrument_adapters.bridge import Bridge
    from instrument_adapters.simulated import SimulatedInstrument

    from .engine import Engine
    from .service import EngineService

    inst = SimulatedInstrument(_sim_config(a), speed=a.speed or None, frames=a.count)
    bridge = Bridge(inst, frames_endpoint="tcp://127.0.0.1:*", corrections_endpoint="tcp://127.0.0.1:*",
                    wait_for_subscriber=True)
    engine = Engine(_engine_config(a))
    if engine.config.model == "gp":  # compile on simulated frames of this size first: no stalled first frame
        from dataclasses import replace

        print(f"demo: compiling the gp model for {a.size} px frames ...", file=sys.stderr, flush=True)
        warm = SimulatedInstrument(replace(_sim_config(a), seed=a.seed + 1), speed=None, frames=3)
        print(f"demo: compiled in {engine.warm_up([warm.acquire() for _ in range(3)]):.1f} s", file=sys.stderr)
    engine.arm()
    prog = Progress(sys.stdout)
    stop = threading.Event()
    _wait_for_interrupt(stop)
    state: dict = {"first": None, "res": []}

    def on_result(frame, result) -> None:
        truth = inst.truth_for(frame.seq)
        extra = ""
        if truth is not None:
            app = np.mean(np.asarray(truth.drift_nm) - np.asarray(truth.beam_shift_nm), axis=0)
            state["first"] = app if state["first"] is None else state["first"]
            res = float(np.hypot(*(app - state["first"])))
            state["res"].append(res)
            extra = f"  true image motion {res * 1e3:6.1f} pm"
        prog.line(_format_result(result, svc.counters.as_dict()) + extra)

    svc = EngineService(engine, frames_endpoint=bridge.frames_endpoint, corrections_endpoint=bridge.corrections_endpoint,
                        maps_endpoint=a.maps, commands_endpoint=a.commands, on_result=on_result)
    svc.start()
    bridge.start()
    monitor = None
    if _has_display() and not a.no_monitor:
        import subprocess

        monitor = subprocess.Popen([sys.executable, "-m", "stem_live.monitor", "--maps", svc.maps_endpoint,
                                    "--commands", svc.commands_endpoint])
    print(f"demo: simulated {a.preset} {a.size}x{a.size}, engine armed; maps on {svc.maps_endpoint}, commands on "
          f"{svc.commands_endpoint}; {'monitor opened' if monitor else 'headless'} (Ctrl-C stops)", file=sys.stderr)
    try:
        while not stop.is_set():
            c = svc.counters
            if bridge.finished and c.processed + c.skipped >= bridge.stats.frames_published:
                break
            stop.wait(0.05)
    finally:
        bridge.stop(restore=True)
        time.sleep(0.1)
        svc.stop()
        prog.done()
        if monitor is not None:
            monitor.terminate()
    r = np.array(state["res"]) if state["res"] else np.array([np.nan])
    c = svc.counters.as_dict()
    print(f"summary: {c['processed']} frames processed, {c['skipped']} skipped, {c['rejected']} rejected, "
          f"{c['corrections_sent']} corrections sent; true image motion RMS {np.sqrt(np.nanmean(r**2)) * 1e3:.1f} pm, "
          f"max {np.nanmax(r) * 1e3:.1f} pm; beam shift restored")
    return 0


def cmd_monitor(a: argparse.Namespace) -> int:
    """The operator's window on an engine's maps/commands endpoints."""
    from .monitor import run_monitor

    return run_monitor(a.maps, a.commands)


def _has_display() -> bool:
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")) and \
        os.environ.get("QT_QPA_PLATFORM") != "offscreen"


def cmd_replay(a: argparse.Namespace) -> int:
    from instrument_adapters.base import EndOfStream
    from instrument_adapters.replay import ReplayInstrument

    from .engine import Engine
    from .record import RecordError

    writer = None
    if a.results is not None:  # per-frame results need the columns and the GP: --results implies --model gp
        from .results import ResultsWriter

        if a.model == "rigid":
            raise UserError("--results needs the column model (per-line drift, columns): use --model gp "
                            "or leave --model out")
        a.model = "gp"
        try:
            writer = ResultsWriter(a.results, info={"source": str(a.file), "model": "gp", "armed": True,
                                                    "corrections_applied": False})
        except ValueError as exc:
            raise UserError(str(exc)) from None
    a.model = a.model or "rigid"
    try:
        inst = ReplayInstrument(a.file, pixel_size_nm=a.pixel_size_nm, dwell_us=a.dwell_us, flyback_us=a.flyback_us,
                                realtime=a.realtime)
    except (RecordError, OSError) as exc:
        raise UserError(str(exc)) from None
    engine = Engine(_engine_config(a))
    if writer is not None:
        engine.arm()  # the corrections it would have sent are recorded; a recording cannot move: none is applied
    prog = Progress()
    stop = threading.Event()
    _wait_for_interrupt(stop)
    n, t0 = 0, time.perf_counter()
    total = len(inst)
    try:
        while not stop.is_set():
            try:
                frame = inst.acquire()
            except EndOfStream:
                break
            except RecordError as exc:
                raise UserError(str(exc)) from None
            r = engine.process(frame)
            if writer is not None:
                writer.add(frame, r, engine)
            n += 1
            prog.line(f"[{n}/{total}] frame {r.seq}  drift [{r.drift_nm[0]:+.3f}, {r.drift_nm[1]:+.3f}] nm  "
                      f"peak {r.peak:.2f}  {n / (time.perf_counter() - t0):.1f} fps")
    finally:
        prog.done()
        if writer is not None:  # also after Ctrl-C or a bad frame: what was processed is kept
            path = writer.close()
            print(f"results of {len(writer)} frames ({writer.n_columns} columns) -> {path}", file=sys.stderr)
    print(f"replayed {n} frames from {a.file} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return 0


def cmd_record(a: argparse.Namespace) -> int:
    from .record import RecordError, record_stream

    prog = Progress()
    stop = threading.Event()
    _wait_for_interrupt(stop)
    try:
        n = record_stream(a.frames, Path(a.out), frames=a.count, timeout_s=a.timeout,
                          progress=lambda i, f: prog.line(f"recorded {i} frames (last seq {f.seq})"), stop=stop)
    except (RecordError, OSError) as exc:
        raise UserError(str(exc)) from None
    finally:
        prog.done()
    print(f"recorded {n} frames to {a.out}", file=sys.stderr)
    return 0


def cmd_evaluate(a: argparse.Namespace) -> int:
    from .evaluate import evaluate

    prog = Progress()
    report = evaluate(preset=a.preset, size=a.size, frames=a.count,
                      drift_nm_per_min=3.0 if a.drift_nm_per_min is None else a.drift_nm_per_min,
                      dose=a.dose, seed=a.seed, model=a.model, jump_nm=a.jump_nm, baseline=not a.no_baseline,
                      calibration="" if a.calibration is None else str(a.calibration),
                      progress=lambda label, i, n: prog.line(f"{label}: frame {i}/{n}"))
    if a.rvae:
        from .rvae.evaluation import eval_dopants, eval_particles

        prog.line("rVAE: training and scoring on the particles and graphene presets ...")
        scores = (eval_particles(seed=a.seed, train_seconds=300) if a.preset == "particles" else
                  eval_dopants(seed=a.seed) if a.preset == "graphene" else {})
        # dotted keys -> the report's nesting: "rvae.dopant_auc" is report["rvae"]["dopant_auc"]
        report["rvae"] = {k.split(".", 1)[1]: v for k, v in scores.items() if k.startswith("rvae.")} or \
            {"note": "scored on --preset particles (angle) and --preset graphene (dopants)"}
    prog.done()
    text = json.dumps(report, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


def cmd_calibrate(a: argparse.Namespace) -> int:
    """A calibration session on a known lattice -> report folder (calibration.json + figures)."""
    from .calibrate import (LATTICES, SIM_SCALE_ERROR, SIM_SHEAR, calibrate_frames, calibrate_simulator,
                            lattice_by_name, parse_lattice_vectors, write_report)
    from .record import RecordError, count_frames, read_frames

    if (a.file is None) == (a.preset is None):
        raise UserError("give a recorded stack FILE or --preset NAME (the simulator), not " +
                        ("both" if a.file is not None else "neither"))
    if a.lattice is not None and a.lattice_vectors is not None:
        raise UserError("give the lattice once: --lattice NAME or --lattice-vectors AY,AX,BY,BX")
    if a.refit_steps < 0:
        raise UserError(f"--refit-steps must be >= 0, got {a.refit_steps}")
    if a.file is not None and (a.scale_error is not None or a.shear is not None or a.drift_nm_per_min is not None):
        raise UserError("--scale-error, --shear and --drift-nm-per-min plant a distortion on the simulator: "
                        "use them with --preset")
    try:
        lattice = (parse_lattice_vectors(a.lattice_vectors) if a.lattice_vectors is not None else
                   lattice_by_name(a.lattice) if a.lattice is not None else None)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    prog = Progress()
    t0 = time.perf_counter()

    def progress(label: str, i: int, n: int) -> None:
        prog.line(f"calibrate: {label} {i}/{n}  ({time.perf_counter() - t0:.0f} s)")

    try:
        if a.preset is not None:
            run = calibrate_simulator(a.preset, a.count or 60, seed=a.seed, size=a.size,
                                      scale_error=tuple(a.scale_error or SIM_SCALE_ERROR),
                                      shear=SIM_SHEAR if a.shear is None else a.shear,
                                      drift_nm_per_min=a.drift_nm_per_min, lattice=lattice,
                                      refit_steps=a.refit_steps, max_samples=a.max_samples, progress=progress)
        else:
            if lattice is None:
                raise UserError(f"{a.file}: say which lattice it shows: --lattice NAME ({', '.join(LATTICES)}) "
                                f"or --lattice-vectors AY,AX,BY,BX (nm)")
            if not a.file.exists():
                raise UserError(f"{a.file} does not exist")
            try:
                total = count_frames(a.file)
                frames = read_frames(a.file, pixel_size_nm=a.pixel_size_nm, dwell_us=a.dwell_us,
                                     flyback_us=a.flyback_us)
                run = calibrate_frames(frames, lattice, max_frames=a.count, total=min(total, a.count or total),
                                       source=str(a.file), refit_steps=a.refit_steps,
                                       max_samples=a.max_samples, progress=progress)
            except (RecordError, OSError) as exc:
                raise UserError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
        paths = write_report(run, a.out)
    finally:
        prog.done()
    print(json.dumps(run.calibration.summary(), indent=1))
    print(f"calibration of {run.calibration.meta['frames']} frames in {time.perf_counter() - t0:.1f} s -> "
          f"{', '.join(str(p) for p in paths)}; use it with `stem-live run --model gp --calibration "
          f"{paths[0]}`", file=sys.stderr)
    return 0


def _load_images(path: Path):
    """A 2-D image or a stack from .npy / .tif (pixel size not needed for locating)."""
    import numpy as np

    if not path.exists():
        raise UserError(f"{path} does not exist")
    try:
        if path.suffix.lower() == ".npy":
            data = np.load(path, allow_pickle=False)
        elif path.suffix.lower() in (".tif", ".tiff"):
            import tifffile

            logging.getLogger("tifffile").setLevel(logging.CRITICAL)  # its warnings are not for the user
            data = tifffile.imread(path)
        else:
            raise UserError(f"{path}: unsupported file type (use .npy, .tif or .tiff)")
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot read {path}: {exc}".splitlines()[0]) from None
    if data.ndim not in (2, 3) or data.size == 0 or not np.issubdtype(data.dtype, np.number) \
            or np.issubdtype(data.dtype, np.complexfloating):
        raise UserError(f"cannot read {path}: expected a real 2-D image or a 3-D stack, got {data.dtype} {data.shape}")
    return data[None] if data.ndim == 2 else data


def cmd_locate(a: argparse.Namespace) -> int:
    import numpy as np

    from .locate import estimate_spacing, locate_classical
    from .locate.export import overlay_rgb, write_columns, write_png

    stack = _load_images(a.file)
    flyback = None
    if a.flyback_px is not None:
        from .locate.flyback import check

        try:
            flyback = check(a.flyback_px)
        except ValueError:
            amp, decay = a.flyback_px
            raise UserError(f"--flyback-px {amp:g} {decay:g}: two finite numbers, and the decay must be > 0 "
                            f"and larger than |amplitude| (amplitude = flyback_amp_nm / pixel size, decay = "
                            f"flyback_tau_us / dwell, from `stem-live calibrate`)") from None
    params = None
    if a.locator == "unet":
        from .locate.unet import THRESHOLD, calibrated_threshold, load_default, load_params, locate_unet

        try:
            params = load_params(a.weights) if a.weights else load_default()
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load U-Net weights: {exc}") from None
        net_threshold = THRESHOLD
        if a.weights:
            net_threshold = calibrated_threshold(a.weights)
            if net_threshold is None:
                net_threshold = THRESHOLD
                print(f"note: no metrics.json with a calibrated threshold beside {a.weights}: using the committed "
                      f"weights' {THRESHOLD:g}", file=sys.stderr)
    out = a.out or a.file.with_name(a.file.stem + "_columns.csv")
    png = a.png or out.with_suffix(".png")
    prog = Progress()
    spacing = a.spacing_px or estimate_spacing(np.asarray(stack[0], dtype=np.float32))
    for k, img in enumerate(stack):
        if not np.isfinite(np.asarray(img)).all():  # before any output: no half-written file
            raise UserError(f"{a.file}: frame {k} holds NaN or infinite pixels")

    def locate_one(img, prior=None, flyback_px=flyback):
        if a.locator == "unet":
            return locate_unet(img, spacing, params=params, n_classes=a.classes, threshold=net_threshold,
                               flyback_px=flyback_px, prior=prior)
        return locate_classical(img, spacing, n_classes=a.classes, threshold=a.threshold, flyback_px=flyback_px,
                                prior=prior)

    tracked = None
    if a.tracked and len(stack) > 1:  # every frame with all the others as its prior (two passes)
        from .lattice_prior import locate_stack

        # no calibrated flyback given: measured from the stack (the columns drift across it)
        tracked = locate_stack([np.asarray(img, dtype=np.float32) for img in stack], spacing, locate_one,
                               fit_flyback=flyback is None,
                               progress=lambda k, n: prog.line(f"tracked: locate {k}/{n}"))
        if flyback is None:
            fb = tracked[0].meta.get("flyback_px")
            prog.done()
            print("flyback measured from the stack: none significant" if fb is None else
                  f"flyback measured from the stack: {fb[0]:.3g} px decaying over {fb[1]:.3g} px "
                  f"(--flyback-px {fb[0]:.3g} {fb[1]:.3g})", file=sys.stderr)
    total = 0
    for k, img in enumerate(stack):
        # with --tracked the frames are located already: only frame 0 is needed again (the overlay)
        img = np.asarray(img, dtype=np.float32) if tracked is None or k == 0 else None
        cols = tracked[k] if tracked is not None else locate_one(img)
        if out.suffix.lower() == ".npz" and len(stack) > 1:
            write_columns(out.with_name(f"{out.stem}_{k:05d}.npz"), cols, frame=k)
        else:
            write_columns(out, cols, frame=k)
        if k == 0:
            write_png(png, overlay_rgb(img, cols))
        total += len(cols)
        prog.line(f"frame {k + 1}/{len(stack)}: {len(cols)} columns (spacing {spacing:.1f} px)")
    prog.done()
    print(f"{total} columns in {len(stack)} frame(s) -> {out}; overlay of frame 0 -> {png}", file=sys.stderr)
    return 0


def cmd_train_locator(a: argparse.Namespace) -> int:
    from .locate.train_unet import reevaluate, train

    if a.eval_only:
        return reevaluate(a.out)
    train(a.out, minutes=a.minutes, seed=a.seed, progress=print)
    return 0


def cmd_train_rvae(a: argparse.Namespace) -> int:
    from .rvae.commands import train_rvae_main

    train_rvae_main(a.source, a.out, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                    latent_dim=a.latent_dim, symmetry_order=a.symmetry_order, patch_size=a.patch_size,
                    angle_prior_sigma=a.angle_prior_sigma, shift_prior_sigma=tuple(a.shift_prior_sigma),
                    content_prior_sigma=a.content_prior_sigma, recon_sigma=a.recon_sigma, frames=a.count, size=a.size,
                    spacing_px=a.spacing_px, kind=a.kind, max_seconds=a.max_seconds, progress=print)
    return 0


def cmd_encode_rvae(a: argparse.Namespace) -> int:
    from .rvae.commands import encode_rvae_main

    encode_rvae_main(a.source, a.checkpoint, a.out, frames=a.count, size=a.size, seed=a.seed, spacing_px=a.spacing_px,
                     kind=a.kind, progress=print)
    return 0


def _rvae_source_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("source", help="recording/image (.tif, .npy), patch stack (.npy N x H x W, .npz), or a simulator "
                                  "preset name (graphene, srtio3, mos2, particles)")
    s.add_argument("--frames", dest="count", type=_positive(int), default=None, help="frames to use")
    s.add_argument("--size", type=_positive(int), default=512, help="frame size for a simulator source")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--spacing-px", type=_positive(float), default=None, help="column spacing (default: estimated)")
    s.add_argument("--kind", choices=("auto", "patches", "frames", "sim"), default="auto", help="what SOURCE is")


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench import run_bench

    prog = Progress()
    sizes = tuple(a.size) if a.size else ((512,) if a.stage == "overload" else (256, 512, 1024, 2048))
    report = run_bench(a.stage, sizes=sizes, seconds=a.seconds, model=a.model, rvae=not a.no_rvae,
                       rate_hz=a.rate_hz, prerender=a.prerender, progress=prog.line)
    prog.done()
    text = json.dumps(report, indent=1)
    print(text)
    from .bench import summary_table

    print(summary_table(report), file=sys.stderr)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stem-live", description="In-line STEM acquisition: drift tracking and correction.")
    p.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("sim", help="run the simulated microscope on the frames/corrections endpoints")
    _sim_args(s)
    _endpoint_args(s, "frames", "corrections")
    _limits_args(s)
    s.add_argument("--speed", type=float, default=1.0, help="1 = real scan rate, 0 = as fast as possible")
    s.add_argument("--frames", dest="count", type=_positive(int), default=None, help="stop after N frames")
    s.add_argument("--restore-on-exit", action="store_true", help="restore the starting beam shift on exit")
    s.add_argument("--server-key", type=Path, default=None, help="CURVE: this instrument's NAME.key_secret")
    s.add_argument("--allowed-keys", type=Path, default=None, help="CURVE: folder of allowed engines' NAME.key")
    s.add_argument("--prerender", type=int, default=0, metavar="N",
                   help="benchmarks: render N frames first, then stream them back and forth (corrections are "
                        "acked but do not move the pre-rendered images)")
    s.set_defaults(func=cmd_sim)

    s = sub.add_parser("serve", help="serve an instrument (sim, replay, nion, autoscript) on the frames/corrections endpoints")
    s.add_argument("--instrument", choices=tuple(ADAPTERS), default="sim", help="which adapter (default sim)")
    for name in ADAPTERS:
        _adapter(name).add_args(s)
    _endpoint_args(s, "frames", "corrections")
    _limits_args(s)
    s.add_argument("--frames", dest="count", type=_positive(int), default=None, help="stop after N frames")
    s.add_argument("--restore-on-exit", action="store_true", help="restore the starting beam shift on exit")
    s.add_argument("--server-key", type=Path, default=None, help="CURVE: this instrument's NAME.key_secret")
    s.add_argument("--allowed-keys", type=Path, default=None, help="CURVE: folder of allowed engines' NAME.key")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("run", help="run the engine against an instrument's endpoints")
    _endpoint_args(s, "frames", "corrections", "maps", "commands")
    s.add_argument("--arm", action="store_true", help="send corrections from the first frame")
    s.add_argument("--restore-on-exit", action="store_true",
                   help="on Ctrl-C, send the beam back to where it was at the first frame")
    s.add_argument("--client-key", type=Path, default=None, help="CURVE: this engine's NAME.key_secret")
    s.add_argument("--server-public-key", type=Path, default=None, help="CURVE: the instrument's NAME.key")
    s.add_argument("--frames", dest="count", type=_positive(int), default=None, help="stop after N processed frames")
    _model_args(s)
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("monitor", help="the operator's window (Qt); closing it never stops acquisition")
    _endpoint_args(s, "maps", "commands")
    s.set_defaults(func=cmd_monitor)

    s = sub.add_parser("demo", help="simulator + engine (+ monitor) on loopback")
    _sim_args(s)
    _endpoint_args(s, "maps", "commands")
    s.add_argument("--frames", dest="count", type=_positive(int), default=None, help="stop after N frames")
    s.add_argument("--speed", type=float, default=1.0, help="1 = real scan rate, 0 = as fast as possible")
    s.add_argument("--no-monitor", action="store_true", help="do not open the monitor even with a display")
    _model_args(s)
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("replay", help="play a recorded stack through the engine, losslessly and in order")
    s.add_argument("file", type=Path)
    s.add_argument("--pixel-size-nm", type=_positive(float), default=None)
    s.add_argument("--dwell-us", type=_positive(float), default=None)
    s.add_argument("--flyback-us", type=float, default=None)
    s.add_argument("--realtime", action="store_true", help="reproduce the recorded frame timing")
    s.add_argument("--results", type=Path, default=None, metavar="OUT.npz",
                   help="write per-frame results (columns raw and undistorted, drift at every scan line with "
                        "sigma, the corrections an armed engine would have sent); implies --model gp")
    _model_args(s)
    s.set_defaults(func=cmd_replay, model=None)

    s = sub.add_parser("record", help="record a frame stream to a TIFF stack")
    s.add_argument("out", type=Path, help="output .tif")
    _endpoint_args(s, "frames")
    s.add_argument("--frames", dest="count", type=_positive(int), default=None, help="stop after N frames")
    s.add_argument("--timeout", type=_positive(float), default=None, help="stop after this many seconds")
    s.set_defaults(func=cmd_record)

    s = sub.add_parser("locate", help="find atomic columns in an image or stack: CSV/npz + overlay PNG")
    s.add_argument("file", type=Path, help=".npy or .tif image or stack")
    s.add_argument("--out", type=Path, default=None, help="positions file (.csv or .npz); default FILE_columns.csv")
    s.add_argument("--png", type=Path, default=None, help="overlay PNG (default: next to --out)")
    s.add_argument("--spacing-px", type=_positive(float), default=None,
                   help="nearest-neighbour column spacing in px (default: estimated from the image)")
    s.add_argument("--classes", type=_positive(int), default=1, help="intensity classes (e.g. 2: C/Si, 3: SrTiO3)")
    s.add_argument("--threshold", type=_positive(float), default=1.0, help="detection threshold in noise units")
    s.add_argument("--locator", choices=("classical", "unet"), default="classical",
                   help="classical (band-pass + fit) or the U-Net (committed weights)")
    s.add_argument("--weights", type=Path, default=None, help="U-Net weights (default: the committed ones)")
    s.add_argument("--flyback-px", type=float, nargs=2, default=None, metavar=("AMP", "DECAY"),
                   help="the scan's flyback in fast-scan pixels: x displacement AMP * exp(-j / DECAY) at pixel j "
                        "(from `stem-live calibrate`: flyback_amp_nm / pixel size, flyback_tau_us / dwell); the "
                        "columns cut by the left edge are then fitted on the distorted scan")
    s.add_argument("--tracked", action="store_true",
                   help="a stack of one area: locate every frame with the lattice of all the other frames as its "
                        "prior (two passes; more precise positions; a column that moved gets none); without "
                        "--flyback-px the flyback is measured from the stack where it drifts")
    s.set_defaults(func=cmd_locate)

    s = sub.add_parser("train-locator", help="train the U-Net column locator on simulated frames (seeded)")
    s.add_argument("--out", type=Path, required=True, help="weights to write (.msgpack); MODEL.md goes beside them")
    s.add_argument("--minutes", type=_positive(float), default=20.0, help="wall-clock training budget")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--eval-only", action="store_true",
                   help="no training: re-evaluate the weights at --out and rewrite their metrics.json and MODEL.md")
    s.set_defaults(func=cmd_train_locator)

    s = sub.add_parser("train-rvae", help="train an rVAE on a recording, image, patch stack or the simulator")
    _rvae_source_args(s)
    s.add_argument("--out", type=Path, required=True, help="checkpoint to write (.msgpack)")
    s.add_argument("--epochs", type=_positive(int), default=20)
    s.add_argument("--batch-size", type=_positive(int), default=128)
    s.add_argument("--lr", type=_positive(float), default=1e-3)
    s.add_argument("--latent-dim", type=_positive(int), default=2, help="content latents")
    s.add_argument("--symmetry-order", type=_positive(int), default=None, help="angles modulo 2*pi/n")
    s.add_argument("--patch-size", type=_positive(int), default=32)
    s.add_argument("--angle-prior-sigma", type=_positive(float), default=None, help="rad (default pi/n)")
    s.add_argument("--shift-prior-sigma", type=_positive(float), nargs=2, default=(1.0, 1.0), metavar=("SY", "SX"),
                   help="px, per axis")
    s.add_argument("--content-prior-sigma", type=_positive(float), default=1.0)
    s.add_argument("--recon-sigma", type=_positive(float), default=0.5, help="Gaussian likelihood sigma")
    s.add_argument("--max-seconds", type=_positive(float), default=None, help="stop training after this long")
    s.set_defaults(func=cmd_train_rvae)

    s = sub.add_parser("encode-rvae", help="latents (angle, shift, content, with sigmas) of any source -> .npz")
    _rvae_source_args(s)
    s.add_argument("--checkpoint", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True, help=".npz to write")
    s.set_defaults(func=cmd_encode_rvae)

    s = sub.add_parser("bench", help="stage and end-to-end timings (JSON)")
    s.add_argument("stage", choices=("protocol", "register", "locate", "track", "gp", "rvae", "pipeline", "overload",
                                     "all"))
    s.add_argument("--size", type=_positive(int), nargs="+", default=None, help="frame sizes (default 256..2048)")
    s.add_argument("--seconds", type=_positive(float), default=10.0,
                   help="duration of pipeline/overload runs (1800: the 30-minute flatness run)")
    s.add_argument("--model", choices=("rigid", "gp"), default="gp", help="pipeline: engine model (default gp)")
    s.add_argument("--no-rvae", action="store_true", help="pipeline: leave the rVAE stage out")
    s.add_argument("--rate-hz", type=_positive(float), default=None,
                   help="pipeline: offered frame rate (default 1.25 x the target: 25/12.5/3.75/1.25 Hz at 256/512/1024/2048 px)")
    s.add_argument("--prerender", type=int, default=60, metavar="N",
                   help="pipeline: frames the simulator renders before streaming them (0: render live)")
    s.add_argument("--json", type=Path, default=None, help="also write the report here")
    s.set_defaults(func=cmd_bench)

    s = sub.add_parser("keys", help="make a CURVE key pair for endpoints beyond loopback")
    s.add_argument("folder", type=Path)
    s.add_argument("--name", default="stem-live", help="file name stem (default stem-live)")
    s.set_defaults(func=cmd_keys)

    s = sub.add_parser("evaluate", help="simulator + engine with ground truth; JSON report")
    _sim_args(s)
    s.add_argument("--frames", dest="count", type=_positive(int), default=100)
    s.add_argument("--model", choices=("rigid", "gp"), default="rigid",
                   help="drift model: rigid registration, or columns + online GP")
    s.add_argument("--jump-nm", type=float, default=0.0, help="a sudden specimen jump of this size (at 10 s)")
    s.add_argument("--no-baseline", action="store_true", help="skip the baseline tracker run")
    s.add_argument("--rvae", action="store_true",
                   help="also train and score the rVAE (particles: angle recovery; graphene: Si dopants)")
    s.add_argument("--json", type=Path, default=None, help="also write the report here")
    s.add_argument("--calibration", type=Path, default=None, metavar="JSON",
                   help="engine uses this `stem-live calibrate` result (with --model gp)")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("calibrate", help="drift-calibration session on a known lattice (simulator or a recorded "
                                         "stack): report folder (JSON + figures) for `run --calibration`")
    s.add_argument("file", type=Path, nargs="?", default=None,
                   help="recorded stack (.tif, .npy, vendor file) of a known lattice; or use --preset")
    s.add_argument("--preset", choices=("graphene", "srtio3", "mos2"), default=None,
                   help="calibrate on the simulator with this specimen (a planted scan distortion, seeded)")
    s.add_argument("--frames", dest="count", type=_positive(int), default=None,
                   help="frames to use (default: 60 on the simulator, all of a file)")
    s.add_argument("--size", type=_positive(int), default=512, help="simulator frame side in pixels (default 512)")
    s.add_argument("--seed", type=int, default=0, help="simulator seed (default 0)")
    s.add_argument("--drift-nm-per-min", type=float, default=None, help="simulator drift speed (default 1 nm/min)")
    s.add_argument("--scale-error", type=float, nargs=2, default=None, metavar=("SY", "SX"),
                   help="simulator: planted fractional scan-step errors (default 0.01 -0.015)")
    s.add_argument("--shear", type=float, default=None, help="simulator: planted shear, x per y (default 0.02)")
    s.add_argument("--lattice", default=None, help="the lattice by name: graphene, srtio3, mos2 (default: the preset)")
    s.add_argument("--lattice-vectors", default=None, metavar="AY,AX,BY,BX",
                   help="the column lattice as two vectors in nm, image axes (y down, x right)")
    s.add_argument("--pixel-size-nm", type=_positive(float), default=None, help="file: pixel size if it has none")
    s.add_argument("--dwell-us", type=_positive(float), default=None, help="file: pixel dwell if it has none")
    s.add_argument("--flyback-us", type=float, default=None, help="file: line flyback if it has none")
    s.add_argument("--refit-steps", type=int, default=60,
                   help="optimiser steps of the GP hyperparameter fit (0: keep the defaults; faster)")
    s.add_argument("--max-samples", type=_positive(int), default=24000,
                   help="column samples the session GP is conditioned on (thinned evenly above; default 24000)")
    s.add_argument("--out", type=Path, required=True, help="report folder to write (created)")
    s.set_defaults(func=cmd_calibrate)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="stem-live: %(levelname)s: %(message)s")
    from instrument_adapters.base import InstrumentError

    from .protocol import KeyFileError

    try:
        return args.func(args)
    except (UserError, InstrumentError, KeyFileError, RuntimeError, OSError, ValueError) as exc:
        print(f"stem-live: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
