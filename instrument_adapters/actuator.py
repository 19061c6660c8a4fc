"""A measured beam-shift actuator applied on the instrument side (``--actuator-calibration FILE``).

``stem-live calibrate --actuator`` writes the 2x2 matrix ``A`` (effective beam shift per
commanded beam shift, nm, (y, x) image axes; identity = perfect). :class:`CalibratedInstrument`
wraps any :class:`~instrument_adapters.base.Instrument` so that the engine sees a perfect
actuator: a requested shift ``b`` is commanded as ``A^-1 b``; the beam shift the instrument
reports (``c``, in frames and reads) is reported as ``A c``. The bridge's limits then apply to
the effective shift.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from instrument_adapters.base import Instrument, InstrumentError
from stem_live.protocol import Frame


def load_matrix(path: str | Path) -> np.ndarray:
    """The ``matrix`` of an actuator calibration file; InstrumentError (one line) if it has none."""
    try:
        m = np.asarray(json.loads(Path(path).read_text())["matrix"], dtype=np.float64)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InstrumentError(f"{path} is not an actuator calibration ({type(exc).__name__}): make one with "
                              "`stem-live calibrate --actuator --out FILE.json`") from None
    if m.shape != (2, 2) or not np.isfinite(m).all() or abs(np.linalg.det(m)) < 1e-6:
        raise InstrumentError(f"{path}: the actuator matrix must be an invertible 2x2 matrix: run "
                              "`stem-live calibrate --actuator` again")
    return m


class CalibratedInstrument(Instrument):
    """``inner`` with its actuator matrix ``matrix`` taken out (see the module docstring)."""

    def __init__(self, inner: Instrument, matrix: np.ndarray) -> None:
        self.inner = inner
        self.matrix = np.asarray(matrix, dtype=np.float64).reshape(2, 2)
        self._inv = np.linalg.inv(self.matrix)
        self.lossless = inner.lossless

    def acquire(self) -> Frame:
        from dataclasses import replace

        frame = self.inner.acquire()
        b = self.matrix @ np.asarray(frame.beam_shift_nm, dtype=np.float64)
        return replace(frame, beam_shift_nm=(float(b[0]), float(b[1])))

    def get_beam_shift(self) -> np.ndarray:
        return self.matrix @ np.asarray(self.inner.get_beam_shift(), dtype=np.float64)

    def set_beam_shift(self, target_nm: np.ndarray) -> None:
        self.inner.set_beam_shift(self._inv @ np.asarray(target_nm, dtype=np.float64).reshape(2))

    def hand_over_to_stage(self, shift_nm: np.ndarray) -> bool:
        return self.inner.hand_over_to_stage(np.asarray(shift_nm, dtype=np.float64))

    def close(self) -> None:
        self.inner.close()

    def __getattr__(self, name: str):  # truth_for, scope, ... of the wrapped adapter
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)
