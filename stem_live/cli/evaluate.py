"""``stem-live evaluate``: simulator + engine scored against the truth (JSON report).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from stem_live.cli.common import Progress, check_memory, contrast_arg, positive, sim_args


def cmd_evaluate(a: argparse.Namespace) -> int:
    from stem_live.lab.evaluate import evaluate

    prog = Progress()
    if a.matrix:
        return _matrix(a, prog)
    # the simulator and the engine hold ~100 bytes a pixel of a frame (6.3 GB at 8192 px)
    check_memory(100 * a.size ** 2, f"evaluate --size {a.size}", "use a smaller --size")
    report = evaluate(preset=a.preset, size=a.size, frames=a.count,
                      drift_nm_per_min=3.0 if a.drift_nm_per_min is None else a.drift_nm_per_min,
                      dose=a.dose, seed=a.seed, model=a.model, jump_nm=a.jump_nm, baseline=not a.no_baseline,
                      calibration="" if a.calibration is None else str(a.calibration),
                      detector=a.detector, locator=a.locator, contrast=a.contrast, trajectory=a.trajectory,
                      strips=a.strips,
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
    print(summary(report), file=sys.stderr)
    return 0


def _matrix(a: argparse.Namespace, prog: Progress) -> int:
    """``--matrix N``: N drawn scenarios (``stem_live.lab.matrix``); one progress line each."""
    from stem_live.lab.matrix import run_matrix

    report = run_matrix(a.matrix, a.seed, model=a.model, progress=prog.line, strips=a.strips)
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
    s.add_argument("--trajectory", action="store_true",
                   help="gp model: each correction carries the drift over the next frame as a path the simulated "
                        "scan follows line by line (closed_loop.residual_line_rms_nm shows what it takes out)")
    s.add_argument("--strips", type=positive(int), default=0, metavar="K",
                   help="gp model: the simulator sends every frame as strips of K lines and the engine corrects "
                        "after each with a path (strip_loop); the frame-level loop runs beside it (frame_level.*)")
    s.add_argument("--rvae", action="store_true",
                   help="also train and score the rVAE (particles: angle recovery; graphene: Si dopants)")
    s.add_argument("--matrix", type=positive(int), default=0, metavar="N",
                   help="N scenarios drawn (with --seed) from the literature ranges of drift and scan "
                        "(simulator/ranges.py, docs/drift-ranges.md), each run open loop, closed loop and "
                        "baseline; --preset/--size/--frames/--dose/--drift-nm-per-min are ignored")
    s.add_argument("--detector", choices=("haadf", "abf", "bf"), default="haadf",
                   help="simulated detector: haadf (bright columns, default), abf or bf (dark columns; "
                        "docs/simulator.md)")
    s.add_argument("--locator", choices=("classical", "unet"), default="classical",
                   help="the locator scored in columns.* (unet: the committed weights)")
    contrast_arg(s)
    s.add_argument("--json", type=Path, default=None, help="also write the report here")
    s.add_argument("--calibration", type=Path, default=None, metavar="JSON",
                   help="engine uses this `stem-live calibrate` result (with --model gp)")
    s.set_defaults(func=cmd_evaluate)


def summary(report: dict) -> str:
    """A few lines a person reads beside the JSON: the image motion closed loop against open
    loop, the baseline tracker and the oracle floor (pm); the columns' error against the
    Cramer-Rao bound; the drift model's error."""
    def pm(nm: float | None) -> str:
        return "n/a" if nm is None else f"{nm * 1e3:.1f} pm"

    ol, cl = report.get("open_loop", {}), report.get("closed_loop", {})
    base = (report.get("baseline") or {}).get("residual_rms_nm")
    floor = cl.get("oracle_floor_nm")
    closed, opened = cl.get("residual_rms_nm"), ol.get("residual_rms_nm")
    lines = [f"image motion RMS: closed loop {pm(closed)}, open loop {pm(opened)}"
             + (f" ({closed / opened:.0%} of it)" if closed is not None and opened else "")
             + f", baseline tracker {pm(base)}, oracle floor {pm(floor)}"]
    fl = report.get("frame_level")
    if fl:
        st = report.get("strips", {})
        lines.append(f"  strips of {st.get('lines')} lines: per line {pm(cl.get('residual_line_rms_nm'))} against the "
                     f"frame-level loop's {pm(fl.get('residual_line_rms_nm'))}; frame mean {pm(closed)} against "
                     f"{pm(fl.get('residual_rms_nm'))}; strip to correction p99 "
                     f"{st.get('latency_ms', {}).get('p99')} ms")
    if closed is not None and base:
        lines.append(f"  closed loop vs baseline: {'better' if closed < base else 'WORSE'} "
                     f"({closed / base:.2f}x the baseline's motion)")
    cols = report.get("columns") or {}
    if "rmse_px" in cols:
        bound = cols.get("crlb_px")
        ratio = f", {cols['rmse_px'] / bound:.1f}x the Cramer-Rao bound {bound:.3f} px" if bound else ""
        lines.append(f"columns: recall {cols.get('recall')}, precision {cols.get('precision')}, "
                     f"position RMSE {cols['rmse_px']:.3f} px ({cols.get('rmse_pm')} pm){ratio}")
    drift = report.get("drift") or {}
    if "rmse_pm" in drift:
        lines.append(f"drift model: RMSE {drift['rmse_pm']} pm per scan line (open loop, after one constant offset)")
    return "\n".join(lines)
