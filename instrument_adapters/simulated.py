"""The bundled virtual microscope as an :class:`Instrument`."""

from __future__ import annotations

import argparse
import math
import threading
import time
from collections import deque
from dataclasses import replace

import numpy as np

from instrument_adapters.base import EndOfStream, Instrument
from simulator import FrameTruth, Microscope, MicroscopeConfig
from stem_live.protocol import Frame, Strip
from stem_live.strips import strip_from_meta


class SimulatedInstrument(Instrument):
    """Wraps :class:`simulator.Microscope`.

    ``speed``: 1.0 paces frames at the real scan rate (frame time + gap); larger is faster;
    ``0`` or ``None`` renders as fast as possible. ``frames`` ends the stream after that many.
    The last ``keep_truth`` frames' ground truth are kept for evaluation (``truth_for(seq)``).

    ``prerender`` > 0 (benchmarks): render that many frames of the seeded session first, then
    stream them forwards and backwards (the specimen drifts back and forth, never jumps) with
    ever increasing ``seq`` and ``t_start``, so that the instrument side costs no CPU while the
    engine is measured. The pre-rendered images do not show corrections: they are acked and
    clamped as usual, and the frames report the beam shift they were rendered with.

    ``strip_lines`` > 0: ``acquire`` returns the frames as strips of that many lines
    (``protocol.Strip``, paced at the scan rate of their lines), each scanned under the beam
    commands made before it (``Microscope.next_strip``); rendered live (no ``prerender``).
    """

    def __init__(self, config: MicroscopeConfig, *, speed: float | None = 1.0, frames: int | None = None,
                 stream: str = "sim", keep_truth: int = 64, prerender: int = 0, strip_lines: int = 0) -> None:
        if strip_lines < 0 or (strip_lines and prerender):
            raise ValueError("strips are scanned live: strip_lines needs prerender 0, and is >= 0")
        self.strip_lines = int(strip_lines)
        self.scope = Microscope(config)
        self.speed = speed
        self.frames = frames
        self.stream = stream
        self._lock = threading.Lock()
        self._truth: deque[tuple[int, FrameTruth]] = deque(maxlen=keep_truth)
        self._next_due: float | None = None
        self._count = 0
        self._cache = [self.scope.acquire() for _ in range(max(0, int(prerender)))]

    def _render(self) -> tuple:
        """(image, meta, truth, period_s) of the next frame: rendered now, or from the cache."""
        period = self.scope.frame_time_s + self.scope.config.frame_gap_s
        if not self._cache:
            with self._lock:
                image, meta, truth = self.scope.acquire()
            return image, meta, truth, period
        n = len(self._cache)
        k = self._count % max(1, 2 * n - 2) if n > 1 else 0
        image, meta, truth = self._cache[k if k < n else 2 * n - 2 - k]
        meta = replace(meta, seq=self._count, t_start=self._count * period)
        return image, meta, truth, period

    def _pace(self, period_s: float) -> None:
        """Wait until this scan's end at the set speed (no burst to catch up after falling behind)."""
        if self.speed:
            now = time.monotonic()
            self._next_due = (self._next_due or now) + period_s / self.speed
            delay = self._next_due - now
            if delay > 0:
                time.sleep(delay)
            else:
                self._next_due = now

    def acquire(self) -> Frame | Strip:
        if self.frames is not None and self._count >= self.frames:
            raise EndOfStream
        if self.strip_lines:
            return self._strip()
        image, meta, truth, period = self._render()
        self._count += 1
        self._truth.append((meta.seq, truth))
        self._pace(period)
        return Frame(seq=meta.seq, image=image, t_start=meta.t_start, pixel_size_nm=tuple(meta.pixel_size_nm),
                     dwell_us=meta.dwell_us, flyback_us=meta.flyback_us, scan_rotation_rad=meta.scan_rotation_rad,
                     beam_shift_nm=tuple(float(v) for v in meta.beam_shift_nm), stream=self.stream,
                     detector=meta.detector, beam_shift_lines_nm=meta.beam_shift_lines_nm)

    def _strip(self) -> Strip:
        """The next strip of the frame being scanned (its truth kept with the frame's last)."""
        with self._lock:
            rows, meta, row0, truth = self.scope.next_strip(self.strip_lines)
        period = len(rows) * meta.line_time_s
        if truth is not None:
            self._count += 1
            self._truth.append((meta.seq, truth))
            period += self.scope.config.frame_gap_s
        self._pace(period)
        return strip_from_meta(rows, meta, row0, self.stream)

    def truth_for(self, seq: int) -> FrameTruth | None:
        for s, t in self._truth:
            if s == seq:
                return t
        return None

    def get_beam_shift(self) -> np.ndarray:
        with self._lock:
            return np.asarray(self.scope.beam_shift_nm, dtype=np.float64).copy()

    def set_beam_shift(self, target_nm: np.ndarray) -> None:
        with self._lock:
            self.scope.set_beam_shift(np.asarray(target_nm, dtype=np.float64))

    follows_paths = True   # the simulated scan changes the shift line by line

    def follow_path(self, t_s: np.ndarray, shift_nm: np.ndarray) -> None:
        with self._lock:
            self.scope.set_beam_path(np.asarray(t_s, dtype=np.float64), np.asarray(shift_nm, dtype=np.float64))


def add_args(parser: argparse.ArgumentParser) -> None:
    """Options of ``stem-live serve --instrument sim`` (all prefixed ``--sim-``)."""
    from simulator import PRESETS

    g = parser.add_argument_group("simulated instrument")
    g.add_argument("--sim-preset", choices=PRESETS, default="graphene", help="specimen (default graphene)")
    g.add_argument("--sim-size", type=int, default=512, metavar="PX", help="frame side in pixels (default 512)")
    g.add_argument("--sim-drift-nm-per-min", type=float, default=None, metavar="NM", help="constant drift speed")
    g.add_argument("--sim-dose", type=float, default=None, metavar="E_PER_A2", help="dose in electrons per square angstrom (default: the preset's)")
    g.add_argument("--sim-seed", type=int, default=0, help="random seed (default 0)")
    g.add_argument("--sim-speed", type=float, default=1.0, help="scan speed: 1 = real scan rate, 0 = as fast as possible")
    g.add_argument("--sim-actuator-gain", type=float, default=None, metavar="G",
                   help="beam-shift actuator gain, applied / commanded (default 0.97)")
    g.add_argument("--sim-actuator-rotation-deg", type=float, default=0.0, metavar="DEG",
                   help="beam-shift axes rotated against the scan axes (deg)")
    g.add_argument("--sim-actuator-skew", type=float, default=0.0, help="beam-shift axes non-orthogonality")
    g.add_argument("--sim-strips", type=int, default=0, metavar="LINES",
                   help="send every frame as strips of this many lines, as it is scanned (default 0: whole frames)")


def from_args(args: argparse.Namespace) -> SimulatedInstrument:
    """Build the simulator from :func:`add_args` options (``frames`` from ``args.count`` when present)."""
    from dataclasses import replace

    from simulator import MicroscopeConfig

    cfg = MicroscopeConfig(preset=args.sim_preset, size=args.sim_size, seed=args.sim_seed)
    if args.sim_drift_nm_per_min is not None:
        cfg = replace(cfg, drift=replace(cfg.drift, drift_nm_per_min=args.sim_drift_nm_per_min))
    if args.sim_dose is not None:
        cfg = replace(cfg, dose_e_per_A2=args.sim_dose)
    act = cfg.actuator
    if args.sim_actuator_gain is not None:
        act = replace(act, gain=args.sim_actuator_gain)
    if args.sim_actuator_rotation_deg or args.sim_actuator_skew:
        act = replace(act, rotation_rad=math.radians(args.sim_actuator_rotation_deg), skew=args.sim_actuator_skew)
    cfg = replace(cfg, actuator=act)
    return SimulatedInstrument(cfg, speed=args.sim_speed or None, frames=getattr(args, "count", None),
                               strip_lines=max(0, args.sim_strips))
