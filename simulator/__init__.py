"""simulator: a virtual STEM (physics only: numpy / scipy).

    from simulator import Microscope, MicroscopeConfig
    scope = Microscope(MicroscopeConfig(preset="graphene", size=512, seed=0))
    image, meta, truth = scope.acquire()

Modules: specimen (crystals / particles), drift (d(t)), scan (scan geometry and
distortion), actuator (beam shift), render (HAADF image formation + detector),
microscope (ties them together), crlb (Cramer-Rao bound of column positions), bench
(``python -m simulator`` timing).
"""
from simulator.actuator import ActuatorConfig
from simulator.drift import DriftConfig
from simulator.frame import FrameMeta, FrameTruth
from simulator.microscope import PRESET_DEFAULTS, Microscope, MicroscopeConfig
from simulator.scan import ScanConfig
from simulator.specimen import PRESETS, Specimen, make_specimen

__all__ = [
    "Microscope", "MicroscopeConfig", "DriftConfig", "ScanConfig", "ActuatorConfig",
    "FrameMeta", "FrameTruth", "Specimen", "make_specimen", "PRESETS", "PRESET_DEFAULTS",
    "benchmark_render",
]


def benchmark_render(size: int = 512, preset: str = "graphene", n: int = 5, seed: int = 0) -> float:
    """Time ``acquire()`` at ``size`` x ``size``; prints and returns ms per frame."""
    from simulator.bench import benchmark_render as _b
    return _b(size, preset=preset, n=n, seed=seed)
