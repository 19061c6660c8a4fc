"""The columns (and rendered sources) of a specimen in one window: what every specimen returns."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Columns"]


@dataclass(frozen=True)
class Columns:
    """Columns (or particles) in a window; positions nm, image frame (y, x).

    ``src_*`` are the point/Gaussian sources to render: for crystals one per column,
    for particles one per blob (``src_parent`` indexes the owning column; sources with
    ``src_parent == len(columns)``, after all others, belong to no column: the amorphous
    support under a nanoparticle).
    """

    positions_nm: np.ndarray      # (N, 2)
    z: np.ndarray                 # (N,) summed atomic number of the column
    weight: np.ndarray            # (N,) sum of Z^1.7
    species: np.ndarray           # (N,) int, index into species_names (VACANCY = -1)
    ids: np.ndarray               # (N,) int64, stable across frames
    orientation_rad: np.ndarray | None
    src_pos_nm: np.ndarray        # (M, 2)
    src_weight: np.ndarray        # (M,)
    src_sigma_nm: np.ndarray      # (M,) intrinsic Gaussian width (0 = point column)
    src_parent: np.ndarray        # (M,)

    def __len__(self) -> int:
        return len(self.ids)
