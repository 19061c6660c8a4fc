"""Drift-calibration session: a short series on a known lattice gives the drift velocity, the
scan distortion (scale, shear, flyback, line jitter) and its principal modes, as a report
folder; the engine loads the result (``EngineConfig.calibration``) and corrects with it from
the first frame.

Pipeline (:func:`calibrate_frames`)::

    locate (classical) -> track (Tracker: the frame-to-frame shift, so sites stay the same
    sites while the specimen drifts) -> every column is assigned its site of the *known*
    lattice (:func:`fit_lattice` on the first frame) -> one drift sample per column with the
    ideal site as its reference (``observations_from_columns``) -> OnlineDriftGP over the
    whole session (the linear scan-distortion terms marginalised exactly) + ``refit`` of the
    hyperparameters -> :class:`Calibration` (+ figures, :func:`write_report`).

With the ideal lattice as the reference the scan distortion is observable in absolute terms
(DESIGN.md: "the reference lattice ... comes from a known lattice in a calibration"); with the
engine's measured reference it cancels. Conventions (as :class:`OnlineDriftGP`): a column at
specimen position p is seen at ``p + d(t) - b(t) - S(pos)`` (nm, (y, x)), with
``S(pos) = D (pos - c) + flyback``, ``D = [[scale_y, shear_yx], [shear, scale_x]]`` (rows:
output y, x; columns: input y, x); ``shear`` is the x offset per unit y, as
``simulator.ScanConfig.shear``. A known lattice fixes lengths and angles but not how the crystal
lies on the grid to a fraction of a degree: its in-plane rotation is fitted, with the convention
that the fast-scan (x) axis is exact (``shear_yx`` = 0), so ``shear`` is the whole
non-orthogonality of the slow axis.

The analysis path imports nothing from ``simulator``: the lattices by name are copied here
(:data:`LATTICES`, checked against ``simulator/specimen.py`` by the tests); only
:func:`calibrate_simulator` imports the simulator, lazily.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

__all__ = ["SCHEMA", "LATTICES", "Lattice", "LatticeFit", "Calibration", "CalibrationRun", "lattice_by_name",
           "parse_lattice_vectors", "fit_lattice", "calibrate_frames", "calibrate_simulator", "write_report",
           "load_cached", "CalibratedGP"]

SCHEMA = "stem-live/calibration/1"
Progress = Callable[[str, int, int], None]

_SQ3 = math.sqrt(3.0)


# ----------------------------------------------------------------------------- lattices
@dataclass(frozen=True)
class Lattice:
    """A known column lattice, image frame: cell vectors ``a_nm``, ``b_nm`` as (y, x) nm and the
    columns of one cell as fractional coordinates ``basis`` ((f_a, f_b), ...)."""

    a_nm: tuple[float, float]
    b_nm: tuple[float, float]
    basis: tuple[tuple[float, float], ...] = ((0.0, 0.0),)
    name: str = ""

    @property
    def cell(self) -> np.ndarray:
        """(2, 2) matrix whose columns are a and b (y, x) nm."""
        return np.array([self.a_nm, self.b_nm], dtype=float).T

    @property
    def basis_nm(self) -> np.ndarray:
        """(K, 2) basis positions (y, x) nm."""
        return np.asarray(self.basis, dtype=float).reshape(-1, 2) @ self.cell.T

    @property
    def min_distance_nm(self) -> float:
        """Smallest distance between two columns (nm)."""
        n = np.arange(-2, 3)
        n1, n2 = (g.ravel() for g in np.meshgrid(n, n, indexing="ij"))
        pts = (np.stack([n1, n2], 1) @ self.cell.T)[:, None, :] + self.basis_nm[None, :, :]
        d = np.hypot(*(pts.reshape(-1, 2) - self.basis_nm[0]).T)
        return float(np.min(d[d > 1e-9]))

    def to_dict(self) -> dict:
        return {"name": self.name, "a_nm": list(self.a_nm), "b_nm": list(self.b_nm),
                "basis": [list(b) for b in self.basis]}


def _hex(a: float) -> tuple[tuple[float, float], tuple[float, float]]:
    return (0.0, a), (a * _SQ3 / 2, a / 2)


#: column lattices of the simulator presets (the values of simulator/specimen.py, image frame)
LATTICES: dict[str, Lattice] = {
    "graphene": Lattice(*_hex(0.246), basis=((0.0, 0.0), (1 / 3, 1 / 3)), name="graphene"),
    "srtio3": Lattice((0.0, 0.3905), (0.3905, 0.0), basis=((0.0, 0.0), (0.5, 0.5), (0.5, 0.0), (0.0, 0.5)),
                      name="srtio3"),
    "mos2": Lattice(*_hex(0.316), basis=((1 / 3, 1 / 3), (2 / 3, 2 / 3)), name="mos2"),
}


def lattice_by_name(name: str) -> Lattice:
    """One of :data:`LATTICES`; ValueError naming the choices otherwise."""
    try:
        return LATTICES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown lattice {name!r}; choose one of {', '.join(LATTICES)} "
                         f"or give two vectors with --lattice-vectors ay,ax,by,bx (nm)") from None


def parse_lattice_vectors(text: str) -> Lattice:
    """``"ay,ax,by,bx"`` (nm, image axes) -> a one-column-per-cell lattice."""
    try:
        v = [float(s) for s in text.replace(" ", "").split(",")]
    except ValueError:
        v = []
    if len(v) != 4 or not all(math.isfinite(x) for x in v):
        raise ValueError(f"lattice vectors must be four numbers ay,ax,by,bx in nm, got {text!r}")
    a, b = np.array(v[:2]), np.array(v[2:])
    if abs(a[0] * b[1] - a[1] * b[0]) < 1e-6 * max(np.dot(a, a), np.dot(b, b), 1e-12) or min(
            np.hypot(*a), np.hypot(*b)) < 0.02:
        raise ValueError(f"lattice vectors {text!r} are parallel or shorter than 0.02 nm")
    return Lattice((v[0], v[1]), (v[2], v[3]), name="vectors")


def _rot(phi: float) -> np.ndarray:
    """2x2 matrix on (y, x) column vectors turning atan2(y, x) by +phi (simulator.specimen.rot)."""
    c, s = math.cos(phi), math.sin(phi)
    return np.array([[c, s], [-s, c]])


@dataclass(frozen=True)
class LatticeFit:
    """The known lattice placed on the first frame (nominal nm, (y, x)).

    ``affine`` (2, 2) and ``offset_nm``: apparent offset from ``origin_nm`` ~= affine @ (ideal
    offset in the given lattice's frame) + offset_nm; it includes the distortion and the drift
    during the first frame, and is used only to find each column's site. ``rotation_rad``: the
    in-plane rotation of the crystal against the given vectors (fast-scan axis exact).
    ``k0``: basis index of the column at ``origin_nm``."""

    lattice: Lattice
    origin_nm: np.ndarray
    k0: int
    affine: np.ndarray
    offset_nm: np.ndarray
    rotation_rad: float
    rms_nm: float
    n_inliers: int
    guess_rad: float = 0.0

    @property
    def total_rotation_rad(self) -> float:
        """The crystal's rotation against the lattice as given (the guess plus the fit)."""
        return self.guess_rad + self.rotation_rad

    def _nearest(self, u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nearest site to ideal offsets u (n, 2): (site offset nm (n, 2), residual nm (n,), key (n,))."""
        cell = self.lattice.cell
        fb = np.asarray(self.lattice.basis, float).reshape(-1, 2)
        rel = fb - fb[self.k0]                                   # (K, 2) fractional
        f = np.linalg.solve(cell, u.T).T                         # (n, 2) fractional
        r = f[:, None, :] - rel[None, :, :]                      # (n, K, 2)
        n = np.rint(r)
        res = (r - n) @ cell.T                                   # (n, K, 2) nm
        d = np.hypot(res[..., 0], res[..., 1])
        k = np.argmin(d, axis=1)
        i = np.arange(len(u))
        nn = n[i, k].astype(np.int64)
        site = (nn + rel[k]) @ cell.T
        key = ((nn[:, 0] + (1 << 20)) << 24) | ((nn[:, 1] + (1 << 20)) << 3) | k.astype(np.int64)
        return site, d[i, k], key

    def assign(self, q_nm: np.ndarray, *, tol_frac: float = 0.3) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sites of columns at first-frame positions ``q_nm`` (n, 2) nm (the frame's positions
        minus its tracked shift): (ideal position nm (n, 2), site key (n,), ok (n,)). The ideal
        position is the undistorted lattice, turned by ``rotation_rad``, placed at the origin;
        ``ok``: within ``tol_frac`` x the smallest column distance of a site."""
        q = np.asarray(q_nm, float).reshape(-1, 2)
        u = np.linalg.solve(self.affine, (q - self.origin_nm - self.offset_nm).T).T
        site, d, key = self._nearest(u)
        ideal = self.origin_nm + self.offset_nm + site @ _rot(self.rotation_rad).T
        return ideal, key, d < tol_frac * self.lattice.min_distance_nm


def fit_lattice(points_nm: np.ndarray, lattice: Lattice, *, rotation_guess_rad: float = 0.0,
                fit_rotation: bool = True, start_radius_frac: float = 3.0, grow: float = 1.6,
                tol_frac: float = 0.3, max_iter: int = 30) -> LatticeFit:
    """Place ``lattice`` on one frame's columns ``points_nm`` (n, 2) (nominal nm, (y, x)).

    Starting from the column nearest the centre, sites are assigned in a disc that grows by
    ``grow`` per step (from ``start_radius_frac`` x the smallest column distance), with an
    affine map refitted on the inliers each time, so scale errors of several % and rotations
    of a few degrees still find the right sites. ``rotation_guess_rad``: the crystal's known
    orientation (e.g. minus the scan rotation); ``fit_rotation``: fit the rest (LQ
    decomposition of the affine map: fast-scan axis exact), else take the guess as exact."""
    pts = np.asarray(points_nm, float).reshape(-1, 2)
    pts = pts[np.all(np.isfinite(pts), axis=1)]
    if len(pts) < 8:
        raise ValueError(f"the first frame has {len(pts)} columns: too few to place the lattice on")
    lat = replace(lattice, a_nm=tuple(_rot(rotation_guess_rad) @ np.asarray(lattice.a_nm, float)),
                  b_nm=tuple(_rot(rotation_guess_rad) @ np.asarray(lattice.b_nm, float)))
    dmin = lat.min_distance_nm
    centre = np.median(pts, axis=0)
    origin = pts[np.argmin(np.hypot(*(pts - centre).T))]
    rel = pts - origin
    dist = np.hypot(*rel.T)
    radius = start_radius_frac * dmin
    # which basis column sits at the origin: the best match in the starting disc
    eye, zero = np.eye(2), np.zeros(2)
    inside = dist <= radius
    scores = [np.median(LatticeFit(lat, origin, k, eye, zero, 0.0, 0.0, 0)._nearest(rel[inside])[1])
              for k in range(len(lat.basis))]
    k0 = int(np.argmin(scores))
    fit = LatticeFit(lat, origin, k0, eye, zero, 0.0, np.inf, 0)
    good = np.zeros(len(pts), bool)
    last = False
    for _ in range(max_iter):
        inside = dist <= radius
        u = np.linalg.solve(fit.affine, (rel - fit.offset_nm).T).T
        site, d, _ = fit._nearest(u)
        good = inside & (d < tol_frac * dmin)
        if good.sum() >= 6:
            X = np.column_stack([site[good], np.ones(good.sum())])
            coef, *_ = np.linalg.lstsq(X, rel[good], rcond=None)
            res = rel[good] - X @ coef
            fit = replace(fit, affine=coef[:2].T, offset_nm=coef[2],
                          rms_nm=float(np.sqrt(np.mean(np.sum(res ** 2, axis=1)))), n_inliers=int(good.sum()))
        if last:
            break
        if radius > dist.max():
            last = True                                           # one more pass over everything
        radius *= grow
    if fit.n_inliers < 8 or fit.n_inliers < 0.5 * len(pts):
        raise ValueError(f"the lattice {lattice.name or 'given'} does not fit the first frame's columns "
                         f"({fit.n_inliers} of {len(pts)} on a site): check the lattice and the pixel size")
    theta = float(np.arctan2(fit.affine[0, 1], fit.affine[0, 0])) if fit_rotation else 0.0
    return replace(fit, rotation_rad=theta, guess_rad=float(rotation_guess_rad))


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
    def from_dict(cls, d: dict, where: str = "calibration") -> "Calibration":
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
    def load(cls, path: str | os.PathLike) -> "Calibration":
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
        from .locate.flyback import check

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

    def wrap_gp(self, gp, *, velocity_sd_floor_nm_per_s: float = 0.01) -> "CalibratedGP":
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


# ----------------------------------------------------------------------------- the session
@dataclass
class CalibrationRun:
    """A calibration and the arrays its figures are drawn from (units nm, s, px)."""

    calibration: Calibration
    trace_t: np.ndarray            # (m,) scan times of the GP trace (s, from the first frame)
    trace_mean: np.ndarray         # (m, 2) GP drift mean (nm, relative to its start)
    trace_sd: np.ndarray           # (m, 2)
    points_t: np.ndarray           # (k,) measured drift points (binned samples)
    points_d: np.ndarray           # (k, 2)
    truth_t: np.ndarray | None     # simulator truth d(t), same origin
    truth_d: np.ndarray | None
    field_pos_px: np.ndarray       # (c, 2) site positions (first frame, px)
    field_meas_nm: np.ndarray      # (c, 2) mean measured distortion -S at the sites (nm)
    field_model_nm: np.ndarray     # (c, 2) modelled -S (linear + flyback) at the sites
    frame_shape: tuple[int, int]
    pca_modes: np.ndarray          # (n_modes, c, 2)
    pca_ts: np.ndarray             # (frames, n_modes) nm
    pca_evr: np.ndarray
    pca_pos_px: np.ndarray         # (c, 2)
    frame_t: np.ndarray            # (frames,) frame mid times (s, from the first frame)


def _mean_sd(gp, t: np.ndarray, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """``gp.predict`` in chunks of ``chunk`` times (the last padded): the posterior sd is solved
    at 16 points per chunk and interpolated, so short chunks give it at trace resolution."""
    t = np.asarray(t, dtype=float).ravel()
    means, sds = [], []
    for a in range(0, len(t), chunk):
        tt = t[a:a + chunk]
        m, s = gp.predict(np.concatenate([tt, np.full(chunk - len(tt), tt[-1])]))
        means.append(m[:len(tt)])
        sds.append(s[:len(tt)])
    if not means:
        return np.zeros((0, 2)), np.zeros((0, 2))
    return np.concatenate(means), np.concatenate(sds)


def _line_jitter(gp, obs, line_time_s: float) -> float:
    """Std (nm) of a common x offset of the columns scanned on one line, from the GP residuals:
    the variance of the per-line mean residual minus what the per-column noise explains."""
    mean, _ = gp.predict(obs.t_s)
    r = obs.disp_nm[:, 1] - (mean[:, 1] - gp.distortion(obs.pos_px, obs.t_line_s)[:, 1])
    line = np.floor((obs.t_s - obs.t_line_s) / line_time_s + 0.5).astype(np.int64)
    _, g = np.unique(line, return_inverse=True)
    n = np.bincount(g)
    m = n >= 2
    if m.sum() < 8:
        return 0.0
    gm = np.bincount(g, r) / n
    within = np.bincount(g, (r - gm[g]) ** 2) / np.maximum(n - 1, 1)   # unbiased per-line variance
    noise = float(np.mean(within[m]))
    between = float(np.var(gm[m], ddof=1))
    return float(np.sqrt(max(between - noise * float(np.mean(1.0 / n[m])), 0.0)))


def _report(label: str, progress: Progress | None, i: int, n: int) -> None:
    if progress is not None:
        progress(label, i, n)


def _affine_summary(mode: np.ndarray, pos_nm: np.ndarray) -> dict:
    """A mode field (c, 2) as translation + gradient (least squares) and how much of it that explains."""
    X = np.column_stack([np.ones(len(pos_nm)), pos_nm - pos_nm.mean(axis=0)])
    coef, *_ = np.linalg.lstsq(X, mode, rcond=None)
    tot = float(np.sum(mode ** 2)) or 1.0
    trans = coef[0]
    return {"translation": [float(v) for v in trans],
            "translation_fraction": float(len(mode) * np.sum(trans ** 2) / tot),
            "gradient_per_nm": [[float(coef[1, 0]), float(coef[2, 0])], [float(coef[1, 1]), float(coef[2, 1])]],
            "affine_fraction": float(1.0 - np.sum((mode - X @ coef) ** 2) / tot)}


def calibrate_frames(frames: Iterable, lattice: Lattice, *, max_frames: int | None = None,
                     spacing_px: float | None = None, sigma_px: float = 0.05, fit_rotation: bool = True,
                     max_samples: int = 24000, refit_steps: int = 60, n_modes: int = 3, min_seen_frac: float = 0.5,
                     edge_frac: float = 0.5, reweight_bins: int = 3, min_groups: int = 512,
                     source: str = "frames", truth: Callable | None = None,
                     total: int | None = None, progress: Progress | None = None) -> CalibrationRun:
    """Calibrate from a series of :class:`~stem_live.protocol.Frame` of a known lattice.

    frames: the series (an iterator is consumed once); max_frames: use at most this many.
    lattice: the known column lattice (:func:`lattice_by_name`, :func:`parse_lattice_vectors`).
    spacing_px: column spacing for the locator (None: estimated on the first frame).
    sigma_px: localisation uncertainty of one column (px) for the GP's sample weights.
    fit_rotation: fit the crystal's in-plane rotation (fast-scan axis exact), else the lattice
        vectors' orientation is taken as exact.
    max_samples: samples the session GP is conditioned on (thinned evenly above this).
    refit_steps: optax steps of the hyperparameter fit. n_modes: PCA modes.
    min_seen_frac: sites seen in fewer frames than this fraction are left out of the PCA.
    edge_frac: columns closer than this x the spacing to the frame edge are left out (a peak
        cut by the edge is located with a bias, which reads as a scale error).
    reweight_bins: after a first fit, columns are split into this many intensity classes, each
        weighted by the robust std of its residuals (> 5 sigma dropped); 0: off.
    min_groups: smallest padded GP size (OnlineDriftGP; the engine's value shares its compilation).
    source: a label for the report. total: frames expected (for progress, when ``frames`` has no length).
    truth: simulator only, ``truth(seq)`` -> the frame's FrameTruth (kept for the report).
    progress: ``progress(label, done, total)`` per frame and per GP step.
    Raises ValueError (one line) for a series that cannot be calibrated.
    """
    from .distortion import OnlineDriftGP, observations_from_columns, trajectory_pca
    from .distortion.observations import Observations
    from .locate import estimate_spacing, locate_classical
    from .track import Tracker

    t_wall = time.perf_counter()
    obs_list, keys, ints, seqs, t_mid, truths = [], [], [], [], [], []
    fit: LatticeFit | None = None
    tracker = None
    first = None
    n_total = total or max_frames or (len(frames) if hasattr(frames, "__len__") else 0)
    for k, frame in enumerate(frames):
        if max_frames is not None and k >= max_frames:
            break
        img = np.asarray(frame.image, dtype=np.float32)
        psz = np.asarray(frame.pixel_size_nm, dtype=float)
        if first is None:
            first = frame
            if spacing_px is None:
                spacing_px = float(estimate_spacing(img))
            tracker = Tracker(spacing_px=spacing_px, history=max(8, (max_frames or 64)))
            edge_px = edge_frac * spacing_px
        elif img.shape != first.image.shape or not np.allclose(psz, first.pixel_size_nm, rtol=1e-6):
            raise ValueError(f"frame {k} (seq {frame.seq}) has another size or pixel size than the first: "
                             f"a calibration needs one scan setting")
        cols = locate_classical(img, spacing_px)
        if len(cols) < 8:
            raise ValueError(f"frame {k} (seq {frame.seq}): only {len(cols)} columns found: not a lattice image")
        tracker.update(cols)
        shift = np.asarray(tracker.shift)
        # the line-averaged positions, as the engine's drift model takes them: the GP has its own
        # per-line term, and fed the de-jittered ones the 60-frame session's velocity was 95 % off
        pos = cols.line_averaged()
        q_nm = (pos - shift) * psz
        if fit is None:
            fit = fit_lattice(q_nm, lattice, rotation_guess_rad=-float(frame.scan_rotation_rad),
                              fit_rotation=fit_rotation)
        ideal_nm, key, ok = fit.assign(q_nm)
        if edge_px > 0:
            # columns cut by the frame edge are located with a bias (a truncated peak): a scale error
            h, w = img.shape
            ok &= ((pos[:, 0] >= edge_px) & (pos[:, 0] <= h - 1 - edge_px)
                   & (pos[:, 1] >= edge_px) & (pos[:, 1] <= w - 1 - edge_px))
        obs = observations_from_columns(ideal_nm[ok] / psz, pos[ok], None, t_start=frame.t_start,
                                        line_time_s=frame.line_time_s, dwell_s=frame.dwell_us * 1e-6,
                                        pixel_size_nm=frame.pixel_size_nm, beam_shift_nm=frame.beam_shift_nm,
                                        sigma_px=sigma_px, frame=frame.seq)
        obs_list.append(obs)
        keys.append(key[ok])
        ints.append(np.asarray(cols.intensity, float)[ok])
        seqs.append(frame.seq)
        t_mid.append(frame.t_start + 0.5 * frame.frame_time_s)
        if truth is not None:
            truths.append(truth(frame.seq))
        _report("frames", progress, k + 1, n_total or k + 1)
    if first is None:
        raise ValueError("no frames to calibrate from")
    if len(obs_list) < 3:
        raise ValueError(f"{len(obs_list)} frame(s): a calibration needs at least 3 (drift and distortion "
                         f"are told apart by how they change from frame to frame)")
    psz = np.asarray(first.pixel_size_nm, dtype=float)
    allobs = Observations.concat(obs_list)
    allkeys = np.concatenate(keys)
    allint = np.concatenate(ints)

    # ---- the session GP: every frame in one window, distortion terms free
    _report("GP: conditioning on the session", progress, 0, 3)
    gp_kw = dict(window_frames=1, max_samples=max_samples, min_groups=min_groups,
                 centre_px=tuple(np.asarray(first.image.shape, float) / 2.0))
    gp = OnlineDriftGP(**gp_kw)
    gp.add(allobs)
    n_outliers = 0
    if reweight_bins > 0:
        # the locator's precision differs between bright and dim columns (Sr vs O in SrTiO3):
        # each intensity class gets the robust std of its residuals as its sigma; > 5 sigma is dropped
        mean_k, _ = gp.predict(allobs.t_s)
        res = allobs.disp_nm - (mean_k - gp.distortion(allobs.pos_px, allobs.t_line_s))
        edges = np.quantile(allint, np.linspace(0, 1, reweight_bins + 1)[1:-1])
        cls = np.searchsorted(edges, allint)
        sig = np.empty(len(allobs))
        for c in range(reweight_bins):
            m = cls == c
            if m.any():
                r = res[m] - np.median(res[m], axis=0)
                sig[m] = max(1.4826 * float(np.median(np.abs(r))), 1e-4)
        good = np.all(np.abs(res - np.median(res, axis=0)) <= 5.0 * sig[:, None], axis=1)
        n_outliers = int((~good).sum())
        allobs = replace(allobs, sigma_nm=sig).select(good)
        allkeys, allint = allkeys[good], allint[good]
        gp = OnlineDriftGP(**gp_kw)
        gp.add(allobs)
    _report(f"GP: fitting hyperparameters ({refit_steps} steps)", progress, 1, 3)
    fitres = gp.refit(steps=refit_steps) if refit_steps > 0 else {"ok": False}
    _report("GP: drift trace, distortion field, PCA", progress, 2, 3)
    p = gp.distortion_params
    h = gp.hyperparameters
    sd_v = float(gp.snapshot.beta_sd[1, 0])
    jitter = _line_jitter(gp, allobs, first.line_time_s)

    # ---- drift trace (relative to the first line) and measured points
    t_first = float(first.t_start)
    lines = np.concatenate([np.asarray(first.line_times()) - first.t_start + (tm - 0.5 * first.frame_time_s)
                            for tm in t_mid])
    step = max(1, len(lines) // 4000)
    tt = lines[::step]
    mean, sd = _mean_sd(gp, tt)
    base = mean[0].copy()
    S = gp.distortion(allobs.pos_px, allobs.t_line_s)
    drift_samples = allobs.disp_nm + S                      # disp = d - S
    nb = 8
    fidx = np.searchsorted(np.asarray(seqs), allobs.frame)
    f0 = np.asarray(t_mid)[fidx] - 0.5 * first.frame_time_s
    bins = np.floor((allobs.t_s - f0) / first.frame_time_s * nb)
    gid = fidx.astype(np.int64) * nb + np.clip(bins, 0, nb - 1).astype(np.int64)
    ug, inv = np.unique(gid, return_inverse=True)
    cnt = np.bincount(inv)
    pt_t = np.bincount(inv, allobs.t_s) / cnt - t_first
    pt_d = np.stack([np.bincount(inv, drift_samples[:, i]) / cnt for i in range(2)], axis=1) - base

    # ---- per-site distortion field and PCA of the displacement fields
    usite, sinv = np.unique(allkeys, return_inverse=True)
    seen = np.bincount(sinv, minlength=len(usite))
    dmod, _ = gp.predict(allobs.t_s)
    meas = allobs.disp_nm - dmod                            # -S(pos) + noise, per sample
    field_meas = np.stack([np.bincount(sinv, meas[:, i]) / seen for i in range(2)], axis=1)
    field_pos = np.stack([np.bincount(sinv, allobs.pos_px[:, i]) / seen for i in range(2)], axis=1)
    field_model = -gp.distortion(field_pos, field_pos[:, 1] * first.dwell_us * 1e-6)
    F = len(obs_list)
    keep = seen >= max(2, int(np.ceil(min_seen_frac * F)))
    remap = np.full(len(usite), -1)
    remap[keep] = np.arange(keep.sum())
    traj = np.full((F, int(keep.sum()), 2), np.nan)
    sel = remap[sinv] >= 0
    traj[fidx[sel], remap[sinv][sel]] = allobs.disp_nm[sel]
    pca_pos = field_pos[keep]
    pca_summary: dict = {"n_modes": 0}
    modes = np.zeros((n_modes, int(keep.sum()), 2))
    ts = np.zeros((F, n_modes))
    evr = np.zeros(n_modes)
    if keep.sum() >= 3:
        modes, ts, evr = trajectory_pca(traj, n_modes=n_modes)
        pca_summary = {"n_modes": int(n_modes), "sites": int(keep.sum()), "frames": F,
                       "explained_variance_ratio": [float(v) for v in evr],
                       # rms column displacement carried by each mode (unit-norm modes over 2 x sites entries)
                       "rms_displacement_nm": [float(v) for v in np.std(ts, axis=0) / np.sqrt(keep.sum())],
                       "modes": [_affine_summary(modes[i], pca_pos * psz) for i in range(n_modes)]}

    # ---- truth (simulator), and the result
    truth_t = truth_d = None
    if truths:
        truth_t = np.concatenate([tr.line_times_s for tr in truths]) - t_first
        truth_d = np.concatenate([tr.drift_nm for tr in truths])
        # the GP's offset is arbitrary (a constant of the lattice origin): align the truth to the
        # trace by its mean difference
        off = np.mean(truth_d - np.stack([np.interp(truth_t, tt - t_first, mean[:, i] - base[i])
                                          for i in range(2)], axis=1), axis=0)
        truth_d = truth_d - off
    trace_t = tt - t_first
    trace_mean = mean - base
    # the drift velocity over the session: the slope of the GP's drift trace. The GP's own linear
    # term is not it on a short session: its long-scale kernel (up to 100 s) trades off against it
    # (20 frames: 1.8 nm/s where the trace, like the truth, says 0.0085)
    velocity = np.linalg.lstsq(np.stack([np.ones_like(tt), tt - tt.mean()], axis=1), mean, rcond=None)[0][1]
    meta = {"source": source, "lattice": lattice.to_dict(),
            "lattice_fit_rms_nm": fit.rms_nm, "frames": F, "first_seq": int(seqs[0]), "last_seq": int(seqs[-1]),
            "samples": int(len(allobs)), "gp_samples": int(gp.n_samples), "outliers_dropped": n_outliers,
            "frame_shape": list(first.image.shape),
            "pixel_size_nm": [float(v) for v in psz], "dwell_us": float(first.dwell_us),
            "flyback_us": float(first.flyback_us), "spacing_px": float(spacing_px),
            "session_s": float(t_mid[-1] - t_mid[0] + first.frame_time_s),
            "hyperparameters": {k: float(v) for k, v in h.items()}, "refit_ok": bool(fitres.get("ok", False)),
            "gp_linear_velocity_nm_per_s": [float(v) for v in p["velocity_nm_per_s"]],
            "wall_s": round(time.perf_counter() - t_wall, 2),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    cal = Calibration(
        velocity_nm_per_s=tuple(float(v) for v in velocity), velocity_sd_nm_per_s=(sd_v, sd_v),
        scale_error=(p["scale_y"], p["scale_x"]), scale_error_sd=(p["sd_scale_y"], p["sd_scale_x"]),
        shear=p["shear"], shear_sd=p["sd_shear"], shear_yx=p["shear_yx"], rotation_rad=fit.total_rotation_rad,
        flyback_amp_nm=p["flyback_amp_nm"], flyback_amp_sd_nm=p["sd_flyback_amp_nm"],
        flyback_tau_us=p["flyback_tau_us"], line_jitter_nm=jitter,
        pca=pca_summary, meta=meta)
    return CalibrationRun(cal, trace_t, trace_mean, sd, pt_t, pt_d, truth_t, truth_d, field_pos,
                          field_meas, field_model, tuple(first.image.shape), modes, ts, evr, pca_pos,
                          np.asarray(t_mid) - t_first)


# ----------------------------------------------------------------------------- simulator source
#: the distortion the simulator source plants by default (large enough to measure: 1-2 %)
SIM_SCALE_ERROR = (0.01, -0.015)
SIM_SHEAR = 0.02


def _rel(est: float, true: float) -> float | None:
    return None if not true else float(abs(est - true) / abs(true))


def calibrate_simulator(preset: str = "srtio3", frames: int = 60, *, seed: int = 0, size: int = 512,
                        scale_error: tuple[float, float] = SIM_SCALE_ERROR, shear: float = SIM_SHEAR,
                        drift_nm_per_min: float | None = None, config: object | None = None,
                        lattice: Lattice | None = None, progress: Progress | None = None,
                        **kwargs) -> CalibrationRun:
    """A calibration session on the simulator (seeded): ``preset`` at ``size`` px for ``frames``
    frames with the planted scan distortion ``scale_error`` (y, x) / ``shear``; ``config``
    (a ``simulator.MicroscopeConfig``) replaces all of these. The true values go into
    ``calibration.truth`` and the relative errors into ``meta["relative_error"]``.
    Further keyword arguments go to :func:`calibrate_frames`."""
    from simulator import Microscope, MicroscopeConfig, ScanConfig

    from .evaluate import frame_from_sim

    if config is None:
        cfg = MicroscopeConfig(preset=preset, size=size, seed=seed,
                               scan=ScanConfig(scale_error=tuple(scale_error), shear=float(shear)))
        if drift_nm_per_min is not None:
            cfg = replace(cfg, drift=replace(cfg.drift, drift_nm_per_min=float(drift_nm_per_min)))
    else:
        cfg = config
    if cfg.preset not in LATTICES:
        raise ValueError(f"preset {cfg.preset!r} is not a lattice; calibrate on {', '.join(LATTICES)}")
    scope = Microscope(cfg)
    kept: dict[int, object] = {}

    def gen():
        for _ in range(int(frames)):
            image, meta, truth = scope.acquire()
            kept[meta.seq] = truth
            yield frame_from_sim(image, meta)

    run = calibrate_frames(_Sized(gen(), int(frames)), lattice or LATTICES[cfg.preset],
                           source=f"simulator:{cfg.preset}:{cfg.shape[0]}x{cfg.shape[1]}:seed{cfg.seed}",
                           truth=kept.__getitem__, progress=progress, **kwargs)
    sc = cfg.scan
    v = [float(x) for x in cfg.drift.velocity_nm_per_s]
    truth = {"velocity_nm_per_s": v, "scale_error": [float(x) for x in sc.scale_error], "shear": float(sc.shear),
             "shear_yx": 0.0, "flyback_amp_nm": float(sc.flyback_amp_nm), "flyback_tau_us": float(sc.flyback_tau_us),
             "line_jitter_nm": float(sc.line_jitter_nm), "drift": asdict(cfg.drift)}
    c = run.calibration
    rel = {"scale_y": _rel(c.scale_error[0], sc.scale_error[0]), "scale_x": _rel(c.scale_error[1], sc.scale_error[1]),
           "shear": _rel(c.shear, sc.shear), "flyback_amp": _rel(c.flyback_amp_nm, sc.flyback_amp_nm),
           "velocity": float(np.hypot(*(np.subtract(c.velocity_nm_per_s, v))) / max(np.hypot(*v), 1e-12))}
    run.calibration = replace(c, truth=truth, meta={**c.meta, "relative_error": rel})
    return run


class _Sized:
    """An iterator with a length (for progress totals)."""

    def __init__(self, it, n: int) -> None:
        self.it, self.n = it, n

    def __iter__(self):
        return self.it

    def __len__(self) -> int:
        return self.n


# ----------------------------------------------------------------------------- report folder
def _grid_mean(pos_px: np.ndarray, vec: np.ndarray, shape: tuple[int, int], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``vec`` (c, 2) over an n x n grid of the frame: (centres (m, 2) px, means (m, 2))."""
    cell = np.asarray(shape, float) / n
    ij = np.clip((pos_px // cell).astype(np.int64), 0, n - 1)
    g = ij[:, 0] * n + ij[:, 1]
    cnt = np.bincount(g, minlength=n * n)
    m = cnt > 0
    mean = np.stack([np.bincount(g, vec[:, i], n * n)[m] / cnt[m] for i in range(2)], axis=1)
    centres = np.stack([(np.flatnonzero(m) // n + 0.5) * cell[0], (np.flatnonzero(m) % n + 0.5) * cell[1]], axis=1)
    return centres, mean


def _fig_trace(run: CalibrationRun, path: Path) -> Path:
    from .pngplot import COLORS, Canvas

    c = run.calibration
    fig = Canvas(930, 960)
    truth = run.truth_t is not None
    fig.text(480, 8, "DRIFT OVER THE SESSION: GP MEAN, +-2 SIGMA BAND, MEASURED (BINNED)"
             + (", SIMULATOR TRUTH" if truth else ""), anchor="centre")
    t = run.trace_t
    tmax = float(t[-1]) if len(t) else 1.0

    def limits(vals):
        lo = min(float(np.nanpercentile(v, 0.5)) for v in vals)
        hi = max(float(np.nanpercentile(v, 99.5)) for v in vals)
        pad = 0.08 * (hi - lo + 1e-3)
        return lo - pad, hi + pad

    gp_at_pts = np.stack([np.interp(run.points_t, t, run.trace_mean[:, i]) for i in range(2)], axis=1)
    for i, (axis, y0) in enumerate((("Y", 50), ("X", 340))):
        m, sd = run.trace_mean[:, i] * 1e3, run.trace_sd[:, i] * 1e3
        vals = [m - 2 * sd, m + 2 * sd, run.points_d[:, i] * 1e3] + ([run.truth_d[:, i] * 1e3] if truth else [])
        ax = fig.panel(90, y0 + 20, 840, 220, xlim=(0.0, tmax), ylim=limits(vals),
                       title=f"{axis}: V = {c.velocity_nm_per_s[i]:.4f} +- {c.velocity_sd_nm_per_s[i]:.4f} NM/S")
        ax.band(t, m - 2 * sd, m + 2 * sd, COLORS["band"])
        ax.points(run.points_t, run.points_d[:, i] * 1e3, COLORS["grey"], size=2)
        ax.line(t, m, COLORS["blue"], width=2)
        if truth:
            ax.line(run.truth_t, run.truth_d[:, i] * 1e3, COLORS["green"])
        ax.axes(ylabel=f"D{axis} (PM)")
        ax.legend([("GP", COLORS["blue"]), ("MEASURED", COLORS["grey"])]
                  + ([("TRUTH", COLORS["green"])] if truth else []))
    # the band at its own scale: everything minus the GP mean
    sd = run.trace_sd * 1e3
    res = (run.points_d - gp_at_pts) * 1e3
    vals = [2 * sd[:, 0], -2 * sd[:, 0], 2 * sd[:, 1], -2 * sd[:, 1], res[:, 0], res[:, 1]]
    if truth:
        tr = (run.truth_d - np.stack([np.interp(run.truth_t, t, run.trace_mean[:, i]) for i in range(2)], 1)) * 1e3
        vals += [tr[:, 0], tr[:, 1]]
    ax = fig.panel(90, 650, 840, 220, xlim=(0.0, tmax), ylim=limits(vals),
                   title="MINUS THE GP MEAN: +-2 SIGMA BAND (Y, X), MEASURED" + (", TRUTH" if truth else ""))
    ax.band(t, -2 * np.max(sd, axis=1), 2 * np.max(sd, axis=1), COLORS["band"])
    ax.hline(0.0, COLORS["grey"])
    ax.points(run.points_t, res[:, 0], COLORS["orange"], size=2)
    ax.points(run.points_t, res[:, 1], COLORS["black"], size=2)
    if truth:
        ax.line(run.truth_t, tr[:, 0], COLORS["red"])
        ax.line(run.truth_t, tr[:, 1], COLORS["green"])
    ax.axes(xlabel="SCAN TIME (S)", ylabel="PM")
    ax.legend([("MEASURED Y", COLORS["orange"]), ("MEASURED X", COLORS["black"])]
              + ([("TRUTH Y", COLORS["red"]), ("TRUTH X", COLORS["green"])] if truth else []))
    return fig.save(path)


def _fig_field(run: CalibrationRun, path: Path) -> Path:
    from .pngplot import COLORS, Canvas

    c = run.calibration
    h, w = run.frame_shape
    fig = Canvas(760, 720)
    n = 12
    cm, mm = _grid_mean(run.field_pos_px, run.field_meas_nm, (h, w), n)
    cmod, mod = _grid_mean(run.field_pos_px, run.field_model_nm, (h, w), n)
    big = max(float(np.max(np.hypot(*mod.T), initial=0.0)),
              float(np.percentile(np.hypot(*mm.T), 95)) if len(mm) else 0.0, 1e-6)
    scale = 0.9 * (min(h, w) / n) / big                       # px per nm
    mag = scale * float(np.mean(c.meta.get("pixel_size_nm", [1.0])))   # arrow length / true length
    ax = fig.panel(70, 60, 600, 600, xlim=(0, w), ylim=(0, h), equal=True, flip_y=True,
                   title=f"SCAN DISTORTION -S(POS) AT THE SITES, ARROWS X {mag:.0f}")
    ax.arrows(cm[:, 1], cm[:, 0], mm[:, 1], mm[:, 0], COLORS["blue"], scale=scale)
    ax.arrows(cmod[:, 1], cmod[:, 0], mod[:, 1], mod[:, 0], COLORS["red"], scale=scale)
    ax.axes(xlabel="COLUMN (PX)", ylabel="ROW (PX)")
    ax.legend([("MEASURED", COLORS["blue"]), ("MODEL", COLORS["red"])])
    def line(v: dict) -> str:
        return (f"SCALE Y {v['scale_error'][0] * 100:+.3f} %  SCALE X {v['scale_error'][1] * 100:+.3f} %  "
                f"SHEAR {v['shear'] * 100:+.3f} %  FLYBACK {v['flyback_amp_nm'] * 1e3:.1f} PM, "
                f"{v['flyback_tau_us']:.0f} US")

    fig.text(360, 700, "FITTED  " + line({"scale_error": c.scale_error, "shear": c.shear,
                                          "flyback_amp_nm": c.flyback_amp_nm, "flyback_tau_us": c.flyback_tau_us}),
             anchor="centre")
    if c.truth:
        fig.text(360, 720, "TRUE    " + line(c.truth), COLORS["green"], anchor="centre")
    return fig.save(path)


def _fig_pca(run: CalibrationRun, path: Path) -> Path:
    from .pngplot import COLORS, Canvas

    k = int(run.pca_modes.shape[0])
    h, w = run.frame_shape
    W = 320
    fig = Canvas(620, max(1, k) * W + 40)
    fig.text(fig.shape[1] / 2, 8, "PCA OF THE COLUMN DISPLACEMENT FIELDS (ARXIV:2009.05635)", anchor="centre")
    C = max(run.pca_modes.shape[1], 1)
    for i in range(k):
        mode = run.pca_modes[i] * np.sqrt(C)                  # rms 1 per column
        cm, mm = _grid_mean(run.pca_pos_px, mode, (h, w), 10) if C > 1 else (np.zeros((0, 2)), np.zeros((0, 2)))
        big = max(float(np.max(np.hypot(*mm.T), initial=0.0)), 1e-9)
        ax = fig.panel(40 + i * W, 50, W - 60, W - 60, xlim=(0, w), ylim=(0, h), equal=True, flip_y=True,
                       title=f"MODE {i + 1}: {100 * run.pca_evr[i]:.1f} %")
        ax.arrows(cm[:, 1], cm[:, 0], mm[:, 1], mm[:, 0], COLORS["blue"], scale=0.9 * (min(h, w) / 10) / big)
        ax.axes(ticks=False)
        ts = run.pca_ts[:, i] / np.sqrt(C) * 1e3                # pm, rms column displacement
        lo, hi = float(np.min(ts, initial=0.0)), float(np.max(ts, initial=0.0))
        pad = 0.1 * (hi - lo + 1e-3)
        ax2 = fig.panel(60 + i * W, 360, W - 80, 200, xlim=(0, float(run.frame_t[-1]) if len(run.frame_t) else 1),
                        ylim=(lo - pad, hi + pad), title="AMPLITUDE (PM)")
        ax2.hline(0.0)
        ax2.line(run.frame_t, ts, COLORS["blue"], width=2)
        ax2.points(run.frame_t, ts, COLORS["blue"], size=4)
        ax2.axes(xlabel="TIME (S)")
    return fig.save(path)


def write_report(run: CalibrationRun, out_dir: str | os.PathLike, *, figures: bool = True) -> list[Path]:
    """The report folder: ``calibration.json`` (:meth:`Calibration.save`), ``drift_trace.csv``
    (GP mean and sd, nm, over scan time s), ``pca_modes.npz`` (sites px, modes, time series)
    and, with ``figures``, ``drift_trace.png``, ``distortion_field.png``, ``pca_modes.png``.
    Returns the paths written."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the report folder {out}: {exc.strerror or exc}") from None
    paths = [run.calibration.save(out / "calibration.json")]
    table = np.column_stack([run.trace_t, run.trace_mean, run.trace_sd])
    p = out / "drift_trace.csv"
    np.savetxt(p, table, delimiter=",", fmt="%.9g", header="t_s,drift_y_nm,drift_x_nm,sd_y_nm,sd_x_nm", comments="")
    paths.append(p)
    p = out / "pca_modes.npz"
    np.savez_compressed(p, sites_px=run.pca_pos_px, modes=run.pca_modes, time_series=run.pca_ts,
                        explained_variance_ratio=run.pca_evr, frame_t_s=run.frame_t)
    paths.append(p)
    if figures:
        paths += [_fig_trace(run, out / "drift_trace.png"), _fig_field(run, out / "distortion_field.png"),
                  _fig_pca(run, out / "pca_modes.png")]
    return paths
