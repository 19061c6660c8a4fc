"""The span of real microscopes: one range per drift and scan parameter, and scenarios drawn from them.

``RANGES`` holds every continuous parameter as a :class:`Range` (low, high, unit, whether it is
drawn log-uniformly, where the range comes from); ``CHOICES`` the discrete ones. A range is drawn
log-uniformly when it spans a decade or more (high / low >= 10), uniformly otherwise. The sources
and which numbers are quoted or inferred: docs/drift-ranges.md.

:func:`draw_scenarios` draws N seeded :class:`Scenario` values (scenario i depends on (seed, i)
only, so the first k of N are the k of a shorter matrix); ``Scenario.config(frames)`` turns one
into a ``MicroscopeConfig``. The simulator's own defaults are not changed by anything here.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import numpy as np

from simulator.drift import DriftConfig
from simulator.microscope import PRESET_DEFAULTS, MicroscopeConfig
from simulator.scan import ScanConfig

__all__ = ["Range", "Choice", "RANGES", "CHOICES", "MAX_FRAME_S", "Scenario", "draw_scenario",
           "draw_scenarios", "scenario_rng"]

LOG_DECADE = 10.0  # high / low at or above which a range is drawn log-uniformly
MAX_FRAME_S = 8.0  # dwell is capped so that one frame takes at most this long (see draw_scenario)
_STREAM = 0x5CE7  # id of the scenario random stream (distinct from simulator._util.STREAMS)
#: La on Sr in the matrix's SrTiO3 (La-doped SrTiO3, 1-5 % in the STEM literature): a perfect
#: crystal moving by more than half a period between frames is ambiguous for any tracker; real
#: specimens carry dopants, vacancies and contamination that tell the lattice translations apart
SRTIO3_LA_FRACTION = 0.02


@dataclass(frozen=True)
class Range:
    """A continuous parameter's span. ``low``/``high`` in ``unit``; ``log_uniform``: drawn
    uniformly in log (only for low > 0); ``source``: where the range comes from;
    ``inferred``: True where the numbers are typical values we infer, not quoted."""

    low: float
    high: float
    unit: str
    log_uniform: bool
    source: str
    inferred: bool = False

    def draw(self, rng: np.random.Generator, high: float | None = None) -> float:
        """One value in [low, high] (``high`` may be lowered for this draw)."""
        hi = self.high if high is None else min(self.high, high)
        if self.log_uniform:
            return float(math.exp(rng.uniform(math.log(self.low), math.log(hi))))
        return float(rng.uniform(self.low, hi))

    def contains(self, value: float) -> bool:
        return self.low <= value <= self.high


@dataclass(frozen=True)
class Choice:
    """A discrete parameter: ``options`` drawn with ``weights`` (None: equal)."""

    options: tuple
    source: str
    weights: tuple[float, ...] | None = None
    inferred: bool = False

    def draw(self, rng: np.random.Generator):
        p = None if self.weights is None else np.asarray(self.weights, float) / sum(self.weights)
        return self.options[int(rng.choice(len(self.options), p=p))]


_JN = "Jones & Nellist 2013 (Microsc. Microanal. 19, 1050)"
_OCN = "Ophus, Ciston & Nelson 2016 (Ultramicroscopy 162, 1)"
_SL = "Sang & LeBeau 2014 (Ultramicroscopy 138, 28)"
_SAV = "Savitzky et al. 2018 (Ultramicroscopy 191, 56)"
_YAN = "Yankovich et al. 2014 (Nat. Commun. 5, 4155)"
_ROC = "Roccapriore et al. 2020 (arXiv:2009.05635)"

#: Every continuous drift and scan parameter the matrix draws (docs/drift-ranges.md).
RANGES: dict[str, Range] = {
    "drift_nm_per_min": Range(0.3, 20.0, "nm/min", True, f"{_SL}; {_OCN}; {_JN}; {_SAV}"),
    "drift_direction_rad": Range(0.0, 2.0 * math.pi, "rad", False, "isotropic: no preferred direction"),
    "ou_sigma_pm": Range(5.0, 60.0, "pm", True, f"{_JN}; {_YAN}; {_SAV}", inferred=True),
    "ou_tau_s": Range(0.3, 10.0, "s", True, f"{_JN}; {_OCN}", inferred=True),
    "mains_pm": Range(0.0, 30.0, "pm", False, f"{_JN}; {_SL}"),
    "flyback_pm": Range(0.0, 30.0, "pm", False, f"{_JN}; {_OCN}", inferred=True),
    "flyback_tau_us": Range(5.0, 100.0, "us", True, f"{_JN}; {_OCN}", inferred=True),
    "flyback_time_us": Range(20.0, 200.0, "us", True, f"{_JN}; vendor scan generators", inferred=True),
    "line_jitter_pm": Range(0.0, 5.0, "pm", False, f"{_JN}; {_YAN}", inferred=True),
    "frame_gap_s": Range(0.0, 0.5, "s", False, f"{_SAV}; {_ROC}", inferred=True),
    "dwell_us": Range(0.5, 20.0, "us", True, f"{_SL}; {_SAV}; {_YAN}; {_ROC}"),
    "pixel_pm": Range(5.0, 30.0, "pm", False, f"{_YAN}; {_SAV}; {_ROC}"),
    "dose_factor": Range(0.3, 3.0, "x preset dose", True, "dose-limited to dose-rich imaging", inferred=True),
    "jump_nm": Range(0.1, 2.0, "nm", True, f"{_JN}; {_SAV}", inferred=True),
    "jump_at": Range(0.3, 0.7, "fraction of the session", False, "mid-session, so frames before and after"),
}

#: The discrete parameters.
CHOICES: dict[str, Choice] = {
    "specimen": Choice(("graphene", "srtio3", "mos2"), "issue #30: the crystal presets"),
    "mains_hz": Choice((50.0, 60.0), "mains grid frequency (Europe/Asia 50 Hz, Americas 60 Hz)"),
    "mains_on": Choice((True, False), "a well-shielded room shows no mains line", (0.85, 0.15), inferred=True),
    # 256-1024 px; powers of two as scan generators offer them, weighted to small frames for time
    "size": Choice((256, 512, 1024), "256-1024 px in-line acquisition", (0.6, 0.25, 0.15)),
    "jump": Choice((False, True), "a sudden specimen/stage jump in some sessions", (0.8, 0.2), inferred=True),
}


@dataclass(frozen=True)
class Scenario:
    """One drawn microscope: units as in the field names (nm, pm, s, us); ``seed`` seeds the
    simulator session; ``jump_nm`` 0 = no jump, else at ``jump_at`` of the session."""

    index: int
    seed: int
    specimen: str
    size: int
    pixel_pm: float
    dwell_us: float
    flyback_time_us: float
    dose_factor: float
    drift_nm_per_min: float
    drift_direction_rad: float
    ou_sigma_pm: float
    ou_tau_s: float
    mains_pm: float
    mains_hz: float
    flyback_pm: float
    flyback_tau_us: float
    line_jitter_pm: float
    frame_gap_s: float
    jump_nm: float = 0.0
    jump_direction_rad: float = 0.0
    jump_at: float = 0.5

    def to_dict(self) -> dict:
        """Plain JSON-able dict (rounded floats)."""
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    @property
    def frame_time_s(self) -> float:
        """Scan time of one frame plus the gap to the next (s)."""
        return self.size * (self.size * self.dwell_us + self.flyback_time_us) * 1e-6 + self.frame_gap_s

    def config(self, frames: int = 25, *, noise: bool = True) -> MicroscopeConfig:
        """The simulator configuration of this scenario for a session of ``frames`` frames
        (the jump, if any, falls at ``jump_at`` of that session)."""
        drift = DriftConfig(
            drift_nm_per_min=self.drift_nm_per_min, direction_rad=self.drift_direction_rad,
            ou_sigma_nm=self.ou_sigma_pm * 1e-3, ou_tau_s=self.ou_tau_s,
            jitter_amp_nm=self.mains_pm * 1e-3, jitter_hz=self.mains_hz,
            jump_nm=self.jump_nm, jump_time_s=self.jump_at * frames * self.frame_time_s,
            jump_direction_rad=self.jump_direction_rad)
        scan = ScanConfig(flyback_amp_nm=self.flyback_pm * 1e-3, flyback_tau_us=self.flyback_tau_us,
                          line_jitter_nm=self.line_jitter_pm * 1e-3)
        return MicroscopeConfig(
            preset=self.specimen, size=self.size, pixel_size_nm=self.pixel_pm * 1e-3, dwell_us=self.dwell_us,
            flyback_us=self.flyback_time_us, frame_gap_s=self.frame_gap_s, noise=noise,
            dose_e_per_A2=self.dose_factor * PRESET_DEFAULTS[self.specimen]["dose_e_per_A2"],
            seed=self.seed, drift=drift, scan=scan,
            si_fraction=SRTIO3_LA_FRACTION if self.specimen == "srtio3" else None)

    def with_(self, **changes) -> Scenario:
        """A copy with fields changed (tests, hand-made scenarios)."""
        return replace(self, **changes)


def scenario_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of scenario ``index`` of matrix ``seed``."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, _STREAM, int(index)])


def draw_scenario(seed: int, index: int) -> Scenario:
    """Scenario ``index`` of the matrix seeded ``seed``: every parameter drawn from ``RANGES`` /
    ``CHOICES``. The dwell is drawn below min(20 us, MAX_FRAME_S / size^2): no one scans a
    1024 px frame for 20 s in-line; at 256 and 512 px the cap is above the range."""
    rng = scenario_rng(seed, index)
    r, c = RANGES, CHOICES
    size = int(c["size"].draw(rng))
    out = {
        "index": int(index), "seed": int(rng.integers(0, 2**31 - 1)),
        "specimen": str(c["specimen"].draw(rng)), "size": size,
        "pixel_pm": r["pixel_pm"].draw(rng),
        "dwell_us": r["dwell_us"].draw(rng, high=MAX_FRAME_S / size**2 * 1e6),
        "flyback_time_us": r["flyback_time_us"].draw(rng),
        "dose_factor": r["dose_factor"].draw(rng),
        "drift_nm_per_min": r["drift_nm_per_min"].draw(rng),
        "drift_direction_rad": r["drift_direction_rad"].draw(rng),
        "ou_sigma_pm": r["ou_sigma_pm"].draw(rng), "ou_tau_s": r["ou_tau_s"].draw(rng),
    }
    mains_pm, mains_hz, mains_on = r["mains_pm"].draw(rng), float(c["mains_hz"].draw(rng)), c["mains_on"].draw(rng)
    out.update(mains_pm=mains_pm if mains_on else 0.0, mains_hz=mains_hz,
               flyback_pm=r["flyback_pm"].draw(rng), flyback_tau_us=r["flyback_tau_us"].draw(rng),
               line_jitter_pm=r["line_jitter_pm"].draw(rng), frame_gap_s=r["frame_gap_s"].draw(rng))
    jump_nm, jump_dir, jump_at = r["jump_nm"].draw(rng), float(rng.uniform(0.0, 2.0 * math.pi)), r["jump_at"].draw(rng)
    if c["jump"].draw(rng):
        out.update(jump_nm=jump_nm, jump_direction_rad=jump_dir, jump_at=jump_at)
    return Scenario(**out)


def draw_scenarios(n: int, seed: int) -> list[Scenario]:
    """``n`` scenarios of the matrix seeded ``seed`` (drawn before anything is measured)."""
    return [draw_scenario(seed, i) for i in range(int(n))]
