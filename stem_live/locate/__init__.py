"""Atomic-column finding: classical locator, sub-pixel refinement (JAX), intensity classes.

Importing this package is light: JAX is imported only when a refinement runs.
"""

from stem_live.locate.classes import IntensityClassifier, classify_intensity, learn_thresholds
from stem_live.locate.classical import locate_classical
from stem_live.locate.columns import Columns
from stem_live.locate.refine import refine_positions, window_for_spacing
from stem_live.locate.spacing import estimate_spacing

__all__ = [
    "Columns",
    "IntensityClassifier",
    "classify_intensity",
    "estimate_spacing",
    "learn_thresholds",
    "locate_classical",
    "refine_positions",
    "window_for_spacing",
]
