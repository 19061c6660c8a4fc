"""The one-page figure of a replay's results (``stem-live replay FILE --results OUT.npz --report
OUT.png``), drawn with the repository's PNG canvas (:mod:`stem_live.io.png`, no matplotlib):

- drift y and x (nm) against time (s): the GP's drift at every scan line with its 2-sigma
  band, and the beam-shift targets the armed engine would have sent (dots), both relative to
  the first frame's beam shift;
- columns found per frame;
- the drift model's learnt hyperparameters (``info["drift_hyperparameters"]``) as text;
- the rVAE latents (angle against the first content latent) where the file has them.

:func:`replay_figure` returns what it drew, so that a test can compare it with the file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from stem_live.io.png import COLORS, Canvas

__all__ = ["replay_figure", "drift_series"]

WIDTH, HEIGHT = 1000, 900


def drift_series(results: dict) -> dict[str, np.ndarray]:
    """The drift as drawn: ``t_s`` (L,) the start time of every scan line of every frame,
    ``drift_nm`` and ``sigma_nm`` (L, 2) at those lines (rows beyond a frame's own dropped),
    ``correction_t_s`` (C,) the frames' mid times and ``correction_nm`` (C, 2) the targets sent,
    relative to the first frame's beam shift; ``frames`` (F,) and ``columns`` (F,) per frame."""
    drift = np.asarray(results["drift_nm"], dtype=np.float64)  # (F, R, 2)
    sigma = np.asarray(results["drift_sigma_nm"], dtype=np.float64)
    rows = np.asarray(results["rows"], dtype=np.int64)
    t0, lt = np.asarray(results["t_start"], float), np.asarray(results["line_time_s"], float)
    ts, ds, ss = [], [], []
    for k in range(len(rows)):
        n = int(rows[k])
        ts.append(t0[k] + np.arange(n) * lt[k])
        ds.append(drift[k, :n])
        ss.append(sigma[k, :n])
    sent = np.asarray(results["correction_sent"], bool)
    beam0 = np.asarray(results["beam_shift_nm"], float)[:1]
    corr = np.asarray(results["correction_nm"], float)[sent] - (beam0 if len(beam0) else 0.0)
    counts = np.diff(np.asarray(results["col_offsets"], np.int64))

    def cat(xs: list, shape: tuple) -> np.ndarray:
        return np.concatenate(xs) if xs else np.zeros(shape)

    return {"t_s": cat(ts, (0,)), "drift_nm": cat(ds, (0, 2)), "sigma_nm": cat(ss, (0, 2)),
            "correction_t_s": np.asarray(results["t_mid"], float)[sent], "correction_nm": corr,
            "frames": np.arange(len(counts)), "columns": counts}


def _limits(*arrays: np.ndarray, pad: float = 0.05) -> tuple[float, float]:
    vals = np.concatenate([np.ravel(a) for a in arrays if np.size(a)] or [np.zeros(1)])
    vals = vals[np.isfinite(vals)]
    if not len(vals):
        return -1.0, 1.0
    lo, hi = float(vals.min()), float(vals.max())
    span = max(hi - lo, 1e-3)
    return lo - pad * span, hi + pad * span


def _hyper_lines(info: dict) -> list[str]:
    hp = info.get("drift_hyperparameters") or {}
    values = hp.get("values") or {}
    lines = [f"{k} = {v:.4g}" if isinstance(v, (int, float)) else f"{k} = {v}" for k, v in values.items()]
    mains = hp.get("mains_hz")
    lines.append(f"mains: {'none' if mains is None else f'{mains:g} HZ'} ({hp.get('mains_mode', '?')})")
    if "fits" in hp:
        lines.append(f"fits {hp.get('fits')}, accepted {hp.get('accepted')}")
    return lines


def replay_figure(results: dict, path: str | os.PathLike) -> dict:
    """Draw the results (``stem_live.io.results.load_results``) into a PNG at ``path``; returns
    :func:`drift_series` (the arrays drawn) with ``path`` and ``latents`` (bool)."""
    s = drift_series(results)
    info = results.get("info") or {}
    fig = Canvas(HEIGHT, WIDTH)
    fig.text(WIDTH / 2, 8, f"stem-live replay: {Path(str(info.get('source', ''))).name}  "
                           f"{len(s['frames'])} frames, {int(s['columns'].sum())} columns", anchor="centre")
    tl = _limits(s["t_s"], s["correction_t_s"])
    for i, (axis, y) in enumerate((("Y", 50), ("X", 290))):
        d, sd = s["drift_nm"][:, i], s["sigma_nm"][:, i]
        c = s["correction_nm"][:, i] if len(s["correction_nm"]) else np.zeros(0)
        ax = fig.panel(90, y, 860, 190, xlim=tl, ylim=_limits(d - 2 * sd, d + 2 * sd, c),
                       title=f"DRIFT {axis} (NM): GP AND 2-SIGMA BAND, CORRECTIONS")
        ax.band(s["t_s"], d - 2 * sd, d + 2 * sd, COLORS["band"])
        ax.line(s["t_s"], d, COLORS["blue"], width=2)
        ax.points(s["correction_t_s"], c, COLORS["red"], size=5)
        ax.axes(xlabel="TIME (S)" if i else "")
        ax.legend([("GP DRIFT", COLORS["blue"]), ("CORRECTION", COLORS["red"])])
    ax = fig.panel(90, 560, 380, 250, xlim=(-0.5, max(len(s["frames"]) - 0.5, 0.5)),
                   ylim=(0, max(1.0, float(s["columns"].max(initial=0)) * 1.1)), title="COLUMNS PER FRAME")
    ax.line(s["frames"], s["columns"], COLORS["green"], width=2)
    ax.points(s["frames"], s["columns"], COLORS["green"], size=4)
    ax.axes(xlabel="FRAME")
    fig.text(520, 545, "DRIFT MODEL (LEARNT)")
    for k, line in enumerate(_hyper_lines(info)[:11]):
        fig.text(520, 570 + 18 * k, line)
    lat = {k: np.asarray(v) for k, v in results.items() if k.startswith("latent")}
    angle, content = lat.get("latent_angle"), lat.get("latent_content")
    has_latents = angle is not None and content is not None and len(angle) > 0
    if has_latents:
        x, y = np.ravel(angle), np.asarray(content).reshape(len(angle), -1)[:, 0]
        ax = fig.panel(520, 790, 430, 90, xlim=_limits(x), ylim=_limits(y), title="RVAE LATENTS: ANGLE VS CONTENT")
        ax.points(x, y, COLORS["orange"], size=2)
        ax.axes()
    else:
        fig.text(520, 790, "NO RVAE LATENTS IN THIS FILE", COLORS["grey"])
    out = fig.save(path)
    return {**s, "path": out, "latents": has_latents}
