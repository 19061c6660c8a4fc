"""One input of a batch, start to end, in one worker process: replay it through the engine
exactly as ``stem-live replay FILE --results OUT.npz`` does (gp model, armed, hyperparameter
fits inline), then the averages, their columns and the summary row.

Outputs in ``OUT/NAME/`` (every file atomic; ``results.npz`` is written last, so its presence
means the input is done): ``average.tif`` (drift-corrected) and ``average_rigid.tif`` (ImageJ,
float32, pixel size in nm), the same two as HyperSpy signals ``average.hspy`` and
``average_rigid.hspy`` (axes y, x in nm), ``columns.csv`` (the columns of ``average.tif``,
:func:`stem_live.io.columns.write_columns` layout), ``report.png`` (the one-page figure of
``replay --report``), ``row.json`` (the summary row) and ``results.npz`` (:mod:`stem_live.io.results`).

The engine of a worker is kept between files (:data:`_ENGINES`, reset before each file: the
state is new, the compiled functions stay).
"""

from __future__ import annotations

import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["BatchOptions", "is_done", "process_file"]

RESULTS = "results.npz"
# (worker thread, engine config) -> Engine, kept for the life of the worker: a worker process has
# one thread; in-process workers (threads) each get their own engine (an Engine is not thread-safe)
_ENGINES: dict[tuple, object] = {}


@dataclass(frozen=True)
class BatchOptions:
    """What applies to every input: scan timing for files without it (nm, us, s; None: from the
    file or a sidecar) and the rVAE checkpoint (``""``: none)."""

    pixel_size_nm: float | None = None
    dwell_us: float | None = None
    flyback_us: float | None = None
    frame_period_s: float | None = None
    frame_gap_us: float | None = None
    rvae: str = ""


def is_done(out_dir: str | os.PathLike, name: str) -> bool:
    """True when ``out_dir/name/results.npz`` exists (the last file a finished input writes)."""
    return (Path(out_dir) / name / RESULTS).is_file()


def _engine(options: BatchOptions):
    """This worker's engine for ``options``, reset (made once per process and configuration)."""
    from stem_live.engine import Engine, EngineConfig

    config = EngineConfig(model="gp", rvae_checkpoint=options.rvae, hyperfit_background=False)
    key = (threading.get_ident(), options.rvae)
    engine = _ENGINES.get(key)
    if engine is None:
        if not _ENGINES:  # a worker of a cluster started elsewhere: the compilation cache too (#27)
            from stem_live.jax_cache import enable

            enable()
        engine = _ENGINES[key] = Engine(config)
    engine.reset()
    return engine


def replay_to_results(path: Path, results_path: Path, options: BatchOptions) -> dict:
    """Replay ``path`` into ``results_path`` (.npz) with ``replay --results``'s loop
    (:func:`stem_live.io.replay_loop.replay_into`); returns
    counts (frames read, refused, lost, written). Raises ValueError / RecordError / OSError
    for a file that cannot be read or whose every frame was refused."""
    from instrument_adapters.base import EndOfStream
    from instrument_adapters.replay import ReplayInstrument
    from stem_live.io.metadata import MIN_ANALYSIS_SIDE
    from stem_live.io.replay_loop import replay_into
    from stem_live.io.results import ResultsWriter

    writer = ResultsWriter(results_path, info={"source": str(path), "model": "gp", "armed": True,
                                               "corrections_applied": False})
    inst = ReplayInstrument(path, pixel_size_nm=options.pixel_size_nm, dwell_us=options.dwell_us,
                            flyback_us=options.flyback_us, realtime=False, min_side=MIN_ANALYSIS_SIDE,
                            frame_interval_s=options.frame_period_s, frame_gap_us=options.frame_gap_us)
    engine = _engine(options)
    engine.arm()
    try:
        c = replay_into(inst.acquire, engine, writer, end=EndOfStream)
    finally:
        inst.close()
    n = c.read
    if n == 0:
        raise ValueError("no frame in the file")
    if c.refused == n:
        raise ValueError(f"all {n} frames refused ({c.last_refusal})")
    if len(writer) == 0:
        raise ValueError(f"no frame of {n} was registered (lost: no significant match)")
    writer.close()
    return {"read": n, "refused": c.refused, "lost": c.lost, "written": len(writer)}


def _reason(exc: BaseException) -> str:
    """One line: the message of an error about the file, else the error's type and message."""
    from stem_live.io import RecordError

    text = " ".join(str(exc).split())
    if isinstance(exc, (ValueError, OSError, RecordError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def process_file(path: str | os.PathLike, out_dir: str | os.PathLike, name: str,
                 options: BatchOptions = BatchOptions()) -> dict:
    """Everything for one input (module doc); returns its summary row. Never raises for a
    bad file: the row says ``failed`` and why (one line)."""
    t0 = time.perf_counter()
    path, folder = Path(path), Path(out_dir) / name
    row: dict = {"name": name, "source": str(path), "status": "ok", "reason": ""}
    partial = folder / ".results.partial.npz"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        counts = replay_to_results(path, partial, options)
        row.update(_products(path, partial, folder, options))
        if counts["refused"] or counts["lost"]:
            row["reason"] = f"refused {counts['refused']}, lost {counts['lost']} of {counts['read']} frames"
        row["seconds"] = time.perf_counter() - t0
        from stem_live.batch.outputs import write_text

        write_text(folder / "row.json", json.dumps(row, default=float))
        os.replace(partial, folder / RESULTS)   # last: the input is done
    except Exception as exc:  # a bad file is a failed row, never the end of the batch
        partial.unlink(missing_ok=True)
        row.update(status="failed", reason=_reason(exc), seconds=time.perf_counter() - t0)
    return row


def _products(path: Path, results_path: Path, folder: Path, options: BatchOptions) -> dict:
    """The averages, their columns and the row fields from the results."""
    from stem_live.batch.average import average_series
    from stem_live.batch.outputs import write_figure, write_hspy, write_imagej_tiff
    from stem_live.batch.summary import result_stats
    from stem_live.io import read_frames
    from stem_live.io.columns import write_columns
    from stem_live.io.metadata import MIN_ANALYSIS_SIDE
    from stem_live.io.results import load_results

    results = load_results(results_path)
    row = result_stats(results)
    frames = read_frames(path, pixel_size_nm=options.pixel_size_nm, dwell_us=options.dwell_us,
                         flyback_us=options.flyback_us, min_side=MIN_ANALYSIS_SIDE,
                         frame_interval_s=options.frame_period_s, frame_gap_us=options.frame_gap_us)
    av = average_series(frames, results)
    info = f"stem-live batch: mean of {av.frames} frames of {path.name}"
    meta = {"frames": av.frames, "source": str(path)}
    for stem, image, how in (("average", av.corrected, "de-warped with the per-line drift"),
                             ("average_rigid", av.rigid, "each shifted by its frame-mean drift")):
        write_imagej_tiff(folder / f"{stem}.tif", image, pixel_size_nm=av.pixel_size_nm, description=f"{info}, {how}")
        write_hspy(folder / f"{stem}.hspy", image, pixel_size_nm=av.pixel_size_nm, title=f"{path.stem} {stem}",
                   source=str(path), extra={**meta, "method": how})
    write_figure(folder / "report.png", results)
    columns = locate_average(av.corrected)
    tmp = folder / ".columns.partial.csv"
    write_columns(tmp, columns)
    os.replace(tmp, folder / "columns.csv")
    row["columns"] = len(columns)
    return row


def locate_average(image: np.ndarray, *, spacing_px: float | None = None):
    """The columns of an average (:func:`stem_live.locate.locate_classical`, spacing from
    :func:`stem_live.locate.estimate_spacing` unless given in px); no line de-jitter or pick-up
    model: an average's lines are no longer the scan's."""
    from stem_live.locate import estimate_spacing, locate_classical

    img = np.asarray(image, dtype=np.float32)
    sp = float(spacing_px) if spacing_px else float(estimate_spacing(img))
    return locate_classical(img, sp, line_jitter=False, line_pickup=False)
