"""Specimens: infinite, procedurally generated crystals and particle fields.

Positions are nm in the *image* frame (y, x): a specimen point s (specimen frame) is seen
at ``Rot(-scan_rotation) s``, i.e. rotating the scan by +phi makes the specimen appear
rotated by -phi. ``Rot(phi)`` turns the angle ``atan2(y, x)`` by +phi.

Nothing is stored per site: the lattice is enumerated for whatever window a frame needs,
and every random decision (dopant, vacancy, particle jitter, orientation) is a hash of
(seed, integer site index), so a site is the same whenever it is seen and the specimen
never runs out however far the image drifts. Changes made by ``Specimen.advance``
(dopant hops, vacancy migration, particle rotation) are kept as per-site overrides.

Contrast: each column carries ``z`` (sum of the atomic numbers in the projected column)
and ``weight`` = sum over its atoms of Z^1.7 (HAADF, incoherent, thin specimen); the
image is rendered from ``weight``. Vacant sites are not columns (``include_vacancies``
shows them with species ``VACANCY`` = -1).

Presets
- graphene: honeycomb, a = 0.246 nm (C-C 0.142 nm); Si (Z 14) on C (Z 6) sites and vacancies.
- srtio3 [001]: a = 0.3905 nm; Sr (38) corners, Ti-O (22 + 8) centre, O (8) edge centres;
  optional O-column vacancies and La (57) on Sr sites (``dopant_fraction``, default 0).
- mos2 2H [001]: a = 0.316 nm; Mo (42) and S2 (2 x 16) on a honeycomb; monosulfur
  vacancies (S2 -> S, default 2 %) and optional W (74) on Mo.
- particles: anisotropic objects (three Gaussian blobs of different brightness in an
  asymmetric arrangement, ~0.9 nm long; symmetry order 1) on a jittered square grid,
  two species that are mirror images of each other, random orientations that diffuse.
  ``orientation_rad`` = atan2(dy, dx) (image axes) of the particle's long axis, from the
  bright blob (the reference point) towards the dim one.
- perovskite: PbTiO3 [001], a = 0.390 nm (tetragonal PbTiO3 a = 0.3899 nm, seen along c):
  Pb (82) corners, Ti-O (22 + 8) centre, O (8) edge centres; optional O-column vacancies.
  With the HAADF exponent 1.7 (the measured range is Z^1.6-2: Pennycook & Jesson,
  Ultramicroscopy 37, 14 (1991); Krivanek et al., Nature 464, 571 (2010), ~Z^1.64) an O
  column scatters (8/82)^1.7 = 1.9 % of a Pb column and the Ti-O column 12.5 %; on the
  diffuse background of a thick crystal (``PRESET_DEFAULTS["perovskite"]["diffuse_fraction"]``)
  the O columns are below what a real HAADF dose shows, so they are *hidden in HAADF*
  (``haadf_hidden_species``: a scorer leaves them out of HAADF truth, keeps them for ABF/BF).
- nanoparticle: fcc Au (or Pt) particles along [110], 3-10 nm, faceted, with surface steps,
  on an amorphous carbon support (``simulator.nanoparticle``); the truth is the metal columns.

Other detectors (ABF, BF; ``simulator.detector``) use ``source_weights(cols, exponent)``:
the per-source sum of Z^exponent instead of Z^1.7.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator._util import uhash
from simulator.columns import Columns
from simulator.nanoparticle import NanoparticleField

__all__ = ["PRESETS", "VACANCY", "Columns", "Specimen", "make_specimen", "rot"]

PRESETS: tuple[str, ...] = ("graphene", "srtio3", "mos2", "particles", "nanoparticle", "perovskite")
VACANCY = -1
_Z_EXP = 1.7
_OFF = 1 << 20  # lattice index offset for ids


def rot(phi: float) -> np.ndarray:
    """2x2 matrix acting on (y, x) column vectors: turns atan2(y, x) by +phi."""
    c, s = np.cos(phi), np.sin(phi)
    return np.array([[c, s], [-s, c]])


@dataclass(frozen=True)
class _Lattice:
    a1: tuple[float, float]
    a2: tuple[float, float]
    basis: tuple[tuple[float, float], ...]     # fractional (f1, f2)
    basis_species: tuple[int, ...]
    names: tuple[str, ...]
    atoms: tuple[tuple[int, ...], ...]         # atomic numbers in each species' column
    # (host species, new species, which kwarg sets the fraction)
    defects: tuple[tuple[int, int, str], ...]
    # (mobile species, host species tuple, hop radius nm)
    hops: tuple[tuple[int, tuple[int, ...], float], ...]
    default_dopant: float
    default_vacancy: float
    haadf_hidden: tuple[int, ...] = ()           # species too faint to count as visible in HAADF


def _hexagonal(a: float) -> tuple[tuple[float, float], tuple[float, float]]:
    return (0.0, a), (a * np.sqrt(3) / 2, a / 2)


_LATTICES: dict[str, _Lattice] = {
    "graphene": _Lattice(
        *_hexagonal(0.246), basis=((0.0, 0.0), (1 / 3, 1 / 3)), basis_species=(0, 0),
        names=("C", "Si"), atoms=((6,), (14,)),
        defects=((0, 1, "dopant"), (0, VACANCY, "vacancy")),
        hops=((1, (0,), 0.16), (VACANCY, (0,), 0.16)),
        default_dopant=0.004, default_vacancy=0.003),
    "srtio3": _Lattice(
        (0.0, 0.3905), (0.3905, 0.0),
        basis=((0.0, 0.0), (0.5, 0.5), (0.5, 0.0), (0.0, 0.5)), basis_species=(0, 1, 2, 2),
        names=("Sr", "TiO", "O", "La"), atoms=((38,), (22, 8), (8,), (57,)),
        defects=((2, VACANCY, "vacancy"), (0, 3, "dopant")),
        hops=((VACANCY, (2,), 0.29),),
        default_dopant=0.0, default_vacancy=0.0),
    "mos2": _Lattice(
        *_hexagonal(0.316), basis=((1 / 3, 1 / 3), (2 / 3, 2 / 3)), basis_species=(0, 1),
        names=("Mo", "S2", "S", "W"), atoms=((42,), (16, 16), (16,), (74,)),
        defects=((0, 3, "dopant"), (1, 2, "vacancy")),
        hops=((2, (1,), 0.33),),
        default_dopant=0.0, default_vacancy=0.02),
    "perovskite": _Lattice(
        (0.0, 0.390), (0.390, 0.0),
        basis=((0.0, 0.0), (0.5, 0.5), (0.5, 0.0), (0.0, 0.5)), basis_species=(0, 1, 2, 2),
        names=("Pb", "TiO", "O"), atoms=((82,), (22, 8), (8,)),
        defects=((2, VACANCY, "vacancy"),),
        hops=((VACANCY, (2,), 0.28),),
        default_dopant=0.0, default_vacancy=0.0, haadf_hidden=(2,)),
}

# particle blobs in the particle frame (orientation 0 = long axis along +x):
# (dy, dx) nm, relative brightness, intrinsic sigma nm. Blob 0 is the reference point.
_BLOBS = np.array([
    [0.00, 0.00, 1.00, 0.11],
    [0.00, 0.50, 0.55, 0.15],
    [0.30, 0.20, 0.40, 0.10],
])


class Specimen:
    """An infinite specimen; query columns for any window with ``columns_in``.

    Keyword arguments (all optional; None = preset default):
      lattice_rotation_rad: in-plane rotation of the crystal in the specimen frame.
      origin_nm: (y, x) position of lattice site (0, 0) / particle (0, 0).
      dopant_fraction: graphene Si on C (0.004); mos2 W on Mo (0); srtio3 La on Sr (0);
          others ignored.
      vacancy_fraction: graphene C vacancies (0.003); srtio3 / perovskite O-column vacancies (0);
          mos2 S2 -> S monosulfur vacancies (0.02); particles empty grid sites (0.05).
      hop_rate_per_s: per-defect hop rate used by ``advance(hops=True)`` (0.02 /s).
      particle_spacing_nm (2.0), particle_jitter_nm (0.35), particle_weight (600, in Z^1.7
          units for the bright blob), rot_diffusion_rad2_per_s (2e-3; 0 freezes them),
          mirror_fraction (0.5: share of the mirror-image species).
      extent_nm: (h, w) window for the convenience properties ``positions_nm`` etc.
      nanoparticle: element ("Au" | "Pt"), particle_diameter_nm (None: seeded 3-10 nm),
          support_density_per_nm2 (200: a 2 nm a-C film), surface_steps (2),
          particle_pitch_nm (16: the particle grid); ``lattice_rotation_rad`` and
          ``origin_nm`` place the particle at grid (0, 0).
    """

    symmetry_order: int = 1   # of a particle (1 = no rotational symmetry)

    def __init__(self, preset: str = "graphene", seed: int = 0, *,
                 lattice_rotation_rad: float = 0.0, origin_nm: tuple[float, float] = (0.0, 0.0),
                 dopant_fraction: float | None = None, vacancy_fraction: float | None = None,
                 hop_rate_per_s: float = 0.02,
                 particle_spacing_nm: float = 2.0, particle_jitter_nm: float = 0.35,
                 particle_weight: float = 600.0, rot_diffusion_rad2_per_s: float = 2e-3,
                 mirror_fraction: float = 0.5,
                 extent_nm: tuple[float, float] = (5.0, 5.0),
                 element: str = "Au", particle_diameter_nm: float | None = None,
                 support_density_per_nm2: float = 200.0, surface_steps: int = 2,
                 particle_pitch_nm: float = 16.0):
        if preset not in PRESETS:
            raise ValueError(f"unknown specimen preset {preset!r}; choose one of {', '.join(PRESETS)}")
        self.preset = preset
        self.seed = int(seed)
        self.lattice_rotation_rad = float(lattice_rotation_rad)
        self.origin_nm = np.asarray(origin_nm, dtype=float).reshape(2)
        self.hop_rate_per_s = float(hop_rate_per_s)
        self.extent_nm = (float(extent_nm[0]), float(extent_nm[1]))
        self._override: dict[int, int] = {}       # site id -> species
        self._angle: dict[int, float] = {}        # particle id -> accumulated rotation
        self._cache = None
        self._np: NanoparticleField | None = None
        if preset == "nanoparticle":
            self._lat = None
            self._np = NanoparticleField(
                self.seed, element=element, diameter_nm=particle_diameter_nm, origin_nm=tuple(self.origin_nm),
                rotation_rad=self.lattice_rotation_rad, pitch_nm=particle_pitch_nm, steps=surface_steps,
                support_density=support_density_per_nm2)
            self.species_names = (element,)
            self.dopant_fraction = self.vacancy_fraction = 0.0
        elif preset == "particles":
            self._lat = None
            self.species_names: tuple[str, ...] = ("particle", "mirror")
            self.vacancy_fraction = 0.05 if vacancy_fraction is None else float(vacancy_fraction)
            self.dopant_fraction = 0.0
            self.spacing = float(particle_spacing_nm)
            self.jitter = float(particle_jitter_nm)
            self.particle_weight = float(particle_weight)
            self.rot_diffusion = float(rot_diffusion_rad2_per_s)
            self.mirror_fraction = float(mirror_fraction)
        else:
            lat = self._lat = _LATTICES[preset]
            self.species_names = lat.names
            self.dopant_fraction = lat.default_dopant if dopant_fraction is None else float(dopant_fraction)
            self.vacancy_fraction = lat.default_vacancy if vacancy_fraction is None else float(vacancy_fraction)
            self._z = np.array([sum(a) for a in lat.atoms], dtype=float)
            self._w = np.array([sum(z ** _Z_EXP for z in a) for a in lat.atoms], dtype=float)
            self._basis_species = np.asarray(lat.basis_species)
            m = np.array([lat.a1, lat.a2]).T                    # columns a1, a2 (y, x)
            self._cell = rot(self.lattice_rotation_rad) @ m      # specimen frame
            self._basis = np.asarray(lat.basis) @ self._cell.T   # (nb, 2) nm

    @property
    def max_source_sigma_nm(self) -> float:
        """Largest intrinsic width of a rendered source (0 for point-like columns)."""
        return float(_BLOBS[:, 3].max()) if self.preset == "particles" else 0.0

    @property
    def source_extent_nm(self) -> float:
        """Largest distance of a source from its column's reference point."""
        return float(np.hypot(_BLOBS[:, 0], _BLOBS[:, 1]).max()) if self.preset == "particles" else 0.0

    # ---------------------------------------------------------------- species info
    @property
    def species_z(self) -> np.ndarray:
        """Summed atomic number per species (particles: effective, from the weight; nanoparticle:
        per atom of a column)."""
        if self._np is not None:
            return np.array([float(self._np.z)])
        if self._lat is None:
            w = self.particle_weight * _BLOBS[:, 2].sum()
            return np.full(2, w ** (1 / _Z_EXP))
        return self._z.copy()

    @property
    def species_weight(self) -> np.ndarray:
        """HAADF weight (sum of Z^1.7) per species (nanoparticle: per atom of a column)."""
        if self._np is not None:
            return np.array([float(self._np.z) ** _Z_EXP])
        if self._lat is None:
            return np.full(2, self.particle_weight * _BLOBS[:, 2].sum())
        return self._w.copy()

    # ---------------------------------------------------------------- enumeration
    def _index_ranges(self, box_nm, scan_rotation_rad: float, cell: np.ndarray):
        (y0, y1), (x0, x1) = box_nm
        corners = np.array([[y0, x0], [y0, x1], [y1, x0], [y1, x1]], dtype=float)
        spec = corners @ rot(-scan_rotation_rad)  # rows: Rot(+phi) c  (rot(-phi).T = rot(phi))
        frac = np.linalg.solve(cell, (spec - self.origin_nm).T).T
        lo = np.floor(frac.min(axis=0)).astype(int) - 1
        hi = np.ceil(frac.max(axis=0)).astype(int) + 1
        return lo, hi

    def _site_species(self, ids: np.ndarray, base: np.ndarray, n1, n2, b) -> np.ndarray:
        species = base.copy()
        u = uhash(self.seed, "defects", n1, n2, b)
        lat = self._lat
        acc = np.zeros_like(u)
        done = np.zeros(u.shape, dtype=bool)
        for host, new, kind in lat.defects:
            f = self.dopant_fraction if kind == "dopant" else self.vacancy_fraction
            if f <= 0:
                continue
            hit = (base == host) & ~done & (u >= acc) & (u < acc + f)
            species[hit] = new
            done |= hit
            acc = acc + np.where(base == host, f, 0.0)
        return self._apply_overrides(ids, species)

    def _apply_overrides(self, ids: np.ndarray, species: np.ndarray) -> np.ndarray:
        if not self._override:
            return species
        keys = np.fromiter(self._override.keys(), dtype=np.int64, count=len(self._override))
        vals = np.fromiter(self._override.values(), dtype=np.int64, count=len(self._override))
        order = np.argsort(keys)
        keys, vals = keys[order], vals[order]
        pos = np.clip(np.searchsorted(keys, ids), 0, len(keys) - 1)
        hit = keys[pos] == ids
        species = species.copy()
        species[hit] = vals[pos[hit]]
        return species

    def columns_in(self, box_nm, scan_rotation_rad: float = 0.0,
                   include_vacancies: bool = False) -> Columns:
        """All columns whose position lies in ``box_nm`` = ((y0, y1), (x0, x1)), image frame."""
        if self._np is not None:
            return self._np.columns_in(box_nm, scan_rotation_rad)
        if self._lat is None:
            return self._particles_in(box_nm, scan_rotation_rad, include_vacancies)
        lo, hi = self._index_ranges(box_nm, scan_rotation_rad, self._cell)
        nb = len(self._basis)
        n1, n2, b = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1),
                                np.arange(nb), indexing="ij")
        n1, n2, b = n1.ravel(), n2.ravel(), b.ravel()
        spec = self.origin_nm + np.stack([n1, n2], axis=1) @ self._cell.T + self._basis[b]
        pos = spec @ rot(-scan_rotation_rad).T
        (y0, y1), (x0, x1) = box_nm
        keep = (pos[:, 0] >= y0) & (pos[:, 0] < y1) & (pos[:, 1] >= x0) & (pos[:, 1] < x1)
        n1, n2, b, pos = n1[keep], n2[keep], b[keep], pos[keep]
        ids = ((n1.astype(np.int64) + _OFF) * (2 * _OFF) + (n2 + _OFF)) * 8 + b
        species = self._site_species(ids, self._basis_species[b], n1, n2, b)
        if not include_vacancies:
            occ = species != VACANCY
            ids, species, pos = ids[occ], species[occ], pos[occ]
        sp = np.maximum(species, 0)
        occupied = species != VACANCY
        z = np.where(occupied, self._z[sp], 0.0)
        w = np.where(occupied, self._w[sp], 0.0)
        n = len(ids)
        return Columns(pos, z, w, species, ids, None,
                       pos, w, np.zeros(n), np.arange(n))

    def _particles_in(self, box_nm, scan_rotation_rad: float, include_vacancies: bool) -> Columns:
        sp = self.spacing
        cell = rot(self.lattice_rotation_rad) @ (sp * np.eye(2))
        lo, hi = self._index_ranges(box_nm, scan_rotation_rad, cell)
        n1, n2 = np.meshgrid(np.arange(lo[0], hi[0] + 1), np.arange(lo[1], hi[1] + 1), indexing="ij")
        n1, n2 = n1.ravel(), n2.ravel()
        k = np.arange(5)[:, None]
        u = uhash(self.seed, "particles", n1[None, :], n2[None, :], k)   # (5, n)
        spec = (self.origin_nm + np.stack([n1, n2], axis=1) @ cell.T
                + self.jitter * (u[:2].T - 0.5) * 2.0)
        pos = spec @ rot(-scan_rotation_rad).T
        (y0, y1), (x0, x1) = box_nm
        keep = (pos[:, 0] >= y0) & (pos[:, 0] < y1) & (pos[:, 1] >= x0) & (pos[:, 1] < x1)
        if not include_vacancies:
            keep &= u[4] >= self.vacancy_fraction
        n1, n2, pos, u = n1[keep], n2[keep], pos[keep], u[:, keep]
        ids = (n1.astype(np.int64) + _OFF) * (2 * _OFF) + (n2 + _OFF)
        species = (u[3] < self.mirror_fraction).astype(np.int64)
        if include_vacancies:
            species[u[4] < self.vacancy_fraction] = VACANCY
        theta = 2.0 * np.pi * u[2] - scan_rotation_rad
        if self._angle:
            theta = theta + np.array([self._angle.get(int(i), 0.0) for i in ids])
        theta = np.mod(theta + np.pi, 2.0 * np.pi) - np.pi
        n = len(ids)
        # blobs: (n, 3) sources
        by = _BLOBS[None, :, 0] * np.where(species == 1, -1.0, 1.0)[:, None]   # mirror flips y
        bx = np.broadcast_to(_BLOBS[None, :, 1], by.shape)
        c, s = np.cos(theta)[:, None], np.sin(theta)[:, None]
        src = np.stack([pos[:, None, 0] + bx * s + by * c, pos[:, None, 1] + bx * c - by * s], axis=-1)
        present = (species != VACANCY)[:, None]
        w_src = self.particle_weight * _BLOBS[None, :, 2] * present
        sig = np.broadcast_to(_BLOBS[None, :, 3], by.shape)
        wtot = w_src.sum(axis=1)
        return Columns(pos, np.where(wtot > 0, wtot ** (1 / _Z_EXP), 0.0), wtot, species, ids, theta,
                       src.reshape(-1, 2), w_src.ravel(), sig.ravel().copy(),
                       np.repeat(np.arange(n), _BLOBS.shape[0]))

    # ---------------------------------------------------------------- dynamics
    def advance(self, dt_s: float, box_nm, scan_rotation_rad: float = 0.0,
                rng: np.random.Generator | None = None, hops: bool = True) -> int:
        """Evolve the part of the specimen inside ``box_nm`` by ``dt_s`` seconds.

        Particles rotate (rotational diffusion, always on unless its constant is 0);
        crystals, if ``hops``, let each mobile defect hop to a random neighbouring host
        site with probability 1 - exp(-hop_rate * dt). Returns the number of hops.
        """
        rng = np.random.default_rng(0) if rng is None else rng
        if self._np is not None:
            return 0
        if self._lat is None:
            if self.rot_diffusion > 0 and dt_s > 0:
                cols = self._particles_in(box_nm, scan_rotation_rad, False)
                step = rng.normal(0.0, np.sqrt(2.0 * self.rot_diffusion * dt_s), len(cols))
                for i, d in zip(cols.ids.tolist(), step.tolist()):
                    self._angle[i] = self._angle.get(i, 0.0) + d
            return 0
        if not hops or self.hop_rate_per_s <= 0 or dt_s <= 0 or not self._lat.hops:
            return 0
        cols = self.columns_in(box_nm, scan_rotation_rad, include_vacancies=True)
        species = cols.species.copy()
        pos = cols.positions_nm
        p = 1.0 - np.exp(-self.hop_rate_per_s * dt_s)
        n_hops = 0
        for mobile, hosts, radius in self._lat.hops:
            movers = np.flatnonzero(species == mobile)
            movers = movers[rng.random(len(movers)) < p]
            for m in movers.tolist():
                d2 = np.sum((pos - pos[m]) ** 2, axis=1)
                cand = np.flatnonzero((d2 < radius ** 2) & (d2 > 1e-10) & np.isin(species, hosts))
                if cand.size == 0:
                    continue
                c = int(rng.choice(cand))
                species[m], species[c] = species[c], species[m]
                self._override[int(cols.ids[m])] = int(species[m])
                self._override[int(cols.ids[c])] = int(species[c])
                n_hops += 1
        return n_hops

    # ---------------------------------------------------------------- detectors
    @property
    def haadf_hidden_species(self) -> tuple[int, ...]:
        """Species too faint at real HAADF doses to count as visible columns (perovskite: O)."""
        return () if self._lat is None else tuple(self._lat.haadf_hidden)

    def source_weights(self, cols: Columns, exponent: float) -> np.ndarray:
        """(M,) sum over each source's atoms of Z^``exponent`` (``exponent`` 1.7 gives
        ``cols.src_weight``); particles: (blob weight)^(exponent / 1.7), one effective atom."""
        if self._np is not None:
            return self._np.source_weights(cols, exponent)
        if self._lat is None:
            w = np.asarray(cols.src_weight, float)
            return np.where(w > 0, np.abs(w) ** (exponent / _Z_EXP), 0.0)
        table = np.array([sum(float(z) ** exponent for z in a) for a in self._lat.atoms])
        sp = np.asarray(cols.species)[cols.src_parent]
        return np.where(sp >= 0, table[np.maximum(sp, 0)], 0.0)

    # ---------------------------------------------------------------- convenience
    def _default(self) -> Columns:
        if self._cache is None or self._cache[0] != (len(self._override), len(self._angle)):
            box = ((0.0, self.extent_nm[0]), (0.0, self.extent_nm[1]))
            self._cache = ((len(self._override), len(self._angle)), self.columns_in(box))
        return self._cache[1]

    @property
    def positions_nm(self) -> np.ndarray:
        """(N, 2) column positions (y, x) nm in the default window [0, extent_nm)."""
        return self._default().positions_nm

    @property
    def z(self) -> np.ndarray:
        return self._default().z

    @property
    def weight(self) -> np.ndarray:
        return self._default().weight

    @property
    def species(self) -> np.ndarray:
        return self._default().species

    @property
    def ids(self) -> np.ndarray:
        return self._default().ids

    @property
    def orientation_rad(self) -> np.ndarray | None:
        return self._default().orientation_rad

    def __repr__(self) -> str:
        return f"Specimen({self.preset!r}, seed={self.seed})"


def make_specimen(preset: str = "graphene", seed: int = 0, **kwargs) -> Specimen:
    """Build a ``Specimen``; kwargs as documented on ``Specimen`` (explicit, no magic)."""
    return Specimen(preset, seed, **kwargs)
