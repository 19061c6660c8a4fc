"""The inputs of a batch: files, folders (searched recursively) and globs, expanded to the
files ``replay`` reads (our TIFF recordings, ImageJ/plain TIFF, ``.npy``, vendor files),
each with a unique output folder name."""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from stem_live.io import is_vendor_file

__all__ = ["BatchInput", "expand_inputs", "readable"]

PLAIN_SUFFIXES = (".tif", ".tiff", ".npy")


@dataclass(frozen=True)
class BatchInput:
    """One file of a batch: ``path`` (absolute) and ``name``, its folder under the output folder."""

    path: Path
    name: str


def readable(path: Path) -> bool:
    """True for a file name ``replay`` reads (by suffix; hidden and partial files excluded)."""
    return (not path.name.startswith(".") and not path.name.endswith(".partial")
            and (path.suffix.lower() in PLAIN_SUFFIXES or is_vendor_file(path)))


def _inside(path: Path, folder: Path | None) -> bool:
    return folder is not None and (path == folder or folder in path.parents)


def expand_inputs(specs: Sequence[str | os.PathLike], *, exclude: str | os.PathLike | None = None) -> list[BatchInput]:
    """Files, folders (recursive) and globs (``*``, ``?``, ``[``, ``**``) to the readable files, in
    the order given (each folder and glob sorted), each file once. Files under ``exclude`` (the
    output folder) are left out. Raises ValueError (one line) for a name that matches nothing
    readable, or a file of a format no reader takes."""
    skip = None if exclude is None else Path(exclude).resolve()
    seen: dict[Path, None] = {}
    for spec in specs:
        text = str(spec)
        p = Path(text).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and readable(f))
        elif p.is_file():
            if not readable(p):
                raise ValueError(f"{p}: not a format replay reads (.tif .tiff .npy, or a vendor file)")
            found = [p]
        elif glob.has_magic(text):
            found = sorted(Path(f) for f in glob.glob(os.path.expanduser(text), recursive=True)
                           if Path(f).is_file() and readable(Path(f)))
        else:
            raise ValueError(f"{text}: no such file or folder")
        found = [f.resolve() for f in found if not _inside(f.resolve(), skip)]
        if not found:
            raise ValueError(f"{text}: no file replay reads (.tif .tiff .npy, or a vendor file) there")
        for f in found:
            seen.setdefault(f, None)
    return _named(list(seen))


def _named(paths: list[Path]) -> list[BatchInput]:
    """Output names: the file's stem; stems used more than once get a short hash of the full
    path (stable across restarts whatever else is in the batch)."""
    stems: dict[str, int] = {}
    for p in paths:
        stems[p.stem] = stems.get(p.stem, 0) + 1
    out = []
    for p in paths:
        name = p.stem if stems[p.stem] == 1 else f"{p.stem}-{hashlib.sha1(str(p).encode()).hexdigest()[:8]}"
        out.append(BatchInput(path=p, name=name))
    return out
