"""The virtual STEM: specimen + drift + scan + actuator + detector, one frame at a time.

Conventions (docs: shared/DESIGN.md, "Physics conventions"): row i = slow scan (y), col j =
fast scan (x); pixel (i, j) is sampled at t = t_start + i * line_time + j * dwell with
line_time = cols * dwell + flyback; a column at specimen position p appears at
p + d(t) - b(t). The probe of pixel (i, j) samples r = scan(i, j) - d(t) + b(t) (see
``scan.py``) and the image is the HAADF sum of the columns near r (see ``render.py``), or,
with ``detector`` "abf" / "bf", the bright-field dips of ``detector.py``.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from simulator._util import stream_rng
from simulator.actuator import Actuator, ActuatorConfig
from simulator.detector import BRIGHT_FIELD, DETECTORS
from simulator.drift import DriftConfig, DriftModel
from simulator.frame import FrameMeta, FrameTruth
from simulator.render import detect, fwhm_to_sigma, pad_points, render_sources
from simulator.scan import ScanConfig, ScanGeometry
from simulator.specimen import PRESETS, Specimen, make_specimen

__all__ = ["MicroscopeConfig", "Microscope", "PRESET_DEFAULTS"]

#: Per-preset defaults used where MicroscopeConfig says None:
#: pixel size (nm), probe FWHM (nm), dose (e/A^2); ``diffuse_fraction`` (HAADF background of a
#: thick crystal, fraction of the incident electrons a pixel; 0 where absent).
#: perovskite: 0.2, the thermal diffuse / cross-talk background of a ~20-40 nm PbTiO3 crystal,
#: on which its O columns (1.9 % of Pb) are not seen at 1e5 e/A^2 (docs/simulator.md).
#: nanoparticle: 0.025 nm px (the 0.25 nm Au column spacing is 10 px), 0.1 nm probe, 5e4 e/A^2.
PRESET_DEFAULTS: dict[str, dict[str, float]] = {
    "graphene": {"pixel_size_nm": 0.010, "probe_fwhm_nm": 0.08, "dose_e_per_A2": 5e5},
    "srtio3": {"pixel_size_nm": 0.012, "probe_fwhm_nm": 0.08, "dose_e_per_A2": 1e5},
    "mos2": {"pixel_size_nm": 0.012, "probe_fwhm_nm": 0.08, "dose_e_per_A2": 1e5},
    "particles": {"pixel_size_nm": 0.05, "probe_fwhm_nm": 0.15, "dose_e_per_A2": 5e4},
    "nanoparticle": {"pixel_size_nm": 0.025, "probe_fwhm_nm": 0.10, "dose_e_per_A2": 5e4},
    "perovskite": {"pixel_size_nm": 0.012, "probe_fwhm_nm": 0.08, "dose_e_per_A2": 1e5,
                   "diffuse_fraction": 0.2},
}


@dataclass(frozen=True)
class MicroscopeConfig:
    """Everything that defines a simulated session. nm, s (us where named), rad.

    size: frame is size x size unless rows/cols are given.
    pixel_size_nm, probe_fwhm_nm, dose_e_per_A2: None -> PRESET_DEFAULTS[preset];
        pixel_size_nm may be a float or (py, px).
    noise: False gives the exact expectation (rounded to uint16): no shot/readout noise.
    readout_noise: std of Gaussian detector noise (counts); background_counts: constant.
    haadf_cross_section_A2: HAADF cross-section per unit Z^1.7 (A^2); an effective
        detector efficiency: graphene C ~30, Si ~125 counts at the default dose.
    frame_gap_s: dead time between the end of one frame and the start of the next.
    dynamics: defects hop between frames (particles rotate regardless, see Specimen).
    si_fraction, vacancy_fraction: dopant / vacancy fractions (None -> preset default;
        si_fraction is the substitutional dopant of the preset: Si in graphene, W in mos2, La in srtio3).
    hop_rate_per_s: per-defect hop rate when dynamics is on.
    specimen_kwargs: any further ``make_specimen`` keyword arguments.
    render_nsigma: Gaussians are cut off at this many sigma.
    detector: "haadf" (bright columns), "abf" or "bf" (dark columns; ``detector.py``).
    diffuse_fraction: HAADF diffuse background (fraction of the incident electrons per
        pixel); None -> the preset's (0 except perovskite).
    """

    preset: str = "graphene"
    size: int = 512
    rows: int | None = None
    cols: int | None = None
    pixel_size_nm: float | tuple[float, float] | None = None
    dwell_us: float = 2.0
    flyback_us: float = 50.0
    probe_fwhm_nm: float | None = None
    dose_e_per_A2: float | None = None
    noise: bool = True
    readout_noise: float = 1.0
    background_counts: float = 2.0
    haadf_cross_section_A2: float = 2e-4
    frame_gap_s: float = 0.0
    scan_rotation_rad: float = 0.0
    seed: int = 0
    drift: DriftConfig = field(default_factory=DriftConfig)
    scan: ScanConfig = field(default_factory=ScanConfig)
    actuator: ActuatorConfig = field(default_factory=ActuatorConfig)
    dynamics: bool = False
    si_fraction: float | None = None
    vacancy_fraction: float | None = None
    hop_rate_per_s: float = 0.02
    specimen_kwargs: dict = field(default_factory=dict)
    render_nsigma: float = 4.0
    detector: str = "haadf"
    diffuse_fraction: float | None = None

    # ---- resolved values
    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.rows or self.size), int(self.cols or self.size))

    @property
    def pixel_size(self) -> tuple[float, float]:
        p = self.pixel_size_nm
        if p is None:
            p = PRESET_DEFAULTS[self.preset]["pixel_size_nm"]
        if np.ndim(p) == 0:
            return (float(p), float(p))
        return (float(p[0]), float(p[1]))

    @property
    def probe_fwhm(self) -> float:
        return float(self.probe_fwhm_nm if self.probe_fwhm_nm is not None
                     else PRESET_DEFAULTS[self.preset]["probe_fwhm_nm"])

    @property
    def dose(self) -> float:
        return float(self.dose_e_per_A2 if self.dose_e_per_A2 is not None
                     else PRESET_DEFAULTS[self.preset]["dose_e_per_A2"])

    @property
    def diffuse(self) -> float:
        return float(self.diffuse_fraction if self.diffuse_fraction is not None
                     else PRESET_DEFAULTS[self.preset].get("diffuse_fraction", 0.0))

    def validate(self) -> None:
        """Raise ValueError with a one-line reason for a bad parameter."""
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose one of {', '.join(PRESETS)}")
        if self.detector not in DETECTORS:
            raise ValueError(f"unknown detector {self.detector!r}; choose one of {', '.join(DETECTORS)}")
        if not (np.isfinite(self.diffuse) and 0 <= self.diffuse < 1):
            raise ValueError(f"diffuse_fraction must be in [0, 1), got {self.diffuse}")
        rows, cols = self.shape
        if not (1 <= rows <= 16384 and 1 <= cols <= 16384):
            raise ValueError(f"frame size {rows}x{cols} out of range 1..16384")
        checks = {"pixel_size_nm": min(self.pixel_size), "dwell_us": self.dwell_us,
                  "probe_fwhm_nm": self.probe_fwhm, "dose_e_per_A2": self.dose}
        for name, v in checks.items():
            if not np.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a positive number, got {v}")
        for name in ("flyback_us", "frame_gap_s", "readout_noise", "background_counts"):
            v = getattr(self, name)
            if not np.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be >= 0, got {v}")


class Microscope:
    """A virtual STEM. ``acquire()`` scans one frame and advances the clock."""

    N_SOLVE = 8  # fixed-point iterations for apparent column positions

    def __init__(self, config: MicroscopeConfig | None = None, **overrides):
        cfg = config if config is not None else MicroscopeConfig(**overrides)
        if config is not None and overrides:
            from dataclasses import replace
            cfg = replace(config, **overrides)
        cfg.validate()
        self.config = cfg
        self.rows, self.cols = cfg.shape
        self.pixel_size_nm = cfg.pixel_size
        self.dwell_s = cfg.dwell_us * 1e-6
        self.flyback_s = cfg.flyback_us * 1e-6
        kw = dict(cfg.specimen_kwargs)
        kw.setdefault("dopant_fraction", cfg.si_fraction)
        kw.setdefault("vacancy_fraction", cfg.vacancy_fraction)
        kw.setdefault("hop_rate_per_s", cfg.hop_rate_per_s)
        if cfg.preset == "nanoparticle":  # the first frame looks at the particle's centre
            kw.setdefault("origin_nm", (0.5 * self.rows * self.pixel_size_nm[0], 0.5 * self.cols * self.pixel_size_nm[1]))
        self.specimen: Specimen = make_specimen(cfg.preset, cfg.seed, **kw)
        self.drift = DriftModel(cfg.drift, cfg.seed)
        self.actuator = Actuator(cfg.actuator, self.rows, cfg.seed)
        self._sigma_probe = fwhm_to_sigma(cfg.probe_fwhm)
        self._seq = 0
        self._t = 0.0
        self._scanned: int | None = None   # rows of the current frame scanned, while it is scanned as strips

    # ------------------------------------------------------------------ state
    @property
    def time_s(self) -> float:
        """Simulation clock (s): start time of the next frame."""
        return self._t

    @property
    def seq(self) -> int:
        """Sequence number the next frame will get."""
        return self._seq

    @property
    def line_time_s(self) -> float:
        return self.cols * self.dwell_s + self.flyback_s

    @property
    def frame_time_s(self) -> float:
        """Scan time of one frame (rows * line_time), without frame_gap_s."""
        return self.rows * self.line_time_s

    @property
    def beam_shift_nm(self) -> np.ndarray:
        """Currently commanded beam-shift target (nm, (y, x)): what the instrument reports."""
        return self.actuator.target

    def set_beam_shift(self, target_nm) -> np.ndarray:
        """Command the beam shift (nm, (y, x)); takes effect per ActuatorConfig.

        Returns the shift that will truly be applied (simulation truth, not for feedback).
        """
        return self.actuator.command(target_nm, self._seq + (self._scanned is not None))

    def set_beam_path(self, t_s, targets_nm) -> np.ndarray:
        """Command a beam-shift path: target ``targets_nm[i]`` (n, 2) nm from the scan line that
        starts at or after ``t_s[i]`` (s, increasing, this clock: frames start at ``time_s`` and
        every frame period after it); points in a gap between frames take effect at the next
        frame's first line. Latency, gain and noise per ``ActuatorConfig``
        (``Actuator.command_path``). Returns the applied values (simulation truth)."""
        t = np.asarray(t_s, dtype=float).reshape(-1)
        period = self.frame_time_s + self.config.frame_gap_s
        k = np.floor(np.maximum(t - self._t, 0.0) / period + 1e-9).astype(np.int64)
        line = np.ceil((t - self._t - k * period) / self.line_time_s - 1e-6).astype(np.int64)
        if self._scanned is not None:   # within a strip scan: not on the lines already scanned
            line = np.where(k == 0, np.maximum(line, self._scanned), line)
        over = line >= self.rows
        k, line = np.where(over, k + 1, k), np.where(over, 0, np.maximum(line, 0))
        return self.actuator.command_path(self._seq + k, line, targets_nm)

    def drift_at(self, times_s) -> np.ndarray:
        """True drift d(t) (n, 2) nm (y, x) at any times; independent of query order."""
        return self.drift(np.atleast_1d(np.asarray(times_s, dtype=float)))

    # ------------------------------------------------------------------ physics
    def _sample_points(self, geom: ScanGeometry, t0: float, b_rows: np.ndarray):
        """Specimen point sampled by every pixel: (ry, rx) float32 (rows, cols) relative
        to the returned float64 ``origin`` (nm), and the bounding box ((y0, y1), (x0, x1))."""
        rows, cols = self.rows, self.cols
        i = np.arange(rows)
        j = np.arange(cols)
        row_dy, row_dx, dev_y, dev_x = self.drift.frame_xy(t0, self.line_time_s, self.dwell_s, rows, cols)
        sy = geom.y(i)
        row_y = sy + b_rows[:, 0] - row_dy                                  # per line
        row_x = geom.cfg.shear * sy + geom.line_jitter + b_rows[:, 1] - row_dx
        col_x = j * geom.step_x + geom.flyback(j)                           # per column
        origin = np.array([row_y[rows // 2], row_x[rows // 2] + col_x[cols // 2]])
        ry = (row_y - origin[0]).astype(np.float32)[:, None] - dev_y
        rx = (row_x - origin[1]).astype(np.float32)[:, None] + (col_x.astype(np.float32)[None, :] - dev_x)
        box = ((float(ry.min()) + origin[0], float(ry.max()) + origin[0]),
               (float(rx.min()) + origin[1], float(rx.max()) + origin[1]))
        return ry, rx, origin, box

    def _apparent(self, p: np.ndarray, geom: ScanGeometry, t0: float, b_rows: np.ndarray):
        """Fractional (i, j) and scan time where specimen points p (n, 2) appear."""
        i = p[:, 0] / geom.step_y
        j = (p[:, 1] - geom.cfg.shear * p[:, 0]) / geom.step_x
        for _ in range(self.N_SOLVE):
            t = t0 + i * self.line_time_s + j * self.dwell_s
            dy, dx = self.drift.xy(t)
            r = geom.row_index(i)
            i, j = geom.invert(p[:, 0] + dy - b_rows[r, 0], p[:, 1] + dx - b_rows[r, 1], j)
        t = t0 + i * self.line_time_s + j * self.dwell_s
        return i, j, t

    def acquire(self) -> tuple[np.ndarray, FrameMeta, FrameTruth]:
        """Scan one frame: (image uint16 (rows, cols), FrameMeta, FrameTruth).

        Advances the clock by frame_time_s + frame_gap_s and the sequence number by 1.
        """
        image, meta, truth, box = self._scan()
        self._advance(box)
        return image, meta, truth

    def acquire_strips(self, lines: int, on_strip: Callable[[np.ndarray, FrameMeta, int], None]
                       ) -> tuple[np.ndarray, FrameMeta, FrameTruth]:
        """Scan one frame as strips of ``lines`` rows (:meth:`next_strip`), calling
        ``on_strip(rows, meta, row0)`` after each (it may command the beam). Returns what
        :meth:`acquire` returns; the image is the strips', each scanned under the commands made
        before it."""
        image = np.zeros((self.rows, self.cols), np.uint16)
        try:
            while True:
                rows, meta, row0, truth = self.next_strip(lines)
                image[row0:row0 + len(rows)] = rows
                on_strip(rows.copy(), meta, row0)
                if truth is not None:
                    return image, meta, truth
        except BaseException:
            self._scanned = None   # a frame left half scanned is scanned again from its start
            raise

    def next_strip(self, lines: int) -> tuple[np.ndarray, FrameMeta, int, FrameTruth | None]:
        """Scan the next ``lines`` rows of the current frame (the last strip may be shorter), as
        an instrument that streams partial frames: (rows uint16 (n, cols), meta, row0, truth).
        The rows are scanned under the commands made so far; until the frame's last strip, a
        ``set_beam_path`` reaches only lines not yet scanned and ``set_beam_shift`` waits for
        the next frame. ``meta``: the frame's as it stands (its ``beam_shift_lines_nm`` the
        commands so far); ``truth``: the whole frame's with its last strip (the clock then
        moves on to the next frame), else None."""
        if lines < 1:
            raise ValueError(f"a strip needs at least one line, got {lines}")
        row0 = self._scanned or 0
        full, meta, truth, box = self._scan()
        row1 = min(row0 + int(lines), self.rows)
        if row1 < self.rows:
            self._scanned = row1
            return full[row0:row1], meta, row0, None
        self._scanned = None
        self._advance(box)
        return full[row0:row1], meta, row0, truth

    def _advance(self, box) -> None:
        """Move the clock and the specimen on by one frame period (after a frame's scan)."""
        cfg = self.config
        dt = self.frame_time_s + cfg.frame_gap_s
        seq = self._seq
        self._seq = seq + 1
        self._t += dt
        self.specimen.advance(dt, box, cfg.scan_rotation_rad, stream_rng(cfg.seed, "dynamics", seq), hops=cfg.dynamics)

    def _scan(self) -> tuple[np.ndarray, FrameMeta, FrameTruth, tuple]:
        """Scan the current frame under the commands made so far (clock unchanged); returns
        (image, meta, truth, the specimen box the frame saw)."""
        cfg = self.config
        rows, cols = self.rows, self.cols
        seq, t0 = self._seq, self._t
        sc = cfg.scan
        lj = (stream_rng(cfg.seed, "line_jitter", seq).standard_normal(rows) * sc.line_jitter_nm
              if sc.line_jitter_nm > 0 else np.zeros(rows))
        geom = ScanGeometry(sc, rows, cols, self.pixel_size_nm, self.dwell_s, lj)
        on_path = self.actuator.follows_path(seq)   # the frame reports its commanded shift per line
        b_rows, cmd_rows = self.actuator.frame(seq)
        line_times = t0 + np.arange(rows) * self.line_time_s

        ry, rx, origin, (by, bx) = self._sample_points(geom, t0, b_rows)
        spec = self.specimen
        sig_max = float(np.hypot(self._sigma_probe, spec.max_source_sigma_nm))
        margin = cfg.render_nsigma * sig_max + spec.source_extent_nm + 0.05
        box = ((by[0] - margin, by[1] + margin), (bx[0] - margin, bx[1] + margin))
        cols_all = spec.columns_in(box, cfg.scan_rotation_rad)

        # where every source appears, then render
        si, sj, _ = self._apparent(cols_all.src_pos_nm, geom, t0, b_rows)
        sig = np.sqrt(self._sigma_probe ** 2 + cols_all.src_sigma_nm ** 2)
        py, px = self.pixel_size_nm
        n_e = cfg.dose * py * px * 100.0                              # electrons per pixel
        amp = n_e * cfg.haadf_cross_section_A2 * cols_all.src_weight / (2.0 * np.pi * (10.0 * sig) ** 2)
        # footprint: nsigma * sigma around the source, plus up to 0.75 px for the rounding of
        # its centre pixel (and a little for local scan-step changes)
        radius = cfg.render_nsigma * sig_max / min(geom.step_y, geom.step_x) + 0.75
        half = int(np.ceil(radius))
        if cfg.detector == "haadf":
            vis = (si > -half) & (si < rows - 1 + half) & (sj > -half) & (sj < cols - 1 + half) & (amp > 0)
            ryp, rxp = pad_points(ry, rx, half)
            expected = render_sources(
                ryp, rxp,
                cols_all.src_pos_nm[vis] - origin, amp[vis], sig[vis],
                np.stack([np.rint(si[vis]), np.rint(sj[vis])], axis=1).astype(np.int64), half, radius)
            if cfg.diffuse:
                expected += cfg.diffuse * n_e
        else:
            expected = self._bright_field(ry, rx, origin, cols_all, si, sj, sig, n_e,
                                          min(geom.step_y, geom.step_x))
        expected += cfg.background_counts
        rng = stream_rng(cfg.seed, "noise", seq) if cfg.noise else None
        image = detect(expected, rng, cfg.readout_noise)

        # truth: the reference position of each column / particle (its first source)
        ref = np.searchsorted(cols_all.src_parent, np.arange(len(cols_all)))
        ci, cj = si[ref], sj[ref]
        ct = t0 + ci * self.line_time_s + cj * self.dwell_s
        inside = (ci >= -0.5) & (ci < rows - 0.5) & (cj >= -0.5) & (cj < cols - 0.5)
        hidden = spec.haadf_hidden_species if cfg.detector == "haadf" else ()
        truth = FrameTruth(
            line_times_s=line_times,
            drift_nm=self.drift(line_times),
            beam_shift_nm=b_rows,
            line_jitter_nm=lj,
            columns_px=np.stack([ci[inside], cj[inside]], axis=1),
            column_times_s=ct[inside],
            column_ids=cols_all.ids[inside],
            species=cols_all.species[inside],
            species_names=spec.species_names,
            weight=cols_all.weight[inside],
            orientation_rad=(None if cols_all.orientation_rad is None
                             else cols_all.orientation_rad[inside]),
            specimen_nm=cols_all.positions_nm[inside],
            symmetry_order=spec.symmetry_order if spec.preset == "particles" else None,
            visible=~np.isin(cols_all.species[inside], hidden),
        )
        meta = FrameMeta(
            seq=seq, t_start=t0, pixel_size_nm=(py, px), dwell_us=cfg.dwell_us,
            flyback_us=cfg.flyback_us, scan_rotation_rad=cfg.scan_rotation_rad,
            beam_shift_nm=(float(cmd_rows[0, 0]), float(cmd_rows[0, 1])), rows=rows, cols=cols,
            detector=cfg.detector.upper(),
            beam_shift_lines_nm=cmd_rows.copy() if on_path else None)
        return image, meta, truth, box

    def _bright_field(self, ry: np.ndarray, rx: np.ndarray, origin: np.ndarray, cols, si: np.ndarray,
                      sj: np.ndarray, sig: np.ndarray, n_e: float, step: float) -> np.ndarray:
        """Expected ABF / BF counts (rows, cols), background excluded: N_e * collection * exp(-tau)
        with tau the sum of the columns' Gaussian dips (and BF's bright rings), ``detector.py``.
        ry, rx, origin: the pixels' sample points (``_sample_points``); si, sj, sig: each source's
        apparent (row, col) and total width (nm); n_e: electrons a pixel; step: scan step (nm)."""
        cfg = self.config
        model = BRIGHT_FIELD[cfg.detector]
        rows, cols_n = self.rows, self.cols
        depth = model.depth * self.specimen.source_weights(cols, model.exponent)
        tau = []  # the dips' optical depth, then (BF) the rings'
        for amp, width in [(1.0, 1.0)] + ([(model.halo, model.halo_width)] if model.halo else []):
            s = sig * width
            radius = cfg.render_nsigma * float(s.max(initial=0.0)) / step + 0.75
            half = int(np.ceil(radius))
            vis = (si > -half) & (si < rows - 1 + half) & (sj > -half) & (sj < cols_n - 1 + half) & (depth > 0)
            ryp, rxp = pad_points(ry, rx, half)
            tau.append(render_sources(
                ryp, rxp, cols.src_pos_nm[vis] - origin, amp * depth[vis], s[vis],
                np.stack([np.rint(si[vis]), np.rint(sj[vis])], axis=1).astype(np.int64), half, radius))
        # the ring brightens by 1 - exp(-tau_ring): tau_ring for weak columns (zero integral with
        # the dip), at most the vacuum level itself beside thick ones
        ring = -np.expm1(-tau[1]) if len(tau) > 1 else 0.0
        return n_e * model.collection * (np.exp(-tau[0]) + ring)

    def __repr__(self) -> str:
        c = self.config
        return f"Microscope(preset={c.preset!r}, {self.rows}x{self.cols}, seed={c.seed}, seq={self._seq})"
