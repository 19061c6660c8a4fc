"""The strip-level loop of the gp model: drift samples from every strip of a frame as it is
scanned (``protocol.Strip``), the online GP conditioned on them at once, and the beam's path
over the coming lines (``protocol.Trajectory``) for an instrument that follows it line by line.

The frame path (:class:`~stem_live.column_model.ColumnModel`) stays in charge of everything that
needs a whole frame: the tracker's reference, the lattice prior, jumps, the hyperparameters. A
strip only adds samples: its columns are located on the strip with the rows above it that the
previous strip left (a column is taken once its lower half has been scanned), linked to the
frame path's reference where the model says each one should be at the time it was scanned,
and added to the GP as the frame's partial samples (``OnlineDriftGP.add(partial=True)``); the
whole frame's samples replace them when the frame path sees the frame.

A strip whose columns sit far off the model (a jump, a lost lock, a model that drifted off) adds
nothing and sends no path: the frame path decides on the whole frame.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from stem_live.protocol import Strip

#: a strip adds no samples where its median miss of the model is above this share of the link
#: radius, or fewer than ``MIN_LINKED`` of its columns link: the model is then too far off for the
#: links to be trusted (near the radius a graphene strip at 29 pm/px linked half its columns, a
#: bond off, and the loop wandered 100-350 pm), and the frame's own check decides
MAX_MISS_OF_RADIUS = 0.5
MIN_LINKED = 0.8


@dataclass(frozen=True)
class StripResult:
    """What the engine did with one strip. ``path``: (t_s (K,), beam shift (K, 2) nm), the beam
    from ``latency_s`` after the strip's last line to the end of the next frame, or None with
    ``reason`` saying why; ``columns``: the strip's columns linked to the reference."""

    seq: int
    row0: int
    rows: int
    columns: int
    path: tuple[np.ndarray, np.ndarray] | None
    reason: str
    timings_ms: dict
    correction: object | None = None   # the protocol Correction sent for it (the engine's, when armed)


class StripLoop:
    """Strips in, GP samples and beam paths out, for one stream (the engine's gp model owns one).

    ``latency_s``: the time from the end of a strip to the first line its path can reach (the
    engine's own time plus the instrument's; the path starts there); ``knot_lines``: lines
    between the path's knots (an eighth of a mains period where the model follows the line);
    ``link_frac``: a column links to the reference site nearest to where the model puts it,
    within this fraction of the column spacing."""

    def __init__(self, model, *, latency_s: float = 0.02, knot_lines: int = 8, link_frac: float = 0.3) -> None:
        self.model = model            # the stream's ColumnModel
        self.latency_s = float(latency_s)
        self.knot_lines = int(knot_lines)
        self.link_frac = float(link_frac)
        self._ref: np.ndarray | None = None   # the frame path's reference (px; model.reference_px) and its tree
        self._tree = None
        self._tail: tuple | None = None       # (stream, seq, next row, rows (n, cols) float32, beam (n, 2))

    def _reference(self) -> bool:
        """Whether the frame path has a reference to link to (its tree rebuilt when it changed)."""
        from scipy.spatial import cKDTree

        ref = self.model.reference_px
        if ref is not self._ref:
            self._ref = ref
            self._tree = cKDTree(np.asarray(ref, np.float64)) if ref is not None and len(ref) else None
        return self._tree is not None

    def process(self, strip: Strip, *, period_s: float) -> StripResult:
        """One strip: locate, link, add to the GP, the path. ``period_s``: from this frame's
        start to the next one's (s)."""
        m = self.model
        t0 = time.perf_counter()
        n = strip.image.shape[0]
        img = m.bright(np.asarray(strip.image, np.float32), strip.detector)
        beam = strip.beam_at_lines
        sigma = m.probe_sigma_px
        keep = int(np.ceil(4.0 * sigma)) + 2 if sigma else 0   # rows the next strip's window takes from this one
        tail = self._tail
        follows = tail is not None and tail[:3] == (strip.stream, strip.seq, strip.row0) and len(tail[3]) == keep
        if follows:
            img, beam = np.vstack([tail[3], img]), np.vstack([tail[4], beam])
        elif keep:   # a frame's first strip: padded to the same window height (one compiled fit size)
            img = np.vstack([np.full((keep, img.shape[1]), np.median(img), np.float32), img])
            beam = np.vstack([np.tile(beam[:1], (keep, 1)), beam])
        w0 = strip.row0 + n - len(img)         # frame row of the window's first row
        self._tail = (strip.stream, strip.seq, strip.row0 + n, img[len(img) - keep:], beam[len(beam) - keep:])

        def result(linked: int, planned, why: str, **timings: float) -> StripResult:
            timings["total"] = (time.perf_counter() - t0) * 1e3
            return StripResult(strip.seq, strip.row0, n, linked, planned, why, timings)

        if not self._reference() or not sigma or len(m.gp.frames) < m.deskew_min_frames:
            return result(0, None, "waiting for the frame path's reference and model")
        if m.relocking(strip.seq):   # the model may sit a lattice vector off, where a strip's
            # columns link to the neighbouring sites and miss nothing
            return result(0, None, "re-locking after a jump: the frame path corrects")
        from stem_live.locate import locate_classical

        cols = locate_classical(img, m.spacing_px, probe_sigma_px=sigma, flyback_px=m.flyback_px(strip))
        pos = np.asarray(cols.line_averaged(), np.float64) + np.array([w0, 0.0])   # as the frame path's samples
        # this strip's columns: those whose lower half is in it (half: 2 sigma); with no rows above
        # (a frame's first strip) not those the window's top cuts; the last strip also takes
        # the ones the frame's bottom edge cuts
        half = 2.0 * sigma
        lo = strip.row0 - half if follows else strip.row0 + half
        hi = np.inf if strip.last else strip.row0 + n - half
        pos = pos[(pos[:, 0] >= lo) & (pos[:, 0] < hi)]
        t1 = time.perf_counter()
        line_s, dwell_s = strip.line_time_s, strip.dwell_us * 1e-6
        px = np.asarray(strip.pixel_size_nm, np.float64)
        t_col = strip.t_start + pos[:, 0] * line_s + pos[:, 1] * dwell_s
        mean, _ = m.gp.predict(t_col)
        rows = np.clip(np.rint(pos[:, 0] - w0).astype(int), 0, len(beam) - 1)
        at_ref = pos - (mean - beam[rows]) / px      # where each column's site sits in the reference
        _, idx = self._tree.query(at_ref, distance_upper_bound=self.link_frac * m.spacing_px)
        matched = np.where(idx < len(self._ref), idx, -1)
        obs = self._samples(strip, pos, matched, beam, w0)
        if len(obs) < 3 or len(obs) < MIN_LINKED * len(pos):
            return result(len(obs), None, f"{len(obs)} of {len(pos)} columns linked in rows {strip.row0}.."
                          f"{strip.row0 + n - 1}: the model is too far off here", locate=(t1 - t0) * 1e3)
        res, _ = m.gp.residuals(obs)
        med = np.median(res, axis=0)
        radius_nm = self.link_frac * m.spacing_px * float(np.mean(px))
        if np.hypot(*med) > MAX_MISS_OF_RADIUS * radius_nm:
            return result(len(obs), None, f"the strip is {np.hypot(*med) * 1e3:.0f} pm off the model: left to "
                          "the frame's check", locate=(t1 - t0) * 1e3)
        spread = 1.4826 * np.median(np.abs(res - med), axis=0) + 1e-6
        obs = obs.select(np.all(np.abs(res - med) <= 5.0 * spread, axis=1))   # mislinked columns out
        t2 = time.perf_counter()
        m.gp.add(obs, partial=True)
        t3 = time.perf_counter()
        path, why = self._path(strip, period_s, beam[-1])
        t4 = time.perf_counter()
        return result(len(obs), path, why, locate=(t1 - t0) * 1e3, link=(t2 - t1) * 1e3, gp=(t3 - t2) * 1e3,
                      path=(t4 - t3) * 1e3)

    def _samples(self, strip: Strip, pos: np.ndarray, matched: np.ndarray, beam: np.ndarray, w0: int):
        """Drift samples of the linked columns (frame rows ``pos``; ``beam`` per window row)."""
        from stem_live.distortion import observations_from_columns

        m = self.model
        lines = np.tile(np.asarray(strip.beam_shift_nm, np.float64), (strip.frame_rows, 1))
        r0 = max(w0, 0)   # a padded first strip's window starts above the frame
        lines[r0:w0 + len(beam)] = beam[r0 - w0:]
        obs = observations_from_columns(self._ref, pos, matched, t_start=strip.t_start,
                                        line_time_s=strip.line_time_s, dwell_s=strip.dwell_us * 1e-6,
                                        pixel_size_nm=strip.pixel_size_nm, beam_shift_nm=lines, frame=strip.seq,
                                        smear_s=m.smear_s(strip.line_time_s))
        if m.calibration is not None:
            obs = m.calibration.correct_observations(obs, strip.beam_shift_nm)
        return obs

    def _path(self, strip: Strip, period_s: float, beam_now: np.ndarray) -> tuple:
        """(path or None, reason): the beam from ``latency_s`` after the strip to the end of the next
        frame, the model's drift at every line with the policy's gain, a knot every ``knot_lines``."""
        from stem_live.column_model import line_drift
        from stem_live.protocol import MAX_KNOTS

        m = self.model
        line_s = strip.line_time_s
        smear = m.smear_s(line_s)
        n = strip.image.shape[0]
        start = strip.t_start + (strip.row0 + n) * line_s + self.latency_s
        end = strip.t_start + period_s + strip.frame_rows * line_s   # the next frame's end: where the beam holds
        t_all = np.arange(start, max(end, start + line_s), line_s)
        every, sd = line_drift(m.gp, t_all, smear)
        if not np.all(np.isfinite(every)):
            return None, "no model yet"
        if np.max(sd[0]) > m.policy.max_sigma_nm:
            return None, f"GP sigma {np.max(sd[0]):.3f} nm > {m.policy.max_sigma_nm} nm"
        step = max(1, self.knot_lines)
        if m.gp.mains_on and m.gp.follows_mains(smear):
            step = min(step, max(1, int(1.0 / (8.0 * m.gp.mains_hz * line_s))))
        step = max(step, int(np.ceil(len(t_all) / (MAX_KNOTS - 1))))
        knots = np.unique(np.r_[np.arange(0, len(t_all), step), len(t_all) - 1])
        b = np.asarray(beam_now, np.float64)
        return (t_all[knots], b[None, :] + m.policy.gain * (every[knots] - b[None, :])), "predictive drift path (GP, strip)"
