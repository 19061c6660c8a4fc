"""``stem-live batch``: many recordings replayed through the engine on a Dask cluster, with
drift-corrected averages and a summary (docs/batch.md).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from stem_live.cli.common import UserError, frame_timing_args, positive


def cmd_batch(a: argparse.Namespace) -> int:
    from stem_live.batch import expand_inputs
    from stem_live.batch.job import BatchOptions
    from stem_live.batch.runner import run_batch

    if a.rvae is not None and not a.rvae.is_file():
        raise UserError(f"--rvae {a.rvae}: no such checkpoint file")
    try:
        inputs = expand_inputs(a.inputs, exclude=a.out)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    opts = BatchOptions(pixel_size_nm=a.pixel_size_nm, dwell_us=a.dwell_us, flyback_us=a.flyback_us,
                        frame_period_s=a.frame_period_s, frame_gap_us=a.frame_gap_us,
                        rvae="" if a.rvae is None else str(a.rvae))
    if not getattr(a, "verbose", False):  # Dask's own start/stop messages only with -v
        quiet_dask()
    print(f"{len(inputs)} inputs -> {a.out}", file=sys.stderr)
    rows = run_batch(inputs, a.out, options=opts, workers=a.workers, scheduler=a.scheduler)
    failed = [r for r in rows if r.get("status") != "ok"]
    print(f"{len(rows) - len(failed)} ok, {len(failed)} failed -> {a.out / 'summary.csv'}", file=sys.stderr)
    return 1 if failed else 0


def quiet_dask() -> None:
    """Dask's loggers (``distributed.*``) to WARNING: its start/stop messages are not the user's."""
    try:
        import distributed  # noqa: F401  (its loggers get their levels on import)
    except ImportError:
        pass
    for name in list(logging.root.manager.loggerDict):
        if name == "distributed" or name.startswith("distributed."):
            logging.getLogger(name).setLevel(logging.WARNING)


def add_parser(sub) -> None:
    """Add this module's command(s) to the ``stem-live`` subparsers ``sub``."""
    s = sub.add_parser("batch", help="replay many recordings on a Dask cluster: results, drift-corrected averages, "
                                     "columns, summary.csv")
    s.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files, folders (searched recursively) or globs (quote them) of recordings replay reads")
    s.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="output folder: DIR/NAME/ per input and DIR/summary.csv; inputs done there are skipped")
    s.add_argument("--workers", type=positive(int), default=2,
                   help="worker processes of the local cluster (one thread each)")
    s.add_argument("--scheduler", default=None, metavar="tcp://HOST:8786",
                   help="an existing Dask scheduler to use instead of a local cluster")
    s.add_argument("--rvae", type=Path, default=None, metavar="CHECKPOINT",
                   help="encode every column with this rVAE checkpoint")
    s.add_argument("--pixel-size-nm", type=positive(float), default=None)
    s.add_argument("--dwell-us", type=positive(float), default=None)
    s.add_argument("--flyback-us", type=float, default=None)
    frame_timing_args(s)
    s.set_defaults(func=cmd_batch)
