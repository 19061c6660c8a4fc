"""``python -m simulator``: print render times (ms per frame)."""
import argparse

from simulator.bench import benchmark_render
from simulator.specimen import PRESETS

p = argparse.ArgumentParser(prog="python -m simulator", description="time the virtual STEM")
p.add_argument("--size", type=int, nargs="+", default=[512, 1024])
p.add_argument("--preset", choices=PRESETS, nargs="+", default=["graphene"])
p.add_argument("-n", type=int, default=5, help="frames to time")
a = p.parse_args()
for preset in a.preset:
    for size in a.size:
        benchmark_render(size, preset=preset, n=a.n)
