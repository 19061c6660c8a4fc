"""Mains frequency (50 Hz, 60 Hz or none) from drift samples.

Stray fields and vibration at the mains frequency move the probe by a sinusoid along
(mostly) the fast axis. The samples of every frame are averaged per ``group_s`` (about a
line), a quadratic in time per frame is taken out (slow drift, scan scale), and a
least-squares periodogram of what remains (both axes summed) is compared at each
candidate frequency with the median of its neighbourhood (``ref_band_hz``): a line far
above its neighbours is mains. The ratio is a significance test against coloured
noise: for a Gaussian residual the summed power is ~chi^2(4), so a ratio of ``min_ratio``
(default 8: power 27 x the chi^2(4) median/3.36) is p ~ 1e-5 per frequency.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from stem_live.distortion.observations import Observations

__all__ = ["MainsDetection", "detect_mains", "line_means"]


@dataclass(frozen=True)
class MainsDetection:
    """hz: detected frequency (a candidate), None when no line is significant;
    ratio: peak power over the neighbourhood median per candidate; peak_hz: where each
    candidate's peak is; amp_nm: least-squares amplitude (both axes, rms of the sinusoid
    times sqrt 2) at each peak; span_s: time the samples cover."""

    hz: float | None
    ratio: dict = field(default_factory=dict)
    peak_hz: dict = field(default_factory=dict)
    amp_nm: dict = field(default_factory=dict)
    span_s: float = 0.0


def line_means(obs: Observations, group_s: float = 1e-3) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(t (g,) s, disp (g, 2) nm, weight (g,) 1/nm^2, frame (g,)) weighted means of the
    samples scanned within ``group_s`` of their frame's first sample bin."""
    if not len(obs):
        return np.zeros(0), np.zeros((0, 2)), np.zeros(0), np.zeros(0, np.int64)
    o = np.lexsort((obs.t_s, obs.frame))
    t, d, f = obs.t_s[o], obs.disp_nm[o], obs.frame[o]
    w = 1.0 / np.maximum(obs.sigma_nm[o], 1e-6) ** 2
    _, first = np.unique(f, return_index=True)
    f0 = t[first][np.searchsorted(f[first], f)]
    b = np.floor((t - f0) / group_s)
    new = np.r_[True, (np.diff(f) != 0) | (np.diff(b) != 0)]
    gid = np.cumsum(new) - 1
    n = int(gid[-1]) + 1
    W = np.bincount(gid, w, n)
    tg = np.bincount(gid, w * t, n) / W
    dg = np.stack([np.bincount(gid, w * d[:, k], n) for k in range(2)], axis=1) / W[:, None]
    return tg, dg, W, f[new]


def _detrend(t, d, w, frame, degree: int = 2) -> np.ndarray:
    """Residual of a weighted polynomial in time fitted per frame (frames too short for it:
    their mean)."""
    out = np.zeros_like(d)
    for fr in np.unique(frame):
        m = frame == fr
        tt = t[m] - t[m].mean()
        deg = int(min(degree, m.sum() - 1))
        if deg < 0:
            continue
        s = max(np.ptp(tt), 1e-9)
        X = np.vander(tt / s, deg + 1)
        sw = np.sqrt(w[m])[:, None]
        coef, *_ = np.linalg.lstsq(X * sw, d[m] * sw, rcond=None)
        out[m] = d[m] - X @ coef
    return out


def _power(t, r, w, freqs, chunk: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """(weighted least-squares power summed over axes, in units of the residual variance;
    amplitude nm) at each frequency: a sine + cosine fit per axis (2x2 normal equations)."""
    t = t - t.mean()
    var = np.sum(w[:, None] * r * r, axis=0) / np.sum(w)        # (2,) weighted residual variance
    pw = np.zeros(len(freqs))
    amp2 = np.zeros(len(freqs))
    for a0 in range(0, len(freqs), chunk):
        ph = 2 * np.pi * np.outer(freqs[a0:a0 + chunk], t)       # (F, g)
        c, s = np.cos(ph), np.sin(ph)
        wc, ws = c * w, s * w
        cc, ss, cs = np.sum(wc * c, 1), np.sum(ws * s, 1), np.sum(wc * s, 1)
        det = np.maximum(cc * ss - cs * cs, 1e-300)
        for k in range(2):
            yc, ys = wc @ r[:, k], ws @ r[:, k]
            a = (ss * yc - cs * ys) / det
            b = (cc * ys - cs * yc) / det
            pw[a0:a0 + chunk] += (a * yc + b * ys) / max(var[k] * np.mean(w), 1e-30)
            amp2[a0:a0 + chunk] += a * a + b * b
    return pw, np.sqrt(amp2)


def detect_mains(obs: Observations, candidates: tuple[float, ...] = (50.0, 60.0), *, group_s: float = 1e-3,
                 search_hz: float = 0.3, ref_band_hz: float = 12.0, guard_hz: float = 1.5,
                 min_ratio: float = 8.0, min_periods: float = 20.0) -> MainsDetection:
    """Which of ``candidates`` (Hz) is in the samples, if any (module doc).

    search_hz: a peak within this of a candidate counts (mains wanders by ~0.1 Hz);
    ref_band_hz: half-width of the neighbourhood whose median power is the reference;
    guard_hz: left out of the reference around every candidate; min_ratio: peak power over
    the reference needed; min_periods: fewer periods of the lowest candidate than this in
    the samples' time span: no decision (hz None, empty ratios)."""
    t, d, w, fr = line_means(obs, group_s)
    span = float(np.ptp(t)) if len(t) else 0.0
    if len(t) < 16 or span * min(candidates) < min_periods:
        return MainsDetection(None, span_s=span)
    r = _detrend(t, d, w, fr)
    df = 0.25 / span
    lo, hi = min(candidates) - ref_band_hz, max(candidates) + ref_band_hz
    freqs = np.arange(lo, hi + df, df)
    pw, amp = _power(t, r, w, freqs)
    guard = np.zeros(len(freqs), bool)
    for c in candidates:
        guard |= np.abs(freqs - c) < guard_hz
    ratios, peaks, amps = {}, {}, {}
    for c in candidates:
        near = np.abs(freqs - c) <= ref_band_hz
        ref = float(np.median(pw[near & ~guard]))
        m = np.abs(freqs - c) <= search_hz
        i = np.flatnonzero(m)[int(np.argmax(pw[m]))]
        ratios[c] = float(pw[i] / max(ref, 1e-30))
        peaks[c] = float(freqs[i])
        amps[c] = float(amp[i])
    best = max(candidates, key=lambda c: ratios[c])
    return MainsDetection(best if ratios[best] >= min_ratio else None, ratios, peaks, amps, span)
