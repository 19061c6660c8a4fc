"""Unsure locators say so: a column list with few columns for the area they occupy, or two
locators disagreeing on a frame, is flagged (``locate.unsure``), and `stem-live locate` says it
in one line and marks the frame in its CSV / npz."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from simulator import Microscope, MicroscopeConfig
from stem_live.lab.train_unet import visible_px
from stem_live.locate.contrast import as_bright
from stem_live.locate.spacing import first_shell_distance
from stem_live.locate.unsure import MAX_DENSITY, MIN_DENSITY, agreement, column_density, unsure_reason

ENV = {**os.environ, "STEM_LIVE_JAX_CACHE": "off"}


def _frame(preset: str, detector: str = "haadf", size: int = 256, seed: int = 21):
    img, _, truth = Microscope(MicroscopeConfig(preset=preset, size=size, seed=seed, detector=detector)).acquire()
    img = as_bright(np.asarray(img, np.float32), "bright" if detector == "haadf" else "dark")
    tp = visible_px(truth)
    return img, tp, first_shell_distance(tp)


@pytest.mark.parametrize("preset,detector", [("graphene", "haadf"), ("srtio3", "haadf"), ("mos2", "haadf"),
                                             ("nanoparticle", "haadf"), ("perovskite", "haadf"),
                                             ("perovskite", "abf")])
def test_complete_lattices_are_sure_and_half_of_them_is_not(preset, detector):
    """The true columns of every preset fill the area they occupy at 0.76-1.02 per spacing^2
    (sure); a random half of them falls to 0.47-0.61 and the spacing doubled to 1.4-2.1
    (unsure: the reason says which)."""
    img, tp, sp = _frame(preset, detector, 512)
    dens = column_density(tp, img.shape, sp)
    assert MIN_DENSITY + 0.1 < dens < MAX_DENSITY - 0.2, dens
    assert unsure_reason(tp, img.shape, sp) == ""
    half = tp[np.random.default_rng(0).permutation(len(tp))[: len(tp) // 2]]
    print(preset, detector, round(dens, 3), round(column_density(half, img.shape, sp), 3))
    assert "few columns" in unsure_reason(half, img.shape, sp)


def test_agreement_of_two_lists():
    """F1 of two lists: identical 1, shifted by 0.2 spacing still 1, one half of the other 0.67,
    disjoint lattices 0; ``unsure_reason`` says the locators disagree below 0.8."""
    img, tp, sp = _frame("graphene")
    assert agreement(tp, tp, sp) == 1.0
    assert agreement(tp, tp + 0.2 * sp, sp) == 1.0
    assert agreement(tp, tp[::2], sp) == pytest.approx(2 * (len(tp[::2])) / (len(tp) + len(tp[::2])))
    assert agreement(tp, tp + 0.5 * sp, sp) < 0.2
    assert agreement(tp, np.zeros((0, 2)), sp) == 0.0
    why = unsure_reason(tp, img.shape, sp, other=tp[::2], other_name="the U-Net")
    assert why.startswith("the locators disagree") and "the U-Net" in why and "\n" not in why
    assert unsure_reason(tp, img.shape, sp, other=tp + 0.1) == ""


def _stem_live(*args, cwd):
    return subprocess.run([sys.executable, "-m", "stem_live.cli", *args], capture_output=True, text=True,
                          timeout=300, env=ENV, cwd=cwd)


def test_locate_says_it_is_unsure_in_one_line_and_flags_the_csv(tmp_path):
    """`stem-live locate` on a two-frame stack of one honeycomb (12 px): frame 0 complete, frame 1
    with a random 55 % of its columns gone. One "unsure:" line on stderr naming frame 1, and the
    CSV's ``unsure`` column 0 on frame 0's rows, 1 on frame 1's."""
    from stem_live.lab.synthetic import honeycomb, render_columns

    rng = np.random.default_rng(3)
    sp, shape = 12.0, (192, 192)
    sites = honeycomb(shape, sp, angle_rad=0.2, origin=(2.0, 3.0))
    kept = sites[rng.random(len(sites)) < 0.45]
    stack = np.stack([render_columns(shape, pos, sigma_px=0.2 * sp, dose=200.0, rng=rng) for pos in (sites, kept)])
    np.save(tmp_path / "s.npy", stack.astype(np.float32))
    r = _stem_live("locate", "s.npy", "--spacing-px", "12", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    said = [ln for ln in r.stderr.splitlines() if ln.startswith("unsure:")]
    assert len(said) == 1 and "frame 1:" in said[0] and "few columns" in said[0], r.stderr
    lines = (tmp_path / "s_columns.csv").read_text().splitlines()
    assert lines[0].endswith(",unsure")
    table = np.loadtxt(tmp_path / "s_columns.csv", delimiter=",", skiprows=1, ndmin=2)
    f0, f1 = table[table[:, 0] == 0], table[table[:, 0] == 1]
    assert len(f0) > 0.95 * len(sites) and not f0[:, -1].any()
    assert 0.3 * len(sites) < len(f1) < 0.6 * len(sites) and f1[:, -1].all()


def test_npz_carries_the_flag(tmp_path):
    from stem_live.io.columns import write_columns
    from stem_live.locate import Columns

    cols = Columns(np.zeros((2, 2)), np.zeros(2, int), np.ones(2), np.ones(2), np.zeros(2, bool), {})
    write_columns(tmp_path / "a.npz", cols, frame=0, unsure=True)
    write_columns(tmp_path / "b.npz", cols, frame=0)
    assert bool(np.load(tmp_path / "a.npz")["unsure"]) and "unsure" not in np.load(tmp_path / "b.npz")
