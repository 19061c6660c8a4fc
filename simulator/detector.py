"""Detectors: HAADF (bright columns) and the bright-field family, ABF and BF (dark columns).

HAADF (``render.py``): incoherent, counts = N_e * kappa * sum_k W_k g_k(r), W = sum Z^1.7
(Z^1.6-2 measured: Pennycook & Jesson, Ultramicroscopy 37, 14 (1991); Krivanek et al.,
Nature 464, 571 (2010): ~Z^1.64). A thick crystal adds a diffuse background (thermal diffuse
scattering, probe cross-talk between columns): ``diffuse_fraction`` x N_e counts, constant.

ABF and BF: the detector sits in the bright-field disc and sees the unscattered beam; a
column removes electrons from it, so columns are dips on a bright background:

    counts = N_e * collection * [exp(-tau(r)) + 1 - exp(-tau_ring(r))] + background,
    tau(r) = depth * sum_k V_k G(r - p_k; s_k),
    tau_ring(r) = halo * depth * sum_k V_k G(r - p_k; halo_width * s_k)   (BF only)

with G a Gaussian of peak 1, s_k the probe width (as HAADF), V_k = sum over the column's atoms
of Z^exponent, exp(-tau) saturating for thick columns (a column never removes more than
the beam) and the ring at most doubling the vacuum level; for weak columns the BF profile
is 1 - tau + tau_ring, a dip with a zero-integral ring. Values (per atom, ``BRIGHT_FIELD``):

- ABF (annulus ~ alpha/2 .. alpha, ``collection`` 0.75 of the BF disc in vacuum): contrast
  ~ Z^(1/3) (Findlay et al., Ultramicroscopy 110, 903 (2010); light columns such as O, Li
  and H visible: Okunishi et al., Microsc. Microanal. 15 (S2), 164 (2009); Ishikawa et al.,
  Nat. Mater. 10, 278 (2011)). ``depth`` 0.028 per unit Z^(1/3): a C atom dips 5 %, an O
  column 5.4 %, Sr 9 %, Pb 11 %, Ti-O 12.6 % (a thin specimen; the simulator's choice,
  of the order of the few-to-15 % dips of those papers).
- BF (small axial detector, ``collection`` 0.05): coherent phase contrast, by reciprocity
  the HRTEM image (Cowley, Appl. Phys. Lett. 15, 58 (1969)); a weak phase object's contrast
  follows the scattering amplitude, ~Z^(2/3) (elastic cross-section ~Z^(4/3), Lenz model).
  A dark Gaussian dip with a zero-integral bright ring (``halo`` 1/4 at twice the width):
  a C atom dips 7 % (single-atom phase contrast in graphene is a few per cent: Meyer et
  al., Nano Lett. 8, 3582 (2008)).

Noise: Poisson on the detected counts plus the readout noise (``render.detect``): the bright
background carries N_e * collection electrons, so the relative shot noise of an ABF frame is
much lower than HAADF's, its columns' contrast much smaller.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["DETECTORS", "BrightField", "BRIGHT_FIELD"]

DETECTORS: tuple[str, ...] = ("haadf", "abf", "bf")


@dataclass(frozen=True)
class BrightField:
    """A bright-field-family detector (see the module docstring).

    exponent: Z exponent of a column's dip; depth: optical depth at a column centre per
    unit of sum Z^exponent; collection: fraction of the incident electrons the detector
    receives in vacuum; halo: amplitude ratio of the bright ring (0: none);
    halo_width: its width / the probe width.
    """

    exponent: float
    depth: float
    collection: float
    halo: float = 0.0
    halo_width: float = 2.0


BRIGHT_FIELD: dict[str, BrightField] = {
    "abf": BrightField(exponent=1.0 / 3.0, depth=0.028, collection=0.75),
    "bf": BrightField(exponent=2.0 / 3.0, depth=0.03, collection=0.05, halo=0.25, halo_width=2.0),
}
