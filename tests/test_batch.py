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
        assert {p.name for p in folder.iterdir()} == {"results.npz", "average.tif", "average_rigid.tif",
                                                      "columns.csv", "row.json"}
        with tifffile.TiffFile(folder / "average.tif") as tf:
            assert tf.is_imagej and tf.imagej_metadata["unit"] == "nm"
            x_res = tf.pages[0].tags["XResolution"].value
            assert x_res[0] / x_res[1] == pytest.approx(1 / PIXEL_NM, rel=1e-4)  # pixels per nm
            assert tf.asarray().shape == (256, 256)
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
    """20 frames at 3 nm/min (14 px of drift, 0.6 px within each frame): the columns of the
    de-warped average against the specimen's true lattice (drift-free pixels of frame 0).
    Measured: 0.12-0.14 px RMS for the drift-corrected average, 0.22-0.25 px for the rigid one
    (target of #28: 0.1 px, not reached: the residual is mostly along x)."""
    import tifffile

    truth_px = data["truth0"].specimen_nm / PIXEL_NM
    corr, shift_c, n_c = _lattice_rmse(tifffile.imread(batch["out"] / "g20" / "average.tif"), truth_px)
    rigid, _, n_r = _lattice_rmse(tifffile.imread(batch["out"] / "g20" / "average_rigid.tif"), truth_px)
    print(f"column RMSE vs truth: drift-corrected {corr:.3f} px ({n_c} columns), rigid {rigid:.3f} px ({n_r})")
    assert n_c >= 200 and n_r >= 200
    assert corr < 0.17
    assert rigid > 1.4 * corr
    assert np.hypot(*shift_c) < 1.0   # the reference: frame 0's drift-free lattice, within its own drift
