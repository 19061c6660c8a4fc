"""The simulator's specimens and detectors of issue #25: an fcc Au nanoparticle on amorphous
carbon, PbTiO3 whose O columns HAADF does not show, La on the Sr sites of SrTiO3, and the
dark-column detectors (ABF, BF); and the classical locator on each, against the truth.

Frames are small (<= 256 px) so that every test runs in a few seconds on a 2-core CPU.
"""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from scipy.spatial import cKDTree

from simulator import ActuatorConfig, DriftConfig, Microscope, MicroscopeConfig, ScanConfig
from simulator.nanoparticle import ELEMENTS, build_particle


def quiet(**kw) -> MicroscopeConfig:
    """No noise, no drift, no scan distortion, ideal actuator."""
    base = dict(noise=False, drift=DriftConfig.none(), scan=ScanConfig.none(), actuator=ActuatorConfig.ideal())
    base.update(kw)
    return MicroscopeConfig(**base)


def interior(p: np.ndarray, shape, margin: float) -> np.ndarray:
    return ((p[:, 0] > margin) & (p[:, 0] < shape[0] - 1 - margin)
            & (p[:, 1] > margin) & (p[:, 1] < shape[1] - 1 - margin))


def value_at(img: np.ndarray, px: np.ndarray) -> np.ndarray:
    """Bilinear image value at (row, col) positions."""
    return ndi.map_coordinates(np.asarray(img, float), px.T, order=1)


# ----------------------------------------------------------------------------- nanoparticle
def test_fcc_110_projection_and_column_thickness():
    """Columns of fcc [110]: centred rectangle a/sqrt2 x a, nearest distance a sqrt(3/8); the
    centre column of a truncated octahedron holds 2 x 1.2247 R / (a / sqrt 2) atoms."""
    a = ELEMENTS["Au"][1]
    d = 5.0
    uv, n, _ = build_particle(a, 0.5 * d, np.zeros(3), 1.15, np.zeros((0, 3)))
    dist = cKDTree(uv).query(uv, 2)[0][:, 1]
    assert np.median(dist) == pytest.approx(a * np.sqrt(3 / 8), abs=1e-9)       # 0.2497 nm
    # the rectangular cell: a / sqrt 2 along x, a along y, one centred column
    d_x = np.diff(np.unique(np.round(uv[:, 1], 6)))
    d_y = np.diff(np.unique(np.round(uv[:, 0], 6)))
    assert np.allclose(d_x, a / (2 * np.sqrt(2))) and np.allclose(d_y, a / 2)
    centre = n[np.argmin(np.hypot(uv[:, 0], uv[:, 1]))]
    expect = 2 * np.sqrt(1.5) * 0.5 * d / (a / np.sqrt(2))                       # 21.2 atoms
    assert abs(centre - expect) <= 1.0 and n.max() == centre
    # volume: atoms = 4 / a^3 x the truncated octahedron's volume (within the surface layer)
    assert 0.85 < n.sum() / (4 / a ** 3 * (np.pi / 6) * d ** 3 * 1.2) < 1.35


def test_nanoparticle_brightest_columns_at_truth_and_support_has_none():
    """Noise-free 4 nm Au particle on a-C: every column with >= 2 atoms is a local maximum within
    one pixel of its truth; no maximum above 2 % of the brightest column lies off the truth (the
    amorphous support has no columns); column peak counts rise with the thickness (Z^1.7 x n)."""
    cfg = quiet(preset="nanoparticle", size=224, seed=4, specimen_kwargs={"particle_diameter_nm": 4.0})
    img, meta, tr = Microscope(cfg).acquire()
    img = img.astype(float)
    atoms = np.rint(tr.weight / 79 ** 1.7).astype(int)
    assert tr.species_names == ("Au",) and atoms.max() >= 15 and atoms.min() >= 1
    peaks = np.argwhere((ndi.maximum_filter(img, 5) == img) & (img > 0.02 * img.max()))
    d_found, _ = cKDTree(tr.columns_px).query(peaks)
    assert np.all(d_found < 1.0)                                 # every bright maximum is a column
    thick = tr.columns_px[(atoms >= 2) & interior(tr.columns_px, img.shape, 3)]
    d_truth, _ = cKDTree(peaks).query(thick)
    assert np.all(d_truth < 0.75)                                # the pixel holding it (<= 0.71 px)
    # brighter with thickness: peak counts against atoms are monotonic (Spearman > 0.95)
    v = value_at(img, tr.columns_px)
    r = np.corrcoef(np.argsort(np.argsort(atoms)), np.argsort(np.argsort(v)))[0, 1]
    assert r > 0.95
    # the support: far from the particle a weak texture (mean 2.8 %, std 1.3 % of one Au atom's peak)
    far = cKDTree(tr.columns_px).query(np.argwhere(np.ones(img.shape, bool)))[0].reshape(img.shape) > 20
    one_atom = np.median(v[atoms == 1]) if (atoms == 1).any() else v.min()
    assert far.sum() > 1000 and np.percentile(img[far], 99) - cfg.background_counts < 0.08 * one_atom
    assert img[far].std() > 0.5                                  # but there is a texture


def test_nanoparticle_is_seeded_and_stable():
    a = Microscope(MicroscopeConfig(preset="nanoparticle", size=96, seed=7)).acquire()
    b = Microscope(MicroscopeConfig(preset="nanoparticle", size=96, seed=7)).acquire()
    c = Microscope(MicroscopeConfig(preset="nanoparticle", size=96, seed=8)).acquire()
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[2].column_ids, b[2].column_ids)
    assert not np.array_equal(a[0], c[0])


# ----------------------------------------------------------------------------- perovskite and detectors
def _rose_snr(height: float, background: float, sigma_px: float) -> float:
    """Matched-filter SNR of a Gaussian column of peak ``height`` (counts) and width ``sigma_px``
    on a shot-noise ``background`` (counts): height / sqrt(background) x sqrt(pi sigma^2)."""
    return height / np.sqrt(background) * np.sqrt(np.pi * sigma_px ** 2)


def test_perovskite_o_hidden_in_haadf_visible_in_abf():
    """PbTiO3 [001]: in HAADF an O column rises (8/82)^1.7 = 1.9 % of a Pb column above the
    diffuse background (0.2 N_e) of the preset dose: a matched-filter SNR of ~4, under the Rose
    criterion of 5: not visible, and the truth says so. In ABF it dips 5.4 % of the vacuum level,
    SNR ~9: visible, and it counts."""
    kw = dict(preset="perovskite", size=160, seed=1)
    img, _, tr = Microscope(quiet(**kw)).acquire()
    names = tr.species_names
    o, pb = tr.species == names.index("O"), tr.species == names.index("Pb")
    assert not tr.visible[o].any() and tr.visible[~o].all()
    bg = np.percentile(img, 1)
    v = value_at(img, tr.columns_px) - bg
    ratio = np.median(v[o]) / np.median(v[pb])
    assert ratio == pytest.approx((8 / 82) ** 1.7, rel=0.25)     # 1.9 %
    sigma_px = 0.08 / (2 * np.sqrt(2 * np.log(2))) / 0.012
    assert _rose_snr(np.median(v[o]), np.median(img), sigma_px) < 5.0
    assert _rose_snr(np.median(v[~o & ~pb]), np.median(img), sigma_px) > 20.0      # Ti-O: clearly seen

    img, meta, tr = Microscope(quiet(detector="abf", **kw)).acquire()
    assert meta.detector == "ABF" and tr.visible.all()
    vac = np.percentile(img, 99.5)
    dip = 1 - value_at(img, tr.columns_px) / vac
    assert np.median(dip[o]) == pytest.approx(1 - np.exp(-0.028 * 2.0), abs=0.01)   # 5.4 %
    assert np.median(dip[pb]) > np.median(dip[o])
    assert _rose_snr(np.median(dip[o]) * vac, vac, sigma_px) > 8.0


@pytest.mark.parametrize("detector, dip", [("abf", 1 - np.exp(-0.028 * 6 ** (1 / 3))),
                                           ("bf", 1 - np.exp(-0.75 * 0.03 * 6 ** (2 / 3)))])
def test_dark_columns_are_minima_at_truth(detector, dip):
    """Graphene in ABF / BF: every C column is a local minimum within 0.5 px of its truth, dipping
    5.0 % (ABF, Z^1/3) / 7.2 % (BF, Z^2/3 with its bright ring) below the vacuum level."""
    img, meta, tr = Microscope(quiet(preset="graphene", size=160, seed=2, si_fraction=0.0,
                                     vacancy_fraction=0.0, detector=detector)).acquire()
    img = img.astype(float)
    assert meta.detector == detector.upper()
    t = tr.columns_px[interior(tr.columns_px, img.shape, 4)]
    minima = np.argwhere((ndi.minimum_filter(img, 5) == img) & (img < np.median(img)))
    d, _ = cKDTree(minima).query(t)
    assert np.mean(d < 0.75) >= 0.99
    # vacuum level: the same detector with no specimen in the way is N_e x collection
    n_e = 5e5 * 0.01 ** 2 * 100
    vac = n_e * {"abf": 0.75, "bf": 0.05}[detector] + 2.0
    measured = 1 - value_at(img, t) / vac
    # the neighbours' tails and (BF) rings add to a column's own dip: within 30 % of it
    assert np.median(measured) == pytest.approx(dip, rel=0.3)


def test_la_dopants_brighter_than_sr():
    """La (57) on Sr (38) sites: (57/38)^1.7 = 1.99 x the HAADF peak; default: no La at all."""
    img, _, tr = Microscope(quiet(preset="srtio3", size=256, seed=3, si_fraction=0.2)).acquire()
    names = tr.species_names
    la, sr = tr.species == names.index("La"), tr.species == names.index("Sr")
    assert 0.1 <= la.sum() / (la.sum() + sr.sum()) <= 0.3
    v = value_at(img, tr.columns_px) - 2.0
    assert np.median(v[la]) / np.median(v[sr]) == pytest.approx((57 / 38) ** 1.7, rel=0.05)
    _, _, tr0 = Microscope(quiet(preset="srtio3", size=256, seed=3)).acquire()
    assert "La" in tr0.species_names and not (tr0.species == names.index("La")).any()


def test_bad_detector_is_a_clear_error():
    with pytest.raises(ValueError, match="detector"):
        Microscope(MicroscopeConfig(detector="sem"))


# ----------------------------------------------------------------------------- locator on them
def _score(cfg: MicroscopeConfig, contrast: str = "auto") -> tuple[float, float, float]:
    """(recall, precision, spacing error) of the classical locator (estimated spacing) on one
    frame, against the visible truth, matched within 0.3 x its nearest-neighbour distance."""
    from stem_live.lab.evaluate import match_columns
    from stem_live.locate import estimate_spacing, locate_classical
    from stem_live.locate.contrast import as_bright, frame_contrast

    img, meta, tr = Microscope(cfg).acquire()
    img = img.astype(np.float32)
    img = as_bright(img, frame_contrast(img, contrast, meta.detector)[0])
    tp = tr.columns_px[tr.visible]
    nn = float(np.median(cKDTree(tp).query(tp, 2)[0][:, 1]))
    spacing = estimate_spacing(img)
    cols = locate_classical(img, spacing)
    ti, fi = match_columns(tp, cols.positions, 0.3 * nn)
    return len(ti) / len(tp), len(fi) / max(len(cols), 1), spacing / nn - 1


@pytest.mark.parametrize("preset, detector, kw, expect", [
    # (recall, precision) at least; measured at seed 5 in the comment (a 224 px frame: the few
    # columns cut by its edge decide the last per cents; at 512 px `evaluate` measures >= 0.99)
    ("nanoparticle", "haadf", {"specimen_kwargs": {"particle_diameter_nm": 4.5}}, (0.99, 0.99)),  # 1.0, 1.0
    ("perovskite", "haadf", {}, (0.99, 0.96)),        # 1.0, 0.969: O columns neither found nor expected
    ("perovskite", "abf", {}, (0.96, 0.95)),          # 0.973, 0.963: O columns found and expected
    ("graphene", "abf", {}, (0.98, 0.97)),            # 0.990, 0.976
])
def test_classical_locator_on_the_new_specimens(preset, detector, kw, expect):
    recall, precision, spacing_err = _score(MicroscopeConfig(preset=preset, size=224, seed=5, detector=detector, **kw))
    print(preset, detector, recall, precision, spacing_err)
    assert abs(spacing_err) < 0.05
    assert recall >= expect[0] - 1e-9 and precision >= expect[1] - 1e-9


def test_dark_frame_without_contrast_finds_the_gaps():
    """Told nothing, an ABF frame whose detector says ABF is inverted ('auto'); told 'bright',
    the locator returns the bright gaps between the columns (poor precision)."""
    from stem_live.locate.contrast import frame_contrast

    cfg = MicroscopeConfig(preset="perovskite", size=192, seed=6, detector="abf")
    img, meta, _ = Microscope(cfg).acquire()
    assert frame_contrast(img, "auto", meta.detector)[0] == "dark"
    assert frame_contrast(img, "auto", "")[0] == "dark"           # from the image itself
    recall, precision, _ = _score(cfg, contrast="bright")
    assert precision < 0.5


def test_evaluate_scores_visible_columns_only():
    """``column_metrics`` on HAADF PbTiO3 counts the Pb and Ti-O columns only."""
    from stem_live.lab.evaluate import column_metrics

    cfg = MicroscopeConfig(preset="perovskite", size=176, seed=7)
    scope = Microscope(cfg)
    frames = [scope.acquire() for _ in range(2)]
    m = column_metrics(frames, cfg)
    assert m["locator"] == "classical" and m["contrast"] == "bright"
    assert m["recall"] >= 0.98 and m["precision"] >= 0.97        # measured 1.0, 0.978
    assert m["spacing_px"] == pytest.approx(0.39 / np.sqrt(2) / 0.012, rel=0.05)
