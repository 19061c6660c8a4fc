"""Actuator calibration: move the beam by known test shifts, measure how the image responds, fit
the 2x2 matrix from commanded beam shift to effective beam shift.

Convention (nm, (y, x) in image axes): a commanded beam shift ``c`` acts as the effective shift
``b = A @ c``; a specimen point appears at ``p + d(t) - b``. A perfect actuator has ``A = I``.
``A`` is reported as gain (``sqrt(det A)``), rotation, skew and anisotropy:
``A = R(rotation) @ [[anisotropy * g, skew * g], [0, g]]`` with ``g = gain / sqrt(anisotropy)``
(``R(t) = [[cos t, -sin t], [sin t, cos t]]`` on (y, x) vectors).

The pattern: from the start, ``+s`` and ``-s`` along y and along x, each followed by a return to
the start, ``repeats`` times, for a ladder of step sizes ``s``. Every frame is registered against
the first frame (:func:`stem_live.register.register`); the drift of the session is removed
by interpolating, in time, the frames taken at the start position around each step (a drift
linear between them). Aliasing on a periodic lattice: the first step is below 0.25 lattice
period (unambiguous), and every larger step is registered near the shift the matrix fitted so
far predicts (within 0.4 period), so that no lattice translation is mistaken for a step.

The instrument is anything with ``acquire() -> Frame``, ``get_beam_shift()`` and
``set_beam_shift(nm)`` (an :class:`instrument_adapters.base.Instrument`); the beam goes back to
where it started in every case.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stem_live.register import make_reference, register

DIRECTIONS = ((1.0, 0.0), (-1.0, 0.0), (0.0, 1.0), (0.0, -1.0))
MIN_PEAK = 0.1  # a registration below this correlation is no measurement


class ActuatorCalibrationError(RuntimeError):
    """The calibration could not measure the actuator; the message says what to do."""


@dataclass(frozen=True)
class ActuatorCalibration:
    """The measured actuator: ``matrix`` = effective beam shift per commanded beam shift (2x2 on
    (y, x), image axes; identity = perfect), its decomposition, and how well it fits.
    Written by ``stem-live calibrate --actuator``, read by ``--actuator-calibration FILE``."""

    matrix: list[list[float]]
    gain: float
    rotation_deg: float
    skew: float
    anisotropy: float
    residual_nm: float = 0.0  # RMS of the fit over the test steps
    steps: int = 0  # test steps measured
    step_sizes_nm: list[float] = field(default_factory=list)
    drift_nm_per_s: list[float] = field(default_factory=lambda: [0.0, 0.0])  # the session's mean drift, (y, x)
    source: str = ""
    kind: str = "stem-live actuator calibration"

    @classmethod
    def from_matrix(cls, m: np.ndarray, **kw: Any) -> ActuatorCalibration:
        gain, rot, skew, aniso = decompose(m)
        return cls(matrix=[[float(v) for v in row] for row in np.asarray(m, dtype=np.float64)], gain=gain,
                   rotation_deg=math.degrees(rot), skew=skew, anisotropy=aniso, **kw)

    @property
    def array(self) -> np.ndarray:
        return np.asarray(self.matrix, dtype=np.float64)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(asdict(self), indent=1))
        return p

    @classmethod
    def load(cls, path: str | Path) -> ActuatorCalibration:
        """Read a file written by :meth:`save`; ValueError (one line) if it is not one."""
        try:
            d = json.loads(Path(path).read_text())
            m = np.asarray(d["matrix"], dtype=np.float64)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path} is not an actuator calibration ({type(exc).__name__}): make one with "
                             "`stem-live calibrate --actuator`") from None
        if m.shape != (2, 2) or not np.isfinite(m).all() or abs(np.linalg.det(m)) < 1e-6:
            raise ValueError(f"{path}: the actuator matrix must be an invertible 2x2 matrix: run "
                             "`stem-live calibrate --actuator` again")
        keep = {k: d[k] for k in ("residual_nm", "steps", "step_sizes_nm", "drift_nm_per_s", "source") if k in d}
        return cls.from_matrix(m, **{"residual_nm": 0.0, "steps": 0, **keep})


def rotation(theta: float) -> np.ndarray:
    """R(theta) on (y, x) vectors."""
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s], [s, c]])


def decompose(m: np.ndarray) -> tuple[float, float, float, float]:
    """(gain, rotation rad, skew, anisotropy) of a 2x2 matrix (see the module's convention)."""
    q, u = np.linalg.qr(np.asarray(m, dtype=np.float64))
    d = np.sign(np.diag(u))
    d[d == 0] = 1.0
    q, u = q * d, d[:, None] * u
    theta = math.atan2(q[1, 0], q[0, 0])
    gain = math.sqrt(abs(u[0, 0] * u[1, 1]))
    return gain, theta, float(u[0, 1] / u[1, 1]), float(u[0, 0] / u[1, 1])


@dataclass(frozen=True)
class Visit:
    """One measured frame: time (s), commanded offset from the start (nm), image shift vs the first frame (nm)."""

    t: float
    command_nm: np.ndarray
    image_nm: np.ndarray
    peak: float

    @property
    def origin(self) -> bool:
        return not np.any(self.command_nm)


def fit_matrix(visits: list[Visit]) -> tuple[np.ndarray, float, np.ndarray, int]:
    """(A, RMS residual nm, drift nm/s, steps used) from visits: every step's image shift minus the
    start-position baseline interpolated in time between the nearest start visits around it."""
    origins = [v for v in visits if v.origin]
    if len(origins) < 2:
        raise ActuatorCalibrationError("too few frames at the start position to remove the drift")
    to = np.array([v.t for v in origins])
    yo = np.array([v.image_nm for v in origins])
    rows_c, rows_d = [], []
    for v in visits:
        if v.origin:
            continue
        base = np.array([np.interp(v.t, to, yo[:, k]) for k in range(2)])
        rows_c.append(v.command_nm)
        rows_d.append(v.image_nm - base)
    if len(rows_c) < 2:
        raise ActuatorCalibrationError("too few test steps to fit the actuator matrix")
    c, d = np.array(rows_c), np.array(rows_d)
    if np.linalg.matrix_rank(c) < 2:
        raise ActuatorCalibrationError("the test steps do not span both axes")
    at, *_ = np.linalg.lstsq(c, -d, rcond=None)  # d = -c @ A.T
    a = at.T
    res = d + c @ a.T
    tc = to - to.mean()
    drift = (tc[:, None] * (yo - yo.mean(0))).sum(0) / max(float((tc**2).sum()), 1e-12)
    return a, float(np.sqrt(np.mean(np.sum(res**2, axis=1)))), drift, len(c)


def step_ladder(first_nm: float, last_nm: float, ratio: float = 4.0) -> list[float]:
    """Step sizes from ``first_nm`` up to ``last_nm``, each at most ``ratio`` times the one before."""
    if last_nm <= first_nm:
        return [float(last_nm)]
    n = int(math.ceil(math.log(last_nm / first_nm) / math.log(ratio)))
    return [float(first_nm * (last_nm / first_nm) ** (k / n)) for k in range(n + 1)]


def measure_actuator(instrument: Any, *, field_fraction: float = 0.2, max_step_nm: float | None = None,
                     repeats: int = 3, settle_frames: int = 1, source: str = "",
                     progress: Callable[[str, int, int], None] | None = None) -> ActuatorCalibration:
    """Drive ``instrument`` through the test pattern and fit its actuator matrix.

    ``field_fraction``: the largest test step as a fraction of the field of view; ``max_step_nm``
    caps it (nm); ``settle_frames``: frames discarded after each move (a frame in flight when the
    beam moved is mixed); ``progress(label, i, n)`` after every frame. The beam is restored."""
    if repeats < 1 or settle_frames < 0 or not 0 < field_fraction <= 0.5:
        raise ValueError("repeats >= 1, settle_frames >= 0 and 0 < field_fraction <= 0.5 are needed")
    start = np.asarray(instrument.get_beam_shift(), dtype=np.float64).reshape(2).copy()
    try:
        return _measure(instrument, start, field_fraction, max_step_nm, repeats, settle_frames, source, progress)
    finally:
        instrument.set_beam_shift(start.copy())


def _measure(inst: Any, start: np.ndarray, field_fraction: float, max_step_nm: float | None, repeats: int,
             settle: int, source: str, progress: Callable[[str, int, int], None] | None) -> ActuatorCalibration:
    def grab() -> Any:
        for _ in range(settle):
            inst.acquire()
        return inst.acquire()

    first = grab()
    image0 = np.asarray(first.image, dtype=np.float32)
    px = np.asarray(first.pixel_size_nm, dtype=np.float64)
    ref = make_reference(image0)
    t0 = first.t_start + 0.5 * first.frame_time_s
    small = 2.0 * float(px.min())
    if np.isfinite(ref.period_px):
        small = min(small, 0.25 * ref.period_px * float(px.min()))
    big = field_fraction * float(min(image0.shape[0] * px[0], image0.shape[1] * px[1]))
    if max_step_nm is not None:
        big = min(big, float(max_step_nm))
    ladder = step_ladder(small, max(big, small))
    total = len(ladder) * (repeats * len(DIRECTIONS) * 2 + 1)
    visits = [Visit(0.0, np.zeros(2), np.zeros(2), 1.0)]
    a_est = np.eye(2)
    done = 0
    for s in ladder:
        for rep in range(repeats):
            for k, d in enumerate(DIRECTIONS):
                for cmd in ((0.0, 0.0), (s * d[0], s * d[1])):
                    if rep == 0 and k == 0 and cmd == (0.0, 0.0) and s == ladder[0]:
                        continue  # the first frame is the first start visit
                    visits.append(_visit(inst, grab, ref, px, t0, start, np.array(cmd), visits, a_est))
                    done += 1
                    if progress is not None:
                        progress(f"step {s:.3f} nm", done, total)
        visits.append(_visit(inst, grab, ref, px, t0, start, np.zeros(2), visits, a_est))
        done += 1
        a_est, *_ = fit_matrix(visits)
    a, res, drift, n = fit_matrix(visits)
    return ActuatorCalibration.from_matrix(a, residual_nm=res, steps=n, step_sizes_nm=ladder,
                                           drift_nm_per_s=[float(v) for v in drift], source=source)


def _visit(inst: Any, grab: Callable[[], Any], ref: Any, px: np.ndarray, t0: float, start: np.ndarray,
           cmd: np.ndarray, visits: list[Visit], a_est: np.ndarray) -> Visit:
    """Move to ``start + cmd``, take a frame, register it near where the fit so far puts it."""
    inst.set_beam_shift(start + cmd)
    frame = grab()
    t = frame.t_start + 0.5 * frame.frame_time_s - t0
    origins = [v for v in visits if v.origin]
    base = origins[-1].image_nm
    if len(origins) >= 2 and origins[-1].t > origins[0].t:  # the drift so far, extrapolated
        base = base + (origins[-1].image_nm - origins[0].image_nm) / (origins[-1].t - origins[0].t) * (t - origins[-1].t)
    predicted = (base - a_est @ cmd) / px
    image = np.asarray(frame.image, dtype=np.float32)
    if image.shape != ref.shape:
        raise ActuatorCalibrationError(f"the frame size changed during the calibration ({ref.shape} -> "
                                       f"{image.shape}): keep the scan settings fixed and run it again")
    # registered after moving the frame back by the prediction: the windowed correlation pulls a
    # large lag towards zero (a bias proportional to the step, i.e. a gain error); a small one it does not
    whole = np.round(predicted)
    back = _shift(image, -(predicted - whole)) if np.any(predicted != whole) else image
    back = np.roll(back, (-int(whole[0]), -int(whole[1])), axis=(0, 1))
    residual, peak = register(ref, back)
    shift_px = predicted + residual
    if not (np.isfinite(peak) and peak >= MIN_PEAK):
        raise ActuatorCalibrationError(f"frame {frame.seq} does not match the first frame (correlation {peak:.2f}) "
                                       "after a test step: use a smaller --field-fraction, or a region with "
                                       "more structure")
    return Visit(t, cmd.copy(), shift_px * px, float(peak))


def _shift(image: np.ndarray, shift_px: np.ndarray) -> np.ndarray:
    """``image`` moved by ``shift_px`` (sub-pixel, Fourier; content wraps round the edges)."""
    from scipy import fft as sfft
    from scipy.ndimage import fourier_shift

    return sfft.irfft2(fourier_shift(sfft.rfft2(image), shift_px, n=image.shape[1]), s=image.shape).astype(np.float32)


def now_stamp() -> str:
    """Local time for ``source`` fields (ISO 8601, seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%S")
