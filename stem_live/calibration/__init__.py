"""The analysis half of a drift-calibration session (no simulator, no I/O): fit a known
lattice, measure drift and scan distortion, and the :class:`Calibration` the engine loads."""

from stem_live.calibration.lattice_fit import LatticeFit, fit_lattice
from stem_live.calibration.model import SCHEMA, CalibratedGP, Calibration, load_cached
from stem_live.calibration.session import CalibrationRun, calibrate_frames

__all__ = ["SCHEMA", "CalibratedGP", "Calibration", "CalibrationRun", "LatticeFit", "calibrate_frames",
           "fit_lattice", "load_cached"]
