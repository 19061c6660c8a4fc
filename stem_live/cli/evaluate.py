"""``stem-live evaluate``: simulator + engine scored against the truth (JSON report).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from stem_live.cli.common import Progress, positive, sim_args


def cmd_evaluate(a: argparse.Namespace) -> int:
    from stem_live.lab.evaluate import evaluate

    prog = Progress()
    report = evaluate(preset=a.preset, size=a.size, frames=a.count,
                      drift_nm_per_min=3.0 if a.drift_nm_per_min is None else a.drift_nm_per_min,
                      dose=a.dose, seed=a.seed, model=a.model, jump_nm=a.jump_nm, baseline=not a.no_baseline,
                      calibration="" if a.calibration is None else str(a.calibration),
                      progress=lambda label, i, n: prog.line(f"{label}: frame {i}/{n}"))
    if a.rvae:
        from stem_live.lab.rvae_eval import eval_dopants, eval_particles

        prog.line("rVAE: training and scoring on the particles and graphene presets ...")
        scores = (eval_particles(seed=a.seed, train_seconds=300) if a.preset == "particles" else
                  eval_dopants(seed=a.seed) if a.preset == "graphene" else {})
        # dotted keys -> the report's nesting: "rvae.dopant_auc" is report["rvae"]["dopant_auc"]
        report["rvae"] = {k.split(".", 1)[1]: v for k, v in scores.items() if k.startswith("rvae.")} or \
            {"note": "scored on --preset particles (angle) and --preset graphene (dopants)"}
    prog.done()
    text = json.dumps(report, indent=1)
    print(text)
    if a.json:
        Path(a.json).write_text(text + "\n")
    return 0


def add_parser(sub) -> None:
    """Add this module's command(s) to the ``stem-live`` subparsers ``sub``."""
    s = sub.add_parser("evaluate", help="simulator + engine with ground truth; JSON report")
    sim_args(s)
    s.add_argument("--frames", dest="count", type=positive(int), default=100)
    s.add_argument("--model", choices=("rigid", "gp"), default="rigid",
                   help="drift model: rigid registration, or columns + online GP")
    s.add_argument("--jump-nm", type=float, default=0.0, help="a sudden specimen jump of this size (at 10 s)")
    s.add_argument("--no-baseline", action="store_true", help="skip the baseline tracker run")
    s.add_argument("--rvae", action="store_true",
                   help="also train and score the rVAE (particles: angle recovery; graphene: Si dopants)")
    s.add_argument("--json", type=Path, default=None, help="also write the report here")
    s.add_argument("--calibration", type=Path, default=None, metavar="JSON",
                   help="engine uses this `stem-live calibrate` result (with --model gp)")
    s.set_defaults(func=cmd_evaluate)
