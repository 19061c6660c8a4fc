"""Actuator calibration, the actuator monitor, and the excursion budget (warning, disarm, stage handover)."""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace

import numpy as np
import pytest
import zmq

from instrument_adapters.actuator import CalibratedInstrument, load_matrix
from instrument_adapters.base import InstrumentError
from instrument_adapters.bridge import BUDGET_REACHED, Bridge
from instrument_adapters.safety import Limits
from instrument_adapters.simulated import SimulatedInstrument
from simulator import ActuatorConfig, DriftConfig, MicroscopeConfig
from simulator.actuator import Actuator
from stem_live.actuator_response import ActuatorMonitor
from stem_live.calibration.actuator import ActuatorCalibration, decompose, measure_actuator, rotation
from stem_live.engine import Engine
from stem_live.protocol import Correction
from stem_live.service import EngineService
from tests.test_bridge import FakeInstrument
from tests.test_cli import stem_live

SKEWED = ActuatorConfig(gain=0.93, rotation_rad=math.radians(7.0), skew=0.02)


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("preset,seed", [("graphene", 0), ("srtio3", 1)])
def test_calibration_recovers_a_rotated_scaled_skewed_actuator(preset, seed):
    inst = SimulatedInstrument(MicroscopeConfig(preset=preset, size=256, seed=seed, actuator=SKEWED), speed=None)
    cal = measure_actuator(inst, repeats=3, settle_frames=0)
    truth = SKEWED.matrix()
    assert _rel(cal.array, truth) < 0.01, (cal.matrix, truth)
    assert cal.gain == pytest.approx(0.93, rel=0.01)
    assert cal.rotation_deg == pytest.approx(7.0, abs=0.5)
    assert cal.step_sizes_nm[0] < 0.4 * 0.246 < cal.step_sizes_nm[-1]  # unaliased start, steps of many periods
    np.testing.assert_array_equal(inst.get_beam_shift(), 0.0)  # back at the start


def test_decompose_inverts_the_simulators_matrix():
    g, theta, skew, aniso = decompose(SKEWED.matrix())
    assert (g, math.degrees(theta), skew, aniso) == pytest.approx((0.93, 7.0, 0.02, 1.0))
    np.testing.assert_allclose(ActuatorCalibration.from_matrix(rotation(0.1) * 2).array, rotation(0.1) * 2)


def test_default_actuator_is_the_plain_gain():
    """Rotation and skew default to 0 and then the plain gain path runs (the simulator stays bit-identical)."""
    cfg = ActuatorConfig()
    assert cfg.rotation_rad == 0.0 and cfg.skew == 0.0
    a, b = Actuator(cfg, 16, seed=1), Actuator(replace(cfg, rotation_rad=1e-300), 16, seed=1)
    for target in ([0.3, -0.2], [1.0, 0.5]):
        assert np.array_equal(a.command(target, 0), a._applied)
        np.testing.assert_allclose(b.command(target, 0), a._applied, rtol=1e-12)


def test_cli_writes_the_calibration_and_the_bridge_takes_the_actuator_out(tmp_path):
    out = tmp_path / "actuator.json"
    r = stem_live("calibrate", "--actuator", "--instrument", "sim", "--sim-size", "256", "--sim-speed", "0",
                  "--sim-actuator-gain", "0.93", "--sim-actuator-rotation-deg", "7", "--sim-actuator-skew", "0.02",
                  "--settle-frames", "0", "--out", str(out), timeout=120)
    assert r.returncode == 0, r.stderr
    assert "gain 0.93" in r.stderr and "--actuator-calibration" in r.stderr
    m = load_matrix(out)
    assert _rel(m, SKEWED.matrix()) < 0.01
    assert json.loads(out.read_text())["steps"] > 20
    # the wrapper: a requested shift b becomes the effective shift b on the simulated actuator
    sim = SimulatedInstrument(MicroscopeConfig(size=64, actuator=replace(SKEWED, noise_nm=0.0)), speed=None)
    inst = CalibratedInstrument(sim, m)
    inst.set_beam_shift(np.array([0.4, -0.3]))
    np.testing.assert_allclose(sim.scope.actuator.command(sim.scope.actuator.target, 0), [0.4, -0.3], atol=0.006)
    np.testing.assert_allclose(inst.get_beam_shift(), [0.4, -0.3], atol=1e-12)
    np.testing.assert_allclose(inst.acquire().beam_shift_nm, [0.4, -0.3], atol=1e-12)
    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    with pytest.raises(InstrumentError, match="calibrate --actuator"):
        load_matrix(bad)
    r = stem_live("sim", "--actuator-calibration", str(bad), "--frames", "1")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "calibrate --actuator" in r.stderr


def _feed(mon: ActuatorMonitor, a: np.ndarray, steps: np.ndarray, rng) -> list[str]:
    c, img, warned = np.zeros(2), np.zeros(2), []
    v = np.array([0.01, -0.004])  # drift per frame
    for dc in steps:
        c = c + dc
        img = img + v - a @ dc + 0.001 * rng.standard_normal(2)
        w = mon.add(c, img)
        if w:
            warned.append(w)
    return warned


def test_actuator_monitor_warns_once_when_the_response_drifts():
    rng = np.random.default_rng(0)
    steps = 0.05 * rng.standard_normal((60, 2))
    ok = ActuatorMonitor()
    assert _feed(ok, np.eye(2), steps, rng) == [] and ok.status.directions == 2
    assert ok.status.gain_ratio == pytest.approx(1.0, abs=0.02)
    off = ActuatorMonitor()
    warned = _feed(off, 0.9 * rotation(math.radians(4)), steps, rng)
    assert len(warned) == 1 and "recalibrate" in warned[0]
    assert off.status.gain_ratio == pytest.approx(0.9, abs=0.03) and off.as_dict()["warning"]
    # steps along one direction only: the response along it is still measured
    line = np.outer(0.05 * rng.standard_normal(60), [0.6, 0.8])
    one = ActuatorMonitor()
    assert len(_feed(one, rotation(math.radians(6)), line, rng)) == 1 and one.status.directions == 1
    quiet = ActuatorMonitor()  # constant steps (a steady correction): no excitation, no verdict
    assert _feed(quiet, 0.5 * np.eye(2), np.tile([0.01, 0.0], (60, 1)), rng) == [] and quiet.status.directions == 0


# ----------------------------------------------------------------------------- excursion budget


class StageInstrument(FakeInstrument):
    """FakeInstrument with a stage that takes the beam shift over."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.stage: list[np.ndarray] = []

    def hand_over_to_stage(self, shift_nm: np.ndarray) -> bool:
        self.stage.append(np.asarray(shift_nm, dtype=float))
        return True


def _walk(bridge: Bridge, n: int, step: float = 0.25, first_id: int = 0) -> list:
    """Corrections stepping the beam out along x from the start, one per (fake) frame."""
    acks = []
    for k in range(n):
        bridge._last_seq = 100 + k
        target = bridge.instrument.get_beam_shift() + (0.0, step)
        acks.append(bridge.apply(Correction(id=first_id + k, beam_shift_nm=tuple(target), for_seq=100 + k)))
    return acks


def test_budget_warns_at_80_percent_then_disarms_and_lets_the_beam_back(ctx, caplog):
    inst = FakeInstrument()
    bridge = Bridge(inst, frames_endpoint="tcp://127.0.0.1:*", corrections_endpoint="tcp://127.0.0.1:*",
                    context=ctx, limits=Limits(max_step_nm=1.0, max_excursion_nm=1.0))
    try:
        acks = _walk(bridge, 6, step=0.3)
        assert [a.warning for a in acks[:2]] == ["", ""]  # 0.3, 0.6 nm
        assert "90 % of the 1 nm excursion budget" in acks[2].warning  # 0.9 nm
        assert acks[3].warning.startswith("excursion budget reached") and acks[3].clamped  # 1.0 nm: reached
        assert bridge.stats.budget_reached == 1
        assert acks[-1].error.startswith("excursion budget reached") and "stage" in acks[-1].error
        assert np.hypot(*(inst.get_beam_shift() - bridge.start_shift_nm)) <= 1.0 + 1e-9
        back = bridge.apply(Correction(id=50, beam_shift_nm=tuple(bridge.start_shift_nm), for_seq=105))
        assert back.error == "" and np.allclose(back.applied_nm, bridge.start_shift_nm)  # a restore still works
        assert _walk(bridge, 1, first_id=60)[0].error == ""  # recentred: accepted again
        assert sum("90 %" in r.message for r in caplog.records) == 1  # the warning is logged once
    finally:
        bridge.stop()


def test_stage_handover_resets_the_beam_and_refuses_older_corrections(ctx):
    inst = StageInstrument()
    bridge = Bridge(inst, frames_endpoint="tcp://127.0.0.1:*", corrections_endpoint="tcp://127.0.0.1:*",
                    context=ctx, limits=Limits(max_step_nm=1.0, max_excursion_nm=1.0), stage_handover=True)
    try:
        acks = _walk(bridge, 4)
        assert acks[-1].warning.startswith("stage handover") and bridge.stats.stage_handovers == 1
        np.testing.assert_allclose(inst.stage[0], [0.0, 1.0])
        np.testing.assert_allclose(inst.get_beam_shift(), bridge.start_shift_nm)
        old = bridge.apply(Correction(id=10, beam_shift_nm=(1.0, -1.0), for_seq=103))
        assert "predates the stage handover" in old.error
    finally:
        bridge.stop()


def test_engine_disarms_when_the_budget_is_reached(ctx):
    cfg = MicroscopeConfig(preset="graphene", size=128, seed=2, drift=DriftConfig(drift_nm_per_min=120))
    bridge = Bridge(SimulatedInstrument(cfg, speed=4.0), frames_endpoint="tcp://127.0.0.1:*",
                    corrections_endpoint="tcp://127.0.0.1:*", context=ctx,
                    limits=Limits(max_step_nm=0.5, max_excursion_nm=0.15))
    svc = EngineService(Engine(), frames_endpoint=bridge.frames_endpoint, corrections_endpoint=bridge.corrections_endpoint,
                        maps_endpoint="tcp://127.0.0.1:*", commands_endpoint="tcp://127.0.0.1:*", context=ctx)
    svc.engine.arm()
    svc.start()
    bridge.start()
    try:
        t0 = time.monotonic()
        while svc.engine.armed or not svc.banner:
            assert time.monotonic() - t0 < 20, "the engine was not disarmed at the excursion budget"
            time.sleep(0.05)
        assert svc.banner.startswith("correction DISARMED: excursion budget reached")
        st = svc.status()
        assert st["instrument_warning"] == BUDGET_REACHED.format(budget=0.15) and "actuator" in st
        assert bridge.stats.excursion_nm <= 0.15 + 1e-9
    finally:
        bridge.stop()
        svc.stop()


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()
