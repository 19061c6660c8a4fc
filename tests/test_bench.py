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
    """``bench startup``: two starts of the same command on one cache folder, emptied first (the
    processes themselves are replaced by a stand-in: the real ones compile for a minute)."""
    import stem_live.lab.bench_startup as bs

    calls = []

    def fake(argv, *, env=None, **_kw):
        cache = env["STEM_LIVE_JAX_CACHE"]
        tmp_path.joinpath("c").mkdir(exist_ok=True)  # as JAX does
        calls.append((argv, cache, sorted(p.name for p in tmp_path.joinpath("c").glob("*"))))
        tmp_path.joinpath("c", f"entry{len(calls)}").write_bytes(b"x" * 200_000)
        return {"seconds": 40.0 if len(calls) == 1 else 3.0}

    monkeypatch.setattr(bs, "time_to_first_frame", fake)
    monkeypatch.setattr(bs, "write_recording", lambda path, **_kw: path)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "stale").write_bytes(b"old")
    rep = bs.bench_startup(size=128, cache_dir=tmp_path / "c")
    assert rep["cold"] == {"seconds": 40.0} and rep["warm"] == {"seconds": 3.0} and rep["cache_mb"] == 0.4
    (argv1, cache1, seen1), (argv2, cache2, seen2) = calls
    assert argv1 == argv2 and "replay" in argv1 and argv1[-2:] == ["--model", "gp"]
    assert cache1 == cache2 == str(tmp_path / "c") and seen1 == [] and seen2 == ["entry1"]  # cold: emptied first
    assert "cold 40.0 s, warm 3.0 s" in bs.startup_table(rep)
