"""Writing located columns: CSV or npz, and an overlay PNG (numpy + zlib, no plotting library)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

from stem_live.locate.columns import Columns

# one colour per class (RGB), then repeated
CLASS_COLOURS = np.array([[255, 80, 60], [60, 200, 255], [255, 210, 0], [120, 255, 120], [230, 120, 255]], np.uint8)


def write_columns(path: Path, columns: Columns, *, frame: int | None = None, unsure: bool | None = None) -> None:
    """``.csv`` (frame,row,col,class,intensity,confidence,border,line_dx) or ``.npz`` (one array
    per field, ``line_shift_px``, the x shift of every scan line, where it was measured, and
    ``flyback_px`` (amplitude, decay) where it was measured from the stack).
    ``line_dx`` is the x shift (px) the line de-jitter added: ``col_px - line_dx`` is the
    line-averaged position. ``unsure`` (True / False, ``locate.unsure``: the locator is not sure
    of this frame's list): a last CSV column ``unsure`` (1 / 0 on every row of the frame), an npz
    field ``unsure``; None (default) leaves both out."""
    path = Path(path)
    n = len(columns)
    fr = np.full(n, -1 if frame is None else frame)
    if path.suffix.lower() == ".npz":
        extra = {}
        if "line_shift_px" in columns.meta:
            extra["line_shift_px"] = np.asarray(columns.meta["line_shift_px"])
        if columns.meta.get("flyback_px") is not None:  # measured from a stack (``locate_stack``)
            extra["flyback_px"] = np.asarray(columns.meta["flyback_px"], np.float64)
        if unsure is not None:
            extra["unsure"] = np.asarray(bool(unsure))
        np.savez(path, frame=fr, positions=columns.positions, klass=columns.klass, intensity=columns.intensity,
                 confidence=columns.confidence, border=columns.border, line_dx=columns.line_dx, **extra)
        return
    fields = [fr, columns.positions, columns.klass, columns.intensity, columns.confidence,
              columns.border.astype(int), columns.line_dx]
    header = "frame,row_px,col_px,class,intensity,confidence,border,line_dx_px"
    fmt = ["%d", "%.4f", "%.4f", "%d", "%.6g", "%.4f", "%d", "%.4f"]
    if unsure is not None:
        fields.append(np.full(n, int(bool(unsure))))
        header += ",unsure"
        fmt.append("%d")
    table = np.column_stack(fields)
    mode = "a" if frame not in (None, 0) and path.exists() else "w"
    with open(path, mode) as fh:
        if mode == "w":
            fh.write(header + "\n")
        np.savetxt(fh, table, delimiter=",", fmt=fmt)


def overlay_rgb(image: np.ndarray, columns: Columns, *, radius: int = 2) -> np.ndarray:
    """Grey image (1-99 % contrast) with a small filled disc on every column, coloured by class."""
    img = np.asarray(image, dtype=np.float64)
    lo, hi = np.percentile(img, [1, 99])
    grey = np.clip((img - lo) / max(hi - lo, 1e-12) * 255, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[:, :, None], 3, axis=2)
    if len(columns):
        dy, dx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
        disc = dy**2 + dx**2 <= radius**2
        dy, dx = dy[disc], dx[disc]
        centre = np.rint(columns.positions).astype(int)
        rr = (centre[:, 0, None] + dy[None]).ravel()
        cc = (centre[:, 1, None] + dx[None]).ravel()
        colour = np.repeat(CLASS_COLOURS[columns.klass % len(CLASS_COLOURS)], disc.sum(), axis=0)
        ok = (rr >= 0) & (rr < img.shape[0]) & (cc >= 0) & (cc < img.shape[1])
        rgb[rr[ok], cc[ok]] = colour[ok]
    return rgb


def write_png(path: Path, rgb: np.ndarray) -> None:
    """Write an (H, W, 3) uint8 array as an 8-bit RGB PNG."""
    h, w, _ = rgb.shape
    raw = np.hstack([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)]).tobytes()  # filter byte 0 per line

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
    Path(path).write_bytes(png)
