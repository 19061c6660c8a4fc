"""Known column lattices (image frame, nm): :class:`Lattice`, the lattices of the simulator's
specimens by name (:data:`LATTICES`, checked against ``simulator/specimen.py`` by the tests),
and a lattice from two vectors typed by the user.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

_SQ3 = math.sqrt(3.0)


# ----------------------------------------------------------------------------- lattices
@dataclass(frozen=True)
class Lattice:
    """A known column lattice, image frame: cell vectors ``a_nm``, ``b_nm`` as (y, x) nm and the
    columns of one cell as fractional coordinates ``basis`` ((f_a, f_b), ...)."""

    a_nm: tuple[float, float]
    b_nm: tuple[float, float]
    basis: tuple[tuple[float, float], ...] = ((0.0, 0.0),)
    name: str = ""

    @property
    def cell(self) -> np.ndarray:
        """(2, 2) matrix whose columns are a and b (y, x) nm."""
        return np.array([self.a_nm, self.b_nm], dtype=float).T

    @property
    def basis_nm(self) -> np.ndarray:
        """(K, 2) basis positions (y, x) nm."""
        return np.asarray(self.basis, dtype=float).reshape(-1, 2) @ self.cell.T

    @property
    def min_distance_nm(self) -> float:
        """Smallest distance between two columns (nm)."""
        n = np.arange(-2, 3)
        n1, n2 = (g.ravel() for g in np.meshgrid(n, n, indexing="ij"))
        pts = (np.stack([n1, n2], 1) @ self.cell.T)[:, None, :] + self.basis_nm[None, :, :]
        d = np.hypot(*(pts.reshape(-1, 2) - self.basis_nm[0]).T)
        return float(np.min(d[d > 1e-9]))

    def to_dict(self) -> dict:
        return {"name": self.name, "a_nm": list(self.a_nm), "b_nm": list(self.b_nm),
                "basis": [list(b) for b in self.basis]}


def _hex(a: float) -> tuple[tuple[float, float], tuple[float, float]]:
    return (0.0, a), (a * _SQ3 / 2, a / 2)


#: column lattices of the simulator presets (the values of simulator/specimen.py, image frame)
LATTICES: dict[str, Lattice] = {
    "graphene": Lattice(*_hex(0.246), basis=((0.0, 0.0), (1 / 3, 1 / 3)), name="graphene"),
    "srtio3": Lattice((0.0, 0.3905), (0.3905, 0.0), basis=((0.0, 0.0), (0.5, 0.5), (0.5, 0.0), (0.0, 0.5)),
                      name="srtio3"),
    "mos2": Lattice(*_hex(0.316), basis=((1 / 3, 1 / 3), (2 / 3, 2 / 3)), name="mos2"),
}


def lattice_by_name(name: str) -> Lattice:
    """One of :data:`LATTICES`; ValueError naming the choices otherwise."""
    try:
        return LATTICES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown lattice {name!r}; choose one of {', '.join(LATTICES)} "
                         f"or give two vectors with --lattice-vectors ay,ax,by,bx (nm)") from None


def parse_lattice_vectors(text: str) -> Lattice:
    """``"ay,ax,by,bx"`` (nm, image axes) -> a one-column-per-cell lattice."""
    try:
        v = [float(s) for s in text.replace(" ", "").split(",")]
    except ValueError:
        v = []
    if len(v) != 4 or not all(math.isfinite(x) for x in v):
        raise ValueError(f"lattice vectors must be four numbers ay,ax,by,bx in nm, got {text!r}")
    a, b = np.array(v[:2]), np.array(v[2:])
    if abs(a[0] * b[1] - a[1] * b[0]) < 1e-6 * max(np.dot(a, a), np.dot(b, b), 1e-12) or min(
            np.hypot(*a), np.hypot(*b)) < 0.02:
        raise ValueError(f"lattice vectors {text!r} are parallel or shorter than 0.02 nm")
    return Lattice((v[0], v[1]), (v[2], v[3]), name="vectors")
