"""Locate + refine time per frame and accuracy against known positions, for both locators.

    python -m stem_live.lab.bench_locate            # 512 and 1024 px, prints a table
    stem-live bench locate --size 512 1024      # the same inside the JSON report

Frames are synthetic honeycombs (``synthetic.honeycomb`` + ``render_columns``: Gaussian
columns, Poisson noise) with exactly known positions, so every row also says how well the
locator did: recall and RMSE (px) of the found columns matched one-to-one to the truth within
0.3 x the spacing. Where atomap is installed (it is not a dependency), its 2-D Gaussian
refinement (``Sublattice.refine_atom_positions_using_2d_gaussian``) refines the classical
locator's start positions of the same frames, and its row is printed beside ours.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import numpy as np

MATCH_FRAC = 0.3  # matching radius, fraction of the nearest-neighbour spacing


def _frames(size: int, spacing_px: float, dose: float, seed: int, n: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """Truth (N, 2) and ``n`` noisy renderings of one honeycomb (sigma 0.18 spacing)."""
    from stem_live.lab.synthetic import honeycomb, render_columns

    rng = np.random.default_rng(seed)
    shape = (int(size), int(size))
    truth = honeycomb(shape, spacing_px, angle_rad=0.3, origin=(1.3, 2.9))
    truth = truth + rng.uniform(-0.3, 0.3, truth.shape)
    inside = (truth >= 0).all(1) & (truth[:, 0] <= size - 1) & (truth[:, 1] <= size - 1)
    truth = truth[inside]
    frames = [render_columns(shape, truth, sigma_px=0.18 * spacing_px, dose=dose, rng=seed + k) for k in range(n)]
    return truth, frames


def score(found: np.ndarray, truth: np.ndarray, radius_px: float) -> tuple[float, float, float]:
    """(recall, precision, rmse_px) of ``found`` matched one-to-one to ``truth`` within
    ``radius_px``, matched as ``stem-live evaluate`` matches (``evaluate.match_columns``)."""
    from stem_live.lab.evaluate import match_columns

    found = np.asarray(found, np.float64).reshape(-1, 2)
    if len(found) == 0 or len(truth) == 0:
        return 0.0, 0.0, float("nan")
    ti, fi = match_columns(truth, found, radius_px)
    err = np.linalg.norm(found[fi] - truth[ti], axis=1)
    return len(err) / len(truth), len(err) / len(found), float(np.sqrt(np.mean(err**2))) if len(err) else float("nan")


def _tracked(spacing_px: float) -> Callable[[np.ndarray], np.ndarray]:
    """The classical locator with a ``LatticePrior`` that learns from every frame it locates,
    as the engine runs it without a calibration (looking for the flyback every few frames;
    these frames do not drift, so it is never found and the search is paid throughout)."""
    from stem_live.lattice_prior import LatticePrior
    from stem_live.locate.classical import locate_classical

    lattice = LatticePrior(spacing_px, fit_flyback=True)

    def fn(img: np.ndarray) -> np.ndarray:
        cols = locate_classical(img, spacing_px, prior=lattice, flyback_px=lattice.flyback_px)
        lattice.update(cols)
        return cols.positions

    return fn


def _time_locator(fn: Callable[[np.ndarray], np.ndarray], frames: list[np.ndarray], truth: np.ndarray,
                  radius: float, repeats: int, label: str, progress: bool) -> dict:
    fn(frames[0])  # warm-up: JIT compilation, FFT plans (excluded)
    times, scores, n_found = [], [], 0
    for k in range(repeats):
        img = frames[1 + k % (len(frames) - 1)]
        t0 = time.perf_counter()
        pos = fn(img)
        times.append(time.perf_counter() - t0)
        scores.append(score(pos, truth, radius))
        n_found = len(pos)
        if progress:
            print(f"\r{label}: {k + 1}/{repeats}", end="", file=sys.stderr, flush=True)
    if progress:
        print(file=sys.stderr)
    t = np.asarray(times) * 1e3
    s = np.asarray(scores)
    return {"median_ms": float(np.median(t)), "p99_ms": float(np.percentile(t, 99)), "min_ms": float(t.min()),
            "n_columns": int(n_found), "n_truth": int(len(truth)), "recall": float(s[:, 0].mean()),
            "precision": float(s[:, 1].mean()), "rmse_px": float(np.nanmean(s[:, 2])), "repeats": int(repeats)}


def _atomap_refiner(spacing_px: float, max_columns: int):
    """atomap's per-column 2-D Gaussian refinement of the classical start positions, on at most
    ``max_columns`` columns (it fits one column at a time with scipy: a whole 1024 px frame
    takes minutes); the time is scaled to all columns. None when atomap is not installed."""
    try:
        import atomap.api as am
    except Exception:  # noqa: BLE001  (not installed, or its hyperspy stack fails to import)
        return None
    from stem_live.locate.classical import locate_classical

    def refine(img: np.ndarray) -> tuple[np.ndarray, float]:
        start = locate_classical(img, spacing_px, refine=False).positions
        sub = start[np.linspace(0, len(start) - 1, min(max_columns, len(start))).astype(int)]
        t0 = time.perf_counter()
        lat = am.Sublattice(sub[:, ::-1].copy(), image=img)  # atomap takes (x, y)
        lat.find_nearest_neighbors()
        lat.refine_atom_positions_using_2d_gaussian(percent_to_nn=0.4, show_progressbar=False)
        dt = (time.perf_counter() - t0) * len(start) / len(sub)
        return np.stack([np.asarray(lat.y_position), np.asarray(lat.x_position)], axis=1), dt

    return refine


def bench_atomap(frames: list[np.ndarray], truth: np.ndarray, spacing_px: float, *, max_columns: int = 300,
                 repeats: int = 2) -> dict:
    """atomap's row of the table: refine time per frame (scaled from ``max_columns`` columns
    to all) and the RMSE of the refined subset; or {"error": ...} without atomap."""
    refine = _atomap_refiner(spacing_px, max_columns)
    if refine is None:
        return {"error": "atomap is not installed (pip install atomap): no side-by-side row"}
    times, rmse = [], []
    for k in range(repeats):
        pos, dt = refine(frames[1 + k % (len(frames) - 1)])
        times.append(dt * 1e3)
        rmse.append(score(pos, truth, MATCH_FRAC * spacing_px)[2])
    return {"median_ms": float(np.median(times)), "rmse_px": float(np.nanmean(rmse)),
            "columns_refined": int(max_columns), "note": "time scaled from the refined subset to every column"}


def bench_locate(sizes=(512, 1024), repeats: int = 20, *, spacing_px: float = 12.0, dose: float = 200.0,
                 seed: int = 0, unet_repeats: int = 3, atomap: bool = True, progress: bool = False) -> dict:
    """Time locate + refine per frame for the classical locator (``locate_classical``) and
    the U-Net (``locate_unet``, committed weights), and atomap's refinement where installed.

    Every size gets one warm-up call per locator (excluded) and then ``repeats``
    (``unet_repeats`` for the network: its forward pass is ~0.3 s at 512 px on 2 cores) timed
    calls on fresh noisy frames. ``classical_tracked``: the classical locator with the lattice
    of the frames before as the prior (``lattice_prior.LatticePrior``, linking, offsets and
    update included), on ``repeats`` + 1 frames of the same lattice, each with its own noise.
    Returns ``{locator: {size: {"median_ms", "p99_ms", "min_ms",
    "n_columns", "n_truth", "recall", "precision", "rmse_px", "repeats"}}}`` with "atomap" rows
    ``{"median_ms", "rmse_px", ...}`` or ``{"error"}``.
    """
    from stem_live.locate.classical import locate_classical
    from stem_live.locate.unet import locate_unet

    radius = MATCH_FRAC * spacing_px
    out: dict = {"classical": {}, "classical_tracked": {}, "unet": {}, "atomap": {}}
    for size in sizes:
        truth, frames = _frames(int(size), spacing_px, dose, seed, min(repeats, 4) + 1)
        out["classical"][str(size)] = _time_locator(lambda im: locate_classical(im, spacing_px).positions, frames,
                                                    truth, radius, repeats, f"classical {size} px", progress)
        # with the lattice of the frames before as the prior (``LatticePrior``): repeats + 1
        # frames, so every call gets a fresh noise draw (a prior that saw the same noise before
        # would score too well)
        truth_t, frames_t = _frames(int(size), spacing_px, dose, seed + 1, repeats + 1)
        out["classical_tracked"][str(size)] = _time_locator(_tracked(spacing_px), frames_t, truth_t, radius, repeats,
                                                            f"classical tracked {size} px", progress)
        out["unet"][str(size)] = _time_locator(lambda im: locate_unet(im, spacing_px).positions, frames, truth,
                                               radius, max(1, unet_repeats), f"unet {size} px", progress)
        if atomap:
            out["atomap"][str(size)] = bench_atomap(frames, truth, spacing_px)
    return out


def table(res: dict) -> str:
    """One line per locator and size."""
    rows = []
    for loc, by_size in res.items():
        for size, r in by_size.items():
            if "error" in r:
                rows.append(f"{loc:9s} {size:>5s} px  {r['error']}")
            elif "recall" in r:
                rows.append(f"{loc:9s} {size:>5s} px  median {r['median_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms  "
                            f"recall {r['recall']:.4f}  precision {r['precision']:.4f}  rmse {r['rmse_px']:.3f} px")
            else:
                rows.append(f"{loc:9s} {size:>5s} px  median {r['median_ms']:8.1f} ms (scaled)  "
                            f"rmse {r['rmse_px']:.3f} px")
    return "\n".join(rows)


def main() -> None:
    print(table(bench_locate(progress=True)))


if __name__ == "__main__":
    main()
