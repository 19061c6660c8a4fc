"""fcc metal nanoparticles seen along [110], on an amorphous carbon support.

Geometry (all lengths nm). fcc sites are the integer triples (h, k, l) with h + k + l even,
times a / 2, in cubic axes. The beam is along [110]; the projection plane is spanned by
[1-10] (image x) and [001] (image y):

    u = (h - k) a / (2 sqrt 2)   (x),   v = l a / 2   (y),   w = (h + k) a / (2 sqrt 2)   (beam)

so the projected columns form a centred rectangular lattice with sides a / sqrt 2 (0.288 nm
for Au, along x) and a (0.408 nm, along y), nearest column distance a sqrt(3/8) (0.250 nm),
and one atom every a / sqrt 2 along the beam in every column.

A particle is the set of sites inside a truncated octahedron (Wulff shape of an fcc metal:
{111} facets at distance R from its centre, {100} facets at ``truncation`` x R, Au
gamma_100 / gamma_111 ~ 1.1-1.2), R = diameter / 2, with its centre at a seeded sub-cell
offset from the lattice; ``steps`` facets parallel to the beam lose part of their outer
atomic layer (a monolayer surface step seen edge-on). Column thickness n = atoms along the
beam; HAADF weight n * Z^1.7 (incoherent, linear in thickness: channelling saturation of
thick columns is left out). Particles sit on a jittered square grid of pitch ``pitch_nm``
(the one at grid (0, 0) exactly at ``origin_nm``), each with a seeded diameter uniform in
3-10 nm unless one is given, and a seeded in-plane rotation (grid (0, 0): ``rotation_rad``).

The support: an amorphous carbon film rendered as point C atoms (Z 6), ``support_density``
per nm^2 (a-C at ~2 g/cm^3 holds ~100 atoms/nm^3: 200 /nm^2 is a 2 nm film), placed by a
counter hash per 1 nm cell so that the film never runs out; they are sources, never columns.
"""
from __future__ import annotations

import numpy as np

from simulator._util import uhash
from simulator.columns import Columns

__all__ = ["ELEMENTS", "NanoparticleField"]

#: element -> (Z, fcc lattice constant nm): Au 0.4078, Pt 0.3924 (room temperature)
ELEMENTS: dict[str, tuple[int, float]] = {"Au": (79, 0.4078), "Pt": (78, 0.3924)}
_BEAM = np.array([1.0, 1.0, 0.0]) / np.sqrt(2.0)
# facet normals parallel to the beam (cubic axes, unit): the four {111} and two {100} edge-on
_EDGE_ON = np.array([[1, -1, 1], [1, -1, -1], [-1, 1, 1], [-1, 1, -1], [0, 0, np.sqrt(3)], [0, 0, -np.sqrt(3)]],
                    dtype=float) / np.sqrt(3.0)
_KEY = 1 << 10          # projected column key: (p + _KEY) * 2 _KEY + (q + _KEY) < 2^22
_PID = 1 << 10          # particle grid index offset in ids
_Z_C = 6


def _rot(phi: float) -> np.ndarray:
    c, s = np.cos(phi), np.sin(phi)
    return np.array([[c, s], [-s, c]])


def build_particle(a: float, radius_nm: float, offset: np.ndarray, truncation: float,
                   step_u: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One particle's columns: (uv (K, 2) nm (y = v, x = u) relative to its centre, atoms per
    column (K,), column keys (K,)). ``offset``: (3,) centre in cubic axes relative to lattice
    site 0 (nm); ``step_u``: (n_steps, 3) uniforms choosing each step's facet and cut."""
    m = int(np.ceil((max(1.0, truncation) * radius_nm + a) / (0.5 * a)))
    g = np.arange(-m, m + 1)
    h, k, ll = (v.ravel() for v in np.meshgrid(g, g, g, indexing="ij"))
    even = (h + k + ll) % 2 == 0
    h, k, ll = h[even], k[even], ll[even]
    r = np.stack([h, k, ll], axis=1) * (0.5 * a) - offset
    ar = np.abs(r)
    keep = (ar.sum(axis=1) <= np.sqrt(3.0) * radius_nm + 1e-9) & (ar.max(axis=1) <= truncation * radius_nm + 1e-9)
    for uf, uc, _ in step_u:                      # monolayer steps on edge-on facets
        n = _EDGE_ON[int(uf * len(_EDGE_ON)) % len(_EDGE_ON)]
        layer = a / np.sqrt(3.0) if abs(n[2]) < 0.9 else a / 2.0
        proj = r @ n
        if not keep.any():
            break
        outer = keep & (proj > proj[keep].max() - 0.5 * layer)
        t = np.cross(n, _BEAM)
        along = r @ t
        if outer.sum() > 2:
            cut = np.quantile(along[outer], 0.25 + 0.5 * uc)
            keep &= ~(outer & (along > cut))
    p, q = (h - k)[keep], ll[keep]
    keys, counts = np.unique((p + _KEY) * (2 * _KEY) + (q + _KEY), return_counts=True)
    p, q = keys // (2 * _KEY) - _KEY, keys % (2 * _KEY) - _KEY
    cu = (offset[0] - offset[1]) / np.sqrt(2.0)
    uv = np.stack([q * (0.5 * a) - offset[2], p * (a / (2.0 * np.sqrt(2.0))) - cu], axis=1)
    return uv, counts.astype(np.int64), keys.astype(np.int64)


class NanoparticleField:
    """fcc particles along [110] on amorphous carbon; see the module docstring.

    seed: all random choices; element: "Au" | "Pt"; diameter_nm: None = seeded 3-10 nm per
    particle; origin_nm: (y, x) centre of particle (0, 0), specimen frame; rotation_rad:
    in-plane rotation of particle (0, 0); pitch_nm: particle grid; jitter_nm: grid jitter;
    truncation: {100} / {111} facet distance ratio; steps: surface steps per particle;
    support_density: C atoms per nm^2 (0: no support).
    """

    def __init__(self, seed: int, *, element: str = "Au", diameter_nm: float | None = None,
                 origin_nm: tuple[float, float] = (0.0, 0.0), rotation_rad: float = 0.0,
                 pitch_nm: float = 16.0, jitter_nm: float = 1.5, truncation: float = 1.15,
                 steps: int = 2, support_density: float = 200.0):
        if element not in ELEMENTS:
            raise ValueError(f"unknown nanoparticle element {element!r}; choose one of {', '.join(ELEMENTS)}")
        if diameter_nm is not None and not 0.5 <= float(diameter_nm) <= 0.8 * pitch_nm:
            raise ValueError(f"diameter_nm must be within 0.5 .. 0.8 x pitch_nm ({0.8 * pitch_nm:g}), got {diameter_nm}")
        self.seed = int(seed)
        self.element = element
        self.z, self.a = ELEMENTS[element]
        self.diameter_nm = None if diameter_nm is None else float(diameter_nm)
        self.origin_nm = np.asarray(origin_nm, dtype=float).reshape(2)
        self.rotation_rad = float(rotation_rad)
        self.pitch, self.jitter = float(pitch_nm), float(jitter_nm)
        self.truncation, self.steps = float(truncation), int(steps)
        self.support_density = float(support_density)
        self._cache: dict[tuple[int, int], tuple] = {}

    # ---------------------------------------------------------------- particles
    def _particle(self, m1: int, m2: int) -> tuple:
        """(centre (2,) nm specimen frame, positions (K, 2) nm, atoms (K,), ids (K,)) of grid particle (m1, m2)."""
        key = (int(m1), int(m2))
        if key not in self._cache:
            u = uhash(self.seed, "nanoparticle", m1, m2, np.arange(8 + 3 * self.steps))
            centre = self.origin_nm + self.pitch * np.array([m1, m2], float)
            if key != (0, 0):
                centre = centre + self.jitter * 2.0 * (u[0:2] - 0.5)
            diameter = self.diameter_nm if self.diameter_nm is not None else 3.0 + 7.0 * u[2]
            phi = self.rotation_rad if key == (0, 0) else 2.0 * np.pi * u[3]
            offset = u[4:7] * self.a
            uv, n, keys = build_particle(self.a, 0.5 * diameter, offset, self.truncation,
                                         u[8:].reshape(self.steps, 3))
            pos = centre + uv @ _rot(phi).T
            ids = ((m1 + _PID) * (2 * _PID) + (m2 + _PID)) * (1 << 22) + keys
            self._cache[key] = (centre, pos, n, ids.astype(np.int64))
        return self._cache[key]

    def _support(self, box_spec: np.ndarray) -> np.ndarray:
        """(M, 2) C atom positions (nm, specimen frame) in the cells covering ``box_spec`` ((2, 2) lo/hi)."""
        n = int(round(self.support_density))
        if n <= 0:
            return np.zeros((0, 2))
        lo = np.floor(box_spec[0]).astype(int)
        hi = np.ceil(box_spec[1]).astype(int)
        i, j = np.meshgrid(np.arange(lo[0], hi[0]), np.arange(lo[1], hi[1]), indexing="ij")
        i, j = i.ravel()[:, None], j.ravel()[:, None]
        k = np.arange(n)[None, :]
        y = i + uhash(self.seed, "support", i, j, k, 0)
        x = j + uhash(self.seed, "support", i, j, k, 1)
        return np.stack([y.ravel(), x.ravel()], axis=1)

    def columns_in(self, box_nm, scan_rotation_rad: float = 0.0):
        """Metal columns (truth) and their sources plus the support's C atoms (sources with
        parent = number of columns) in ``box_nm`` = ((y0, y1), (x0, x1)), image frame."""
        (y0, y1), (x0, x1) = box_nm
        corners = np.array([[y0, x0], [y0, x1], [y1, x0], [y1, x1]], dtype=float)
        spec = corners @ _rot(-scan_rotation_rad)            # image -> specimen frame (rows)
        d_max = max(10.0, self.diameter_nm or 0.0)
        reach = np.sqrt(3.0) * 0.5 * d_max + self.jitter + self.a   # bounding sphere of the octahedron
        lo = np.floor((spec.min(axis=0) - reach - self.origin_nm) / self.pitch).astype(int)
        hi = np.ceil((spec.max(axis=0) + reach - self.origin_nm) / self.pitch).astype(int)
        parts = [self._particle(m1, m2) for m1 in range(lo[0], hi[0] + 1) for m2 in range(lo[1], hi[1] + 1)]
        pos = np.concatenate([p[1] for p in parts]) @ _rot(-scan_rotation_rad).T
        n_at = np.concatenate([p[2] for p in parts])
        ids = np.concatenate([p[3] for p in parts])
        inside = (pos[:, 0] >= y0) & (pos[:, 0] < y1) & (pos[:, 1] >= x0) & (pos[:, 1] < x1)
        pos, n_at, ids = pos[inside], n_at[inside], ids[inside]
        c = self._support(np.stack([spec.min(axis=0), spec.max(axis=0)])) @ _rot(-scan_rotation_rad).T
        c = c[(c[:, 0] >= y0) & (c[:, 0] < y1) & (c[:, 1] >= x0) & (c[:, 1] < x1)]
        n = len(ids)
        w = n_at * float(self.z) ** 1.7
        src_w = np.concatenate([w, np.full(len(c), float(_Z_C) ** 1.7)])
        m = n + len(c)
        return Columns(pos, n_at * float(self.z), w, np.zeros(n, np.int64), ids, None,
                       np.concatenate([pos, c]), src_w, np.zeros(m),
                       np.concatenate([np.arange(n), np.full(len(c), n)]))

    def source_weights(self, cols, exponent: float) -> np.ndarray:
        """(M,) sum of Z^``exponent`` of every source of ``cols`` (metal columns, then C atoms)."""
        n = len(cols)
        atoms = np.asarray(cols.z, float) / self.z
        return np.concatenate([atoms * float(self.z) ** exponent,
                               np.full(len(cols.src_weight) - n, float(_Z_C) ** exponent)])
