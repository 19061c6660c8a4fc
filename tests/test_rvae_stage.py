"""The rVAE stage inside the engine (``--model gp``): latents index-matched to the columns,
background fine-tuning that never holds up a frame, the atomic swap, training from scratch.

Frames come from the simulator (graphene, 208 px: about 170 columns, mid-way between two of the
locator's padded sizes; a GP window of 4 frames, about 400 sample groups, stays within the GP's
smallest padded size, so nothing recompiles mid-test). The rVAE is a small one (16 px patches,
narrow layers) and the encoder has two buckets, so that compiling and training take seconds.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from simulator import Microscope, MicroscopeConfig
from stem_live.engine import Engine, EngineConfig
from stem_live.lab.evaluate import frame_from_sim, match_columns
from stem_live.rvae.live import LiveEncoder, OnlineTrainer
from stem_live.rvae.model import RVAEConfig, init_params
from stem_live.rvae.patches import extract_patches
from stem_live.rvae.stage import RvaeStage

SIZE = 208
# the drift hyperparameter fit (its own background thread, tested elsewhere) is off: these tests
# time the rVAE thread against the frames
GP = EngineConfig(model="gp", gp_window_frames=4, learn_hyperparameters=False)
BUCKETS = (64, 256)
SMALL = RVAEConfig(patch_size=16, latent_dim=2, encoder_features=(8, 16), encoder_dense=32,
                   decoder_hidden=(32, 64), canvas_size=16)


def frames(seed: int = 1):
    """An endless seeded simulator session: (Frame, image, truth) per acquisition."""
    scope = Microscope(MicroscopeConfig(preset="graphene", size=SIZE, seed=seed))
    while True:
        image, meta, truth = scope.acquire()
        yield frame_from_sim(image, meta), image, truth


@pytest.fixture(scope="module")
def params():
    """Random small-rVAE params, after the gp pipeline and the training step (batch 32) have
    been compiled once (warm-up)."""
    eng = Engine(GP)
    src = frames(seed=99)
    for _ in range(2):
        eng.process(next(src)[0])
    p = init_params(SMALL, seed=0)
    trainer = OnlineTrainer(LiveEncoder(p, BUCKETS), p, capacity=64, batch_size=32)
    trainer.add(np.random.default_rng(0).normal(size=(64, SMALL.patch_size, SMALL.patch_size)))
    trainer.fine_tune(1, block=True)
    assert trainer.swaps == 1
    return p


def _spacing(pos: np.ndarray) -> float:
    from scipy.spatial import cKDTree

    return float(np.median(cKDTree(pos).query(pos, 2)[0][:, 1]))


def _angle_diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(np.angle(np.exp(1j * (np.asarray(a, float) - np.asarray(b, float)))))


def _assert_same_latents(got: dict, want: dict, atol: float = 1e-4) -> None:
    assert _angle_diff(got["angle"], want["angle"]).max() < atol
    for key in ("shift", "content", "angle_sigma", "content_sigma"):
        np.testing.assert_allclose(got[key], want[key], atol=atol, rtol=1e-4, err_msg=key)


def test_latents_are_index_matched_to_the_columns(params):
    stage = RvaeStage(params, buckets=BUCKETS)
    assert stage.wait_ready(30) and stage.available  # given params count as trained
    eng = Engine(GP, rvae=stage)
    ref = LiveEncoder(params, BUCKETS)  # the same params, encoded outside the engine
    src = frames()
    for _k in range(3):
        frame, image, truth = next(src)
        r = eng.process(frame)
        pos = r.columns.positions
        n = len(pos)
        lat = r.latents
        assert lat is not None and "rvae" in r.timings_ms
        # the columns are the real ones: nearly every true column found, nearly nothing else
        tp = truth.columns_px
        ti, fi = match_columns(tp, pos, 0.3 * _spacing(tp))
        assert len(ti) >= 0.97 * len(tp) and len(fi) >= 0.95 * n, (len(ti), len(tp), n)
        assert len(lat["angle"]) == n and lat["content"].shape == (n, SMALL.latent_dim)
        assert lat["shift"].shape == (n, 2) and np.isfinite(lat["content"]).all()
        # what encoding the same patches outside the engine gives, row by row
        _assert_same_latents(lat, ref.encode_image(image, pos))
        # each column alone: its latents do not depend on the batch it was encoded in
        p, m = extract_patches(image, pos, SMALL.patch_size, buckets=BUCKETS)
        for i in (0, n // 2, n - 1):
            one = ref.encode(p[i:i + 1], m[i:i + 1])
            _assert_same_latents({key: v[i:i + 1] for key, v in lat.items()}, one)
        # and they follow the column: reversed positions give reversed latents
        rev = ref.encode_image(image, pos[::-1])
        _assert_same_latents({key: v[::-1] for key, v in lat.items()}, rev)
        # distinct columns give distinct latents (a constant output would pass the checks above)
        assert np.std(lat["content"][:, 0]) > 1e-3 and np.std(lat["angle"]) > 1e-3
    assert stage.status()["frame_error"] is None and eng.status()["rvae"]["available"] is True


def test_train_runs_in_the_background_frames_go_on_and_the_encoder_swaps(params):
    stage = RvaeStage(params, buckets=BUCKETS, batch_size=32, min_patches=64)
    assert stage.wait_ready(30)
    eng = Engine(GP, rvae=stage)
    src = frames(seed=2)
    warm_ms = []
    for _ in range(3):
        warm_ms.append(eng.process(next(src)[0]).timings_ms["total"])
    assert stage.version == 0 and len(stage.trainer) >= 3 * 150

    steps = 1000  # seconds of work (slower while frames run: the two threads share the GIL)
    ended = {}

    def watch() -> None:  # the moment the fine-tune thread ends, to 5 ms
        while stage.training:
            time.sleep(0.005)
        ended["t"] = time.perf_counter()

    t0 = time.perf_counter()
    msg = eng.train(steps)
    threading.Thread(target=watch, daemon=True).start()
    assert "started" in msg and f"{steps} steps" in msg and "version 1" in msg and "\n" not in msg
    assert "already running" in eng.train(steps)  # a second request does not start a second run
    during, versions = [], []
    while stage.training and len(during) < 300:
        frame, image, truth = next(src)
        r = eng.process(frame)
        if "t" not in ended:  # finished while training was still running
            during.append(r.timings_ms["total"])
            versions.append(stage.version)
    assert stage.trainer.wait(30)
    time.sleep(0.02)
    t_train = ended["t"] - t0
    print(f"training {t_train:.2f} s; {len(during)} frames meanwhile, frame time median "
          f"{np.median(during):.0f} ms, max {max(during):.0f} ms (before training: median {np.median(warm_ms):.0f} ms)")
    # frames kept coming while it trained, and none of them waited for it
    assert len(during) >= 5, (len(during), t_train)
    assert max(during) < 0.2 * t_train * 1e3, (during, t_train)
    # the old params until the swap (which happens a moment before the thread ends: the last
    # frame may already see it)
    assert versions[0] == 0 and set(versions[:-1]) == {0} and versions == sorted(versions), versions
    # after the swap: one new version, the requested steps done, a finite loss
    st = eng.status()["rvae"]
    assert stage.version == 1 and st["version"] == 1 and st["steps_done"] == steps and not st["training"]
    assert st["last_loss"] is not None and np.isfinite(st["last_loss"]) and st["error"] is None
    # the latents now come from the fine-tuned params and differ from the old ones
    frame, image, truth = next(src)
    r = eng.process(frame)
    pos = r.columns.positions
    new = LiveEncoder(stage.trainer.params, BUCKETS).encode_image(image, pos)
    old = LiveEncoder(params, BUCKETS).encode_image(image, pos)
    _assert_same_latents(r.latents, new)
    change = np.abs(r.latents["content"] - old["content"]).max()
    assert change > 1e-2, change


def test_train_without_a_checkpoint_builds_a_stage_from_scratch(params, monkeypatch):
    import stem_live.rvae.stage as stage_mod

    class Small(stage_mod.RvaeStage):  # the engine's from-scratch stage, with the small test model
        def __init__(self, source=None, **kw):
            kw.setdefault("config", SMALL)
            kw.setdefault("buckets", BUCKETS)
            kw.setdefault("batch_size", 32)
            super().__init__(source, **kw)

    monkeypatch.setattr(stage_mod, "RvaeStage", Small)
    eng = Engine(GP)
    src = frames(seed=3)
    r = eng.process(next(src)[0])
    assert eng.rvae is None and r.latents is None and eng.status()["rvae"] is None
    msg = eng.train(40)
    assert "from scratch" in msg and "\n" not in msg
    t0 = time.monotonic()
    while eng.rvae is None:
        assert time.monotonic() - t0 < 20, "the from-scratch stage was never built"
        time.sleep(0.02)
    stage = eng.rvae
    assert isinstance(stage, Small) and stage.origin == "random init (seed 0)" and not stage.trained
    st = eng.status()["rvae"]
    assert st["pending_steps"] == 40 and st["buffered"] == 0 and not st["available"]  # waits for patches
    n_none = 0
    while stage.version == 0:
        assert time.monotonic() - t0 < 30, stage.status()
        r = eng.process(next(src)[0])
        if stage.version == 0:
            assert r.latents is None  # an untrained model publishes nothing
            n_none += 1
    assert n_none >= 1 and stage.trainer.steps_done == 40 and stage.available
    r = eng.process(next(src)[0])
    assert r.latents is not None and len(r.latents["angle"]) == len(r.columns.positions)
    # training again fine-tunes the stage the engine now has
    assert "fine-tuning" in eng.train(5) and eng.rvae is stage
    assert stage.trainer.wait(20) and stage.version == 2


def test_rigid_model_refuses_rvae_with_one_line():
    eng = Engine()
    with pytest.raises(ValueError) as err:
        eng.train(10)
    text = str(err.value)
    assert "\n" not in text and "--model gp" in text
    with pytest.raises(ValueError, match="--model gp"):
        Engine(EngineConfig(model="rigid"), rvae=object())
    with pytest.raises(ValueError, match="--model gp"):
        Engine(EngineConfig(model="rigid", rvae_checkpoint="some.msgpack"))


def test_stage_refuses_bad_steps_with_one_line(params):
    stage = RvaeStage(params, buckets=BUCKETS, warmup=False)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        stage.train(0)
    assert "start once 256 patches are buffered (0 so far)" in stage.train(3)
    stage.close()
