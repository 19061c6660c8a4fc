"""Specimen drift d(t) (nm, image axes (y, x)) relative to the microscope column.

d(t) = v t                                   constant thermal/mechanical drift
     + s (1 - exp(-t / tau_settle)) u        settling after a stage move (off by default)
     + OU(t)                                 Ornstein-Uhlenbeck random walk (2-D, isotropic)
     + A sin(2 pi f t + phi) e_jitter        mains-frequency jitter (along the fast axis x)
     + sum_k H(t - t_k) delta_k              sudden jumps

Presets (``DriftConfig.preset(name)``, ``DRIFT_PRESETS``; every value inside the ranges of
``simulator.ranges``, sources in docs/drift-ranges.md):

- ``settled``: a holder settled for an hour: 0.5 nm/min, OU 8 pm / 5 s, 5 pm mains;
- ``fresh``: minutes after insertion or a tilt: 6 nm/min plus a 5 nm settling exponential
  (60 s), i.e. 11 nm/min at t = 0; OU 30 pm / 2 s, 10 pm mains;
- ``noisy-room``: settled stage in a room with vibration and stray fields: 1.5 nm/min,
  OU 45 pm / 0.8 s, 25 pm mains.

The mains frequency ``jitter_hz`` is 50 Hz unless set (60 Hz grids: ``jitter_hz=60``).

Default magnitudes are those of an aberration-corrected STEM on a settled side-entry
holder: specimen drift 0.5-5 nm/min after settling (1 nm/min here); mains (50 Hz)
stray-field/vibration jitter of 5-20 pm amplitude on the fast scan axis (5 pm here);
an OU wander of ~10-20 pm with a correlation time of seconds, i.e. a random walk of a
few pm/sqrt(s) on short time scales (15 pm, 8 s here: sigma*sqrt(2/tau) = 7.5 pm/sqrt(s)).

The OU process is generated on a fixed time grid (``ou_dt_s``) from t = 0, extended
lazily in fixed-size chunks, each drawn from its own seeded stream, and linearly
interpolated; so ``drift_at`` is a pure function of (config, seed, t), whatever the order
of the queries. Times before 0 use the OU value at 0.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from simulator._util import stream_rng

__all__ = ["DRIFT_PRESETS", "DriftConfig", "DriftModel"]

Jump = tuple[float, tuple[float, float]]


@dataclass(frozen=True)
class DriftConfig:
    """Drift parameters. Lengths nm, times s, angles rad; vectors are (y, x) image axes.

    drift_nm_per_min, direction_rad: constant velocity; direction is atan2(vy, vx)
        (0 = +x, pi/2 = +y). ``velocity_nm_per_min`` (vy, vx), if given, overrides both.
    settle_nm, settle_tau_s: exponential settling of ``settle_nm`` along ``direction_rad``.
    ou_sigma_nm, ou_tau_s: stationary std (per axis) and correlation time of the OU walk.
    ou_dt_s: time step of the OU grid (interpolated linearly in between).
    jitter_amp_nm, jitter_hz, jitter_axis_rad: sinusoidal jitter (mains: jitter_hz 50 or
        60 Hz); axis 0 = along x.
    jumps: ((time_s, (dy, dx)), ...) step changes of d at the given times.
    jump_nm, jump_time_s, jump_direction_rad: convenience for one extra jump.
    """

    drift_nm_per_min: float = 1.0
    direction_rad: float = 0.6
    velocity_nm_per_min: tuple[float, float] | None = None
    settle_nm: float = 0.0
    settle_tau_s: float = 60.0
    ou_sigma_nm: float = 0.015
    ou_tau_s: float = 8.0
    ou_dt_s: float = 0.01
    jitter_amp_nm: float = 0.005
    jitter_hz: float = 50.0
    jitter_axis_rad: float = 0.0
    jumps: tuple[Jump, ...] = ()
    jump_nm: float = 0.0
    jump_time_s: float = 10.0
    jump_direction_rad: float = 0.0

    @classmethod
    def none(cls) -> DriftConfig:
        """No drift at all: d(t) = 0."""
        return cls(drift_nm_per_min=0.0, ou_sigma_nm=0.0, jitter_amp_nm=0.0)

    @classmethod
    def preset(cls, name: str, **overrides) -> DriftConfig:
        """A named drift preset (``DRIFT_PRESETS``: settled, fresh, noisy-room), any field
        overridden by keyword (e.g. ``jitter_hz=60.0``)."""
        if name not in DRIFT_PRESETS:
            raise ValueError(f"unknown drift preset {name!r}; choose one of {', '.join(DRIFT_PRESETS)}")
        return replace(cls(), **{**DRIFT_PRESETS[name], **overrides})

    @classmethod
    def linear(cls, drift_nm_per_min: float = 1.0, direction_rad: float = 0.0) -> DriftConfig:
        """Constant velocity only (no OU, jitter or jumps)."""
        return replace(cls.none(), drift_nm_per_min=drift_nm_per_min, direction_rad=direction_rad)

    @property
    def velocity_nm_per_s(self) -> np.ndarray:
        """Constant drift velocity (vy, vx) in nm/s."""
        if self.velocity_nm_per_min is not None:
            return np.asarray(self.velocity_nm_per_min, dtype=float) / 60.0
        s = self.drift_nm_per_min / 60.0
        return np.array([s * np.sin(self.direction_rad), s * np.cos(self.direction_rad)])

    def all_jumps(self) -> list[tuple[float, np.ndarray]]:
        """Every jump as (time_s, (dy, dx) nm), sorted by time."""
        out = [(float(t), np.asarray(d, dtype=float)) for t, d in self.jumps]
        if self.jump_nm:
            a = self.jump_direction_rad
            out.append((float(self.jump_time_s), self.jump_nm * np.array([np.sin(a), np.cos(a)])))
        return sorted(out, key=lambda x: x[0])


#: Named drift regimes (field values of ``DriftConfig``; fields not named keep their defaults).
DRIFT_PRESETS: dict[str, dict[str, float]] = {
    "settled": {"drift_nm_per_min": 0.5, "ou_sigma_nm": 0.008, "ou_tau_s": 5.0, "jitter_amp_nm": 0.005},
    "fresh": {"drift_nm_per_min": 6.0, "settle_nm": 5.0, "settle_tau_s": 60.0, "ou_sigma_nm": 0.030,
              "ou_tau_s": 2.0, "jitter_amp_nm": 0.010},
    "noisy-room": {"drift_nm_per_min": 1.5, "ou_sigma_nm": 0.045, "ou_tau_s": 0.8, "jitter_amp_nm": 0.025},
}


class DriftModel:
    """Evaluates d(t) for a ``DriftConfig`` and seed; see the module docstring."""

    CHUNK = 8192  # OU grid points generated per extension

    def __init__(self, cfg: DriftConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = int(seed)
        self._v = cfg.velocity_nm_per_s
        self._jumps = cfg.all_jumps()
        self._phase = float(stream_rng(seed, "jitter").uniform(0.0, 2.0 * np.pi))
        self._ou = np.zeros((1, 2))  # OU values on the grid, starts at 0 at t = 0
        self._ou_on = cfg.ou_sigma_nm > 0 and cfg.ou_tau_s > 0

    def _extend_ou(self, n_needed: int) -> None:
        """Append OU grid values, chunk by chunk, until there are ``n_needed``."""
        cfg = self.cfg
        a = np.exp(-cfg.ou_dt_s / cfg.ou_tau_s)
        s = cfg.ou_sigma_nm * np.sqrt(1.0 - a * a)
        # exact AR(1) recursion x[n+1] = a x[n] + xi[n], evaluated in blocks short enough
        # that a^-m stays moderate: x[s+m] = a^m (x[s] + sum_{k<=m} a^-k xi[s+k])
        block = int(max(1, min(self.CHUNK, 10.0 * cfg.ou_tau_s / cfg.ou_dt_s)))
        m = np.arange(1, block + 1, dtype=float)
        with np.errstate(over="ignore", divide="ignore"):
            up, down = a ** -m, a ** m
        parts = [self._ou]
        last = self._ou[-1]
        n_have = self._ou.shape[0]
        while n_have < n_needed:
            k = (n_have - 1) // self.CHUNK
            xi = stream_rng(self.seed, "ou", k).standard_normal((self.CHUNK, 2)) * s
            for s0 in range(0, self.CHUNK, block):
                seg = xi[s0:s0 + block]
                nb = seg.shape[0]
                if block == 1:                                   # tau << dt: no division by a
                    x = a * last + seg
                else:
                    x = down[:nb, None] * (last + np.cumsum(up[:nb, None] * seg, axis=0))
                parts.append(x)
                last = x[-1]
            n_have += self.CHUNK
        self._ou = np.concatenate(parts, axis=0)

    def ou_at(self, t: np.ndarray) -> np.ndarray:
        """The OU component, shape t.shape + (2,), nm (y, x)."""
        oy, ox = self._ou_xy(np.asarray(t, dtype=float))
        return np.stack([oy, ox], axis=-1)

    def _ou_xy(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if not self._ou_on:
            return np.zeros(t.shape), np.zeros(t.shape)
        k = np.maximum(t, 0.0) * (1.0 / self.cfg.ou_dt_s)
        n = k.astype(np.int64)
        self._extend_ou(int(n.max(initial=0)) + 2)
        f = k - n
        g = 1.0 - f
        oy, ox = self._ou[:, 0], self._ou[:, 1]
        return oy[n] * g + oy[n + 1] * f, ox[n] * g + ox[n + 1] * f

    def xy(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """True drift (dy, dx) nm as two arrays of ``t``'s shape (t in s)."""
        t = np.asarray(t, dtype=float)
        cfg = self.cfg
        dy = t * self._v[0]
        dx = t * self._v[1]
        if cfg.settle_nm:
            a = cfg.direction_rad
            e = cfg.settle_nm * (1.0 - np.exp(-np.maximum(t, 0.0) / cfg.settle_tau_s))
            dy = dy + np.sin(a) * e
            dx = dx + np.cos(a) * e
        if self._ou_on:
            oy, ox = self._ou_xy(t)
            dy = dy + oy
            dx = dx + ox
        if cfg.jitter_amp_nm:
            a = cfg.jitter_axis_rad
            w = cfg.jitter_amp_nm * np.sin(2.0 * np.pi * cfg.jitter_hz * t + self._phase)
            if np.sin(a):
                dy = dy + np.sin(a) * w
            dx = dx + np.cos(a) * w
        for tj, dj in self._jumps:
            step = t >= tj
            dy = dy + step * dj[0]
            dx = dx + step * dj[1]
        return dy, dx

    def __call__(self, t: np.ndarray) -> np.ndarray:
        """True drift d(t), shape t.shape + (2,), nm (y, x)."""
        dy, dx = self.xy(t)
        return np.stack([dy, dx], axis=-1)

    def frame_xy(self, t0: float, line_time_s: float, dwell_s: float, rows: int, cols: int):
        """d(t) for every pixel of a frame, split for speed and precision.

        Returns (row_dy, row_dx, dev_y, dev_x): float64 (rows,) drift at each line start
        and float32 (rows, cols) deviation d(t_ij) - d(t_i0) within the line, so that
        d(t_ij) = row[i] + dev[i, j] equals ``xy(t_ij)`` to float32 precision.
        Separable parts (velocity, jitter) use outer products; the piecewise-linear OU
        adds one ramp per grid point crossed within the line.
        """
        cfg = self.cfg
        tl = t0 + np.arange(rows) * line_time_s               # line starts, float64
        jd = np.arange(cols) * dwell_s                         # time into the line
        row_dy, row_dx = self.xy(tl)
        if tl[0] < 0:                                          # generic exact path
            dy, dx = self.xy(tl[:, None] + jd[None, :])
            return (row_dy, row_dx, (dy - row_dy[:, None]).astype(np.float32),
                    (dx - row_dx[:, None]).astype(np.float32))
        jd32 = jd.astype(np.float32)
        dev_y = np.zeros((rows, cols), np.float32)
        dev_x = np.zeros((rows, cols), np.float32)
        dev_y += (self._v[0] * jd32)[None, :]
        dev_x += (self._v[1] * jd32)[None, :]
        if cfg.jitter_amp_nm:
            a_ = cfg.jitter_axis_rad
            w = 2.0 * np.pi * cfg.jitter_hz
            al = w * tl + self._phase
            cb1 = (np.cos(w * jd) - 1.0).astype(np.float32)
            sb = np.sin(w * jd).astype(np.float32)
            sa = (cfg.jitter_amp_nm * np.sin(al)).astype(np.float32)
            ca = (cfg.jitter_amp_nm * np.cos(al)).astype(np.float32)
            j_dev = sa[:, None] * cb1[None, :] + ca[:, None] * sb[None, :]
            if np.sin(a_):
                dev_y += np.float32(np.sin(a_)) * j_dev
            dev_x += np.float32(np.cos(a_)) * j_dev
        if self._ou_on:
            dt = cfg.ou_dt_s
            n0 = (tl / dt).astype(np.int64)
            self._extend_ou(int((tl[-1] + jd[-1]) / dt) + 3)
            slope = np.diff(self._ou, axis=0) / dt               # nm/s on each grid interval
            s_prev = slope[n0]
            dev_y += s_prev[:, 0].astype(np.float32)[:, None] * jd32[None, :]
            dev_x += s_prev[:, 1].astype(np.float32)[:, None] * jd32[None, :]
            m = 1
            while True:                                           # one ramp per grid point crossed
                tg = (n0 + m) * dt - tl
                if cols < 2 or not np.any(tg < jd[-1]):
                    break
                s_new = slope[n0 + m]
                ds = (s_new - s_prev).astype(np.float32)
                ramp = np.maximum(jd32[None, :] - tg.astype(np.float32)[:, None], np.float32(0.0))
                dev_y += ds[:, 0][:, None] * ramp
                dev_x += ds[:, 1][:, None] * ramp
                s_prev = s_new
                m += 1
        if cfg.settle_nm or self._jumps:
            # rare: evaluate exactly per pixel and replace the (zero) contributions
            t = tl[:, None] + jd[None, :]
            ey = np.zeros((rows, cols))
            ex = np.zeros((rows, cols))
            if cfg.settle_nm:
                a_ = cfg.direction_rad
                e = cfg.settle_nm * (np.exp(-np.maximum(tl, 0.0) / cfg.settle_tau_s)[:, None]
                                     - np.exp(-np.maximum(t, 0.0) / cfg.settle_tau_s))
                ey += np.sin(a_) * e
                ex += np.cos(a_) * e
            for tj, dj in self._jumps:
                rows_hit = np.flatnonzero((tl < tj) & (tl + jd[-1] >= tj))
                for r in rows_hit.tolist():
                    step = jd >= tj - tl[r]
                    ey[r] += step * dj[0]
                    ex[r] += step * dj[1]
            dev_y += ey.astype(np.float32)
            dev_x += ex.astype(np.float32)
        return row_dy, row_dx, dev_y, dev_x
