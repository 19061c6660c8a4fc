"""Beam-shift actuator: commanded target -> beam shift b actually applied (nm, (y, x)).

A command issued between frames (before frame ``seq``) takes effect at line
``latency_lines`` of frame ``seq + latency_frames`` (a latency of more lines than a frame
has spills into later frames) and stays until the next command takes effect.
The applied shift moves by ``gain * R(rotation) @ [[1, skew], [0, 1]] @ (target - previous
target)`` (on (y, x) vectors; :meth:`ActuatorConfig.matrix`) plus an isotropic
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
    """gain: applied / commanded change; latency in lines and frames; noise_nm per axis;
    rotation_rad: rotation of the deflector axes against the scan axes (rad); skew: non-orthogonality
    (y picks up ``skew`` times the x command). Rotation and skew 0 keep the plain ``gain`` path."""

    gain: float = 0.97
    latency_lines: int = 0
    latency_frames: int = 0
    noise_nm: float = 0.001
    rotation_rad: float = 0.0
    skew: float = 0.0

    def matrix(self) -> np.ndarray:
        """Applied change per commanded change, 2x2 on (y, x) vectors: gain * R(rotation) @ [[1, skew], [0, 1]]."""
        c, s = np.cos(self.rotation_rad), np.sin(self.rotation_rad)
        return self.gain * np.array([[c, -s], [s, c]]) @ np.array([[1.0, self.skew], [0.0, 1.0]])

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
    path: bool = False   # a point of a path (``command_path``)


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
        if cfg.rotation_rad or cfg.skew:
            applied = self._applied + cfg.matrix() @ (target - self._target)
        else:  # the plain gain: bit-identical to the simulator before rotation and skew existed
            applied = self._applied + cfg.gain * (target - self._target)
        if cfg.noise_nm:
            applied = applied + cfg.noise_nm * self._rng.standard_normal(2)
        line = cfg.latency_lines
        seq = int(next_seq) + cfg.latency_frames + line // self.rows
        self._cancel_from(seq, line % self.rows)
        self._events.append(_Event(seq, line % self.rows, target.copy(), applied.copy()))
        self._target, self._applied = target, applied
        return applied.copy()

    def command_path(self, seqs, lines, targets_nm) -> np.ndarray:
        """Command a path: target ``targets_nm[i]`` (n, 2) nm from line ``lines[i]`` of frame
        ``seqs[i]`` on (in scan order; the actuator's latency is added). Each line moves the
        applied shift by ``gain * (target change)`` (rotation and skew as in :meth:`command`);
        the noise is one draw for the whole path (one command), not one per line. A later
        command replaces what is left of the path. Returns the applied values (n, 2)."""
        seqs = np.asarray(seqs, np.int64).reshape(-1)
        lines = np.asarray(lines, np.int64).reshape(-1)
        targets = np.asarray(targets_nm, dtype=float).reshape(-1, 2)
        if not len(targets) or len(seqs) != len(targets) or len(lines) != len(targets):
            raise ValueError("a path needs one frame, one line and one target per point")
        if not np.all(np.isfinite(targets)):
            raise ValueError("beam shift path must be finite")
        cfg = self.cfg
        m = cfg.matrix() if (cfg.rotation_rad or cfg.skew) else cfg.gain * np.eye(2)
        noise = cfg.noise_nm * self._rng.standard_normal(2) if cfg.noise_nm else np.zeros(2)
        applied = self._applied + (targets - self._target) @ m.T + noise
        pos = lines + cfg.latency_lines
        seq = seqs + cfg.latency_frames + pos // self.rows
        line = pos % self.rows
        self._cancel_from(int(seq[0]), int(line[0]))
        for q, ln, t, a in zip(seq, line, targets, applied):
            self._events.append(_Event(int(q), int(ln), t.copy(), a.copy(), True))
        self._target, self._applied = targets[-1].copy(), applied[-1].copy()
        return applied

    def _cancel_from(self, seq: int, line: int) -> None:
        """Drop the pending events from (``seq``, ``line``) on: a new command replaces them."""
        self._events = [e for e in self._events if (e.seq, e.line) < (seq, line)]

    def follows_path(self, seq: int) -> bool:
        """Whether a path's points take effect in frame ``seq`` (call before :meth:`frame`)."""
        return any(e.path and e.seq == seq for e in self._events)

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
