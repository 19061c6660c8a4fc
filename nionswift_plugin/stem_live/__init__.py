"""stem-live's panel for Nion Swift (Window menu > stem-live), registered when Swift loads its plug-ins.

Swift imports every module of the ``nionswift_plugin`` namespace package and calls its ``run()``;
``stop()`` runs when Swift quits. The panel itself is in :mod:`.panel`, its logic in
:mod:`instrument_adapters.nion_panel`.
"""

from __future__ import annotations

import gettext

from nion.swift import Workspace

from .panel import PANEL_ID, StemLivePanel

_ = gettext.gettext


def run() -> None:
    """Register the panel with Swift's workspace manager."""
    Workspace.WorkspaceManager().register_panel(StemLivePanel, PANEL_ID, _("stem-live"), ["left", "right"], "right",
                                                {"min-width": 320})


def stop() -> None:
    """Unregister the panel."""
    try:
        Workspace.WorkspaceManager().unregister_panel(PANEL_ID)
    except KeyError:  # never registered
        pass
