"""Benchmarks measure what they claim: overload accounting, machine report."""

from __future__ import annotations

from stem_live.bench import bench_overload, machine


def test_overload_counts_every_skipped_frame_and_memory_stays_flat():
    r = bench_overload(128, seconds=3.0, factor=5.0)
    assert r["skipped"] > r["processed"] > 10  # really overloaded, still processing
    assert r["totals"]["unaccounted"] == 0  # every frame sent was processed or counted as skipped
    assert r["rss_growth_mb"] < 50


def test_machine_report_names_the_cpu():
    m = machine()
    assert m["cores"] >= 1 and m["cpu"] and m["zmq"]
