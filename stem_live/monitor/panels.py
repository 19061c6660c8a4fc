"""One widget per panel of the monitor. Each takes :class:`~stem_live.protocol.Maps` messages and is
tolerant: data it needs but does not find leaves a short "waiting for ..." label; arrays it does
not know are ignored; a malformed array is skipped with a log line, never an exception.
"""

from __future__ import annotations

import logging
import math
import re
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyqtgraph as pg
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSizePolicy,
    QStackedWidget,
    QVBoxLayout,
    QWidget,
)

from stem_live.protocol import Maps

log = logging.getLogger("stem_live.monitor")

BG = "#101418"
FG = "#c8d0d8"
Y_COLOUR = "#4fc3f7"  # y component (slow scan) everywhere
X_COLOUR = "#ffb74d"  # x component (fast scan) everywhere
CLASS_COLOURS = ["#00e5ff", "#ff4081", "#76ff03", "#ffea00", "#e040fb", "#ff6e40", "#18ffff", "#b2ff59"]


def _finite_float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _array(arrays: Mapping[str, np.ndarray], name: str, ndim: int | None = None,
           shape_tail: Sequence[int] | None = None) -> np.ndarray | None:
    """``arrays[name]`` as float64 when present and of the expected rank / trailing shape; else None."""
    a = arrays.get(name)
    if a is None:
        return None
    a = np.asarray(a)
    if a.dtype.kind not in "biuf" or (ndim is not None and a.ndim != ndim):
        return None
    if shape_tail is not None and tuple(a.shape[a.ndim - len(shape_tail):]) != tuple(shape_tail):
        return None
    return a.astype(np.float64, copy=False)


def _style_plot(plot: pg.PlotItem, bottom: tuple[str, str], left: tuple[str, str]) -> None:
    for side, (text, units) in (("bottom", bottom), ("left", left)):
        ax = plot.getAxis(side)
        ax.enableAutoSIPrefix(False)
        ax.setPen(pg.mkPen(FG))
        ax.setTextPen(pg.mkPen(FG))
        plot.setLabel(side, text, units=units, color=FG)
    plot.showGrid(x=False, y=False)


class WaitingPanel(QWidget):
    """A titled panel whose body is a 'waiting for ...' label until its data first arrives."""

    def __init__(self, title: str, waiting_for: str, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.title = QLabel(f"<b>{title}</b>")
        self.title.setStyleSheet(f"color: {FG}; padding: 2px 4px;")
        self.info = QLabel("")
        self.info.setStyleSheet("color: #8a96a3; padding: 2px 4px;")
        self.info.setAlignment(Qt.AlignRight | Qt.AlignVCenter)
        self.waiting = QLabel(f"waiting for {waiting_for} ...")
        self.waiting.setAlignment(Qt.AlignCenter)
        self.waiting.setStyleSheet("color: #8a96a3; font-style: italic;")
        self.stack = QStackedWidget()
        self.stack.addWidget(self.waiting)
        self.head = QHBoxLayout()
        self.head.setContentsMargins(0, 0, 0, 0)
        self.head.addWidget(self.title)
        self.head.addStretch(1)
        self.head.addWidget(self.info)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(2, 2, 2, 2)
        lay.setSpacing(2)
        lay.addLayout(self.head)
        lay.addWidget(self.stack, 1)

    def set_body(self, w: QWidget) -> None:
        self.stack.addWidget(w)
        self.body = w

    @property
    def has_data(self) -> bool:
        return self.stack.currentIndex() == 1

    def show_body(self, on: bool = True) -> None:
        self.stack.setCurrentIndex(1 if on else 0)

    #: hidden panels (a tab in the background) keep only the newest batch and draw it when shown
    skip_when_hidden = True

    def update_maps(self, batch: Sequence[Maps]) -> None:
        """Take the messages received since the last update (oldest first); never raises."""
        try:
            if self.skip_when_hidden and not self.isVisible():
                self._hidden_batch = list(batch)
                return
            self._hidden_batch = None
            self._update(batch)
        except Exception:  # a panel must never take the window down
            log.exception("%s panel: could not show this update", type(self).__name__)

    def showEvent(self, event) -> None:  # noqa: N802 (Qt name)
        super().showEvent(event)
        batch = getattr(self, "_hidden_batch", None)
        if batch:
            self._hidden_batch = None
            self.update_maps(batch)

    def _update(self, batch: Sequence[Maps]) -> None:  # pragma: no cover - abstract
        raise NotImplementedError


# ----------------------------------------------------------------------------- live frame


class FramePanel(WaitingPanel):
    """The newest preview (row 0 at the top) with the columns found, coloured by class.

    Contrast: set from the first frame (0.5-99.5 percentiles) and then kept across frames until
    the user drags the histogram or presses "Auto levels".
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Live frame", "the first frame (maps: preview)", parent)
        self.view = pg.GraphicsLayoutWidget()
        self.view.setBackground(BG)
        self.plot: pg.PlotItem = self.view.addPlot(row=0, col=0)
        _style_plot(self.plot, ("x", "px"), ("y", "px"))
        self.plot.showGrid(x=False, y=False)
        self.plot.invertY(True)  # row 0 (first scan line) at the top
        self.plot.setAspectLocked(True)
        self.image = pg.ImageItem(axisOrder="row-major")
        self.plot.addItem(self.image)
        self.hist = pg.HistogramLUTItem()
        self.hist.setImageItem(self.image)
        self.hist.axis.setTextPen(pg.mkPen(FG))
        self.view.addItem(self.hist, row=0, col=1)
        self.column_items: list[pg.ScatterPlotItem] = []
        self.scale_bar: pg.ScaleBar | None = None
        self._scale_px: float | None = None

        self.auto_button = QPushButton("Auto levels")
        self.auto_button.setToolTip("Set the contrast from the newest frame (0.5-99.5 percentiles)")
        self.auto_button.clicked.connect(self.auto_levels)
        self.columns_box = QCheckBox("columns")
        self.columns_box.setChecked(True)
        self.columns_box.toggled.connect(self._toggle_columns)
        self.head.insertWidget(1, self.auto_button)
        self.head.insertWidget(2, self.columns_box)
        self.set_body(self.view)
        self.frames_shown = 0
        self.last_seq: int | None = None
        self.n_columns = 0

    def auto_levels(self) -> None:
        img = self.image.image
        if img is None:
            return
        finite = np.asarray(img)[np.isfinite(img)]
        if finite.size == 0:
            return
        lo, hi = np.percentile(finite, [0.5, 99.5])
        if not hi > lo:
            lo, hi = float(finite.min()), float(finite.min()) + 1.0
        self.image.setLevels((float(lo), float(hi)))
        self.hist.setLevels(float(lo), float(hi))

    def levels(self) -> tuple[float, float]:
        lo, hi = self.image.getLevels()
        return float(lo), float(hi)

    def _toggle_columns(self, on: bool) -> None:
        for item in self.column_items:
            item.setVisible(on)

    def _update(self, batch: Sequence[Maps]) -> None:
        m = next((m for m in reversed(batch) if _array(m.arrays, "preview", 2) is not None), None)
        if m is None:
            return
        img = np.asarray(m.arrays["preview"], dtype=np.float32)
        if img.shape[0] < 1 or img.shape[1] < 1:
            return
        first = self.image.image is None
        self.image.setImage(img, autoLevels=False)
        if first:
            self.auto_levels()
            self.plot.autoRange(padding=0)
        elif self.image.width() != img.shape[1] or self.image.height() != img.shape[0]:
            self.plot.autoRange(padding=0)
        self._show_columns(m)
        self._update_scale(m, img.shape)
        self.frames_shown += 1
        self.last_seq = m.seq
        step = m.info.get("preview_step", 1)
        psize = m.info.get("pixel_size_nm")
        text = f"seq {m.seq} · {img.shape[1]}×{img.shape[0]} px"
        if isinstance(step, (int, float)) and step != 1:
            text += f" (1:{step:g})"
        if isinstance(psize, (list, tuple)) and len(psize) == 2 and _finite_float(psize[1]):
            text += f" · {float(psize[1]) * 1e3:.1f} pm/px"
        if self.n_columns:
            text += f" · {self.n_columns} columns"
        self.info.setText(text)
        self.show_body()

    def _show_columns(self, m: Maps) -> None:
        cols = _array(m.arrays, "columns", 2)
        if cols is None or cols.shape[1] < 2:
            for item in self.column_items:
                item.setData([], [])
            self.n_columns = 0
            return
        classes = cols[:, 2].astype(int) if cols.shape[1] >= 3 else np.zeros(len(cols), int)
        classes = np.clip(classes, 0, len(CLASS_COLOURS) - 1)
        while len(self.column_items) < len(CLASS_COLOURS):
            c = CLASS_COLOURS[len(self.column_items)]
            item = pg.ScatterPlotItem(size=7, pen=pg.mkPen(c, width=1.2), brush=None, symbol="o", pxMode=True)
            item.setZValue(10)
            item.setVisible(self.columns_box.isChecked())
            self.plot.addItem(item)
            self.column_items.append(item)
        for k, item in enumerate(self.column_items):
            sel = classes == k
            # a column at pixel index (row, col) sits at the centre of that pixel: +0.5
            item.setData(cols[sel, 1] + 0.5, cols[sel, 0] + 0.5)
        self.n_columns = len(cols)

    def _update_scale(self, m: Maps, shape: tuple[int, int]) -> None:
        psize = m.info.get("pixel_size_nm")
        step = _finite_float(m.info.get("preview_step", 1)) or 1.0
        if not (isinstance(psize, (list, tuple)) and len(psize) == 2):
            return
        px_nm = _finite_float(psize[1])
        if not px_nm or px_nm <= 0:
            return
        nm_per_px = px_nm * step
        field_nm = nm_per_px * shape[1]
        bar_nm = _nice(field_nm / 5)
        size_px = bar_nm / nm_per_px
        if self._scale_px is not None and abs(size_px - self._scale_px) < 1e-6:
            return
        if self.scale_bar is not None:
            self.scale_bar.setParentItem(None)
            self.plot.scene().removeItem(self.scale_bar)
        bar = pg.ScaleBar(size=size_px, width=4, brush=pg.mkBrush("w"), pen=pg.mkPen("k"), offset=(-20, -20))
        bar.setParentItem(self.plot.getViewBox())
        bar.anchor((1, 1), (1, 1), offset=(-20, -20))
        bar.text.setText(f"{bar_nm:g} nm")
        self.scale_bar, self._scale_px = bar, size_px


def _nice(x: float) -> float:
    """The largest of 1, 2, 5 x 10^k not above x."""
    if not x > 0:
        return 1.0
    e = 10 ** math.floor(math.log10(x))
    for f in (5, 2, 1):
        if f * e <= x:
            return f * e
    return e


# ----------------------------------------------------------------------------- drift trace


class DriftPanel(WaitingPanel):
    """Drift (y, x) against frame mid-time, GP mean +- 2 sigma when sent, corrections as markers."""

    skip_when_hidden = False  # a trace must see every message

    def __init__(self, max_points: int = 2000, parent: QWidget | None = None) -> None:
        super().__init__("Drift", "drift estimates (maps: drift_nm)", parent)
        self.max_points = max_points
        self.t: deque[float] = deque(maxlen=max_points)
        self.d: deque[tuple[float, float]] = deque(maxlen=max_points)
        self.ct: deque[float] = deque(maxlen=max_points)
        self.c: deque[tuple[float, float]] = deque(maxlen=max_points)
        self.t0: float | None = None
        self.gp: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.widget = pg.PlotWidget(background=BG)
        self.plot: pg.PlotItem = self.widget.getPlotItem()
        _style_plot(self.plot, ("time since start", "s"), ("drift", "nm"))
        self.legend = self.plot.addLegend(offset=(8, 8), labelTextColor=FG, brush=pg.mkBrush(16, 20, 24, 200))
        self._in_legend: set[str] = set()
        self.bands = []
        self.gp_curves = []
        for colour, _name in ((Y_COLOUR, "y"), (X_COLOUR, "x")):
            lo = pg.PlotDataItem(pen=None)
            hi = pg.PlotDataItem(pen=None)
            qc = pg.mkColor(colour)
            qc.setAlpha(50)
            band = pg.FillBetweenItem(lo, hi, brush=pg.mkBrush(qc))
            band.setZValue(-10)
            self.plot.addItem(band)
            self.bands.append((lo, hi, band))
            self.gp_curves.append(self.plot.plot(pen=pg.mkPen(colour, width=1, style=Qt.DashLine)))
        self.curves = [self.plot.plot(pen=pg.mkPen(Y_COLOUR, width=1), name="drift y"),
                       self.plot.plot(pen=pg.mkPen(X_COLOUR, width=1), name="drift x")]
        self.markers = [
            pg.ScatterPlotItem(symbol="t", size=8, pen=pg.mkPen(Y_COLOUR), brush=None),
            pg.ScatterPlotItem(symbol="t1", size=8, pen=pg.mkPen(X_COLOUR), brush=None)]
        for s in self.markers:
            self.plot.addItem(s)
        self.set_body(self.widget)

    def _legend(self, item: Any, name: str) -> None:
        if name not in self._in_legend:  # only what has data gets a legend entry
            self.legend.addItem(item, name)
            self._in_legend.add(name)

    def clear(self) -> None:
        self.t.clear()
        self.d.clear()
        self.ct.clear()
        self.c.clear()
        self.t0 = None
        self.gp = None

    def __len__(self) -> int:
        return len(self.t)

    def add(self, m: Maps) -> None:
        t = _finite_float(m.info.get("t_mid"))
        if t is None:
            return
        if self.t and t < self.t[-1] - 1e-9:  # time went back: a new stream or a restarted simulator
            self.clear()
        if self.t0 is None:
            self.t0 = t
        d = _array(m.arrays, "drift_nm", 1, (2,))
        if d is not None and np.isfinite(d).all():
            self.t.append(t)
            self.d.append((float(d[0]), float(d[1])))
        c = _array(m.arrays, "correction_nm", 1, (2,))
        if c is not None and np.isfinite(c).all():
            self.ct.append(t)
            self.c.append((float(c[0]), float(c[1])))
        gt = _array(m.arrays, "gp_t", 1)
        gm = _array(m.arrays, "gp_mean_nm", 2, (2,))
        gs = _array(m.arrays, "gp_sigma_nm", 2, (2,))
        if gt is not None and gm is not None and gs is not None and len(gt) == len(gm) == len(gs) and len(gt):
            self.gp = (gt.copy(), gm.copy(), gs.copy())

    def _update(self, batch: Sequence[Maps]) -> None:
        for m in batch:
            self.add(m)
        if not self.t:
            return
        t0 = self.t0 or 0.0
        t = np.fromiter(self.t, float, len(self.t)) - t0
        d = np.array(self.d, float).reshape(-1, 2)
        for k in range(2):
            self.curves[k].setData(t, d[:, k])
        if self.c:
            ct = np.fromiter(self.ct, float, len(self.ct)) - t0
            c = np.array(self.c, float).reshape(-1, 2)
            for k in range(2):
                self.markers[k].setData(ct, c[:, k])
                self._legend(self.markers[k], f"correction {'yx'[k]}")
        else:
            for s in self.markers:
                s.setData([], [])
        if self.gp is not None:
            gt, gm, gs = self.gp
            gt = gt - t0
            for k in range(2):
                lo, hi, _ = self.bands[k]
                lo.setData(gt, gm[:, k] - 2 * gs[:, k])
                hi.setData(gt, gm[:, k] + 2 * gs[:, k])
                self.gp_curves[k].setData(gt, gm[:, k])
                self._legend(self.gp_curves[k], f"GP {'yx'[k]} ±2σ")
        self.info.setText(f"{len(self.t)} points · last y {d[-1, 0]:+.3f} nm, x {d[-1, 1]:+.3f} nm")
        self.show_body()


# ----------------------------------------------------------------------------- distortion


class DistortionPanel(WaitingPanel):
    """Per-scan-line displacement (y, x) of the newest frame, nm against row."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("Scan distortion", "per-line distortion (maps: line_distortion_nm)", parent)
        self.widget = pg.PlotWidget(background=BG)
        self.plot: pg.PlotItem = self.widget.getPlotItem()
        _style_plot(self.plot, ("scan line", "row"), ("displacement", "nm"))
        self.plot.addLegend(offset=(8, 8), labelTextColor=FG, brush=pg.mkBrush(16, 20, 24, 200))
        self.curves = [self.plot.plot(pen=pg.mkPen(Y_COLOUR, width=1), name="y"),
                       self.plot.plot(pen=pg.mkPen(X_COLOUR, width=1), name="x")]
        self.set_body(self.widget)

    def _update(self, batch: Sequence[Maps]) -> None:
        for m in reversed(batch):
            a = _array(m.arrays, "line_distortion_nm", 2, (2,))
            if a is None:
                continue
            rows = np.arange(len(a))
            for k in range(2):
                self.curves[k].setData(rows, a[:, k])
            if len(a):
                rms = np.sqrt(np.nanmean(a**2, axis=0))
                self.info.setText(f"seq {m.seq} · rms y {rms[0]:.3f} nm, x {rms[1]:.3f} nm")
            self.show_body()
            return


# ----------------------------------------------------------------------------- latents


_LATENT = re.compile(r"^latent_(angle|\d+)$")


def _latent_key(name: str) -> tuple[int, int]:
    k = name[len("latent_"):]
    return (0, 0) if k == "angle" else (1, int(k))


class LatentPanel(WaitingPanel):
    """rVAE latent maps (``latent_angle``, ``latent_<k>``) and the latent scatter, in a grid."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__("rVAE latents", "latent maps (maps: latent_angle, latent_<k>, latent_scatter)", parent)
        self.view = pg.GraphicsLayoutWidget()
        self.view.setBackground(BG)
        self.set_body(self.view)
        self.names: tuple[str, ...] = ()
        self.images: dict[str, pg.ImageItem] = {}
        self.scatter: pg.ScatterPlotItem | None = None
        self.shown_seq: int | None = None  # the frame whose latents are shown (``maps`` info latent_seq)

    def _layout(self, names: tuple[str, ...]) -> None:
        self.view.clear()
        self.images, self.scatter = {}, None
        ncols = max(1, math.ceil(math.sqrt(len(names))))
        for i, name in enumerate(names):
            r, c = divmod(i, ncols)
            if name == "latent_scatter":
                p = self.view.addPlot(row=r, col=c, title="latent scatter")
                _style_plot(p, ("z0", ""), ("z1", ""))
                self.scatter = pg.ScatterPlotItem(size=3, pen=None, brush=pg.mkBrush(79, 195, 247, 120))
                p.addItem(self.scatter)
                continue
            p = self.view.addPlot(row=r, col=c, title=name.replace("latent_", "angle" if name == "latent_angle" else "z"))
            p.invertY(True)
            p.setAspectLocked(True)
            p.hideAxis("bottom")
            p.hideAxis("left")
            img = pg.ImageItem(axisOrder="row-major")
            img.setColorMap(pg.colormap.get("CET-C6" if name == "latent_angle" else "viridis"))
            p.addItem(img)
            self.images[name] = img
        self.names = names

    def _update(self, batch: Sequence[Maps]) -> None:
        m = next((m for m in reversed(batch) if any(_LATENT.match(k) or k == "latent_scatter" for k in m.arrays)), None)
        if m is None:
            return
        imgs = {k: _array(m.arrays, k, 2) for k in m.arrays if _LATENT.match(k)}
        imgs = {k: v for k, v in imgs.items() if v is not None and v.size}
        scat = _array(m.arrays, "latent_scatter", 2)
        if scat is not None and scat.shape[1] < 2:
            scat = None
        names = tuple(sorted(imgs, key=_latent_key)) + (("latent_scatter",) if scat is not None else ())
        if not names:
            return
        if names != self.names:
            self._layout(names)
        for k, img in imgs.items():
            finite = img[np.isfinite(img)]
            levels = (float(finite.min()), float(finite.max()) if finite.max() > finite.min() else float(finite.min()) + 1) \
                if finite.size else (0.0, 1.0)
            if k == "latent_angle":
                levels = (-math.pi, math.pi)
            self.images[k].setImage(np.asarray(img, np.float32), levels=levels)
        if scat is not None and self.scatter is not None:
            self.scatter.setData(scat[:, 0], scat[:, 1])
        seq = m.info.get("latent_seq", m.seq)  # the rVAE may lag the frame by one or so
        seq = seq if isinstance(seq, int) and not isinstance(seq, bool) else m.seq
        self.shown_seq = seq
        self.info.setText(f"seq {seq} · {len(imgs)} maps" + (f" · {len(scat)} points" if scat is not None else ""))
        self.show_body()


class StatusLabel(QLabel):
    """A status-bar field with a fixed look."""

    def __init__(self, text: str = "", tip: str = "") -> None:
        super().__init__(text)
        self.setToolTip(tip)
        self.setStyleSheet("padding: 0 6px;")
        self.setSizePolicy(QSizePolicy.Preferred, QSizePolicy.Fixed)
