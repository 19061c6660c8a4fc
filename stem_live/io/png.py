"""A tiny numpy -> PNG plotter for report figures (no matplotlib, no Qt): line plots with
bands and markers, arrow fields, axes with ticks, and a 3x5 pixel font (upper case, digits,
a little punctuation). Drawing is vectorised per primitive; coordinates are data units inside
a :class:`Panel` and pixels on the :class:`Canvas` (x right, y down).

    fig = Canvas(480, 640)
    ax = fig.panel(40, 30, 560, 380, xlim=(0, 10), ylim=(-1, 1), title="DRIFT Y (NM)")
    ax.band(t, lo, hi, (200, 210, 255)); ax.line(t, y, (30, 60, 200)); ax.axes()
    fig.save("trace.png")
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["Canvas", "Panel", "COLORS"]

COLORS = {"black": (20, 20, 20), "grey": (150, 150, 150), "light": (225, 225, 225), "blue": (31, 90, 200),
          "band": (190, 205, 245), "red": (210, 50, 40), "green": (30, 150, 60), "orange": (230, 140, 20)}

# 3x5 glyphs, rows top to bottom, 3 bits each
_GLYPHS = {
    "A": "010101111101101", "B": "110101110101110", "C": "011100100100011", "D": "110101101101110",
    "E": "111100110100111", "F": "111100110100100", "G": "011100101101011", "H": "101101111101101",
    "I": "111010010010111", "J": "001001001101010", "K": "101101110101101", "L": "100100100100111",
    "M": "101111111101101", "N": "110101101101101", "O": "010101101101010", "P": "110101110100100",
    "Q": "010101101110011", "R": "110101110101101", "S": "011100010001110", "T": "111010010010010",
    "U": "101101101101111", "V": "101101101101010", "W": "101101111111101", "X": "101101010101101",
    "Y": "101101010010010", "Z": "111001010100111", "0": "111101101101111", "1": "010110010010111",
    "2": "110001010100111", "3": "110001010001110", "4": "101101111001001", "5": "111100110001110",
    "6": "011100111101111", "7": "111001010010010", "8": "111101111101111", "9": "111101111001110",
    " ": "000000000000000", ".": "000000000000010", ",": "000000000010100", "-": "000000111000000",
    "+": "000010111010000", ":": "000010000010000", "/": "001001010100100", "(": "010100100100010",
    ")": "010001001001010", "=": "000111000111000", "%": "101001010100101", "_": "000000000000111",
    "[": "110100100100110", "]": "011001001001011", "|": "010010010010010", "'": "010010000000000",
    "<": "001010100010001", ">": "100010001010100", "*": "000101010101000", "#": "101111101111101",
}


class Canvas:
    """An RGB image (h, w) to draw on; ``save`` writes a PNG."""

    def __init__(self, height: int, width: int, background=(255, 255, 255)) -> None:
        self.rgb = np.empty((int(height), int(width), 3), np.uint8)
        self.rgb[:] = background

    @property
    def shape(self) -> tuple[int, int]:
        return self.rgb.shape[:2]

    def put(self, x: np.ndarray, y: np.ndarray, color, width: int = 1) -> None:
        """Set pixels at float (x, y) (rounded), ``width`` px squares."""
        h, w = self.shape
        xi = np.rint(np.asarray(x, float)).astype(np.int64).ravel()
        yi = np.rint(np.asarray(y, float)).astype(np.int64).ravel()
        if width > 1:
            o = np.arange(width) - (width - 1) // 2
            ox, oy = np.meshgrid(o, o)
            xi = (xi[:, None] + ox.ravel()[None, :]).ravel()
            yi = (yi[:, None] + oy.ravel()[None, :]).ravel()
        ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        self.rgb[yi[ok], xi[ok]] = color

    def segments(self, x0, y0, x1, y1, color, width: int = 1) -> None:
        """Straight segments (pixel coordinates, arrays of equal length), sampled densely."""
        x0, y0, x1, y1 = (np.atleast_1d(np.asarray(v, float)).ravel() for v in (x0, y0, x1, y1))
        ok = np.isfinite(x0) & np.isfinite(y0) & np.isfinite(x1) & np.isfinite(y1)
        x0, y0, x1, y1 = x0[ok], y0[ok], x1[ok], y1[ok]
        if not len(x0):
            return
        n = np.clip(np.ceil(np.maximum(np.abs(x1 - x0), np.abs(y1 - y0))).astype(np.int64) + 1, 2, 4096)
        seg = np.repeat(np.arange(len(n)), n)
        start = np.cumsum(n) - n
        f = (np.arange(n.sum()) - start[seg]) / (n[seg] - 1)
        self.put(x0[seg] + f * (x1 - x0)[seg], y0[seg] + f * (y1 - y0)[seg], color, width)

    def rect(self, x0: float, y0: float, x1: float, y1: float, color, fill: bool = False) -> None:
        if fill:
            h, w = self.shape
            a, b = int(max(0, math.floor(y0))), int(min(h, math.ceil(y1)))
            c, d = int(max(0, math.floor(x0))), int(min(w, math.ceil(x1)))
            self.rgb[a:b, c:d] = color
            return
        self.segments([x0, x1, x1, x0], [y0, y0, y1, y1], [x1, x1, x0, x0], [y0, y1, y1, y0], color)

    def text(self, x: float, y: float, s: str, color=COLORS["black"], scale: int = 2, anchor: str = "left") -> None:
        """Text in the 3x5 font (upper-cased; unknown characters are blank) with its top at ``y``;
        anchor left / centre / right."""
        s = s.upper()
        adv = 4 * scale
        width = len(s) * adv - scale
        x0 = x - (width / 2 if anchor == "centre" else width if anchor == "right" else 0)
        bits = np.array([[int(b) for b in _GLYPHS.get(ch, _GLYPHS[" "])] for ch in s] or np.zeros((0, 15)), bool)
        if not bits.size:
            return
        k, r = np.nonzero(bits.reshape(len(s), 15))
        gy, gx = r // 3, r % 3
        px = x0 + k * adv + gx * scale
        py = y + gy * scale
        o = np.arange(scale)
        ox, oy = np.meshgrid(o, o)
        self.put((px[:, None] + ox.ravel()).ravel(), (py[:, None] + oy.ravel()).ravel(), color)

    def panel(self, x: int, y: int, w: int, h: int, *, xlim, ylim, title: str = "", equal: bool = False,
              flip_y: bool = False) -> Panel:
        return Panel(self, x, y, w, h, xlim, ylim, title, equal, flip_y)

    def save(self, path: str | Path) -> Path:
        from stem_live.io.columns import write_png

        p = Path(path)
        write_png(p, self.rgb)
        return p


def _nice_ticks(lo: float, hi: float, n: int = 5) -> np.ndarray:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return np.array([lo])
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    return np.arange(math.ceil(lo / step) * step, hi + 1e-9 * step, step)


def _fmt(v: float, step: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e")
    digits = max(0, -int(math.floor(math.log10(step))) if step > 0 else 0)
    return f"{v:.{min(digits, 4)}f}"


class Panel:
    """A plotting area on a canvas with data limits; methods take data coordinates."""

    def __init__(self, canvas: Canvas, x: int, y: int, w: int, h: int, xlim, ylim, title: str = "",
                 equal: bool = False, flip_y: bool = False) -> None:
        self.c, self.x, self.y, self.w, self.h = canvas, x, y, w, h
        x0, x1 = (float(v) for v in xlim)
        y0, y1 = (float(v) for v in ylim)
        if not x1 > x0:
            x0, x1 = x0 - 0.5, x0 + 0.5
        if not y1 > y0:
            y0, y1 = y0 - 0.5, y0 + 0.5
        if equal:  # one data unit is the same number of pixels on both axes
            sx, sy = w / (x1 - x0), h / (y1 - y0)
            s = min(sx, sy)
            cx, cy = 0.5 * (x0 + x1), 0.5 * (y0 + y1)
            x0, x1 = cx - 0.5 * w / s, cx + 0.5 * w / s
            y0, y1 = cy - 0.5 * h / s, cy + 0.5 * h / s
        self.xlim, self.ylim, self.flip_y, self.title = (x0, x1), (y0, y1), flip_y, title

    def px(self, xd, yd) -> tuple[np.ndarray, np.ndarray]:
        """Data -> canvas pixel coordinates."""
        (x0, x1), (y0, y1) = self.xlim, self.ylim
        px = self.x + (np.asarray(xd, float) - x0) / (x1 - x0) * (self.w - 1)
        fy = (np.asarray(yd, float) - y0) / (y1 - y0)
        py = self.y + (fy if self.flip_y else 1.0 - fy) * (self.h - 1)
        return px, py

    def _clip(self, px, py):
        ok = (px >= self.x) & (px <= self.x + self.w - 1) & (py >= self.y) & (py <= self.y + self.h - 1)
        return np.where(ok, px, np.nan), np.where(ok, py, np.nan)

    def line(self, xd, yd, color, width: int = 1) -> None:
        px, py = self.px(xd, yd)
        py = np.clip(py, self.y, self.y + self.h - 1)
        inside = (px >= self.x) & (px <= self.x + self.w - 1)
        px = np.where(inside, px, np.nan)
        self.c.segments(px[:-1], py[:-1], px[1:], py[1:], color, width)

    def band(self, xd, lo, hi, color) -> None:
        """Fill between ``lo`` and ``hi`` (x sorted), one pixel column at a time (vectorised)."""
        xd = np.asarray(xd, float)
        if len(xd) < 2:
            return
        cols = np.arange(self.x, self.x + self.w)
        (x0, x1) = self.xlim
        xc = x0 + (cols - self.x) / (self.w - 1) * (x1 - x0)
        inside = (xc >= xd[0]) & (xc <= xd[-1])
        _, plo = self.px(xc, np.interp(xc, xd, lo))
        _, phi = self.px(xc, np.interp(xc, xd, hi))
        top = np.clip(np.minimum(plo, phi), self.y, self.y + self.h - 1)
        bot = np.clip(np.maximum(plo, phi), self.y, self.y + self.h - 1)
        rows = np.arange(self.y, self.y + self.h)[:, None]
        mask = (rows >= np.floor(top)[None, :]) & (rows <= np.ceil(bot)[None, :]) & inside[None, :]
        r, k = np.nonzero(mask)
        self.c.rgb[rows[r, 0], cols[k]] = color

    def points(self, xd, yd, color, size: int = 3) -> None:
        px, py = self._clip(*self.px(xd, yd))
        ok = np.isfinite(px) & np.isfinite(py)
        self.c.put(px[ok], py[ok], color, size)

    def arrows(self, xd, yd, ud, vd, color, scale: float = 1.0, head_px: float = 3.0) -> None:
        """Arrows from (x, y) by (u, v) x ``scale`` (data units), with small heads."""
        x0, y0 = self.px(xd, yd)
        x1, y1 = self.px(np.asarray(xd, float) + scale * np.asarray(ud, float),
                         np.asarray(yd, float) + scale * np.asarray(vd, float))
        self.c.segments(x0, y0, x1, y1, color)
        L = np.hypot(x1 - x0, y1 - y0)
        ok = L > 2 * head_px
        ux, uy = (x1 - x0) / np.where(L > 0, L, 1), (y1 - y0) / np.where(L > 0, L, 1)
        for sgn in (1, -1):
            hx = x1 - head_px * (ux - sgn * 0.6 * uy)
            hy = y1 - head_px * (uy + sgn * 0.6 * ux)
            self.c.segments(x1[ok], y1[ok], hx[ok], hy[ok], color)

    def hline(self, yd: float, color=COLORS["light"]) -> None:
        self.line(list(self.xlim), [yd, yd], color)

    def axes(self, xlabel: str = "", ylabel: str = "", ticks: bool = True) -> None:
        """Frame, ticks with labels, title above, x label below, y label at the top left."""
        c = self.c
        c.rect(self.x - 1, self.y - 1, self.x + self.w, self.y + self.h, COLORS["black"])
        if ticks:
            xt = _nice_ticks(*self.xlim)
            yt = _nice_ticks(*self.ylim)
            xs = float(np.diff(xt[:2])[0]) if len(xt) > 1 else 1.0
            ys = float(np.diff(yt[:2])[0]) if len(yt) > 1 else 1.0
            px, _ = self.px(xt, np.full(len(xt), self.ylim[0]))
            yb = self.y + self.h
            c.segments(px, np.full(len(px), yb), px, np.full(len(px), yb + 4), COLORS["black"])
            for p_, v in zip(px, xt):
                c.text(p_, yb + 7, _fmt(v, xs), anchor="centre")
            _, py = self.px(np.full(len(yt), self.xlim[0]), yt)
            c.segments(np.full(len(py), self.x - 5), py, np.full(len(py), self.x - 1), py, COLORS["black"])
            for p_, v in zip(py, yt):
                c.text(self.x - 8, p_ - 5, _fmt(v, ys), anchor="right")
        if self.title:
            c.text(self.x + self.w / 2, self.y - 16, self.title, anchor="centre")
        if xlabel:
            c.text(self.x + self.w / 2, self.y + self.h + 22, xlabel, anchor="centre")
        if ylabel:
            c.text(self.x + 4, self.y + 4, ylabel, COLORS["grey"])

    def legend(self, items: list[tuple[str, tuple[int, int, int]]]) -> None:
        """Colour swatches with labels in the top-right corner."""
        y = self.y + 6
        for label, color in items:
            x = self.x + self.w - 10 - (4 * 2 * len(label)) - 16
            self.c.rect(x, y + 1, x + 10, y + 9, color, fill=True)
            self.c.text(x + 14, y, label)
            y += 16
