"""Writing a batch's files atomically: each is written to a hidden temporary name in its own
folder, flushed, then renamed over the final name (``os.replace``), so a file is either
absent or complete, also when a worker is killed."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["atomic_write", "write_figure", "write_hspy", "write_imagej_tiff", "write_text"]


def _replaced(path: Path, tmp: Path, write_to: Callable[[Path], None]) -> Path:
    """``write_to(tmp)``, then ``tmp`` renamed over ``path``; ``tmp`` removed if anything fails."""
    try:
        write_to(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _suffixed_tmp(path: Path) -> Path:
    """``.STEM.partial.SUFFIX`` beside ``path``: hidden, and the suffix a writer picks its format by."""
    return path.with_name(f".{path.stem}.partial{path.suffix}")


def atomic_write(path: str | os.PathLike, write: Callable[[object], None]) -> Path:
    """``write(fh)`` into ``.NAME.partial`` beside ``path`` (binary file), then rename it to ``path``."""
    path = Path(path)

    def to_file(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())

    return _replaced(path, path.with_name(f".{path.name}.partial"), to_file)


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` (UTF-8) to ``path``, atomically."""
    return atomic_write(path, lambda fh: fh.write(text.encode("utf-8")))


def write_imagej_tiff(path: str | os.PathLike, image: np.ndarray, *, pixel_size_nm, description: str = "") -> Path:
    """A float32 ImageJ TIFF whose scale Fiji shows: ``pixel_size_nm`` (y, x) nm per pixel
    (resolution in pixels per nm, unit ``nm``), atomically."""
    import tifffile

    psz = np.broadcast_to(np.asarray(pixel_size_nm, dtype=np.float64), (2,))
    meta = {"unit": "nm", "axes": "YX"}
    if description:
        meta["Info"] = description

    def write(fh) -> None:
        tifffile.imwrite(fh, np.asarray(image, dtype=np.float32), imagej=True,
                         resolution=(1.0 / float(psz[1]), 1.0 / float(psz[0])), metadata=meta)

    return atomic_write(path, write)


def write_hspy(path: str | os.PathLike, image: np.ndarray, *, pixel_size_nm, title: str = "",
               source: str = "", extra: dict | None = None) -> Path:
    """A HyperSpy signal (``.hspy``, HDF5, through ``rsciio.hspy``: ``hs.load(path)`` gives a
    ``Signal2D``) of ``image`` (rows = y, cols = x) with both axes calibrated in nm (scale =
    ``pixel_size_nm`` (y, x), offset 0), atomically. ``extra`` goes to ``original_metadata.stem_live``.
    Needs rosettasciio and h5py (``stem-live[batch]``)."""
    try:
        from rsciio.hspy import file_writer
    except ImportError:
        raise RuntimeError("the .hspy output needs rosettasciio and h5py: pip install 'stem-live[batch]'") from None
    path = Path(path)
    data = np.asarray(image, dtype=np.float32)
    psz = np.broadcast_to(np.asarray(pixel_size_nm, dtype=np.float64), (2,))
    axes = [{"name": name, "units": "nm", "scale": float(psz[k]), "offset": 0.0, "size": int(data.shape[k]),
             "navigate": False} for k, name in enumerate(("y", "x"))]
    signal = {"data": data, "axes": axes,
              "metadata": {"General": {"title": title or path.stem, "original_filename": Path(source).name},
                           "Signal": {"signal_type": "", "quantity": "Intensity (counts)"}},
              "original_metadata": {"stem_live": dict(extra or {})}, "tmp_parameters": {},
              "attributes": {"_lazy": False}, "package_info": {"package": "", "package_version": ""},
              "learning_results": {}, "models": {}}
    return _replaced(path, _suffixed_tmp(path), lambda tmp: file_writer(str(tmp), signal, show_progressbar=False))


def write_figure(path: str | os.PathLike, results: dict) -> Path:
    """The one-page figure of ``results`` (:func:`stem_live.io.figures.replay_figure`, PNG), atomically."""
    from stem_live.io.figures import replay_figure

    path = Path(path)
    return _replaced(path, _suffixed_tmp(path), lambda tmp: replay_figure(results, tmp))
