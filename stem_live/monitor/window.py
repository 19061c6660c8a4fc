"""MonitorWindow: the panels, the controls and the status bar around an :class:`EngineClient`."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import zmq
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QCloseEvent, QFont
from qtpy.QtWidgets import (
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QMainWindow,
    QPlainTextEdit,
    QPushButton,
    QSplitter,
    QTabWidget,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from stem_live.monitor.client import EngineClient
from stem_live.monitor.panels import DistortionPanel, DriftPanel, FramePanel, LatentPanel, StatusLabel
from stem_live.protocol import Command, Maps, Reply

RECORDINGS_DIR = Path("~/stem-live-recordings")
MAX_PENDING = 1000  # maps kept between two redraws (the engine publishes at most ~20 a second)

OK_COLOUR = "#66bb6a"
BAD_COLOUR = "#ef5350"
WARN_COLOUR = "#ffca28"


def default_recording_path() -> Path:
    """``~/stem-live-recordings/<timestamp>.tif`` (never the current directory)."""
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return (RECORDINGS_DIR / f"{stamp}.tif").expanduser()


def _num(metrics: Mapping[str, Any], key: str) -> float | None:
    v = metrics.get(key)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def _ms(v: float | None) -> str:
    return "–" if v is None else f"{v:.1f}"


def rvae_text(st: Any) -> str:
    """One line for the engine's rVAE state (``status()["rvae"]``; None: no stage)."""
    if not isinstance(st, dict):
        return "rVAE: none (Train rVAE builds one from scratch; needs --model gp)"
    if st.get("error"):
        return f"rVAE: error: {st['error']}"
    state = ("training" if st.get("training") else
             f"waiting for patches ({st.get('pending_steps')} steps queued)" if st.get("pending_steps") else
             "encoding" if st.get("available") else "compiling" if not st.get("ready") else "not trained yet")
    loss = st.get("last_loss")
    loss = f", loss {loss:.4g}" if isinstance(loss, (int, float)) and math.isfinite(loss) else ""
    return (f"rVAE v{st.get('version', 0)}: {state} · {st.get('steps_done', 0)} steps{loss} · "
            f"{st.get('buffered', 0)} patches buffered ({st.get('origin', '?')})")


def drift_model_text(st: Any) -> str:
    """One line for what the drift model learnt from the stream (``status()["drift_hyperparameters"]``)."""
    if not isinstance(st, dict) or not isinstance(st.get("values"), dict):
        return "drift model: rigid (no GP)"
    v = st["values"]

    def pm(key: str) -> str:
        x = v.get(key)
        return f"{x * 1e3:.0f} pm" if isinstance(x, (int, float)) and math.isfinite(x) else "?"

    def s(key: str) -> str:
        x = v.get(key)
        return f"{x:.2g} s" if isinstance(x, (int, float)) and math.isfinite(x) else "?"

    mains = st.get("mains_hz")
    mains = f"mains {mains:g} Hz {pm('sigma_mains_nm')}" if isinstance(mains, (int, float)) else "no mains"
    return (f"drift model: wander {pm('sigma_long_nm')} / {s('ell_long_s')}, short {pm('sigma_short_nm')} / "
            f"{s('ell_short_s')}, {mains} ({st.get('mains_mode', '?')}) · {st.get('accepted', 0)}/{st.get('fits', 0)} "
            f"fits accepted")


class ControlsPanel(QWidget):
    """Buttons and parameters; every action is one :class:`Command` to the engine."""

    def __init__(self, window: MonitorWindow) -> None:
        super().__init__()
        self.window = window
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)

        box = QGroupBox("Drift correction")
        g = QVBoxLayout(box)
        self.state_label = QLabel("state: unknown")
        self.state_label.setAlignment(Qt.AlignCenter)
        self.state_label.setStyleSheet("font-weight: bold; padding: 4px;")
        row = QHBoxLayout()
        self.arm_button = QPushButton("Arm")
        self.arm_button.setToolTip("Start sending drift corrections to the instrument")
        self.disarm_button = QPushButton("Disarm")
        self.disarm_button.setToolTip("Stop sending corrections (the beam stays where it is)")
        row.addWidget(self.arm_button)
        row.addWidget(self.disarm_button)
        self.reset_button = QPushButton("Reset model")
        self.reset_button.setToolTip("Forget the drift model; the next frame becomes the new reference")
        g.addWidget(self.state_label)
        g.addLayout(row)
        g.addWidget(self.reset_button)
        lay.addWidget(box)

        box = QGroupBox("Parameters")
        f = QFormLayout(box)
        self.gain_spin = QDoubleSpinBox()
        self.gain_spin.setRange(0.0, 2.0)
        self.gain_spin.setSingleStep(0.05)
        self.gain_spin.setDecimals(2)
        self.gain_spin.setValue(1.0)
        self.gain_spin.setToolTip("Fraction of the predicted drift corrected each frame")
        self.gain_button = QPushButton("Set")
        grow = QHBoxLayout()
        grow.addWidget(self.gain_spin, 1)
        grow.addWidget(self.gain_button)
        f.addRow("gain", grow)
        lay.addWidget(box)

        box = QGroupBox("Recording")
        g = QVBoxLayout(box)
        prow = QHBoxLayout()
        self.record_path = QLineEdit(str(default_recording_path()))
        self.record_path.setToolTip("TIFF stack to record to (a fresh timestamped name each time by default)")
        self._default_path = self.record_path.text()
        self.browse_button = QToolButton()
        self.browse_button.setText("…")
        prow.addWidget(self.record_path, 1)
        prow.addWidget(self.browse_button)
        self.record_button = QPushButton("Record")
        self.record_button.setToolTip("Record every processed frame to the file above")
        self.stop_record_button = QPushButton("Stop recording")
        rrow = QHBoxLayout()
        rrow.addWidget(self.record_button)
        rrow.addWidget(self.stop_record_button)
        self.record_label = QLabel("not recording")
        g.addLayout(prow)
        g.addLayout(rrow)
        g.addWidget(self.record_label)
        lay.addWidget(box)

        box = QGroupBox("Model")
        g = QVBoxLayout(box)
        self.train_button = QPushButton("Train rVAE")
        self.train_button.setToolTip("Train the rotationally invariant VAE on the columns seen so far")
        self.status_button = QPushButton("Refresh status")
        self.rvae_label = QLabel("rVAE: –")
        self.rvae_label.setWordWrap(True)
        self.rvae_label.setToolTip("The engine's rVAE stage (from the last reply; Refresh status updates it)")
        self.drift_label = QLabel("drift model: –")
        self.drift_label.setWordWrap(True)
        self.drift_label.setToolTip("What the drift GP learnt from the stream: wander amplitude / time scale, "
                                    "mains frequency (detected or set), hyperparameter fits accepted")
        g.addWidget(self.train_button)
        g.addWidget(self.status_button)
        g.addWidget(self.rvae_label)
        g.addWidget(self.drift_label)
        lay.addWidget(box)

        lay.addWidget(QLabel("Replies"))
        self.log = QPlainTextEdit()
        self.log.setReadOnly(True)
        self.log.setMaximumBlockCount(500)
        mono = QFont("monospace")
        mono.setStyleHint(QFont.Monospace)
        mono.setPointSize(8)
        self.log.setFont(mono)
        lay.addWidget(self.log, 1)

        send = window.send
        self.arm_button.clicked.connect(lambda: send(Command("arm")))
        self.disarm_button.clicked.connect(lambda: send(Command("disarm")))
        self.reset_button.clicked.connect(lambda: send(Command("reset")))
        self.gain_button.clicked.connect(lambda: send(Command("set", {"gain": round(self.gain_spin.value(), 6)})))
        self.record_button.clicked.connect(self._record)
        self.stop_record_button.clicked.connect(lambda: send(Command("record", {"stop": True})))
        self.browse_button.clicked.connect(self._browse)
        self.train_button.clicked.connect(lambda: send(Command("train")))
        self.status_button.clicked.connect(lambda: send(Command("status")))

    def _record(self) -> None:
        text = self.record_path.text().strip()
        if not text or text == self._default_path:  # untouched default: a fresh timestamp each time
            text = str(default_recording_path())
            self.record_path.setText(text)
            self._default_path = text
        self.window.send(Command("record", {"path": str(Path(text).expanduser())}))

    def _browse(self) -> None:
        start = str(Path(self.record_path.text()).expanduser().parent)
        path, _ = QFileDialog.getSaveFileName(self, "Record to", start, "TIFF stack (*.tif *.tiff)")
        if path:
            self.record_path.setText(path)

    def show_state(self, state: Mapping[str, Any]) -> None:
        """Mirror the engine state from a reply (armed, gain, recording)."""
        armed = state.get("armed")
        if isinstance(armed, bool):
            self.show_armed(armed)
        cfg = state.get("config")
        if isinstance(cfg, dict):
            gain = cfg.get("gain")
            if isinstance(gain, (int, float)) and not self.gain_spin.hasFocus():
                self.gain_spin.setValue(float(gain))
        if "rvae" in state:
            self.rvae_label.setText(rvae_text(state.get("rvae")))
        if "drift_hyperparameters" in state:
            self.drift_label.setText(drift_model_text(state.get("drift_hyperparameters")))
        rec = state.get("recording")
        if isinstance(rec, dict):
            if rec.get("active"):
                self.record_label.setText(f"● recording {rec.get('frames', 0)} frames to {rec.get('path', '')}")
                self.record_label.setStyleSheet(f"color: {BAD_COLOUR};")
            else:
                err = rec.get("error") or ""
                self.record_label.setText("not recording" + (f" (last error: {err})" if err else ""))
                self.record_label.setStyleSheet("")

    def show_armed(self, armed: bool) -> None:
        if armed:
            self.state_label.setText("ARMED: correcting")
            self.state_label.setStyleSheet(f"font-weight: bold; padding: 4px; color: #101418; background: {OK_COLOUR};")
        else:
            self.state_label.setText("DISARMED")
            self.state_label.setStyleSheet(f"font-weight: bold; padding: 4px; color: #101418; background: {WARN_COLOUR};")


class MonitorWindow(QMainWindow):
    """The operator's window. Talks to the engine only through ``maps`` and ``command`` messages.

    Closing it stops only the window: it sends nothing, acquisition and correction go on.
    """

    def __init__(self, maps_endpoint: str, commands_endpoint: str, *, context: zmq.Context | None = None,
                 tick_ms: int = 50, render_hz: float = 10.0, stale_s: float = 2.0,
                 command_timeout_s: float = 3.0) -> None:
        super().__init__()
        self.setWindowTitle(f"stem-live monitor — maps {maps_endpoint} · commands {commands_endpoint}")
        self.client = EngineClient(maps_endpoint, commands_endpoint, context=context, tick_ms=tick_ms,
                                   stale_s=stale_s, command_timeout_s=command_timeout_s, parent=self)
        self.frame_panel = FramePanel()
        self.drift_panel = DriftPanel()
        self.distortion_panel = DistortionPanel()
        self.latent_panel = LatentPanel()
        self.controls = ControlsPanel(self)
        self.last_maps: Maps | None = None
        self.last_reply: Reply | None = None
        self.maps_seen = 0
        self._pending: list[Maps] = []
        # the socket is drained every tick (newest wins); the panels are redrawn at most render_hz times a second
        self._render_timer = QTimer(self)
        self._render_timer.setInterval(max(10, int(1000 / render_hz)))
        self._render_timer.timeout.connect(self.flush)

        right = QSplitter(Qt.Vertical)
        right.addWidget(self.drift_panel)
        self.tabs = QTabWidget()
        self.tabs.addTab(self.distortion_panel, "Distortion")
        self.tabs.addTab(self.latent_panel, "Latents")
        right.addWidget(self.tabs)
        right.setSizes([450, 350])
        split = QSplitter(Qt.Horizontal)
        split.addWidget(self.frame_panel)
        split.addWidget(right)
        split.addWidget(self.controls)
        split.setStretchFactor(0, 5)
        split.setStretchFactor(1, 4)
        split.setStretchFactor(2, 0)
        split.setSizes([620, 500, 260])
        # what the operator must know now (frames stopped, correction disarmed): hidden while all is well
        self.banner = QLabel("")
        self.banner.setWordWrap(True)
        self.banner.setStyleSheet(f"padding: 6px; font-weight: bold; color: white; background: {BAD_COLOUR};")
        self.banner.setVisible(False)
        central = QWidget()
        outer = QVBoxLayout(central)
        outer.setContentsMargins(0, 0, 0, 0)
        outer.addWidget(self.banner)
        outer.addWidget(split, 1)
        self.setCentralWidget(central)

        sb = self.statusBar()
        self.conn_label = StatusLabel(f"waiting for the engine on {maps_endpoint}", "maps connection")
        self.fps_label = StatusLabel("– frames/s", "frames processed per second")
        self.latency_label = StatusLabel("latency p50 – / p99 – ms", "frame arrival -> correction sent")
        self.stage_label = StatusLabel("", "per-stage processing times of the newest frame")
        self.count_label = StatusLabel("skipped – · rejected –", "frames never processed / messages rejected")
        self.armed_label = StatusLabel("", "drift correction state")
        self.reply_label = StatusLabel("", "the last command's reply")
        for w in (self.conn_label, self.fps_label, self.latency_label, self.stage_label, self.count_label,
                  self.armed_label):
            sb.addWidget(w)
        sb.addPermanentWidget(self.reply_label)
        self._set_conn_style(None)

        self.client.mapsReceived.connect(self.on_maps)
        self.client.replyReceived.connect(self.on_reply)
        self.client.connectionChanged.connect(self.on_connection)
        self.client.start()
        self._render_timer.start()
        self.send(Command("status"))  # mirror the engine state in the controls

    # ------------------------------------------------------------------ commands

    def send(self, cmd: Command) -> None:
        args = " ".join(f"{k}={v}" for k, v in cmd.args.items())
        self.controls.log.appendPlainText(f"{time.strftime('%H:%M:%S')} > {cmd.cmd} {args}".rstrip())
        self.client.send(cmd)

    def on_reply(self, cmd: Command, reply: Reply) -> None:
        self.last_reply = reply
        mark = "ok" if reply.ok else "FAILED"
        text = f"{cmd.cmd}: {reply.message or mark}"
        self.controls.log.appendPlainText(f"{time.strftime('%H:%M:%S')} < {mark}: {reply.message}")
        self.reply_label.setText(text)
        self.reply_label.setStyleSheet(f"padding: 0 6px; color: {OK_COLOUR if reply.ok else BAD_COLOUR};")
        if reply.state:
            self.show_banner(str(reply.state.get("banner") or ""))
            self.controls.show_state(reply.state)
            armed = reply.state.get("armed")
            if isinstance(armed, bool):
                self._show_armed(armed)

    # ------------------------------------------------------------------ maps

    def on_maps(self, batch: Sequence[Maps]) -> None:
        """Queue newly received maps; :meth:`flush` draws them (rate-limited by a timer). A
        heartbeat (no frames arriving: ``info["heartbeat"]``) only updates the banner and the armed state."""
        for m in batch:
            if m.info.get("heartbeat"):
                self.show_banner(str(m.info.get("banner") or ""))
                armed = _num(m.metrics, "armed")
                if armed is not None:
                    self._show_armed(armed > 0.5)
        batch = [m for m in batch if not m.info.get("heartbeat")]
        if batch:
            self.show_banner(str(batch[-1].info.get("banner") or ""))
        self._pending.extend(batch)
        del self._pending[:-MAX_PENDING]

    def flush(self) -> None:
        """Draw everything received since the last flush: traces take every message, images the newest."""
        if not self._pending:
            return
        batch, self._pending = self._pending, []
        self.maps_seen += len(batch)
        self.last_maps = batch[-1]
        for panel in (self.frame_panel, self.drift_panel, self.distortion_panel, self.latent_panel):
            panel.update_maps(batch)
        self._show_metrics(batch[-1])

    def _show_metrics(self, m: Maps) -> None:
        mt = m.metrics
        fps = _num(mt, "fps")
        self.fps_label.setText(f"{fps:.1f} frames/s" if fps is not None else "– frames/s")
        self.latency_label.setText(f"latency p50 {_ms(_num(mt, 'latency_p50_ms'))} / "
                                   f"p99 {_ms(_num(mt, 'latency_p99_ms'))} ms")
        stages = [(k[len("stage_"):-len("_ms")], _num(mt, k)) for k in mt if k.startswith("stage_") and k.endswith("_ms")]
        self.stage_label.setText(" · ".join(f"{k} {v:.1f}" for k, v in stages if v is not None) + " ms"
                                 if stages else "")
        sk, rj = _num(mt, "skipped"), _num(mt, "rejected")
        self.count_label.setText(f"skipped {'–' if sk is None else int(sk)} · rejected {'–' if rj is None else int(rj)}")
        armed = _num(mt, "armed")
        if armed is not None:
            self._show_armed(armed > 0.5)
        self.conn_label.setText(f"● live · seq {m.seq}")

    def show_banner(self, text: str) -> None:
        """Show ``text`` across the top of the window; hide the banner for ""."""
        self.banner.setText(text)
        self.banner.setVisible(bool(text))

    def _show_armed(self, armed: bool) -> None:
        self.armed_label.setText("ARMED" if armed else "disarmed")
        self.armed_label.setStyleSheet(f"padding: 0 6px; font-weight: bold; color: {OK_COLOUR if armed else WARN_COLOUR};")
        self.controls.show_armed(armed)

    def on_connection(self, alive: bool) -> None:
        if alive:
            self.conn_label.setText(f"● live · seq {self.client.last_seq}")
            self._set_conn_style(True)
        else:
            self.conn_label.setText(f"● engine not responding: no maps for > {self.client.stale_s:g} s "
                                    f"(engine stopped or no frames arriving); listening on {self.client.maps_endpoint}")
            self._set_conn_style(False)

    def _set_conn_style(self, alive: bool | None) -> None:
        colour = {True: OK_COLOUR, False: BAD_COLOUR, None: WARN_COLOUR}[alive]
        self.conn_label.setStyleSheet(f"padding: 0 6px; color: {colour}; font-weight: bold;")

    @property
    def responding(self) -> bool:
        return self.client.responding

    # ------------------------------------------------------------------ lifecycle

    def shutdown(self) -> None:
        """Close the sockets (idempotent). Sends nothing: acquisition goes on."""
        self._render_timer.stop()
        self.client.stop()

    def closeEvent(self, event: QCloseEvent) -> None:  # noqa: N802 (Qt name)
        self.shutdown()
        super().closeEvent(event)
