"""Drift and scan distortion: displacement observations, online GP, correction policy,
PCA of column trajectories, de-warping. jax/tinygp are imported only when a GP is used.

    from stem_live.distortion import (Observations, observations_from_columns,
        OnlineDriftGP, CorrectionPolicy, trajectory_pca, dewarp, undistort_positions)
"""
from .dewarp import dewarp, line_displacement_px, undistort_positions
from .gp import OnlineDriftGP
from .observations import Observations, observations_from_columns
from .pca import trajectory_pca
from .policy import CorrectionDecision, CorrectionPolicy

__all__ = ["Observations", "observations_from_columns", "OnlineDriftGP", "CorrectionPolicy",
           "CorrectionDecision", "trajectory_pca", "dewarp", "undistort_positions",
           "line_displacement_px"]
