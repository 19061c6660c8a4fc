"""The ``Instrument`` interface every adapter implements, and the errors it may raise.

An adapter wraps one microscope (or a simulator, or a file) and knows nothing about sockets:
:mod:`instrument_adapters.bridge` serves any ``Instrument`` over the stem-live protocol.

Units and axes: nm, seconds, radians; ``(y, x)`` pairs with y = slow scan (rows) and
x = fast scan (columns). Beam shift is absolute (the instrument's own zero).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from stem_live.protocol import Frame, Strip


class InstrumentError(RuntimeError):
    """The instrument refused or failed an operation; the message says what to do."""


class EndOfStream(Exception):
    """A finite source (replay) has no more frames."""


class Instrument(ABC):
    """A source of frames that can also move the beam.

    ``acquire`` blocks until the next frame is complete and returns it with the metadata of
    the scan that produced it (``seq`` increasing, ``beam_shift_nm`` in effect during it). An
    instrument that streams partial frames returns each frame's strips instead
    (``protocol.Strip``, in scan order, each as soon as its lines are scanned).
    """

    #: True where frames come from a file and must be delivered losslessly (replay).
    lossless: bool = False

    @abstractmethod
    def acquire(self) -> Frame | Strip:
        """Return the next complete frame (or strip); raise :class:`EndOfStream` when a finite source ends."""

    @abstractmethod
    def get_beam_shift(self) -> np.ndarray:
        """Current beam shift target, nm (y, x)."""

    @abstractmethod
    def set_beam_shift(self, target_nm: np.ndarray) -> None:
        """Move the beam shift to ``target_nm`` (nm, (y, x)); limits are the bridge's job."""

    #: True where the instrument can follow a beam-shift path line by line (``follow_path``)
    follows_paths: bool = False

    def follow_path(self, t_s: np.ndarray, shift_nm: np.ndarray) -> None:
        """Set the beam shift to ``shift_nm[i]`` (nm, (y, x)) at the scan line that starts at
        ``t_s[i]`` (s, the frames' ``t_start`` clock), one value per line; the limits are the
        bridge's job. Only called where ``follows_paths`` is True."""
        raise InstrumentError(f"{type(self).__name__} cannot follow a beam-shift path: send single corrections")

    def hand_over_to_stage(self, shift_nm: np.ndarray) -> bool:
        """Move the stage so that the specimen moves as a beam shift of ``shift_nm`` (nm, (y, x)) moved
        it, so that the bridge can set the beam shift back to its start. True when done; the
        default (an instrument without a stage it can drive) does nothing and returns False."""
        return False

    def close(self) -> None:
        """Release the instrument; the default does nothing."""
