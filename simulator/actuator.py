"""Beam-shift actuator: commanded target -> beam shift b actually applied (nm, (y, x)).

A command issued between frames (before frame ``seq``) takes effect at line
``latency_lines`` of frame ``seq + latency_frames`` (a latency of more lines than a frame
has spills into later frames) and stays until the next command takes effect.
The applied shift moves by ``gain * (target - previous target)`` plus an isotropic
Gaussian error of std ``noise_nm`` per axis (errors accumulate, as in a real deflector
driven by increments). The instrument reports the commanded target, not the applied value.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator._util import stream_rng

__all__ = ["ActuatorConfig", "Actuator"]


@dataclass(frozen=True)
class ActuatorConfig:
    """gain: applied / commanded change; latency in lines and frames; noise_nm per axis."""

    gain: float = 0.97
    latency_lines: int = 0
    latency_frames: int = 0
    noise_nm: float = 0.001

    @classmethod
    def ideal(cls) -> ActuatorConfig:
        """Unit gain, no latency, no noise."""
        return cls(gain=1.0, latency_lines=0, latency_frames=0, noise_nm=0.0)

    none = ideal


@dataclass(frozen=True)
class _Event:
    seq: int       # frame in which it takes effect
    line: int      # first line with the new value
    target: np.ndarray
    applied: np.ndarray


class Actuator:
    """Holds the command history and answers what b was on each line of a frame."""

    def __init__(self, cfg: ActuatorConfig, rows: int, seed: int = 0):
        if cfg.latency_lines < 0 or cfg.latency_frames < 0:
            raise ValueError("actuator latency must be >= 0")
        self.cfg = cfg
        self.rows = int(rows)
        self._rng = stream_rng(seed, "actuator")
        self._target = np.zeros(2)
        self._applied = np.zeros(2)
        self._base_target = np.zeros(2)   # in effect before every remaining event
        self._base_applied = np.zeros(2)
        self._events: list[_Event] = []

    @property
    def target(self) -> np.ndarray:
        """Latest commanded target (nm, (y, x))."""
        return self._target.copy()

    def command(self, target_nm, next_seq: int) -> np.ndarray:
        """Command a new target before frame ``next_seq``; returns the applied value."""
        target = np.asarray(target_nm, dtype=float).reshape(2)
        if not np.all(np.isfinite(target)):
            raise ValueError("beam shift target must be finite")
        cfg = self.cfg
        applied = self._applied + cfg.gain * (target - self._target)
        if cfg.noise_nm:
            applied = applied + cfg.noise_nm * self._rng.standard_normal(2)
        line = cfg.latency_lines
        seq = int(next_seq) + cfg.latency_frames + line // self.rows
        self._events.append(_Event(seq, line % self.rows, target.copy(), applied.copy()))
        self._target, self._applied = target, applied
        return applied.copy()

    def frame(self, seq: int) -> tuple[np.ndarray, np.ndarray]:
        """(applied (rows, 2), commanded (rows, 2)) per line of frame ``seq``.

        Events that took effect before this frame are folded into the base and dropped.
        """
        while self._events and (self._events[0].seq < seq
                                or (self._events[0].seq == seq and self._events[0].line == 0)):
            ev = self._events.pop(0)
            self._base_target, self._base_applied = ev.target, ev.applied
        applied = np.tile(self._base_applied, (self.rows, 1))
        commanded = np.tile(self._base_target, (self.rows, 1))
        for ev in self._events:
            if ev.seq != seq:
                break
            applied[ev.line:] = ev.applied
            commanded[ev.line:] = ev.target
        return applied, commanded
