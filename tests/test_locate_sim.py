"""Column finding against the virtual microscope's ground truth.

The target: graphene and SrTiO3, 512 x 512, default dose, default drift and scan: recall and
precision >= 0.995, position RMSE <= 0.10 px against ``truth.columns_px`` (one-to-one
matching within 0.3 x the nearest-neighbour spacing of the truth).

Two parts of that target are out of reach for *any* single-frame locator, and are kept
here as strict xfails (they turn into failures the day they pass) next to the checks of
what is physically achievable:

* The Cramer-Rao bound at the default dose is above 0.10 px. A C column in graphene
  scatters ~2100 electrons into the detector, so even alone on a zero background its
  position error is sigma_probe / sqrt(N) = 3.4 / 46 = 0.074 px per axis (0.105 px 2-D);
  with the neighbours' tails, the background and the detector noise the bound
  (``simulator.crlb``) is 0.144 px. The O columns of SrTiO3 (Z = 8, ~690 electrons) have a bound of
  0.23 px, the rms over all SrTiO3 columns is 0.17 px.
* The truth position of a column is where it appears on the scan line through its centre,
  including that line's random jitter (0.2 px) and the 50 Hz jitter (0.5 px amplitude,
  18.6 lines a period). The column's image is a blob ~8 lines tall, each line with its own
  offset: even a noise-free fit of the blob differs from the truth by 0.21 px (graphene) /
  0.14 px (SrTiO3) rms along x. The fit measures every line's offset from the columns
  crossing it (``linejitter.line_shifts``) and adds it back (graphene about 0.21 px, 0.29 px
  without it), but one line's offset is only known to ~0.12-0.16 px.

So the achievable checks are: recall / precision, an RMSE within 20 % of the Cramer-Rao
bound on jitter-free frames (the estimator is efficient), the de-jitter (the measured line
offsets follow the true ones), and an RMSE on default frames no worse than measured.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree

from simulator import DriftConfig, Microscope, MicroscopeConfig, ScanConfig
from simulator.crlb import position_crlb_px
from stem_live.locate import locate_classical
from stem_live.locate.unet import locate_unet

SIZE = 512


def _match(found, truth, tol):
    """One-to-one matching within ``tol`` (Hungarian on the pairs closer than ``tol``)."""
    d = np.linalg.norm(found[:, None, :] - truth[None, :, :], axis=-1)
    d = np.where(d <= tol, d, 1e6)
    r, c = linear_sum_assignment(d)
    ok = d[r, c] <= tol
    return r[ok], c[ok]


def _spacing(t):
    """Median nearest-neighbour distance of the true columns (px): the matching scale."""
    return float(np.median(cKDTree(t).query(t, k=2)[0][:, 1]))


def _locate(locator, img, spacing):
    if locator == "unet":
        return locate_unet(img, spacing)
    return locate_classical(img, spacing)


def _run(preset, n_frames, clean, seed=1, locator="classical"):
    kw = dict(drift=DriftConfig.none(), scan=ScanConfig.none()) if clean else {}
    scope = Microscope(MicroscopeConfig(preset=preset, size=SIZE, seed=seed, **kw))
    tp = n_found = n_truth = 0
    err2, bound2 = [], []
    for _ in range(n_frames):
        img, meta, truth = scope.acquire()
        t = truth.columns_px
        spacing = _spacing(t)
        cols = _locate(locator, img, spacing)
        r, c = _match(cols.positions, t, 0.3 * spacing)
        tp += len(r)
        n_found += len(cols)
        n_truth += len(t)
        err2.append(np.sum((cols.positions[r] - t[c]) ** 2, axis=1))
        bound2.append(position_crlb_px(scope.config, truth)[c] ** 2)
        # every found column lies inside the frame (the truth's convention)
        assert np.all((cols.positions > -0.5) & (cols.positions < SIZE - 0.5))
    rmse = float(np.sqrt(np.mean(np.concatenate(err2))))
    crlb = float(np.sqrt(np.mean(np.concatenate(bound2))))
    out = dict(recall=tp / n_truth, precision=tp / n_found, rmse=rmse, crlb=crlb)
    print(f"{locator} {preset} {'jitter-free' if clean else 'default'} x{n_frames}: recall {out['recall']:.4f} "
          f"precision {out['precision']:.4f} rmse {rmse:.3f} px (Cramer-Rao {crlb:.3f} px)")
    return out


_cache: dict = {}


def run(preset, n_frames, clean, locator="classical"):
    key = (preset, n_frames, clean, locator)
    if key not in _cache:
        _cache[key] = _run(preset, n_frames, clean, locator=locator)
    return _cache[key]


LOCATORS = ["classical", "unet"]


@pytest.mark.parametrize("locator", LOCATORS)
@pytest.mark.parametrize("preset", ["graphene", "srtio3"])
def test_sim_default_recall_precision(preset, locator):
    m = run(preset, 10, clean=False, locator=locator)
    assert m["recall"] >= 0.995
    assert m["precision"] >= 0.995


@pytest.mark.parametrize("preset,locator,rmse_max", [("graphene", "classical", 0.24), ("srtio3", "classical", 0.22),
                                                    ("graphene", "unet", 0.24), ("srtio3", "unet", 0.22)])
def test_sim_default_rmse_measured(preset, locator, rmse_max):
    """Default drift and scan: the Cramer-Rao bound plus what is left of the scan jitter
    after the per-line de-jitter (see the module docstring); fails if the locator gets worse
    than measured (10 frames, graphene / SrTiO3: classical about 0.206 / 0.196 px, U-Net
    0.201 / 0.192 px), bound 0.24 / 0.22 px."""
    m = run(preset, 10, clean=False, locator=locator)
    assert m["rmse"] <= rmse_max


@pytest.mark.parametrize("locator", LOCATORS)
@pytest.mark.parametrize("preset", ["graphene", "srtio3"])
def test_sim_jitter_free_efficient(preset, locator):
    """No drift, no scan distortion: every column found, and the position error within
    20 % of the Cramer-Rao bound (the fixed-width, neighbour-subtracted fit is efficient),
    and that bound above 0.10 px."""
    m = run(preset, 1, clean=True, locator=locator)
    assert m["recall"] >= 0.99 and m["precision"] >= 0.995
    assert m["rmse"] <= 1.2 * m["crlb"]
    assert m["crlb"] > 0.10  # why the 0.10 px target cannot be met at the default dose


@pytest.mark.parametrize("preset", ["graphene", "srtio3"])
def test_scan_line_jitter_is_measured_and_taken_out(preset):
    """The per-line de-jitter of the fit (``linejitter.line_shifts``). On a default frame the
    measured line shifts follow the simulator's true x offset of every line (random line
    jitter + 50 Hz jitter + drift; a 16-line running mean removed from both: the slow part
    goes into the columns' own offsets) and the positions move closer to the truth; on a
    jitter-free frame nothing moves."""
    from scipy.ndimage import uniform_filter1d

    img, meta, truth = Microscope(MicroscopeConfig(preset=preset, size=SIZE, seed=2)).acquire()
    t = truth.columns_px
    spacing = _spacing(t)
    cols = locate_classical(img, spacing)
    plain = locate_classical(img, spacing, line_jitter=False)
    true = -(truth.line_jitter_nm + truth.beam_shift_nm[:, 1] - truth.drift_nm[:, 1]) / meta.pixel_size_nm[1]

    def high_pass(v):
        return (v - uniform_filter1d(v, 16, mode="nearest"))[15:-15]

    corr = np.corrcoef(high_pass(true), high_pass(cols.meta["line_shift_px"]))[0, 1]

    def rmse(c):
        r, k = _match(c.positions, t, 0.3 * spacing)
        return float(np.sqrt(np.mean(np.sum((c.positions[r] - t[k]) ** 2, axis=1))))

    print(preset, f"corr {corr:.3f}, rmse {rmse(plain):.3f} -> {rmse(cols):.3f} px, "
          f"line jitter {cols.meta['line_jitter_px']:.3f} px")
    assert corr >= 0.8  # measured 0.93 graphene, 0.91 SrTiO3
    assert rmse(cols) <= 0.85 * rmse(plain)  # measured 0.21 vs 0.30 px graphene, 0.20 vs 0.25 SrTiO3
    # the line-averaged view (the drift model's input) is the fit without the de-jitter (but
    # for a column or two at the left / right edge: whether a column is inside the frame is
    # judged on its de-jittered position)
    d, _ = cKDTree(plain.positions).query(cols.line_averaged())
    assert np.sum(d > 1e-6) <= 3 and abs(len(cols) - len(plain)) <= 3
    clean = dict(drift=DriftConfig.none(), scan=ScanConfig.none())
    img, _, _ = Microscope(MicroscopeConfig(preset=preset, size=SIZE, seed=2, **clean)).acquire()
    cols = locate_classical(img, spacing)
    plain = locate_classical(img, spacing, line_jitter=False)
    assert cols.meta["line_jitter_px"] <= 0.02
    assert np.max(np.abs(cols.positions - plain.positions)) < 0.03


def test_known_flyback_takes_out_the_left_edge_bias():
    """The simulator's default flyback (x displacement 1 px at the line start, 10 px decay): a
    fit on the regular grid puts the columns cut by the left edge ~0.5 px right of where they
    appear, and some centred just outside the frame inside it. Given the flyback (as a
    calibration measures it), the fit models the distorted scan there: the left-edge x bias
    drops below 0.25 px (from above 0.35 px without it), fewer columns outside the frame are
    found, and the rest of the frame moves by less than 0.05 px."""
    from simulator import ScanConfig as SC

    bias, extra, moved = {}, {}, []
    for fb in (False, True):
        dx, n_extra = [], 0
        for seed in (2, 3, 4):
            img, meta, truth = Microscope(MicroscopeConfig(preset="graphene", size=SIZE, seed=seed)).acquire()
            t = truth.columns_px
            spacing = _spacing(t)
            flyback = (SC().flyback_amp_nm / meta.pixel_size_nm[1], SC().flyback_tau_us / meta.dwell_us)
            cols = locate_classical(img, spacing, flyback_px=flyback if fb else None)
            r, c = _match(cols.positions, t, 0.3 * spacing)
            left = t[c, 1] < 2.0
            dx.append(cols.positions[r[left], 1] - t[c[left], 1])
            unmatched = np.setdiff1d(np.arange(len(cols)), r)
            n_extra += int(np.sum(cols.positions[unmatched, 1] < 2.0))
            if fb:  # the columns beyond the flyback's reach stay where they were (but for the line shifts)
                plain = locate_classical(img, spacing)
                far = plain.positions[:, 1] > 60
                d, _ = cKDTree(cols.positions).query(plain.positions[far])
                moved.append(d)
        bias[fb], extra[fb] = float(np.mean(np.concatenate(dx))), n_extra
    print(f"left-edge x bias {bias[False]:+.3f} -> {bias[True]:+.3f} px, columns found there that are not "
          f"in the frame {extra[False]} -> {extra[True]} (3 frames)")
    assert bias[False] > 0.35 and bias[True] < 0.25  # measured +0.50 without, +0.18 with it
    assert extra[True] < extra[False]
    assert np.max(np.concatenate(moved)) < 0.05


def test_mains_jitter_is_taken_out_on_a_noise_free_frame():
    """Only 50 Hz pick-up (0.5 px along x, 18.6 lines a period), no noise: what is left after
    the de-jitter is the solver's and the model's error, not the dose's. The line-averaged fit
    is 0.13 px off along x (asserted > 0.1); the de-jitter leaves about 0.046 px, asserted
    <= 0.055 px (its line shifts are the exact minimiser)."""
    cfg = MicroscopeConfig(preset="graphene", size=SIZE, seed=0, noise=False,
                           drift=DriftConfig(drift_nm_per_min=0.0, ou_sigma_nm=0.0),
                           scan=ScanConfig(flyback_amp_nm=0.0, line_jitter_nm=0.0))
    img, _, truth = Microscope(cfg).acquire()
    t = truth.columns_px
    spacing = _spacing(t)
    cols = locate_classical(img.astype(np.float32), spacing)
    r, c = _match(cols.positions, t, 0.3 * spacing)
    inner = ~cols.border[r]
    err_x = (cols.positions[r] - t[c])[inner, 1]
    avg_x = (cols.line_averaged()[r] - t[c])[inner, 1]
    rms = float(np.sqrt(np.mean(err_x**2)))
    print(f"x rms line-averaged {np.sqrt(np.mean(avg_x**2)):.3f} -> de-jittered {rms:.3f} px")
    assert np.sqrt(np.mean(avg_x**2)) > 0.1
    assert rms <= 0.055
    # the lines are measured only by columns of at least min_amp_snr: above all of them, none
    none = locate_classical(img.astype(np.float32), spacing, min_amp_snr=1e9)
    assert len(none) >= len(cols) and not none.line_dx.any()


@pytest.mark.parametrize("preset", ["graphene", "srtio3"])
def test_done_when_rmse_is_met_at_ten_times_the_dose(preset):
    """What the 0.10 px target needs: everything at its default (drift, scan jitter,
    flyback) but 10x the dose (``stem-live evaluate``'s columns.*, 3 frames). Measured: RMSE
    0.103 / 0.080 px, away from the frame edges 0.087 / 0.064 px (Cramer-Rao 0.040 / 0.043 px;
    at the default dose 0.20 / 0.21 px). Graphene's floor is the scan jitter of the truth
    definition, not the dose: 0.086 px at 30x (README)."""
    from dataclasses import replace

    from stem_live.lab.evaluate import column_metrics

    cfg = MicroscopeConfig(preset=preset, size=SIZE, seed=0, drift=DriftConfig(drift_nm_per_min=3.0))
    cfg = replace(cfg, dose_e_per_A2=10 * cfg.dose)
    scope = Microscope(cfg)
    m = column_metrics([scope.acquire() for _ in range(3)], cfg)
    print(preset, m)
    assert m["recall"] >= 0.995 and m["precision"] >= 0.995
    assert m["rmse_inner_px"] <= 0.10
    assert m["rmse_px"] <= 0.11


@pytest.mark.xfail(strict=True, reason="RMSE <= 0.10 px is below the Cramer-Rao bound at the default "
                   "dose (0.144 px graphene, 0.17 px SrTiO3), and the scan jitter of the truth "
                   "definition adds to it even after the per-line de-jitter: see the module docstring")
@pytest.mark.parametrize("locator", LOCATORS)
@pytest.mark.parametrize("preset", ["graphene", "srtio3"])
def test_sim_done_when_rmse(preset, locator):
    assert run(preset, 10, clean=False, locator=locator)["rmse"] <= 0.10


@pytest.mark.parametrize("preset", ["graphene", "srtio3"])
def test_evaluate_column_metrics_meet_the_done_when(preset):
    """What ``stem-live evaluate --preset P`` reports (``columns.*``: its first 10 open-loop
    frames, seed 0, 3 nm/min drift, spacing estimated from the image): recall and precision
    >= 0.995, RMSE <= 0.24 px and above the report's own Cramer-Rao bound (> 0.10 px), the
    columns away from the edges within 40 % of that bound. SrTiO3's precision depends on
    dropping the tail of a column centred outside the frame: where the fit converged
    decides, even beyond the trust radius."""
    from stem_live.lab.evaluate import column_metrics

    cfg = MicroscopeConfig(preset=preset, size=SIZE, seed=0, drift=DriftConfig(drift_nm_per_min=3.0))
    scope = Microscope(cfg)
    m = column_metrics([scope.acquire() for _ in range(10)], cfg)
    print(preset, m)
    assert m["recall"] >= 0.995 and m["precision"] >= 0.995
    assert m["rmse_px"] <= 0.24  # measured 0.197 / 0.192 px
    # the report says why 0.10 px is out of reach: its own Cramer-Rao bound (0.147 / 0.173 px)
    assert 0.10 < m["crlb_px"] < m["rmse_px"]
    # away from the edges within 40 % of the bound (measured 0.190 / 0.185 px); columns whose
    # window crosses the edge (5 / 6 %) are worse (0.30 / 0.28 px)
    assert m["rmse_inner_px"] <= 1.4 * m["crlb_px"]
    assert m["rmse_inner_px"] < m["rmse_px"] < m["rmse_border_px"] <= 0.35
    assert 0.02 <= m["border_fraction"] <= 0.10


@pytest.mark.parametrize("locator", LOCATORS)
@pytest.mark.parametrize("preset", ["graphene", "srtio3"])
def test_clipped_column_tops_are_still_located(preset, locator):
    """An 8-bit export or a saturated detector clips the brightest pixels: the clipped tops of
    the columns are small saturated plateaus, not contamination. With the top 1 % of the
    pixels clipped every column is still found, as in the unclipped frame (every peak has a
    saturated pixel within a spacing: were the plateaus taken for contamination, all would be
    dropped)."""
    img, _, truth = Microscope(MicroscopeConfig(preset=preset, size=SIZE, seed=3)).acquire()
    t = truth.columns_px
    spacing = _spacing(t)
    clipped = np.minimum(img, np.percentile(img, 99.0))
    assert np.mean(clipped == clipped.max()) >= 0.009
    for frame in (img, clipped):
        cols = _locate(locator, frame, spacing)
        r, c = _match(cols.positions, t, 0.3 * spacing)
        err = np.linalg.norm(cols.positions[r] - t[c], axis=1)
        print(locator, preset, len(r) / len(t), len(r) / len(cols), np.sqrt(np.mean(err**2)))
        assert len(r) / len(t) >= 0.99 and len(r) / len(cols) >= 0.98
        assert np.sqrt(np.mean(err**2)) <= 0.35
