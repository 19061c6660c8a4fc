"""Compiled once: JAX's persistent compilation cache (where it lives, that a second process loads
what the first compiled), the start-up bench's timer, and ``run`` compiling on its first frame."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np

from stem_live.jax_cache import ENV, cache_dir
from stem_live.lab.bench_startup import time_to_first_frame


def test_cache_folder_follows_the_environment(tmp_path):
    assert cache_dir({ENV: "off"}) is None and cache_dir({ENV: ""}) is None and cache_dir({ENV: " 0 "}) is None
    assert cache_dir({ENV: str(tmp_path / "c")}) == tmp_path / "c"
    assert cache_dir({"XDG_CACHE_HOME": "/xdg"}) == Path("/xdg/stem-live/jax")
    assert cache_dir({}) == Path.home() / ".cache" / "stem-live" / "jax"


def test_tests_never_write_the_users_cache():
    assert os.environ[ENV] == "off" and cache_dir() is None  # tests/conftest.py


CHILD = textwrap.dedent("""
    import sys
    from pathlib import Path
    from stem_live.jax_cache import enable
    enable(Path(sys.argv[1]))
    import jax, jax.numpy as jnp
    from jax import monitoring
    seen = {"hits": 0, "misses": 0}
    def listen(name, **_):
        for k in seen:
            if name.endswith("/cache_" + k):
                seen[k] += 1
    monitoring.register_event_listener(listen)
    jax.jit(lambda x: jnp.cumsum(jnp.sin(x) * 3.0))(jnp.arange(17.0)).block_until_ready()
    print(seen["hits"], seen["misses"])
""")


def test_a_second_process_loads_what_the_first_compiled(tmp_path):
    folder = tmp_path / "jax"
    runs = [subprocess.run([sys.executable, "-c", CHILD, str(folder)], capture_output=True, text=True, timeout=60)
            for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    (hits1, miss1), (hits2, miss2) = (map(int, r.stdout.split()) for r in runs)
    assert hits1 == 0 and miss1 >= 1  # cold: compiled, and written
    assert hits2 == miss1 and miss2 == 0  # warm: every compilation of the first process loaded from disk
    assert len(list(folder.glob("*-cache"))) == miss1


def test_startup_timer_stops_at_the_first_frame_line():
    script = ("import sys, time; time.sleep(0.3); print('compiling ...', file=sys.stderr, flush=True); "
              "print('[1/3] frame 0', file=sys.stderr, flush=True); time.sleep(60)")
    r = time_to_first_frame([sys.executable, "-c", script], timeout_s=30)
    assert 0.3 <= r["seconds"] < 10  # and the process was stopped: the call did not wait 60 s
    bad = time_to_first_frame([sys.executable, "-c", "import sys; print('no luck', file=sys.stderr)"])
    assert bad["seconds"] is None and "no luck" in bad["error"]


def test_run_compiles_on_the_first_frame_and_starts_from_the_next():
    from simulator import Microscope, MicroscopeConfig
    from stem_live.engine import EngineConfig
    from stem_live.lab.evaluate import frame_from_sim
    from stem_live.live_engine import compiling_engine

    # the rigid model in the gp model's place: the same steps without a minute of compiling under test
    scope = Microscope(MicroscopeConfig(preset="graphene", size=128, seed=3))
    frames = [frame_from_sim(*scope.acquire()[:2]) for _ in range(3)]
    said: list[str] = []
    engine = compiling_engine(EngineConfig(model="rigid"), say=said.append, models=("rigid",))
    first = engine.process(frames[0])
    assert said[0].startswith("compiling the rigid model for 128x128 frames") and said[1].startswith("compiled in")
    assert first.seq == frames[0].seq and first.locked
    # a frame from well after the compilation: the new reference, not a jump from the first frame
    late = replace(frames[1], t_start=frames[1].t_start + 30.0, beam_shift_nm=(0.4, -0.3))
    r = engine.process(late)
    assert np.allclose(r.drift_nm, 0.0) and not r.jump and engine.frames == 1
    assert np.allclose(engine.start_beam_nm, [0.4, -0.3])
    assert len(said) == 2 and engine.compile_s is not None and engine.compile_s >= 0  # compiled once
    engine.process(frames[2])
    assert engine.frames == 2 and len(said) == 2


def test_a_live_engine_compiles_side_fits_in_the_background_but_not_while_warming_up(monkeypatch):
    from stem_live.engine import Engine, EngineConfig
    from stem_live.live_engine import LiveEngine
    from stem_live.locate import buckets

    seen = []
    monkeypatch.setattr(Engine, "process", lambda self, frame, encode=True: seen.append(
        (frame, bool(getattr(buckets._BACKGROUND, "on", False)))))
    engine = LiveEngine(EngineConfig(model="rigid"))
    engine.warm_up(["w1", "w2"])
    engine.process("live")
    assert seen == [("w1", False), ("w2", False), ("live", True)]
    assert not getattr(buckets._BACKGROUND, "on", False)   # only inside the live frame


def test_the_compiled_stream_keeps_its_column_spacing(monkeypatch):
    """The frames that compiled the gp model are the stream's own: after the reset that makes
    the next frame the reference, the spacing measured on them is kept (estimating it again
    cost the first frame after the start 0.5 s at 1024 px)."""
    from simulator import Microscope, MicroscopeConfig
    from stem_live.engine import Engine, EngineConfig
    from stem_live.lab.evaluate import frame_from_sim
    from stem_live.live_engine import compiling_engine

    def warm_up(self, frames, *, strip_lines=0):   # stands in for a minute of compiling: what it leaves is the spacing
        self._columns.spacing_px = 9.5
        return 0.0

    monkeypatch.setattr(Engine, "warm_up", warm_up)
    monkeypatch.setattr(Engine, "process", lambda self, frame, encode=True: None)
    engine = compiling_engine(EngineConfig(model="gp"), say=lambda _s: None)
    frame = frame_from_sim(*Microscope(MicroscopeConfig(preset="graphene", size=64, seed=1)).acquire())
    engine.process(frame)
    assert engine._columns.spacing_px == 9.5 and engine._columns.tracker.spacing_px == 9.5
    assert engine.frames == 0   # reset: the next frame is the reference
