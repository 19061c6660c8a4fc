"""Atomic-column finding: classical locator, sub-pixel refinement (JAX), intensity classes.

Importing this package is light: JAX is imported only when a refinement runs.
"""

from .classes import IntensityClassifier, classify_intensity, learn_thresholds
from .classical import locate_classical
from .columns import Columns
from .refine import refine_positions, window_for_spacing
from .spacing import estimate_spacing

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
