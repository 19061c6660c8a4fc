"""The column spacing estimate (``estimate_spacing``): every simulator preset at 4-40 px, a real
grain boundary, a nanoparticle on an amorphous support, and frames without a lattice."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from simulator import Microscope, MicroscopeConfig
from stem_live.lab.synthetic import render_columns
from stem_live.locate import estimate_spacing
from stem_live.locate.spacing import first_shell_distance

DATA = Path(__file__).parent / "data"

#: nearest-neighbour distance of each preset's visible columns, nm (graphene C-C; SrTiO3 a / 2, cation
#: to O; MoS2 Mo to S2 a / sqrt 3; particles: the jittered 2 nm grid, measured on the truth; Au [110]
#: a sqrt(3/8); PbTiO3 a / 2 with its O columns (ABF, BF), Pb to Ti a / sqrt 2 in HAADF (no O shown))
NN_NM = {"graphene": 0.142, "srtio3": 0.3905 / 2, "mos2": 0.316 / np.sqrt(3), "particles": 1.84,
         "nanoparticle": 0.4078 * np.sqrt(3 / 8), "perovskite": 0.39 / 2}
SPACINGS = (4.0, 7.0, 12.0, 20.0, 30.0, 40.0)
CASES = [(p, d) for p in ("graphene", "srtio3", "mos2", "nanoparticle", "perovskite") for d in ("haadf", "abf", "bf")]
CASES.append(("particles", "haadf"))
def _params():
    for preset, detector in CASES:
        for sp in SPACINGS:
            yield pytest.param(preset, detector, sp, id=f"{preset}-{detector}-{sp:g}")


@pytest.mark.parametrize("preset,detector,spacing_px", list(_params()))
def test_spacing_within_5_percent_on_every_preset_and_detector_at_4_to_40_px(preset, detector, spacing_px):
    """Every preset and detector (BF / ABF inverted as the locators invert them), spacings
    4-40 px (the pixel size varied), seed 21: the estimate within 5 % of the truth's own
    nearest-neighbour distance of the columns the detector shows."""
    from stem_live.lab.train_unet import visible_px
    from stem_live.locate.contrast import as_bright

    size = 256 if spacing_px <= 12 else 512
    nn = NN_NM[preset] * (np.sqrt(2.0) if preset == "perovskite" and detector == "haadf" else 1.0)
    cfg = MicroscopeConfig(preset=preset, size=size, seed=21, pixel_size_nm=nn / spacing_px, detector=detector)
    img, _, truth = Microscope(cfg).acquire()
    img = as_bright(np.asarray(img, np.float32), "bright" if detector == "haadf" else "dark")
    ref = first_shell_distance(visible_px(truth))  # the truth's own nearest-neighbour distance
    est = estimate_spacing(img)
    print(f"{preset} {detector} {spacing_px:g} px: truth {ref:.2f} px, estimate {est:.2f} px")
    assert est == pytest.approx(ref, rel=0.05)


def test_spacing_of_a_real_grain_boundary():
    img = np.load(DATA / "graphene_gb_6nm.npy")
    meta = json.loads((DATA / "graphene_gb_6nm.json").read_text())
    ref = 0.142 / meta["pixel_size_nm"]  # 12.1 px
    est = estimate_spacing(img)
    assert est == pytest.approx(ref, rel=0.05)


def _particle_on_support(spacing_px: float, size: int = 512, seed: int = 0):
    """An fcc-like particle (a hexagonal patch of heavy columns, radius 6 spacings) on an
    amorphous support (weak columns at random, about one per (0.7 spacing)^2), Poisson noise."""
    rng = np.random.default_rng(seed)
    a1 = spacing_px * np.array([0.0, 1.0])
    a2 = spacing_px * np.array([np.sqrt(3) / 2, 0.5])
    n = int(size / spacing_px) + 2
    i, j = np.meshgrid(np.arange(-n, n + 1), np.arange(-n, n + 1), indexing="ij")
    lat = i.reshape(-1, 1) * a1 + j.reshape(-1, 1) * a2 + size / 2
    lat = lat[np.linalg.norm(lat - size / 2, axis=1) < 6 * spacing_px]
    n_am = int(size * size / (0.7 * spacing_px) ** 2)
    am = rng.uniform(0, size, (n_am, 2))
    pos = np.concatenate([lat, am])
    amp = np.concatenate([np.full(len(lat), 1.0), rng.uniform(0.05, 0.2, n_am)])
    return render_columns((size, size), pos, sigma_px=0.2 * spacing_px, amplitude=amp, background=0.2,
                          dose=50.0, rng=rng)


@pytest.mark.parametrize("spacing_px", [10.0, 27.0])
def test_spacing_of_a_particle_on_an_amorphous_support(spacing_px):
    est = estimate_spacing(_particle_on_support(spacing_px))
    assert est == pytest.approx(spacing_px, rel=0.05)


@pytest.mark.parametrize("kind", ["noise", "blank", "vacuum", "smooth"])
def test_no_lattice_says_so_in_one_actionable_line(kind):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    img = {"noise": rng.poisson(5, (256, 256)).astype(float),
           "blank": np.full((256, 256), 7.0),
           "vacuum": rng.normal(100.0, 3.0, (256, 256)),
           "smooth": rng.poisson(20 + 200 * np.exp(-((yy - 90) ** 2 + (xx - 150) ** 2) / (2 * 40.0**2)))
           .astype(float)}[kind]
    with pytest.raises(ValueError, match="no lattice") as err:
        estimate_spacing(img)
    msg = str(err.value)
    assert "\n" not in msg and "--spacing-px" in msg
