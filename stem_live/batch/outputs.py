"""Writing a batch's files atomically: each is written to a hidden temporary name in its own
folder, flushed, then renamed over the final name (``os.replace``), so a file is either
absent or complete, also when a worker is killed."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

__all__ = ["atomic_write", "write_imagej_tiff", "write_text"]


def atomic_write(path: str | os.PathLike, write: Callable[[object], None]) -> Path:
    """``write(fh)`` into ``.NAME.partial`` beside ``path`` (binary file), then rename it to ``path``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


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
