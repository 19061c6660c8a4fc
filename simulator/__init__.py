"""simulator: a virtual STEM (physics only: numpy / scipy).

    from simulator import Microscope, MicroscopeConfig
    scope = Microscope(MicroscopeConfig(preset="graphene", size=512, seed=0))
    image, meta, truth = scope.acquire()

Modules: specimen (crystals / particles), drift (d(t)), scan (scan geometry and
distortion), actuator (beam shift), render (HAADF image formation + detector),
microscope (ties them together), crlb (Cramer-Rao bound of column positions), bench
(``python -m simulator`` timing).
"""
from .actuator import ActuatorConfig
from .drift import DriftConfig
from .frame import FrameMeta, FrameTruth
from .microscope import PRESET_DEFAULTS, Microscope, MicroscopeConfig
from .scan import ScanConfig
from .specimen import PRESETS, Specimen, make_specimen

__all__ = [
    "Microscope", "MicroscopeConfig", "DriftConfig", "ScanConfig", "ActuatorConfig",
    "FrameMeta", "FrameTruth", "Specimen", "make_specimen", "PRESETS", "PRESET_DEFAULTS",
    "benchmark_render",
]


def benchmark_render(size: int = 512, preset: str = "graphene", n: int = 5, seed: int = 0) -> float:
    """Time ``acquire()`` at ``size`` x ``size``; prints and returns ms per frame."""
    from .bench import benchmark_render as _b
    return _b(size, preset=preset, n=n, seed=seed)
