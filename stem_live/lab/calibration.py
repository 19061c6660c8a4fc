"""A calibration session on the simulator, with a planted scan distortion and the truth beside
the result (relative errors in ``meta["relative_error"]``).
"""

from __future__ import annotations

from dataclasses import asdict, replace

import numpy as np

from stem_live.calibration.session import CalibrationRun, Progress, calibrate_frames
from stem_live.lattices import LATTICES, Lattice

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
    from stem_live.lab.evaluate import frame_from_sim

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
