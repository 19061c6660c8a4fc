"""``stem-live locate``: atomic columns of an image or stack -> CSV/npz + overlay PNG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stem_live.cli.common import Progress, UserError, positive


def _load_images(path: Path):
    """The (N, H, W) images of any file ``replay`` reads (TIFF, .npy, vendor files); the pixel size,
    dwell and flyback are not needed for locating."""
    from stem_live.io import RecordError, read_images

    try:
        return read_images(path)
    except (RecordError, OSError) as exc:
        raise UserError(str(exc).splitlines()[0] if str(exc) else f"cannot read {path}") from None


def cmd_locate(a: argparse.Namespace) -> int:
    import numpy as np

    from stem_live.io.columns import overlay_rgb, write_columns, write_png
    from stem_live.locate import estimate_spacing, locate_classical

    stack = _load_images(a.file)
    flyback = None
    if a.flyback_px is not None:
        from stem_live.locate.flyback import check

        try:
            flyback = check(a.flyback_px)
        except ValueError:
            amp, decay = a.flyback_px
            raise UserError(f"--flyback-px {amp:g} {decay:g}: two finite numbers, and the decay must be > 0 "
                            f"and larger than |amplitude| (amplitude = flyback_amp_nm / pixel size, decay = "
                            f"flyback_tau_us / dwell, from `stem-live calibrate`)") from None
    params = None
    if a.locator == "unet":
        from stem_live.locate.unet import THRESHOLD, calibrated_threshold, load_default, load_params, locate_unet

        try:
            params = load_params(a.weights) if a.weights else load_default()
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load U-Net weights: {exc}") from None
        net_threshold = THRESHOLD
        if a.weights:
            net_threshold = calibrated_threshold(a.weights)
            if net_threshold is None:
                net_threshold = THRESHOLD
                print(f"note: no metrics.json with a calibrated threshold beside {a.weights}: using the committed "
                      f"weights' {THRESHOLD:g}", file=sys.stderr)
    out = a.out or a.file.with_name(a.file.stem + "_columns.csv")
    png = a.png or out.with_suffix(".png")
    prog = Progress()
    spacing = a.spacing_px or estimate_spacing(np.asarray(stack[0], dtype=np.float32))
    for k, img in enumerate(stack):
        if not np.isfinite(np.asarray(img)).all():  # before any output: no half-written file
            raise UserError(f"{a.file}: frame {k} holds NaN or infinite pixels")

    def locate_one(img, prior=None, flyback_px=flyback):
        if a.locator == "unet":
            return locate_unet(img, spacing, params=params, n_classes=a.classes, threshold=net_threshold,
                               flyback_px=flyback_px, prior=prior)
        return locate_classical(img, spacing, n_classes=a.classes, threshold=a.threshold, flyback_px=flyback_px,
                                prior=prior)

    tracked = None
    if a.tracked and len(stack) > 1:  # every frame with all the others as its prior (two passes)
        from stem_live.lattice_prior import locate_stack

        # no calibrated flyback given: measured from the stack (the columns drift across it)
        tracked = locate_stack([np.asarray(img, dtype=np.float32) for img in stack], spacing, locate_one,
                               fit_flyback=flyback is None,
                               progress=lambda k, n: prog.line(f"tracked: locate {k}/{n}"))
        if flyback is None:
            fb = tracked[0].meta.get("flyback_px")
            prog.done()
            print("flyback measured from the stack: none significant" if fb is None else
                  f"flyback measured from the stack: {fb[0]:.3g} px decaying over {fb[1]:.3g} px "
                  f"(--flyback-px {fb[0]:.3g} {fb[1]:.3g})", file=sys.stderr)
    total = 0
    for k, img in enumerate(stack):
        # with --tracked the frames are located already: only frame 0 is needed again (the overlay)
        img = np.asarray(img, dtype=np.float32) if tracked is None or k == 0 else None
        cols = tracked[k] if tracked is not None else locate_one(img)
        if out.suffix.lower() == ".npz" and len(stack) > 1:
            write_columns(out.with_name(f"{out.stem}_{k:05d}.npz"), cols, frame=k)
        else:
            write_columns(out, cols, frame=k)
        if k == 0:
            write_png(png, overlay_rgb(img, cols))
        total += len(cols)
        prog.line(f"frame {k + 1}/{len(stack)}: {len(cols)} columns (spacing {spacing:.1f} px)")
    prog.done()
    print(f"{total} columns in {len(stack)} frame(s) -> {out}; overlay of frame 0 -> {png}", file=sys.stderr)
    return 0


def add_parser(sub) -> None:
    """Add this module's command(s) to the ``stem-live`` subparsers ``sub``."""
    s = sub.add_parser("locate", help="find atomic columns in an image or stack: CSV/npz + overlay PNG")
    s.add_argument("file", type=Path, help=".npy or .tif image or stack")
    s.add_argument("--out", type=Path, default=None, help="positions file (.csv or .npz); default FILE_columns.csv")
    s.add_argument("--png", type=Path, default=None, help="overlay PNG (default: next to --out)")
    s.add_argument("--spacing-px", type=positive(float), default=None,
                   help="nearest-neighbour column spacing in px (default: estimated from the image)")
    s.add_argument("--classes", type=positive(int), default=1, help="intensity classes (e.g. 2: C/Si, 3: SrTiO3)")
    s.add_argument("--threshold", type=positive(float), default=1.0, help="detection threshold in noise units")
    s.add_argument("--locator", choices=("classical", "unet"), default="classical",
                   help="classical (band-pass + fit) or the U-Net (committed weights)")
    s.add_argument("--weights", type=Path, default=None, help="U-Net weights (default: the committed ones)")
    s.add_argument("--flyback-px", type=float, nargs=2, default=None, metavar=("AMP", "DECAY"),
                   help="the scan's flyback in fast-scan pixels: x displacement AMP * exp(-j / DECAY) at pixel j "
                        "(from `stem-live calibrate`: flyback_amp_nm / pixel size, flyback_tau_us / dwell); the "
                        "columns cut by the left edge are then fitted on the distorted scan")
    s.add_argument("--tracked", action="store_true",
                   help="a stack of one area: locate every frame with the lattice of all the other frames as its "
                        "prior (two passes; more precise positions; a column that moved gets none); without "
                        "--flyback-px the flyback is measured from the stack where it drifts")
    s.set_defaults(func=cmd_locate)
