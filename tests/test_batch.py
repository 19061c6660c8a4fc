"""``stem-live batch`` on a real LocalCluster (two workers in this process): inputs, outputs, failed rows,
restarts, equality with ``replay --results``, and the science of the drift-corrected average."""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("dask.distributed")

# the module's cluster and batch run are shared by its tests; the first one waits for both

PIXEL_NM = 0.01  # the graphene preset's pixel size


def _record(path: Path, *, frames: int, seed: int, drift_nm_per_min: float = 3.0):
    """A simulated graphene series (256 px) to a TIFF recording; returns frame 0's truth."""
    from simulator import Microscope, MicroscopeConfig
    from stem_live.io import StackWriter
    from stem_live.lab.evaluate import frame_from_sim

    cfg = MicroscopeConfig(preset="graphene", size=256, seed=seed)
    cfg = replace(cfg, drift=replace(cfg.drift, drift_nm_per_min=drift_nm_per_min))
    scope = Microscope(cfg)
    truths = []
    with StackWriter(path) as w:
        for _ in range(frames):
            image, meta, truth = scope.acquire()
            w.write(frame_from_sim(image, meta))
            truths.append(truth)
    return truths


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("inputs")
    (root / "sub").mkdir()
    truths = _record(root / "g20.tif", frames=20, seed=1)
    _record(root / "sub" / "g5.tif", frames=5, seed=2)
    (root / "bad.tif").write_bytes(b"II*\x00" + bytes(range(256)) * 4)   # a TIFF header, then nonsense
    (root / "notes.txt").write_text("not a recording")
    return {"root": root, "truth0": truths[0],
            "true_drift_nm": float(np.hypot(*(truths[-1].drift_nm[-1] - truths[0].drift_nm[0])))}


@pytest.fixture(scope="module")
def client():
    from dask.distributed import Client, LocalCluster

    # two workers in this process: they share its compiled engine functions, so the tests fit the
    # 30 s budget; worker processes (the default of `stem-live batch`) each compile once (~20 s)
    cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=":0")
    c = Client(cluster)
    yield c
    c.close()
    cluster.close()


@pytest.fixture(scope="module")
def serial(data, tmp_path_factory):
    """``replay --results`` of the 5-frame input in this process: the reference of the equality
    test, and the one compilation of the engine that the in-process workers then share."""
    from stem_live.cli import main

    path = tmp_path_factory.mktemp("serial") / "serial.npz"
    assert main(["replay", str(data["root"] / "sub" / "g5.tif"), "--results", str(path)]) == 0
    return path


def test_serial_replay_of_an_input(serial):
    from stem_live.io.results import load_results

    res = load_results(serial)
    assert res["info"]["frames"] == 5 and np.isfinite(res["drift_nm"]).all()


@pytest.fixture(scope="module")
def batch(data, client, serial, tmp_path_factory):
    from stem_live.batch import expand_inputs
    from stem_live.batch.runner import run_batch

    out = tmp_path_factory.mktemp("out")
    lines: list[str] = []
    rows = run_batch(expand_inputs([data["root"]], exclude=out), out, client=client, progress=lines.append)
    return {"out": out, "rows": rows, "progress": lines}


def test_expand_inputs(tmp_path):
    from stem_live.batch import expand_inputs

    (tmp_path / "a" / "deep").mkdir(parents=True)
    (tmp_path / "b").mkdir()
    for rel in ("a/x.tif", "a/deep/y.npy", "b/x.tif", "a/.hidden.tif", "a/z.txt", "a/deep/.r.npz.partial"):
        (tmp_path / rel).write_bytes(b"")
    got = expand_inputs([tmp_path / "a", str(tmp_path / "b" / "*.tif"), tmp_path / "a" / "x.tif"])
    assert [i.path.relative_to(tmp_path).as_posix() for i in got] == ["a/deep/y.npy", "a/x.tif", "b/x.tif"]
    names = [i.name for i in got]
    assert names[0] == "y" and names[1].startswith("x-") and names[2].startswith("x-") and names[1] != names[2]
    assert [(i.path, i.name) for i in expand_inputs([tmp_path], exclude=tmp_path / "a")] == [
        ((tmp_path / "b" / "x.tif").resolve(), "x")]   # a stem used once is the name
    for bad in (tmp_path / "missing", str(tmp_path / "*.dm4"), tmp_path / "a" / "z.txt"):
        with pytest.raises(ValueError):
            expand_inputs([bad])


def test_rows_outputs_and_failed_file(batch, data):
    import tifffile
    from rsciio import hspy as rsciio_hspy

    out, rows = batch["out"], batch["rows"]
    assert [r["name"] for r in rows] == ["bad", "g20", "g5"]
    by = {r["name"]: r for r in rows}
    assert by["bad"]["status"] == "failed" and by["bad"]["reason"] and "\n" not in by["bad"]["reason"]
    assert by["g20"]["status"] == by["g5"]["status"] == "ok"
    assert by["g20"]["frames"] == 20 and by["g5"]["frames"] == 5
    # ~250 columns in a 2.56 nm field of graphene (about 255 true ones inside the frame)
    assert 200 <= by["g20"]["columns"] <= 290
    # total drift: 3 nm/min over 20 frames of 0.144 s plus the slow walk, as the simulator made it
    assert by["g20"]["total_drift_nm"] == pytest.approx(data["true_drift_nm"], rel=0.25)
    assert 0.0 < by["g20"]["scatter_px"] < 0.5
    assert by["g20"]["mains_hz"] in (50.0, None) and by["g20"]["hyper_ell_long_s"] > 0
    with open(out / "summary.csv", newline="") as fh:
        table = list(csv.DictReader(fh))
    assert [t["status"] for t in table] == ["failed", "ok", "ok"] and int(table[1]["frames"]) == 20
    assert not (out / "bad" / "results.npz").exists()
    for name in ("g20", "g5"):
        folder = out / name
        assert {p.name for p in folder.iterdir()} == {
            "results.npz", "average.tif", "average_rigid.tif", "average.hspy", "average_rigid.hspy", "columns.csv",
            "report.png", "row.json"}
        with tifffile.TiffFile(folder / "average.tif") as tf:
            assert tf.is_imagej and tf.imagej_metadata["unit"] == "nm"
            x_res = tf.pages[0].tags["XResolution"].value
            assert x_res[0] / x_res[1] == pytest.approx(1 / PIXEL_NM, rel=1e-4)  # pixels per nm
            tif = tf.asarray()
            assert tif.shape == (256, 256)
        for stem in ("average", "average_rigid"):   # the HyperSpy signal: the same image, axes in nm
            sig = rsciio_hspy.file_reader(str(folder / f"{stem}.hspy"))[0]
            assert [(a["name"], a["units"], a["size"]) for a in sig["axes"]] == [("y", "nm", 256), ("x", "nm", 256)]
            assert [float(a["scale"]) for a in sig["axes"]] == pytest.approx([PIXEL_NM, PIXEL_NM])
            np.testing.assert_array_equal(sig["data"], tifffile.imread(folder / f"{stem}.tif"))
        assert sig["original_metadata"]["stem_live"]["frames"] == by[name]["frames"]
        assert (folder / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert batch["progress"][-1].startswith("[3/3]") and "files/min" in batch["progress"][-1]


def test_results_equal_serial_replay(batch, serial):
    from stem_live.io.results import load_results

    a, b = load_results(serial), load_results(batch["out"] / "g5" / "results.npz")
    assert sorted(a) == sorted(b)
    for key in a:
        if key == "info":
            assert {k: v for k, v in a[key].items() if k not in ("source", "drift_hyperparameters")} == \
                   {k: v for k, v in b[key].items() if k not in ("source", "drift_hyperparameters")}
            assert a[key]["drift_hyperparameters"]["values"] == b[key]["drift_hyperparameters"]["values"]
        else:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_restart_skips_finished_inputs(batch, data, client):
    from stem_live.batch import expand_inputs
    from stem_live.batch.runner import run_batch

    out = batch["out"]
    before = {n: (out / n / "results.npz").stat().st_mtime_ns for n in ("g20", "g5")}
    lines: list[str] = []
    rows = run_batch(expand_inputs([data["root"]], exclude=out), out, client=client, progress=lines.append)
    assert lines[0] == "2 of 3 inputs done earlier: skipped"
    assert [r["status"] for r in rows] == ["failed", "ok", "ok"]        # the bad file is tried again
    assert rows[1] == json.loads((out / "g20" / "row.json").read_text())
    assert {n: (out / n / "results.npz").stat().st_mtime_ns for n in ("g20", "g5")} == before


def _lattice_rmse(image: np.ndarray, truth_px: np.ndarray, *, border_px: float = 8.0) -> tuple[float, np.ndarray, int]:
    """RMS distance (px) of the columns located in ``image`` from the nearest true ones, after
    the common translation (the reference time's drift) is taken out; columns within
    ``border_px`` of the edge are left out. Returns (rmse, translation (2,), columns matched)."""
    from scipy.spatial import cKDTree

    from stem_live.batch.job import locate_average

    cols = locate_average(image)
    p = cols.positions
    dist, idx = cKDTree(truth_px).query(p)
    n = image.shape[0]
    keep = (dist < 3.0) & (p >= border_px).all(axis=1) & (p <= n - 1 - border_px).all(axis=1)
    res = p[keep] - truth_px[idx[keep]]
    shift = res.mean(axis=0)
    return float(np.sqrt(((res - shift) ** 2).sum(axis=1).mean())), shift, int(keep.sum())


def test_drift_corrected_average_is_on_the_true_lattice(batch, data):
    """20 frames at 3 nm/min (14 px of drift, 0.6 px within each frame, 5 pm mains along x): the
    columns of the de-warped average against the specimen's true lattice (drift-free pixels of
    frame 0). Seeds 1, 2, 3 measured: 0.069 / 0.064 / 0.068 px (hindsight drift), rigid 0.217 /
    0.226 / 0.191 px; the engine's causal drift 0.122 / 0.099 / 0.112 px before the drift samples'
    reference lost its row warp (``row_warp``), 0.074 px on seed 1 with it; this test is seed 1."""
    import tifffile

    from stem_live.batch.average import average_series
    from stem_live.io import read_frames
    from stem_live.io.results import load_results

    truth_px = data["truth0"].specimen_nm / PIXEL_NM
    corr, shift_c, n_c = _lattice_rmse(tifffile.imread(batch["out"] / "g20" / "average.tif"), truth_px)
    rigid, _, n_r = _lattice_rmse(tifffile.imread(batch["out"] / "g20" / "average_rigid.tif"), truth_px)
    causal = average_series(read_frames(data["root"] / "g20.tif"), load_results(batch["out"] / "g20" / "results.npz"),
                            hindsight=False)
    corr_causal, _, _ = _lattice_rmse(causal.corrected, truth_px)
    print(f"column RMSE vs truth: drift-corrected {corr:.3f} px ({n_c} columns), causal drift {corr_causal:.3f} px, "
          f"rigid {rigid:.3f} px ({n_r})")
    assert n_c >= 200 and n_r >= 200
    assert corr <= 0.10                      # issue #28
    assert corr < corr_causal                # the hindsight drift does better still
    assert rigid > 1.8 * corr
    assert np.hypot(*shift_c) < 1.0   # the reference: frame 0's drift-free lattice, within its own drift
    # the average's column width within 10 % of a single frame's (issue #28; seeds 1-3 measured
    # +1.5 to +2.9 %): the fitted probe sigma of the classical locator on both
    from stem_live.locate import estimate_spacing, locate_classical

    single = np.asarray(next(iter(read_frames(data["root"] / "g20.tif"))).image, np.float32)
    spacing = estimate_spacing(single)
    width = {name: float(locate_classical(np.nan_to_num(np.asarray(img, np.float32)), spacing).meta["probe_sigma_px"])
             for name, img in (("single", single),
                               ("average", tifffile.imread(batch["out"] / "g20" / "average.tif")))}
    assert abs(width["average"] / width["single"] - 1.0) < 0.10, width


def test_refined_drift_recovers_a_per_frame_error():
    """refine_drift on synthetic results: 5 frames of a 6x6 lattice whose recorded drift is off by a
    per-frame linear ramp in x (the engine's causal error): the fitted drift has it taken out."""
    from stem_live.batch.refine import column_ids, refine_drift

    f, rows, lt, psz = 5, 64, 1e-3, 0.01
    lattice = np.stack(np.meshgrid(np.arange(6) * 10.0 + 5, np.arange(6) * 10.0 + 5, indexing="ij"), -1).reshape(-1, 2)
    rng = np.random.default_rng(3)
    err_px = np.stack([np.zeros(f), np.linspace(-0.4, 0.4, f)], 1)        # slope of the error per frame (px / frame time)
    und, t_s, drift = [], [], np.zeros((f, rows, 2))
    for k in range(f):
        s = lattice[:, 0] / rows - 0.5                                     # the column's time within its frame
        und.append(lattice + err_px[k] * s[:, None] + rng.normal(0, 0.02, lattice.shape))  # seen off by the error
        t_s.append(k * 0.1 + lattice[:, 0] * lt)
        drift[k] = -err_px[k] * ((np.arange(rows) / rows) - 0.5)[:, None] * psz  # recorded drift: the error's negative
    offs = np.arange(f + 1) * len(lattice)
    res = {"columns_undistorted_px": np.concatenate(und), "col_offsets": offs, "columns_t_s": np.concatenate(t_s),
           "pixel_size_nm": np.full((f, 2), psz), "beam_shift_nm": np.zeros((f, 2)), "t_start": np.arange(f) * 0.1,
           "line_time_s": np.full(f, lt), "rows": np.full(f, rows), "drift_nm": drift, "info": {}}
    ids = column_ids(res["columns_undistorted_px"], offs)
    assert ids.max() == len(lattice) - 1 and (ids[:len(lattice)] == ids[-len(lattice):]).all()
    out = refine_drift(res, min_columns=10)
    rec = drift[..., 1] / psz
    before = np.sqrt(((rec - rec.mean(1, keepdims=True)) ** 2).mean())
    fitted = out["drift_nm"][..., 1] / psz
    after = np.sqrt(((fitted - fitted.mean(1, keepdims=True)) ** 2).mean())
    assert before > 0.05 and after < 0.1 * before                        # the ramps are gone


def test_session_report_equals_replay_results(data, serial, tmp_path):
    """``run``/``demo --report``: the per-frame results a live session keeps for its figure are
    those of ``replay --results`` (same engine, same frames), and the figure draws that drift."""
    from instrument_adapters.base import EndOfStream
    from instrument_adapters.replay import ReplayInstrument
    from stem_live.engine import Engine, EngineConfig
    from stem_live.io.figures import drift_series
    from stem_live.io.metadata import MIN_ANALYSIS_SIDE
    from stem_live.io.replay_loop import replay_into
    from stem_live.io.results import load_results
    from stem_live.io.session_report import session_report

    engine = Engine(EngineConfig(model="gp", hyperfit_background=False))
    engine.arm()
    with pytest.raises(ValueError, match="PNG"):
        session_report(tmp_path / "r.jpg", engine)
    lines: list[str] = []
    on_result, finish = session_report(tmp_path / "session.png", engine, source="test", say=lines.append)
    inst = ReplayInstrument(data["root"] / "sub" / "g5.tif", realtime=False, min_side=MIN_ANALYSIS_SIDE)

    def as_service(n, frame, r) -> None:   # the live service calls on_result(frame, result) for every frame
        on_result(frame, r)

    replay_into(inst.acquire, engine, end=EndOfStream, on_frame=as_service)
    assert finish() == tmp_path / "session.png" and lines == [f"report -> {tmp_path / 'session.png'}"]
    ref = load_results(serial)
    got = finish.report.results()
    for key in ("seq", "drift_nm", "columns_px", "columns_undistorted_px", "correction_nm"):
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)
    drawn = drift_series(got)
    assert len(drawn["t_s"]) == 5 * 256 and np.allclose(drawn["drift_nm"], drift_series(ref)["drift_nm"])
    assert (tmp_path / "session.png").read_bytes()[:4] == b"\x89PNG"
