"""The stem-live dock panel: settings, Start/Stop, Arm/Disarm, and labels refreshed while Swift runs.

All logic is in :class:`instrument_adapters.nion_panel.PanelController`; this module only builds
Swift widgets, reads them into :class:`~instrument_adapters.nion_panel.PanelSettings` and shows
:class:`~instrument_adapters.nion_panel.PanelStatus`.
"""

from __future__ import annotations

import gettext
import time
import typing

from nion.swift import Panel

from instrument_adapters.base import InstrumentError
from instrument_adapters.nion_panel import PanelController, PanelSettings, PanelStatus, scan_devices

_ = gettext.gettext

PANEL_ID = "stem-live-panel"
#: how often the labels are refreshed (s)
REFRESH_S = 0.25
CURRENT = ""  # the scan-device choice "current scan device"
CORRECTIONS = {"beam_shift": "beam shift (CSH)", "scan_offset": "scan offset (center_nm)"}


class StemLivePanel(Panel.Panel):
    """Start/stop the stem-live bridge on a scan device of this Swift, arm/disarm, watch it work."""

    def __init__(self, document_controller: typing.Any, panel_id: str, properties: typing.Mapping[str, typing.Any]) -> None:
        super().__init__(document_controller, panel_id, _("stem-live"))
        self.controller = PanelController()
        ui = self.ui
        defaults = PanelSettings()
        column = ui.create_column_widget(properties={"margin": 6, "spacing": 4})

        def row(label: str, *widgets: typing.Any) -> None:
            r = ui.create_row_widget()
            r.add(ui.create_label_widget(label, properties={"width": 110}))
            for w in widgets:
                r.add(w)
            r.add_stretch()
            column.add(r)

        self.device_combo = ui.create_combo_box_widget(items=[CURRENT], item_getter=self._device_label)
        self.correction_combo = ui.create_combo_box_widget(items=list(CORRECTIONS), item_getter=CORRECTIONS.get)
        self.frames_edit = self._line_edit(defaults.frames_endpoint)
        self.corrections_edit = self._line_edit(defaults.corrections_endpoint)
        self.commands_edit = self._line_edit(defaults.commands_endpoint)
        self.max_step_edit = self._line_edit(f"{defaults.max_step_nm:g}", width=60)
        self.max_excursion_edit = self._line_edit(f"{defaults.max_excursion_nm:g}", width=60)
        self.calibration_edit = self._line_edit("")
        self.strips_edit = self._line_edit(str(defaults.strip_lines), width=60)
        self.server_key_edit = self._line_edit("")
        self.allowed_keys_edit = self._line_edit("")
        self.restore_check = ui.create_check_box_widget(_("Restore the starting beam shift on Stop"))
        self.restore_check.checked = defaults.restore_on_stop
        self.handover_check = ui.create_check_box_widget(_("Hand the shift over to the stage at the excursion budget"))
        self.handover_check.checked = defaults.stage_handover
        self.start_button = ui.create_push_button_widget(_("Start"))
        self.arm_button = ui.create_push_button_widget(_("Arm"))
        self.start_button.on_clicked = self._start_stop
        self.arm_button.on_clicked = self._arm_disarm
        self.state_label = ui.create_label_widget()
        self.frames_label = ui.create_label_widget()
        self.corrections_label = ui.create_label_widget()
        self.excursion_label = ui.create_label_widget()
        self.engine_label = ui.create_label_widget()
        self.error_label = ui.create_label_widget()
        for label in (self.engine_label, self.error_label, self.excursion_label):
            label.word_wrap = True

        row(_("Scan device"), self.device_combo)
        row(_("Correction"), self.correction_combo)
        row(_("Frames"), self.frames_edit)
        row(_("Corrections"), self.corrections_edit)
        row(_("Engine commands"), self.commands_edit)
        row(_("Max step (nm)"), self.max_step_edit, ui.create_label_widget(_("  excursion (nm)")), self.max_excursion_edit)
        row(_("Actuator file"), self.calibration_edit)
        row(_("Strip lines"), self.strips_edit, ui.create_label_widget(_("  0: whole frames")))
        row(_("CURVE key"), self.server_key_edit)
        row(_("Allowed keys"), self.allowed_keys_edit)
        column.add(self.restore_check)
        column.add(self.handover_check)
        buttons = ui.create_row_widget()
        buttons.add(self.start_button)
        buttons.add_spacing(8)
        buttons.add(self.arm_button)
        buttons.add_stretch()
        column.add(buttons)
        for label in (self.state_label, self.frames_label, self.corrections_label, self.excursion_label,
                      self.engine_label, self.error_label):
            column.add(label)
        column.add_stretch()
        self.widget = column
        self._settings_widgets = (self.device_combo, self.correction_combo, self.frames_edit, self.corrections_edit,
                                  self.commands_edit, self.max_step_edit, self.max_excursion_edit, self.server_key_edit,
                                  self.allowed_keys_edit, self.calibration_edit, self.strips_edit, self.restore_check,
                                  self.handover_check)
        self._message = ""
        self._last_refresh = 0.0
        self._devices: list[tuple[str, str]] = []
        self.refresh()

    # ------------------------------------------------------------------ widgets

    def _line_edit(self, text: str, width: int = 200) -> typing.Any:
        edit = self.ui.create_line_edit_widget(properties={"width": width})
        edit.text = text
        return edit

    def _device_label(self, device_id: str) -> str:
        if device_id == CURRENT:
            return _("current scan device")
        return dict(self._devices).get(device_id, device_id)

    def settings(self) -> PanelSettings:
        """The :class:`PanelSettings` the fields say; raises ``InstrumentError`` for a number that is not one."""
        def number(edit: typing.Any, what: str) -> float:
            try:
                return float((edit.text or "").strip())
            except ValueError:
                raise InstrumentError(f"{what} must be a number of nm, got {edit.text!r}") from None

        def whole(edit: typing.Any, what: str) -> int:
            text = (edit.text or "").strip()
            if not text.isdigit():
                raise InstrumentError(f"{what} must be a whole number >= 0 (0: whole frames), got {edit.text!r}")
            return int(text)

        return PanelSettings(
            frames_endpoint=(self.frames_edit.text or "").strip(),
            corrections_endpoint=(self.corrections_edit.text or "").strip(),
            commands_endpoint=(self.commands_edit.text or "").strip(),
            scan_device_id=self.device_combo.current_item or CURRENT,
            correction_mode=self.correction_combo.current_item or "beam_shift",
            max_step_nm=number(self.max_step_edit, "max step"),
            max_excursion_nm=number(self.max_excursion_edit, "max excursion"),
            restore_on_stop=bool(self.restore_check.checked),
            actuator_calibration=(self.calibration_edit.text or "").strip(),
            stage_handover=bool(self.handover_check.checked),
            server_key=(self.server_key_edit.text or "").strip(),
            allowed_keys=(self.allowed_keys_edit.text or "").strip(),
            strip_lines=whole(self.strips_edit, "strip lines"))

    # ------------------------------------------------------------------ actions

    def _start_stop(self) -> None:
        self._message = ""
        try:
            if self.controller.running:
                self.controller.stop()
            else:
                self.controller.start(self.settings())
        except InstrumentError as exc:
            self._message = str(exc)
        self.refresh()

    def _arm_disarm(self) -> None:
        self._message = ""
        try:
            if self.controller.armed:
                self.controller.disarm()
            else:
                self.controller.arm()
        except InstrumentError as exc:
            self._message = str(exc)
        self.refresh()

    # ------------------------------------------------------------------ display

    def periodic(self) -> None:
        super().periodic()
        now = time.monotonic()
        if now - self._last_refresh >= REFRESH_S:
            self.refresh()

    def refresh(self) -> None:
        """Show the controller's status now."""
        self._last_refresh = time.monotonic()
        st = self.controller.status()
        if not st.running:
            devices = scan_devices()
            if devices != self._devices:
                chosen = self.device_combo.current_item
                self._devices = devices
                self.device_combo.items = [CURRENT, *(i for i, _n in devices)]
                self.device_combo.current_item = chosen if chosen in self.device_combo.items else CURRENT
        for w in self._settings_widgets:
            _show(w, "enabled", not st.running)
        _show(self.arm_button, "enabled", st.running)
        _show(self.start_button, "text", _("Stop") if st.running else _("Start"))
        _show(self.arm_button, "text", _("Disarm") if st.armed else _("Arm"))
        for label, text in zip((self.state_label, self.frames_label, self.corrections_label, self.excursion_label,
                                self.engine_label, self.error_label), status_lines(st, self._message)):
            _show(label, "text", text)

    def close(self) -> None:
        if self.controller.running:
            self.controller.stop()
        super().close()


def _show(widget: typing.Any, name: str, value: typing.Any) -> None:
    """Set a widget property only when it changes (the labels refresh four times a second)."""
    if getattr(widget, name) != value:
        setattr(widget, name, value)


def status_lines(st: PanelStatus, message: str = "") -> tuple[str, str, str, str, str, str]:
    """State, frames, corrections, excursion, engine and error lines for ``st``."""
    if st.running:
        state = f"running on {st.scan_device}, correction {'ARMED' if st.armed else 'disarmed'}"
        if st.armed and st.engine_armed is False:
            state += " (the engine is disarmed)"
    else:
        state = "stopped"
    strips = f" (in {st.strips_sent} strips)" if st.strips_sent else ""
    frames = f"frames sent {st.frames_sent}{strips}, dropped {st.frames_dropped}"
    last = "" if st.last_correction_nm is None else \
        f"; last [{st.last_correction_nm[0]:+.3f}, {st.last_correction_nm[1]:+.3f}] nm"
    corrections = (f"corrections applied {st.corrections_applied} (clamped {st.corrections_clamped}, "
                   f"refused {st.corrections_refused}){last}")
    budget = f"{st.excursion_budget_nm:g}" if st.excursion_budget_nm else "-"
    excursion = f"excursion used {st.excursion_nm:.2f} / {budget} nm"
    if st.warning:
        excursion += f" - {st.warning}"
    engine = f"engine: {st.engine}"
    error = message or st.last_error
    return state, frames, corrections, excursion, engine, (f"error: {error}" if error else "")
