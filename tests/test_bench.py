"""Benchmarks measure what they claim: overload accounting, machine report."""

from __future__ import annotations

from stem_live.lab.bench import bench_overload, machine


def test_overload_counts_every_skipped_frame_and_memory_stays_flat():
    r = bench_overload(128, seconds=3.0, factor=5.0, model="rigid", rvae=False, calm_seconds=2.0, start_up_s=1.0)
    assert r["skipped"] > r["processed"] > 10  # really overloaded, still processing
    assert r["totals"]["unaccounted"] == 0  # every frame sent was processed or counted as skipped
    assert r["rss_growth_mb"] < 50
    assert r["unloaded_latency_p99_ms"] is not None and r["latency_p99_ms"] is not None


def test_machine_report_names_the_cpu():
    m = machine()
    assert m["cores"] >= 1 and m["cpu"] and m["zmq"]


def test_pipeline_over_sockets_keeps_up_at_a_low_rate():
    """Simulator (pre-rendered, another process) -> sockets -> engine: at an offered rate far
    below capacity every frame is processed, in order, with a latency far below the period."""
    from stem_live.lab.bench import bench_pipeline

    r = bench_pipeline(128, seconds=3.0, rate_hz=10.0, model="rigid", rvae=False, prerender=6)
    assert r["processed"] >= 20 and r["skipped"] <= 2
    assert 8.0 <= r["fps"] <= 12.0
    assert r["latency_p99_ms"] is not None and r["latency_p99_ms"] < 100.0
    assert set(r["stages"]) >= {"register", "total"} and r["stages"]["total"]["median_ms"] > 0
    # a latency per correction sent (the rigid model sends one where the drift leaves its deadband:
    # 13-17 of the 30 frames here, with the timing)
    assert r["first_frames_included"] and r["latency_n"] >= 5 and len(r["latency_first_ms"]) == 5
    assert r["start_cost_frames"] == r["start"]["frames_skipped"] <= 1 and r["start"]["compile_s"] == 0.0


def test_pipeline_reports_what_the_start_cost(monkeypatch):
    """The engine compiles on the stream's first frame (as ``run`` does): the frames that arrive
    meanwhile are the start's cost, counted; every frame after it is in the percentiles."""
    import time

    import stem_live.lab.bench as bench
    from stem_live.engine import Engine, EngineConfig
    from stem_live.live_engine import compiling_engine

    def slow_warm_up(self, frames, *, strip_lines=0):  # a 1.5 s compilation in the rigid model's place
        time.sleep(1.5)
        return 1.5

    monkeypatch.setattr(Engine, "warm_up", slow_warm_up)
    monkeypatch.setattr(bench, "pipeline_engine", lambda *a, say=None, **kw: compiling_engine(
        EngineConfig(model="rigid"), say=say or print, models=("rigid",)))
    r = bench.bench_pipeline(128, seconds=2.0, rate_hz=10.0, model="rigid", rvae=False, prerender=6)
    assert r["start"]["compile_s"] == 1.5 and r["start"]["seconds"] >= 1.5
    assert 10 <= r["start_cost_frames"] <= 20  # 1.5 s at 10 Hz, less the one waiting when it ends
    # after the start: the frames are processed, not the start's backlog skipped (a loaded 2-core CI
    # machine holds an odd frame past the 100 ms period: 3 of 25 seen there, 0 when idle)
    assert r["processed"] >= 15 and r["skipped"] <= 0.2 * r["processed"]
    assert r["latency_p99_ms"] < 100.0 and r["latency_n"] >= 5  # the stall is the start's, not a frame's latency


def test_prerendered_simulator_plays_back_and_forth_without_jumps():
    import numpy as np

    from instrument_adapters.simulated import SimulatedInstrument
    from simulator import MicroscopeConfig

    inst = SimulatedInstrument(MicroscopeConfig(preset="srtio3", size=64, seed=3), speed=None, prerender=4)
    frames = [inst.acquire() for _ in range(9)]
    assert [f.seq for f in frames] == list(range(9))
    assert np.all(np.diff([f.t_start for f in frames]) > 0)
    # order 0 1 2 3 2 1 0 1 2: the same images, mirrored in time
    for a, b in ((2, 4), (1, 5), (0, 6), (1, 7)):
        assert np.array_equal(frames[a].image, frames[b].image)
    assert not np.array_equal(frames[0].image, frames[1].image)


def test_locate_bench_scores_both_locators_against_the_truth():
    """``bench locate``: both locators timed and scored on frames with known positions; the
    summary table shows every row; atomap's row says why it is missing when it is."""
    import numpy as np

    from stem_live.lab.bench import summary_table
    from stem_live.lab.bench_locate import bench_locate, score

    truth = np.array([[10.0, 10.0], [10.0, 22.0], [22.0, 10.0]])
    rec, prec, rmse = score(np.array([[10.1, 10.0], [22.0, 9.9], [40.0, 40.0]]), truth, 3.0)
    assert rec == 2 / 3 and prec == 2 / 3 and abs(rmse - 0.1) < 1e-9

    r = bench_locate(sizes=(128,), repeats=2, unet_repeats=1)
    c, u = r["classical"]["128"], r["unet"]["128"]
    assert c["recall"] >= 0.99 and c["precision"] >= 0.99 and c["rmse_px"] < 0.15, c
    assert u["recall"] >= 0.9 and u["rmse_px"] < 0.5, u
    assert c["median_ms"] > 0 and u["median_ms"] > 0
    try:
        import atomap  # noqa: F401

        assert r["atomap"]["128"]["rmse_px"] < 0.5
    except ImportError:
        assert "not installed" in r["atomap"]["128"]["error"]
    table = summary_table({"locate": r, "machine": {}})
    assert "classical   128 px" in table and "unet        128 px" in table and "atomap" in table


def test_startup_bench_reports_cold_and_warm(monkeypatch, tmp_path):
    """``bench startup``: starts of the same command on one cache folder, emptied first, the
    warm ones repeated, and one more counting JAX's compilations (the processes themselves are
    replaced by a stand-in: the real ones compile for a minute)."""
    import stem_live.lab.bench_startup as bs

    calls = []

    def fake(argv, *, env=None, count=None, **_kw):
        cache = env["STEM_LIVE_JAX_CACHE"]
        tmp_path.joinpath("c").mkdir(exist_ok=True)  # as JAX does
        calls.append((argv, cache, sorted(p.name for p in tmp_path.joinpath("c").glob("*")), env.get("JAX_LOG_COMPILES")))
        tmp_path.joinpath("c", f"entry{len(calls)}").write_bytes(b"x" * 200_000)
        if count:
            return {"seconds": 3.5, "counts": {"traces": 19, "cache_hits": 19, "backend": 19}}
        return {"seconds": 40.0 if len(calls) == 1 else 2.0 + len(calls), "cpu_s": 1.5}

    monkeypatch.setattr(bs, "time_to_first_frame", fake)
    monkeypatch.setattr(bs, "write_recording", lambda path, **_kw: path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "stale").write_bytes(b"old")
    rep = bs.bench_startup(size=128, cache_dir=tmp_path / "c", warm_runs=3)
    assert rep["cold"] == {"seconds": 40.0, "cpu_s": 1.5} and rep["cache_mb"] == 1.0
    assert rep["warm"]["seconds"] == 5.0 and (rep["warm"]["min_s"], rep["warm"]["max_s"]) == (4.0, 6.0)
    assert len(rep["warm"]["runs"]) == 3 and rep["warm"]["cpu_s"] == 1.5
    assert rep["warm_jit"] == {"traces": 19, "cache_hits": 19, "compiled": 0, "seconds": 3.5}
    (argv1, cache1, seen1, log1), (argv2, cache2, seen2, _), *_, (argv5, _, _, log5) = calls
    assert len(calls) == 5 and argv1 == argv2 == argv5 and "replay" in argv1 and argv1[-2:] == ["--model", "gp"]
    assert cache1 == cache2 == str(tmp_path / "c") and seen1 == [] and seen2 == ["entry1"]  # cold: emptied first
    assert log1 is None and log5 == "1"  # only the last start logs its compilations
    table = bs.startup_table(rep)
    assert "cold 40.0 s" in table and "warm 5.0 s, 1.5 s CPU, 4.0-6.0 s over 3" in table and "0 compiled" in table


def test_startup_timer_counts_lines_and_cpu():
    import sys

    from stem_live.lab.bench_startup import time_to_first_frame

    script = ("import sys\nfor _ in range(3): print('stem-live: Finished tracing f', file=sys.stderr, flush=True)\n"
              "sum(range(3_000_000))\nprint('[1/3] frame 0', file=sys.stderr, flush=True)\nimport time; time.sleep(60)")
    r = time_to_first_frame([sys.executable, "-c", script], timeout_s=30, count={"traces": "Finished tracing"})
    assert r["counts"] == {"traces": 3} and r["seconds"] < 10 and r["cpu_s"] is not None and r["cpu_s"] > 0
