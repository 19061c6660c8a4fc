"""The quality gate (``stem_live.locate.quality.credible``) and ``stem-live locate``'s use of it:
noise, vacuum, blank and contamination frames get one line and no column list; real images and
every simulator preset pass. Also ``--contrast`` (``locate.contrast``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulator import Microscope, MicroscopeConfig
from stem_live.locate import estimate_spacing, locate_classical
from stem_live.locate.contrast import as_bright, decide_contrast
from stem_live.locate.quality import credible, lattice_significance
from stem_live.locate.spacing import first_shell_distance

DATA = Path(__file__).parent / "data"
ENV = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}


def _no_columns(kind: str, size: int = 256) -> np.ndarray:
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    if kind == "noise":
        return rng.poisson(5, (size, size)).astype(np.float32)
    if kind == "blank":
        return np.full((size, size), 7.0, np.float32)
    if kind == "vacuum":
        return rng.normal(100.0, 3.0, (size, size)).astype(np.float32)
    # contamination: smooth blobs, shot noise
    blobs = sum(100 * np.exp(-((yy - a) ** 2 + (xx - b) ** 2) / (2 * 15.0**2)) for a, b in rng.uniform(0, size, (12, 2)))
    return rng.poisson(20 + blobs).astype(np.float32)


@pytest.mark.parametrize("kind", ["noise", "blank", "vacuum", "contamination"])
def test_frames_without_columns_fail_the_gate(kind):
    img = _no_columns(kind)
    cols = locate_classical(img, 8.0)
    ok, why = credible(cols, img, spacing_px=8.0)
    assert not ok
    assert why and "\n" not in why
    if kind != "blank":
        assert lattice_significance(img) < 30  # a lattice: > 100


@pytest.mark.parametrize("name", ["graphene_gb_6nm", "srtio3_adf"])
def test_real_images_pass_the_gate(name):
    img = np.load(DATA / f"{name}.npy").astype(np.float32)
    spacing = estimate_spacing(img)
    cols = locate_classical(img, spacing)
    ok, why = credible(cols, img)
    assert ok, why
    assert lattice_significance(img) > 300


@pytest.mark.parametrize("preset", ["graphene", "srtio3", "mos2", "particles"])
def test_every_preset_passes_the_gate_and_is_bright(preset):
    img, _, truth = Microscope(MicroscopeConfig(preset=preset, size=256, seed=21)).acquire()
    img = img.astype(np.float32)
    # the truth's spacing: 256 px of the particles preset hold ~6 x 6 jittered particles, too few for a
    # lattice spot (estimate_spacing at 4-40 px: test_spacing.py)
    spacing = first_shell_distance(truth.columns_px)
    cols = locate_classical(img, spacing)
    ok, why = credible(cols, img)
    assert ok, why
    assert decide_contrast(img)[0] == "bright"
    assert decide_contrast(as_bright(img, "dark"))[0] == "dark"  # a dark-column (BF-like) frame


def _stem_live(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "stem_live.cli", *args], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=cwd)


@pytest.mark.parametrize("kind", ["noise", "blank", "vacuum"])
@pytest.mark.parametrize("spacing", [None, "6"])
def test_locate_refuses_a_frame_without_columns_in_one_line(tmp_path, kind, spacing):
    if kind == "blank" and spacing is None:
        pytest.skip("the same check as with the spacing given")
    np.save(tmp_path / "f.npy", _no_columns(kind).astype(np.uint16 if kind == "noise" else np.float32))
    r = _stem_live("locate", "f.npy", *(("--spacing-px", spacing) if spacing else ()), cwd=tmp_path)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("stem-live: error:"), r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.npy"]  # no column list, no overlay


def test_locate_dark_contrast_finds_the_columns_of_an_inverted_frame(tmp_path):
    img = np.load(DATA / "srtio3_adf.npy").astype(np.float32)
    np.save(tmp_path / "abf.npy", as_bright(img, "dark"))
    r = _stem_live("locate", "abf.npy", "--contrast", "auto", "--spacing-px", "20.95", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "dark columns" in r.stderr
    n_dark = len(np.loadtxt(tmp_path / "abf_columns.csv", delimiter=",", skiprows=1, ndmin=2))
    n_bright = len(locate_classical(img, 20.95))
    assert abs(n_dark - n_bright) <= 2
