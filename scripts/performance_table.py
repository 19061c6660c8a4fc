"""Run the benchmarks, a short ``stem-live evaluate`` and a calibration; write docs/performance.md.

    .venv/bin/python scripts/performance_table.py            # full: about 10 min on 2 cores
    .venv/bin/python scripts/performance_table.py --quick    # small sizes, a few minutes
    .venv/bin/python scripts/performance_table.py --out /tmp/perf.md

Every figure in docs/performance.md comes from this script: the page says when and on which
machine (CPU model, cores, GPU) it ran, and the exact commands. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = "cal/"  # `calibrate --out`: a temporary folder at run time, "cal/" on the page

# (label, arguments after `stem-live`)
FULL = [("protocol", "bench protocol --size 512 2048"), ("register", "bench register --size 512 2048"),
        ("locate", "bench locate --size 512 1024"), ("track", "bench track --size 512 1024"), ("gp", "bench gp"),
        ("rvae", "bench rvae"), ("pipeline", "bench pipeline --size 512 1024 --seconds 30"),
        ("overload", "bench overload --size 512 --seconds 30"), ("startup", "bench startup"),
        ("strips", "bench strips --size 512 --lines 64"),
        ("evaluate", "evaluate --preset graphene --size 512 --frames 30 --model gp --seed 0"),
        ("calibrate", f"calibrate --preset srtio3 --frames 60 --out {OUT_DIR}")]
QUICK = [("protocol", "bench protocol --size 256"), ("register", "bench register --size 256"),
         ("locate", "bench locate --size 256"), ("track", "bench track --size 256"),
         ("pipeline", "bench pipeline --size 256 --seconds 5"),
         ("evaluate", "evaluate --preset graphene --size 256 --frames 10 --model gp --seed 0 --no-baseline"),
         ("calibrate", f"calibrate --preset srtio3 --size 256 --frames 10 --out {OUT_DIR}")]
EVAL_KEYS = [  # (dotted key of the evaluate report, number format)
    ("drift.rmse_pm", ".2f"), ("open_loop.residual_rms_nm", ".4f"), ("closed_loop.residual_rms_nm", ".4f"),
    ("closed_loop.ratio_to_open_loop", ".4f"), ("closed_loop.oracle_floor_nm", ".4f"),
    ("baseline.residual_rms_nm", ".4f"), ("engine_fps", ".1f"), ("gp.update_ms.median", ".1f"),
    ("gp.update_ms.max", ".1f"), ("columns.recall", ".4f"), ("columns.precision", ".4f"), ("columns.rmse_px", ".4f"),
    ("columns.crlb_px", ".4f"), ("columns.rmse_inner_px", ".4f"), ("columns.rmse_border_px", ".4f"),
    ("columns.border_fraction", ".4f"), ("columns.tracked_rmse_px", ".4f"),
    ("columns.tracked_rmse_second_half_px", ".4f"), ("columns.tracked_flyback_px", ".4g"),
    ("columns.stack_recall", ".4f"), ("columns.stack_precision", ".4f"), ("columns.stack_rmse_px", ".4f"),
    ("columns.stack_flyback_px", ".4g"), ("columns.locate_ms", ".1f"), ("wall_s", ".0f"),
]
CAL_ROWS = [  # (quantity, key, index or None, relative-error key or None)
    ("scale error y", "scale_error", 0, "scale_y"), ("scale error x", "scale_error", 1, "scale_x"),
    ("shear (x per y)", "shear", None, "shear"), ("flyback amplitude (nm)", "flyback_amp_nm", None, "flyback_amp"),
    ("flyback decay (us)", "flyback_tau_us", None, None),
    ("drift velocity (y, x) nm/s", "velocity_nm_per_s", None, "velocity"),
]
LOCATORS = {"classical": "classical locator", "classical_tracked": "classical locator with the lattice prior",
            "unet": "U-Net locator", "atomap": "atomap 2-D Gaussian refinement (time scaled to all columns)"}
PER_FRAME = {"protocol": "protocol encode + decode, one frame",
             "register": "rigid registration + prediction (engine `--model rigid`), per frame",
             "track": "column tracking (`Tracker.update`), per frame"}


def stem_live() -> list[str]:
    """The `stem-live` command of this interpreter: its console script, else ``-m stem_live.cli``."""
    script = Path(sys.executable).parent / "stem-live"
    return [str(script)] if script.exists() else [sys.executable, "-m", "stem_live.cli"]


def run(label: str, args: list[str], tmp: str) -> dict:
    """Run one command; its JSON report (stdout) as a dict. Its stderr (progress) passes through."""
    args = [tmp if a == OUT_DIR else a for a in args]
    print(f"[{time.strftime('%H:%M:%S')}] {label}: stem-live {' '.join(args)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(stem_live() + args, cwd=ROOT, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"performance_table: `stem-live {' '.join(args)}` failed with status {proc.returncode}")
    print(f"[{time.strftime('%H:%M:%S')}] {label}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return json.loads(proc.stdout)


def cpu() -> tuple[str, int]:
    model = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as fh:
            model = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), model)
    except OSError:
        pass
    return model, os.cpu_count() or 0


def f(v, fmt: str = ".1f") -> str:
    """A number (or a list of numbers) in ``fmt``; anything else as JSON."""
    if v is None:
        return "n/a"
    if isinstance(v, list) and fmt:
        return "[" + ", ".join(f(x, fmt) for x in v) + "]"
    return format(v, fmt) if fmt and isinstance(v, (int, float)) else json.dumps(v)


def ms(r: dict) -> str:
    return f"median {f(r.get('median_ms'), '.2f')} ms, p99 {f(r.get('p99_ms'), '.2f')} ms"


def bench_rows(label: str, r: dict) -> list[tuple[str, str]]:
    """(what, figure) rows of one `stem-live bench` report."""
    out = []
    if isinstance(r.get(label), dict) and "error" in r[label]:
        return [(label, f"not measured: {r[label]['error']}")]
    if label in PER_FRAME:
        for size, s in r[label].items():
            cols = f", {s['columns']} columns" if "columns" in s else ""
            out.append((f"{PER_FRAME[label]}, {size} px", ms(s) + cols))
    elif label == "locate":
        for loc, by_size in r["locate"].items():
            for size, s in ((k, v) for k, v in by_size.items() if "error" not in v):
                fig = (f"{ms(s)}; RMSE {f(s['rmse_px'], '.3f')} px, recall {f(s['recall'], '.4f')}, "
                       f"precision {f(s['precision'], '.4f')}" if "recall" in s else
                       f"median {f(s['median_ms'], '.0f')} ms, RMSE {f(s['rmse_px'], '.3f')} px")
                out.append((f"{LOCATORS.get(loc, loc)}, locate + refine, {size} px ({s.get('n_truth', '?')} columns)",
                            fig))
    elif label == "gp":
        g = r["gp"]
        out.append((f"GP stage per frame, {g['frames']} frames of {g['samples_per_frame']} columns",
                    (f"median {g['median_ms']} ms; frames ~100: median {g['median_ms_at_100']} / max "
                     f"{g['max_ms_at_100']} ms; last 100: median {g['median_ms_at_end']} / max "
                     f"{g['max_ms_at_end']} ms")))
    elif label == "rvae":
        v = r["rvae"]
        rate = f(v.get("encode_patches_per_s"), ",.0f")
        out.append(("rVAE encoder, 32x32 patches, batch 1024", f"{rate} patches/s"))
        out.append(("rVAE training step, batch 128", f"{f(v.get('train_patches_per_s'), ',.0f')} patches/s"))
        if "train_seconds" in v:
            out.append((f"rVAE training, {v.get('train_run')}", f"{f(v['train_seconds'])} s, compile included"))
    elif label == "pipeline":
        for size, p in r["pipeline"].items():
            st = ", ".join(f"{k} {v['median_ms']:.1f}" for k, v in p.get("stages", {}).items())
            out.append((f"pipeline, all stages, {size} px ({p['columns_per_frame']} columns/frame)",
                        (f"{p['fps']} frames/s at {p['offered_hz']} offered (capacity {p['capacity_fps']}); skipped "
                         f"{p['skipped']}, rVAE skipped {p['rvae_skipped']}; latency p50 {p['latency_p50_ms']} / "
                         f"p99 {p['latency_p99_ms']} ms (the stream's first frames included; the start: "
                         f"{(p.get('start') or {}).get('seconds')} s, {p.get('start_cost_frames')} frames skipped); "
                         f"stage medians (ms): {st}; memory {p['rss_growth_mb']:+} MB over {p['seconds']:.0f} s")))
    elif label == "startup":
        s = r["startup"]
        out.append((f"start to the first processed frame, `{s['command']}`, {s['size']} px",
                    f"cold {f(s['cold'].get('seconds'))} s, warm {f(s['warm'].get('seconds'))} s "
                    f"(median of {len(s['warm'].get('runs', [])) or 1})"))
    elif label == "strips":
        s = r["strips"]
        st = ", ".join(f"{k} {v}" for k, v in s["stages_ms"].items())
        out.append((f"strip loop, strip arrival to correction, {s['lines']}-line strips of {s['size']} px",
                    f"median {s['latency_ms']['median']} ms, p99 {s['latency_ms']['p99']} ms over "
                    f"{s['strips_timed']} strips; stage medians (ms): {st}"))
    elif label == "overload":
        o, t = r["overload"], r["overload"]["totals"]
        out.append((f"overload, {o['size']} px, frames at 5x capacity",
                    (f"capacity {o['engine_capacity_fps']} frames/s, published at {o['publish_rate_hz']} Hz: "
                     f"processed {t['processed']}, skipped {t['skipped']}, failed {t['failed']}, unaccounted "
                     f"{t['unaccounted']}; latency p99 {o['latency_p99_ms']} ms vs {o['unloaded_latency_p99_ms']} ms "
                     f"unloaded (x{o['latency_p99_ratio']}); memory {o['rss_growth_mb']:+} MB over "
                     f"{o['seconds']:.0f} s")))
    return out


def dotted(report: dict, key: str):
    for part in key.split("."):
        if not isinstance(report, dict) or part not in report:
            return None
        report = report[part]
    return report


def render(reports: dict, commands: dict, quick: bool, started: datetime, load: float) -> str:
    model, cores = cpu()
    m = next((r["machine"] for r in reports.values() if "machine" in r), {})
    lines = ["# Performance", "",
             ("Generated by `scripts/performance_table.py`" + (" `--quick`" if quick else "") + "; rerun it "
              "rather than edit this page. Timings depend on the machine and on its load (a shared machine varies "
              "by tens of per cent within an hour): compare figures from one machine and one run. What each "
              "figure means: README.md (`stem-live bench`, `stem-live evaluate`, `stem-live calibrate`)."), "",
             f"- date: {started:%Y-%m-%d %H:%M}",
             f"- machine: {model}, {cores} cores, GPU: {m.get('gpu') or 'none'}",
             f"- load average (1 min) before the run: {load:.2f} (other work on the machine; about 0 when idle)",
             (f"- software: Python {m.get('python', platform.python_version())}, JAX {m.get('jax', '?')}, "
              f"NumPy {m.get('numpy', '?')}, ZeroMQ {m.get('zmq', '?')}"),
             "", "## Timings (`stem-live bench`)", "", "| what | figure | command |", "|---|---|---|"]
    for label, r in reports.items():
        lines += [f"| {w} | {fig} | `{commands[label]}` |" for w, fig in bench_rows(label, r)]
    if "evaluate" in reports:
        lines += ["", "## Against the simulator's truth (`stem-live evaluate`)", "", f"`{commands['evaluate']}`", "",
                  "| key | value |", "|---|---|"]
        lines += [f"| `{k}` | {f(dotted(reports['evaluate'], k), fmt)} |" for k, fmt in EVAL_KEYS
                  if dotted(reports["evaluate"], k) is not None]
    if "calibrate" in reports:
        cal = reports["calibrate"]
        truth, rel = cal.get("truth", {}), cal.get("relative_error", {})
        lines += ["", "## Calibration on the simulator (`stem-live calibrate`)", "", f"`{commands['calibrate']}`", "",
                  "| quantity | true | recovered | relative error |", "|---|---|---|---|"]
        for name, key, i, rkey in CAL_ROWS:
            t, v = truth.get(key), cal.get(key)
            t, v = (t, v) if i is None else (t and t[i], v and v[i])
            r = rel.get(rkey) if rkey else None
            err = "" if r is None else f(100 * r, ".2g") + " %"
            lines.append(f"| {name} | {f(t, '.4g')} | {f(v, '.4g')} | {err} |")
    lines += ["", "## Commands", "", "```sh"] + [commands[k] for k in reports] + ["```", ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes and short runs")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "performance.md", help="default docs/performance.md")
    a = ap.parse_args()
    started, load0 = datetime.now(), os.getloadavg()[0]
    reports, commands = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, args in QUICK if a.quick else FULL:
            commands[label] = "stem-live " + args
            reports[label] = run(label, args.split(), str(Path(tmp) / "cal"))
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(render(reports, commands, a.quick, started, load0))
    print(f"performance table -> {a.out} ({(datetime.now() - started).seconds} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
