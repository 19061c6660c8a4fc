"""The result type of every column locator."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Columns:
    """Atomic columns found in one frame.

    All arrays have the same length N. Positions are in pixels, ``(row, col)``, sub-pixel.
    """

    positions: np.ndarray  # (N, 2) float64 (row, col)
    klass: np.ndarray  # (N,) int, 0 = dimmest class
    intensity: np.ndarray  # (N,) float, peak intensity above the local background
    confidence: np.ndarray  # (N,) float in [0, 1]
    border: np.ndarray  # (N,) bool, refinement window crossed the image border
    meta: dict = field(default_factory=dict, compare=False, repr=False)
    # (N,) float: the x shift (px) the scan-line de-jitter added to each column (its centre
    # line's offset less the mean offset of the lines it spans); positions[:, 1] - line_dx is
    # the fit's line-averaged x, the smoother input for the drift model. Zeros without it.
    line_dx: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        pos = np.asarray(self.positions, dtype=np.float64).reshape(-1, 2)
        n = len(pos)
        object.__setattr__(self, "positions", pos)
        for name, dtype in (
            ("klass", np.int32),
            ("intensity", np.float64),
            ("confidence", np.float64),
            ("border", bool),
        ):
            arr = np.asarray(getattr(self, name), dtype=dtype).reshape(-1)
            if len(arr) != n:
                raise ValueError(f"Columns.{name} has {len(arr)} entries, positions has {n}")
            object.__setattr__(self, name, arr)
        dx = np.zeros(n) if self.line_dx is None else np.asarray(self.line_dx, dtype=np.float64).reshape(-1)
        if len(dx) != n:
            raise ValueError(f"Columns.line_dx has {len(dx)} entries, positions has {n}")
        object.__setattr__(self, "line_dx", dx)

    def __len__(self) -> int:
        return len(self.positions)

    @classmethod
    def empty(cls) -> Columns:
        return cls(np.zeros((0, 2)), np.zeros(0, int), np.zeros(0), np.zeros(0), np.zeros(0, bool))

    def subset(self, index) -> Columns:
        """Columns selected by a boolean mask or an index array."""
        return Columns(
            self.positions[index],
            self.klass[index],
            self.intensity[index],
            self.confidence[index],
            self.border[index],
            dict(self.meta),
            self.line_dx[index],
        )

    def line_averaged(self) -> np.ndarray:
        """(N, 2) positions without the line de-jitter's shift: where the fit put each column
        as the mean of the scan lines it spans (random line jitter mostly averaged out)."""
        return self.positions - np.stack([np.zeros(len(self)), self.line_dx], axis=1)
