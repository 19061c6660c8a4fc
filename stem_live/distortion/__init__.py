"""Drift and scan distortion: displacement observations, online GP, correction policy,
PCA of column trajectories, de-warping. jax/tinygp are imported only when a GP is used.

    from stem_live.distortion import (Observations, observations_from_columns,
        OnlineDriftGP, CorrectionPolicy, trajectory_pca, dewarp, undistort_positions)
"""
from stem_live.distortion.dewarp import dewarp, line_displacement_px, undistort_positions
from stem_live.distortion.gp import OnlineDriftGP
from stem_live.distortion.observations import Observations, observations_from_columns
from stem_live.distortion.pca import trajectory_pca
from stem_live.distortion.policy import CorrectionDecision, CorrectionPolicy

__all__ = ["Observations", "observations_from_columns", "OnlineDriftGP", "CorrectionPolicy",
           "CorrectionDecision", "trajectory_pca", "dewarp", "undistort_positions",
           "line_displacement_px"]
