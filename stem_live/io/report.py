"""The calibration report folder: ``calibration.json``, ``drift_trace.csv``, ``pca_modes.npz`` and
three figures (drift trace, distortion field, PCA modes).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from stem_live.calibration.session import CalibrationRun


# ----------------------------------------------------------------------------- report folder
def _grid_mean(pos_px: np.ndarray, vec: np.ndarray, shape: tuple[int, int], n: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of ``vec`` (c, 2) over an n x n grid of the frame: (centres (m, 2) px, means (m, 2))."""
    cell = np.asarray(shape, float) / n
    ij = np.clip((pos_px // cell).astype(np.int64), 0, n - 1)
    g = ij[:, 0] * n + ij[:, 1]
    cnt = np.bincount(g, minlength=n * n)
    m = cnt > 0
    mean = np.stack([np.bincount(g, vec[:, i], n * n)[m] / cnt[m] for i in range(2)], axis=1)
    centres = np.stack([(np.flatnonzero(m) // n + 0.5) * cell[0], (np.flatnonzero(m) % n + 0.5) * cell[1]], axis=1)
    return centres, mean


def _fig_trace(run: CalibrationRun, path: Path) -> Path:
    from stem_live.io.png import COLORS, Canvas

    c = run.calibration
    fig = Canvas(930, 960)
    truth = run.truth_t is not None
    fig.text(480, 8, "DRIFT OVER THE SESSION: GP MEAN, +-2 SIGMA BAND, MEASURED (BINNED)"
             + (", SIMULATOR TRUTH" if truth else ""), anchor="centre")
    t = run.trace_t
    tmax = float(t[-1]) if len(t) else 1.0

    def limits(vals):
        lo = min(float(np.nanpercentile(v, 0.5)) for v in vals)
        hi = max(float(np.nanpercentile(v, 99.5)) for v in vals)
        pad = 0.08 * (hi - lo + 1e-3)
        return lo - pad, hi + pad

    gp_at_pts = np.stack([np.interp(run.points_t, t, run.trace_mean[:, i]) for i in range(2)], axis=1)
    for i, (axis, y0) in enumerate((("Y", 50), ("X", 340))):
        m, sd = run.trace_mean[:, i] * 1e3, run.trace_sd[:, i] * 1e3
        vals = [m - 2 * sd, m + 2 * sd, run.points_d[:, i] * 1e3] + ([run.truth_d[:, i] * 1e3] if truth else [])
        ax = fig.panel(90, y0 + 20, 840, 220, xlim=(0.0, tmax), ylim=limits(vals),
                       title=f"{axis}: V = {c.velocity_nm_per_s[i]:.4f} +- {c.velocity_sd_nm_per_s[i]:.4f} NM/S")
        ax.band(t, m - 2 * sd, m + 2 * sd, COLORS["band"])
        ax.points(run.points_t, run.points_d[:, i] * 1e3, COLORS["grey"], size=2)
        ax.line(t, m, COLORS["blue"], width=2)
        if truth:
            ax.line(run.truth_t, run.truth_d[:, i] * 1e3, COLORS["green"])
        ax.axes(ylabel=f"D{axis} (PM)")
        ax.legend([("GP", COLORS["blue"]), ("MEASURED", COLORS["grey"])]
                  + ([("TRUTH", COLORS["green"])] if truth else []))
    # the band at its own scale: everything minus the GP mean
    sd = run.trace_sd * 1e3
    res = (run.points_d - gp_at_pts) * 1e3
    vals = [2 * sd[:, 0], -2 * sd[:, 0], 2 * sd[:, 1], -2 * sd[:, 1], res[:, 0], res[:, 1]]
    if truth:
        tr = (run.truth_d - np.stack([np.interp(run.truth_t, t, run.trace_mean[:, i]) for i in range(2)], 1)) * 1e3
        vals += [tr[:, 0], tr[:, 1]]
    ax = fig.panel(90, 650, 840, 220, xlim=(0.0, tmax), ylim=limits(vals),
                   title="MINUS THE GP MEAN: +-2 SIGMA BAND (Y, X), MEASURED" + (", TRUTH" if truth else ""))
    ax.band(t, -2 * np.max(sd, axis=1), 2 * np.max(sd, axis=1), COLORS["band"])
    ax.hline(0.0, COLORS["grey"])
    ax.points(run.points_t, res[:, 0], COLORS["orange"], size=2)
    ax.points(run.points_t, res[:, 1], COLORS["black"], size=2)
    if truth:
        ax.line(run.truth_t, tr[:, 0], COLORS["red"])
        ax.line(run.truth_t, tr[:, 1], COLORS["green"])
    ax.axes(xlabel="SCAN TIME (S)", ylabel="PM")
    ax.legend([("MEASURED Y", COLORS["orange"]), ("MEASURED X", COLORS["black"])]
              + ([("TRUTH Y", COLORS["red"]), ("TRUTH X", COLORS["green"])] if truth else []))
    return fig.save(path)


def _fig_field(run: CalibrationRun, path: Path) -> Path:
    from stem_live.io.png import COLORS, Canvas

    c = run.calibration
    h, w = run.frame_shape
    fig = Canvas(760, 720)
    n = 12
    cm, mm = _grid_mean(run.field_pos_px, run.field_meas_nm, (h, w), n)
    cmod, mod = _grid_mean(run.field_pos_px, run.field_model_nm, (h, w), n)
    big = max(float(np.max(np.hypot(*mod.T), initial=0.0)),
              float(np.percentile(np.hypot(*mm.T), 95)) if len(mm) else 0.0, 1e-6)
    scale = 0.9 * (min(h, w) / n) / big                       # px per nm
    mag = scale * float(np.mean(c.meta.get("pixel_size_nm", [1.0])))   # arrow length / true length
    ax = fig.panel(70, 60, 600, 600, xlim=(0, w), ylim=(0, h), equal=True, flip_y=True,
                   title=f"SCAN DISTORTION -S(POS) AT THE SITES, ARROWS X {mag:.0f}")
    ax.arrows(cm[:, 1], cm[:, 0], mm[:, 1], mm[:, 0], COLORS["blue"], scale=scale)
    ax.arrows(cmod[:, 1], cmod[:, 0], mod[:, 1], mod[:, 0], COLORS["red"], scale=scale)
    ax.axes(xlabel="COLUMN (PX)", ylabel="ROW (PX)")
    ax.legend([("MEASURED", COLORS["blue"]), ("MODEL", COLORS["red"])])
    def line(v: dict) -> str:
        return (f"SCALE Y {v['scale_error'][0] * 100:+.3f} %  SCALE X {v['scale_error'][1] * 100:+.3f} %  "
                f"SHEAR {v['shear'] * 100:+.3f} %  FLYBACK {v['flyback_amp_nm'] * 1e3:.1f} PM, "
                f"{v['flyback_tau_us']:.0f} US")

    fig.text(360, 700, "FITTED  " + line({"scale_error": c.scale_error, "shear": c.shear,
                                          "flyback_amp_nm": c.flyback_amp_nm, "flyback_tau_us": c.flyback_tau_us}),
             anchor="centre")
    if c.truth:
        fig.text(360, 720, "TRUE    " + line(c.truth), COLORS["green"], anchor="centre")
    return fig.save(path)


def _fig_pca(run: CalibrationRun, path: Path) -> Path:
    from stem_live.io.png import COLORS, Canvas

    k = int(run.pca_modes.shape[0])
    h, w = run.frame_shape
    W = 320
    fig = Canvas(620, max(1, k) * W + 40)
    fig.text(fig.shape[1] / 2, 8, "PCA OF THE COLUMN DISPLACEMENT FIELDS (ARXIV:2009.05635)", anchor="centre")
    C = max(run.pca_modes.shape[1], 1)
    for i in range(k):
        mode = run.pca_modes[i] * np.sqrt(C)                  # rms 1 per column
        cm, mm = _grid_mean(run.pca_pos_px, mode, (h, w), 10) if C > 1 else (np.zeros((0, 2)), np.zeros((0, 2)))
        big = max(float(np.max(np.hypot(*mm.T), initial=0.0)), 1e-9)
        ax = fig.panel(40 + i * W, 50, W - 60, W - 60, xlim=(0, w), ylim=(0, h), equal=True, flip_y=True,
                       title=f"MODE {i + 1}: {100 * run.pca_evr[i]:.1f} %")
        ax.arrows(cm[:, 1], cm[:, 0], mm[:, 1], mm[:, 0], COLORS["blue"], scale=0.9 * (min(h, w) / 10) / big)
        ax.axes(ticks=False)
        ts = run.pca_ts[:, i] / np.sqrt(C) * 1e3                # pm, rms column displacement
        lo, hi = float(np.min(ts, initial=0.0)), float(np.max(ts, initial=0.0))
        pad = 0.1 * (hi - lo + 1e-3)
        ax2 = fig.panel(60 + i * W, 360, W - 80, 200, xlim=(0, float(run.frame_t[-1]) if len(run.frame_t) else 1),
                        ylim=(lo - pad, hi + pad), title="AMPLITUDE (PM)")
        ax2.hline(0.0)
        ax2.line(run.frame_t, ts, COLORS["blue"], width=2)
        ax2.points(run.frame_t, ts, COLORS["blue"], size=4)
        ax2.axes(xlabel="TIME (S)")
    return fig.save(path)


def write_report(run: CalibrationRun, out_dir: str | os.PathLike, *, figures: bool = True) -> list[Path]:
    """The report folder: ``calibration.json`` (:meth:`Calibration.save`), ``drift_trace.csv``
    (GP mean and sd, nm, over scan time s), ``pca_modes.npz`` (sites px, modes, time series)
    and, with ``figures``, ``drift_trace.png``, ``distortion_field.png``, ``pca_modes.png``.
    Returns the paths written."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(f"cannot create the report folder {out}: {exc.strerror or exc}") from None
    paths = [run.calibration.save(out / "calibration.json")]
    table = np.column_stack([run.trace_t, run.trace_mean, run.trace_sd])
    p = out / "drift_trace.csv"
    np.savetxt(p, table, delimiter=",", fmt="%.9g", header="t_s,drift_y_nm,drift_x_nm,sd_y_nm,sd_x_nm", comments="")
    paths.append(p)
    p = out / "pca_modes.npz"
    np.savez_compressed(p, sites_px=run.pca_pos_px, modes=run.pca_modes, time_series=run.pca_ts,
                        explained_variance_ratio=run.pca_evr, frame_t_s=run.frame_t)
    paths.append(p)
    if figures:
        paths += [_fig_trace(run, out / "drift_trace.png"), _fig_field(run, out / "distortion_field.png"),
                  _fig_pca(run, out / "pca_modes.png")]
    return paths
