"""A simulated session through the gp engine, scored line by line against the simulator's truth."""

from __future__ import annotations

import numpy as np

from simulator.microscope import Microscope, MicroscopeConfig
from stem_live.engine import Engine, EngineConfig
from stem_live.lab.evaluate import frame_from_sim


def line_drift_errors(cfg: MicroscopeConfig, frames: int, *, skip: int) -> tuple[np.ndarray, list[bool]]:
    """The engine (gp model, fixed hyperparameters, inline: reproducible) over ``frames`` frames of
    ``cfg``: its per-line drift less the true one, (lines, 2) nm (y, x), of frames ``skip`` on,
    and the jump flag of every frame."""
    scope = Microscope(cfg)
    engine = Engine(EngineConfig(model="gp", hyperfit_background=False, learn_hyperparameters=False))
    errs, jumps = [], []
    for k in range(frames):
        image, meta, truth = scope.acquire()
        res = engine.process(frame_from_sim(image, meta))
        jumps.append(bool(res.jump))
        if k >= skip:
            errs.append(np.asarray(res.line_drift_nm) - np.asarray(truth.drift_nm))
    return np.concatenate(errs), jumps
