"""Displacement observations: one drift sample per tracked atomic column.

Conventions (shared/DESIGN.md, "Physics conventions"): row i = slow scan (y), column j =
fast scan (x); pixel (i, j) of a frame is sampled at ``t = t_start + i*line_time + j*dwell``.
A column at specimen position ``p`` appears at ``p + d(t) - b(t)`` (nm), ``d`` the specimen
drift, ``b`` the beam shift in effect. With a fixed scan distortion ``S(pos)`` (the probe
sits at ``nominal + S`` when the image says ``nominal``) the column is seen at

    pos_nm = p + d(t) - b(t) - S(pos)

so a column tracked against a reference position ``ref`` (nm) gives the sample

    disp = (pos - ref) * pixel_size + b(t) = d(t) - S(pos) + [p - ref]

``disp`` is in the specimen frame: positive when the specimen moved towards +y / +x.

The bracket is the reference lattice's own error. For a *known* lattice (calibration,
``ref = p``) it is zero and ``S`` is observable. For a *measured* reference frame
``ref = p + d(t_ref(p)) - b_ref - S(ref)``: a constant (the drift and shift when the
reference was taken: removed later as one offset), plus the drift that happened while the
reference frame itself was scanned (its linear part looks like a scale/shear and is absorbed
by the distortion terms of :class:`~stem_live.distortion.gp.OnlineDriftGP`), plus the
reference's own distortion ``S(ref)``, which cancels ``S(pos)`` up to ``S`` of the (small)
displacement; so with a measured reference the GP reports drift *relative to the reference*
and distortion *relative to the reference's distortion* (near zero). Refine the reference
(average de-drifted positions over frames, or fit a known lattice) to make it absolute.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["Observations", "observations_from_columns"]


@dataclass(frozen=True)
class Observations:
    """Drift samples. Lengths nm, times s, pairs (y, x) / (row, col).

    t_s: (n,) scan time of each sample (when its pixel was scanned).
    pos_px: (n, 2) (row, col) where the column was seen in its frame.
    disp_nm: (n, 2) (y, x) specimen displacement measured by the sample (see module doc).
    sigma_nm: (n,) 1-sigma measurement uncertainty per axis.
    frame: (n,) int frame sequence number.
    t_line_s: (n,) time since the start of the sample's line (col * dwell): the flyback
        ringing basis is a function of it.
    pixel_size_nm: (py, px) of the frame (to express positions in nm).
    smear_s: (n,) RMS spread (s) of the scan times a sample averages over: a column's fitted
        position is a weighted mean over the lines it spans (about ``probe sigma / sqrt 2``
        lines), so a fast oscillation (the mains line) reaches the sample attenuated by
        ``exp(-(w smear)^2 / 2)``; zeros (None) for point-like samples.
    """

    t_s: np.ndarray
    pos_px: np.ndarray
    disp_nm: np.ndarray
    sigma_nm: np.ndarray
    frame: np.ndarray
    t_line_s: np.ndarray
    pixel_size_nm: tuple[float, float] = (1.0, 1.0)
    smear_s: np.ndarray | None = None

    def __post_init__(self):
        n = len(self.t_s)
        if self.smear_s is None:
            object.__setattr__(self, "smear_s", np.zeros(n))
        for name, shape in (("pos_px", (n, 2)), ("disp_nm", (n, 2)), ("sigma_nm", (n,)),
                            ("frame", (n,)), ("t_line_s", (n,)), ("smear_s", (n,))):
            if np.shape(getattr(self, name)) != shape:
                raise ValueError(f"Observations.{name} must have shape {shape}, "
                                 f"got {np.shape(getattr(self, name))}")

    def __len__(self) -> int:
        return len(self.t_s)

    @property
    def pos_nm(self) -> np.ndarray:
        return self.pos_px * np.asarray(self.pixel_size_nm, dtype=float)

    @classmethod
    def empty(cls) -> Observations:
        z = np.zeros(0)
        return cls(z, np.zeros((0, 2)), np.zeros((0, 2)), z, np.zeros(0, np.int64), z)

    @staticmethod
    def concat(parts: list[Observations]) -> Observations:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Observations.empty()
        return Observations(
            np.concatenate([p.t_s for p in parts]), np.concatenate([p.pos_px for p in parts]),
            np.concatenate([p.disp_nm for p in parts]), np.concatenate([p.sigma_nm for p in parts]),
            np.concatenate([p.frame for p in parts]), np.concatenate([p.t_line_s for p in parts]),
            parts[-1].pixel_size_nm, np.concatenate([p.smear_s for p in parts]))

    def select(self, idx) -> Observations:
        return Observations(self.t_s[idx], self.pos_px[idx], self.disp_nm[idx], self.sigma_nm[idx],
                            self.frame[idx], self.t_line_s[idx], self.pixel_size_nm, self.smear_s[idx])


def observations_from_columns(ref_positions_px, positions_px, matched=None, *, t_start: float,
                              line_time_s: float, dwell_s: float, pixel_size_nm,
                              beam_shift_nm, sigma_px: float | np.ndarray = 0.05,
                              frame: int = 0, smear_s: float = 0.0) -> Observations:
    """One drift sample per tracked column of one frame.

    ref_positions_px: (m, 2) (row, col) reference position of each tracked column (a
        reference frame or a known lattice, in this frame's pixel grid).
    positions_px: (n, 2) (row, col) where columns were found in this frame.
    matched: (n,) index into ``ref_positions_px`` for each found column, -1 = unmatched;
        None means ``positions_px[k]`` matches ``ref_positions_px[k]``.
    beam_shift_nm: (y, x) beam shift in effect (absolute, as the instrument reports it),
        or (rows, 2) per line (nm). Then ``disp = d(t) - d_ref + b_ref`` (no distortion):
        exactly the beam shift that would hold the columns at their reference positions,
        which is what :class:`~stem_live.distortion.policy.CorrectionPolicy` sends.
    sigma_px: localisation uncertainty (px, scalar or (n,)).
    smear_s: RMS spread of the scan times each position averages over (s; ``Observations``).

    The sample time is when the column centre was scanned (fractional row and col):
    ``t = t_start + row * line_time + col * dwell``; the sample is
    ``disp = (pos - ref) * pixel_size + b(t)`` (module doc).
    """
    pos = np.asarray(positions_px, dtype=float).reshape(-1, 2)
    ref_all = np.asarray(ref_positions_px, dtype=float).reshape(-1, 2)
    n = len(pos)
    if matched is None:
        if len(ref_all) != n:
            raise ValueError("without `matched`, ref_positions_px and positions_px need the same length")
        m = np.arange(n)
    else:
        m = np.asarray(matched, dtype=np.int64).reshape(-1)
        if len(m) != n:
            raise ValueError("`matched` needs one entry per found column")
    sig = np.broadcast_to(np.asarray(sigma_px, dtype=float), (n,))
    ok = (m >= 0) & (m < len(ref_all)) & np.all(np.isfinite(pos), axis=1)
    ref = np.full((n, 2), np.nan)
    ref[ok] = ref_all[m[ok]]
    ok &= np.all(np.isfinite(ref), axis=1)
    pos, ref, sig = pos[ok], ref[ok], sig[ok]
    psz = np.broadcast_to(np.asarray(pixel_size_nm, dtype=float), (2,))
    b = np.asarray(beam_shift_nm, dtype=float)
    if b.ndim == 2:  # per line
        rows = np.clip(np.rint(pos[:, 0]).astype(np.int64), 0, len(b) - 1)
        b_s = b[rows]
    else:
        b_s = np.broadcast_to(b.reshape(2), pos.shape)
    t_line = np.clip(pos[:, 1], 0.0, None) * dwell_s
    t = t_start + pos[:, 0] * line_time_s + t_line
    disp = (pos - ref) * psz + b_s
    return Observations(t_s=t, pos_px=pos, disp_nm=disp, sigma_nm=sig * float(np.mean(psz)),
                        frame=np.full(len(t), int(frame), np.int64), t_line_s=t_line,
                        pixel_size_nm=(float(psz[0]), float(psz[1])), smear_s=np.full(len(t), float(smear_s)))
