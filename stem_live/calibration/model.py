"""What a calibration session measured (:class:`Calibration`, JSON on disk), the cached loader the
engine uses, and :class:`CalibratedGP`, a drift GP with the calibrated velocity as its mean.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

SCHEMA = "stem-live/calibration/1"


# ----------------------------------------------------------------------------- result
def _pair(v, name: str) -> tuple[float, float]:
    try:
        a = [float(x) for x in v]
    except (TypeError, ValueError):
        a = []
    if len(a) != 2 or not all(math.isfinite(x) for x in a):
        raise ValueError(f"field {name!r} must be a pair of finite numbers, got {v!r}")
    return a[0], a[1]


def _num(v, name: str, *, positive: bool = False) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        x = float("nan")
    if isinstance(v, bool) or not math.isfinite(x) or (positive and x <= 0) or x < 0 and name.endswith("sd"):
        raise ValueError(f"field {name!r} must be a finite{' positive' if positive else ''} number, got {v!r}")
    return x


@dataclass(frozen=True)
class Calibration:
    """What a calibration session measured; travels as JSON (:meth:`save`, :meth:`load`).

    Units nm, s (us where named), rad; pairs (y, x). ``velocity_nm_per_s``: the drift velocity
    over the session (the least-squares slope of the GP's drift trace), ``velocity_sd_nm_per_s``
    the 1-sigma of the GP's linear term (the slow wander marginalised). ``scale_error``:
    fractional scan-step errors (y, x) (0.01 = 1 % too large);
    ``shear``: x offset per unit y; ``shear_yx``: y per unit x (~0 by the rotation convention);
    ``rotation_rad``: the crystal against the given lattice vectors. ``flyback_amp_nm``: x
    displacement at the start of a line, decaying with ``flyback_tau_us``.
    ``line_jitter_nm``: std of a random offset per scan line as column positions see it (the
    GP's per-line term; a column averages the few lines it spans). ``pca``: summary of the
    principal modes of the column displacement fields. ``meta``: source, lattice, frames,
    pixel size, timing, GP hyperparameters. ``truth``: the simulator's true values (simulator
    source only)."""

    velocity_nm_per_s: tuple[float, float]
    velocity_sd_nm_per_s: tuple[float, float]
    scale_error: tuple[float, float]
    scale_error_sd: tuple[float, float]
    shear: float
    shear_sd: float
    shear_yx: float = 0.0
    rotation_rad: float = 0.0
    flyback_amp_nm: float = 0.0
    flyback_amp_sd_nm: float = 0.0
    flyback_tau_us: float = 20.0
    line_jitter_nm: float = 0.0
    pca: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    truth: dict | None = None
    schema: str = SCHEMA

    @property
    def distortion_matrix(self) -> np.ndarray:
        """D (2, 2): S(pos) = D (pos - c); rows output (y, x), columns input (y, x)."""
        return np.array([[self.scale_error[0], self.shear_yx], [self.shear, self.scale_error[1]]])

    def to_dict(self) -> dict:
        d = asdict(self)
        d = {"schema": d.pop("schema"), **d}
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    def save(self, path: str | os.PathLike) -> Path:
        """Write JSON (UTF-8, indented); returns the path."""
        p = Path(path)
        p.write_text(json.dumps(_jsonable(self.to_dict()), indent=1) + "\n", encoding="utf-8")
        return p

    @classmethod
    def from_dict(cls, d: dict, where: str = "calibration") -> Calibration:
        """Validate and build; ValueError (one line, naming the field) otherwise."""
        if not isinstance(d, dict):
            raise ValueError(f"{where}: not a JSON object")
        if d.get("schema") != SCHEMA:
            raise ValueError(f"{where}: field 'schema' must be {SCHEMA!r}, got {d.get('schema')!r} "
                             f"(not a stem-live calibration, or from another version)")
        try:
            kw = dict(
                velocity_nm_per_s=_pair(d.get("velocity_nm_per_s"), "velocity_nm_per_s"),
                velocity_sd_nm_per_s=_pair(d.get("velocity_sd_nm_per_s"), "velocity_sd_nm_per_s"),
                scale_error=_pair(d.get("scale_error"), "scale_error"),
                scale_error_sd=_pair(d.get("scale_error_sd"), "scale_error_sd"),
                shear=_num(d.get("shear"), "shear"), shear_sd=_num(d.get("shear_sd"), "shear_sd"),
                shear_yx=_num(d.get("shear_yx", 0.0), "shear_yx"),
                rotation_rad=_num(d.get("rotation_rad", 0.0), "rotation_rad"),
                flyback_amp_nm=_num(d.get("flyback_amp_nm", 0.0), "flyback_amp_nm"),
                flyback_amp_sd_nm=_num(d.get("flyback_amp_sd_nm", 0.0), "flyback_amp_sd_nm"),
                flyback_tau_us=_num(d.get("flyback_tau_us", 20.0), "flyback_tau_us", positive=True),
                line_jitter_nm=_num(d.get("line_jitter_nm", 0.0), "line_jitter_nm"),
            )
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        if min(kw["velocity_sd_nm_per_s"]) < 0 or min(kw["scale_error_sd"]) < 0 or kw["shear_sd"] < 0:
            raise ValueError(f"{where}: a field ending in '_sd' is negative")
        if max(abs(x) for x in (*kw["scale_error"], kw["shear"], kw["shear_yx"])) >= 0.5:
            raise ValueError(f"{where}: field 'scale_error' or 'shear' is 50 % or more: not a scan distortion")
        for k in ("pca", "meta"):
            if not isinstance(d.get(k, {}), dict):
                raise ValueError(f"{where}: field {k!r} must be an object")
        truth = d.get("truth")
        if truth is not None and not isinstance(truth, dict):
            raise ValueError(f"{where}: field 'truth' must be an object or null")
        return cls(**kw, pca=dict(d.get("pca", {})), meta=dict(d.get("meta", {})), truth=truth)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Calibration:
        """Read a :meth:`save` file; a missing, unreadable or malformed one -> one-line ValueError."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ValueError(f"calibration file {p} does not exist (run `stem-live calibrate ... --out DIR` "
                             f"and pass DIR/calibration.json)") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"cannot read calibration file {p}: {exc}".splitlines()[0]) from None
        try:
            d = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"calibration file {p} is not valid JSON ({exc.msg}, line {exc.lineno})") from None
        return cls.from_dict(d, f"calibration file {p}")

    # ------------------------------------------------------------------ for the engine
    def flyback_measured(self, pixel_size_x_nm: float) -> bool:
        """The flyback is at least 0.01 px in pixels of this size (nm): worth fitting."""
        px = float(pixel_size_x_nm)
        return px > 0 and abs(self.flyback_amp_nm / px) >= 0.01

    def flyback_px(self, pixel_size_x_nm: float, dwell_us: float) -> tuple[float, float] | None:
        """The flyback as the locator takes it (``locate_classical(flyback_px=)``): (amplitude,
        decay) in fast-scan pixels of a frame with this pixel size (nm) and dwell (us). None
        where it is below 0.01 px, the timing is unknown or the numbers make no monotone scan."""
        from stem_live.locate.flyback import check

        px, dwell = float(pixel_size_x_nm), float(dwell_us)
        if not (px > 0 and dwell > 0) or not self.flyback_measured(px):
            return None
        try:
            return check((self.flyback_amp_nm / px, self.flyback_tau_us / dwell))
        except ValueError:
            return None

    def correct_observations(self, obs, beam_shift_nm) -> object:
        """Drift samples measured against a *measured* reference, with the known scan scale and
        shear taken out: the apparent column displacement ``disp - b`` (nominal nm) is turned
        into the true one, ``(I + D)(disp - b)``. ``beam_shift_nm``: (2,) or per line (rows, 2)."""
        b = np.asarray(beam_shift_nm, dtype=float)
        if b.ndim == 2:
            rows = np.clip(np.rint(obs.pos_px[:, 0]).astype(np.int64), 0, len(b) - 1)
            bs = b[rows]
        else:
            bs = np.broadcast_to(b.reshape(2), obs.disp_nm.shape)
        app = obs.disp_nm - bs
        return replace(obs, disp_nm=bs + app + app @ self.distortion_matrix.T)

    def wrap_gp(self, gp, *, velocity_sd_floor_nm_per_s: float = 0.01) -> CalibratedGP:
        """The engine's GP with this drift velocity as its prior mean; the prior sd of the
        velocity around it is the calibration's sd, at least ``velocity_sd_floor_nm_per_s``
        (drift rates wander between the calibration and the session)."""
        sd = max(float(np.max(self.velocity_sd_nm_per_s)), float(velocity_sd_floor_nm_per_s))
        return CalibratedGP(gp, self.velocity_nm_per_s, velocity_sd_nm_per_s=sd)

    def summary(self) -> dict:
        """The headline numbers (and, for the simulator, truth and relative errors)."""
        out = {"velocity_nm_per_s": [round(v, 6) for v in self.velocity_nm_per_s],
               "velocity_sd_nm_per_s": [round(v, 6) for v in self.velocity_sd_nm_per_s],
               "scale_error": [round(v, 6) for v in self.scale_error], "shear": round(self.shear, 6),
               "flyback_amp_nm": round(self.flyback_amp_nm, 5), "flyback_tau_us": round(self.flyback_tau_us, 2),
               "line_jitter_nm": round(self.line_jitter_nm, 5)}
        if self.truth:
            out["truth"] = {k: v for k, v in self.truth.items() if k != "drift"}
            out["relative_error"] = self.meta.get("relative_error", {})
        return out


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, (np.floating, float)):
        v = float(x)
        return v if math.isfinite(v) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    return x


_CACHE: dict[str, tuple[tuple, Calibration]] = {}


def load_cached(path: str | os.PathLike) -> Calibration:
    """:meth:`Calibration.load`, cached per file (re-read when it changes; the engine rebuilds its
    model on every reset). A file that disappears after a good load keeps its cached value."""
    p = str(Path(path).resolve())
    try:
        st = os.stat(p)
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = None
    hit = _CACHE.get(p)
    if hit is not None and (stamp is None or hit[0] == stamp):
        return hit[1]
    cal = Calibration.load(path)
    _CACHE[p] = (stamp, cal)
    return cal


class CalibratedGP:
    """An :class:`OnlineDriftGP` whose drift has a known linear part: the GP models
    ``d(t) - v (t - t0)`` (``v`` from a calibration, ``t0`` the first sample's time) and the
    prior sd of its own velocity term is narrowed to ``velocity_sd`` (nm/s), so the first
    frames already predict the drift. Everything else is the wrapped GP's (delegated)."""

    def __init__(self, gp, velocity_nm_per_s: Sequence[float], *, velocity_sd_nm_per_s: float | None = None) -> None:
        self.gp = gp
        self.velocity = np.asarray(velocity_nm_per_s, dtype=float).reshape(2)
        self.t0: float | None = None
        if velocity_sd_nm_per_s is not None:
            gp.set_velocity_prior_sd(velocity_sd_nm_per_s)

    def __getattr__(self, name: str):
        return getattr(self.gp, name)

    def _mean(self, t) -> np.ndarray:
        t = np.atleast_1d(np.asarray(t, dtype=float)).ravel()
        t0 = self.t0 if self.t0 is not None else (float(t.min()) if len(t) else 0.0)
        return (t - t0)[:, None] * self.velocity[None, :]

    def _shifted(self, obs):
        return replace(obs, disp_nm=obs.disp_nm - self._mean(obs.t_s))

    def add(self, obs) -> None:
        if self.t0 is None and len(obs):
            self.t0 = float(np.min(obs.t_s))
        self.gp.add(self._shifted(obs))

    def predict(self, t_s) -> tuple[np.ndarray, np.ndarray]:
        mean, sd = self.gp.predict(t_s)
        if self.t0 is None:
            return mean, sd
        return mean + self._mean(t_s), sd

    def residuals(self, obs) -> tuple[np.ndarray, np.ndarray]:
        if self.t0 is None:
            return self.gp.residuals(obs)
        return self.gp.residuals(self._shifted(obs))
