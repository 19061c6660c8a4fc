"""``stem-live locate``: atomic columns of an image or stack -> CSV/npz + overlay PNG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from stem_live.cli.common import Progress, UserError, check_memory, positive


def _load_images(path: Path):
    """The (N, H, W) images of any file ``replay`` reads (TIFF, .npy, vendor files); the pixel size,
    dwell and flyback are not needed for locating."""
    from stem_live.engine import frame_problem
    from stem_live.io import RecordError, read_images
    from stem_live.io.metadata import MIN_ANALYSIS_SIDE

    try:
        stack = read_images(path, min_side=MIN_ANALYSIS_SIDE)
    except (RecordError, OSError) as exc:
        raise UserError(str(exc).splitlines()[0] if str(exc) else f"cannot read {path}") from None
    for k, img in enumerate(stack):  # before any output: no half-written file
        problem = frame_problem(img, min_side=MIN_ANALYSIS_SIDE)
        if problem is not None:
            raise UserError(f"{path.name}: frame {k} cannot be located: {problem}")
    return stack


def _spacing(image, path: Path) -> float:
    """The column spacing measured on ``image``, or a UserError that says to give --spacing-px."""
    import numpy as np

    from stem_live.locate import estimate_spacing

    try:
        return float(estimate_spacing(np.asarray(image, dtype=np.float32)))
    except ValueError as exc:
        why = str(exc).split(", got")[-1].split(": give the column spacing")[0].strip()
        raise UserError(f"cannot measure the column spacing of {path.name} ({why}): give it with --spacing-px") from None


def check_locate_memory(shape: tuple[int, ...], spacing_px: float) -> None:
    """Refuse a spacing that leaves fewer than 2 columns a side, or a column fit that cannot fit
    in memory (chunks of up to 1,024 windows of about 0.7 spacing a side, float32, ~16 arrays each)."""
    side = min(shape[-2:])
    if spacing_px > side / 2:
        raise UserError(f"--spacing-px {spacing_px:g} leaves fewer than 2 columns across the {side} px image: "
                        f"give the nearest-neighbour spacing in pixels (or leave it out to measure it)")
    window = 2 * max(2, round(0.35 * spacing_px)) + 1
    columns = min(1024, max(1, shape[-2] * shape[-1] / spacing_px ** 2))
    check_memory(int(columns * window ** 2 * 4 * 16), f"locating columns {spacing_px:g} px apart",
                 "give a smaller --spacing-px")


def cmd_locate(a: argparse.Namespace) -> int:
    import numpy as np

    from stem_live.io.columns import overlay_rgb, write_columns, write_png
    from stem_live.locate import locate_classical

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

        if a.weights and not a.weights.is_file():
            raise UserError(f"no U-Net weights at {a.weights}: train them with `stem-live train-locator`, "
                            f"or leave --weights out for the committed ones")
        try:
            params = load_params(a.weights) if a.weights else load_default()
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot load U-Net weights ({str(exc).split(': train')[0]}): train them with "
                            f"`stem-live train-locator`") from None
        net_threshold = THRESHOLD
        if a.weights:
            net_threshold = calibrated_threshold(a.weights)
            if net_threshold is None:
                net_threshold = THRESHOLD
                print(f"note: no metrics.json with a calibrated threshold beside {a.weights}: using the committed "
                      f"weights' {THRESHOLD:g}", file=sys.stderr)
    out = a.out or Path.cwd() / (a.file.stem + "_columns.csv")  # the current folder, never beside the input
    png = a.png or out.with_suffix(".png")
    prog = Progress()
    stack = _bright_columns(stack, a.contrast)
    spacing = a.spacing_px or _spacing(stack[0], a.file)
    check_locate_memory(stack.shape, spacing)
    for k, img in enumerate(stack):
        if not np.isfinite(np.asarray(img)).all():  # before any output: no half-written file
            raise UserError(f"{a.file}: frame {k} holds NaN or infinite pixels")

    def locate_one(img, prior=None, flyback_px=flyback):
        if a.locator == "unet":
            return locate_unet(img, spacing, params=params, n_classes=a.classes, threshold=net_threshold,
                               flyback_px=flyback_px, prior=prior)
        return locate_classical(img, spacing, n_classes=a.classes, threshold=a.threshold, flyback_px=flyback_px,
                                prior=prior, **DENOISE[a.denoise])

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
    results = [tracked[k] if tracked is not None else locate_one(np.asarray(img, dtype=np.float32))
               for k, img in enumerate(stack)]
    gated = _quality_gate(stack, results, spacing, a.file) if a.quality_gate else set()
    unsure = _unsure(stack, results, spacing, gated, a)
    total = 0
    first = min(set(range(len(stack))) - gated)
    for k, img in enumerate(stack):
        if k in gated:
            continue
        img = np.asarray(img, dtype=np.float32) if k == first else None  # the overlay's frame
        cols = results[k]
        if out.suffix.lower() == ".npz" and len(stack) > 1:
            write_columns(out.with_name(f"{out.stem}_{k:05d}.npz"), cols, frame=k, unsure=k in unsure)
        else:
            write_columns(out, cols, frame=k, unsure=k in unsure)
        if k == first:
            write_png(png, overlay_rgb(img, cols))
        total += len(cols)
        prog.line(f"frame {k + 1}/{len(stack)}: {len(cols)} columns (spacing {spacing:.1f} px)")
    prog.done()
    print(f"{total} columns in {len(stack) - len(gated)} frame(s) -> {out}; overlay of frame {first} -> {png}",
          file=sys.stderr)
    return 0


#: ``--denoise``: the classical locator's spectral denoiser and its residual pass
DENOISE = {"auto": {"wiener": 2.0, "residual_pass": True},   # denoiser + the columns it lost beside bright ones
           "on": {"wiener": 2.0, "residual_pass": False},    # the lattice-periodic denoiser alone
           "off": {"wiener": None, "residual_pass": False}}  # the plain band-pass


def _bright_columns(stack, contrast: str):
    """``stack`` with bright columns: inverted for --contrast dark; for auto, as
    ``locate.contrast.decide_contrast`` decides from frame 0 (said on stderr)."""
    from stem_live.locate.contrast import as_bright, decide_contrast

    if contrast == "auto":
        contrast, why = decide_contrast(stack[0])
        print(f"--contrast auto: {why}", file=sys.stderr)
    return as_bright(stack, contrast) if contrast == "dark" else stack


def _unsure(stack, results, spacing: float, gated: set[int], a: argparse.Namespace) -> dict[int, str]:
    """{frame: reason} of the frames whose column list the locator is not sure of
    (``locate.unsure.unsure_reason``: few columns for the area they occupy, or with
    --cross-check the other locator's list of the frame disagreeing); said in one line on
    stderr (the first frame's reason and how many frames)."""
    import numpy as np

    from stem_live.locate.unsure import unsure_reason

    other_name = "the U-Net" if a.locator == "classical" else "the classical locator"
    found = {}
    for k, (img, cols) in enumerate(zip(stack, results)):
        if k in gated:
            continue
        img = np.asarray(img, dtype=np.float32)
        other = None
        if a.cross_check:
            if a.locator == "classical":
                from stem_live.locate.unet import locate_unet

                other = locate_unet(img, spacing).positions
            else:
                from stem_live.locate import locate_classical

                other = locate_classical(img, spacing, **DENOISE[a.denoise]).positions
        why = unsure_reason(cols.positions, img.shape, spacing, other=other, other_name=other_name)
        if why:
            found[k] = why
    if found:
        k0 = min(found)
        more = f" (and {len(found) - 1} more of {len(stack)} frames)" if len(found) > 1 else ""
        print(f"unsure: frame {k0}{more}: {found[k0]}; the column list is flagged (unsure = 1)", file=sys.stderr)
    return found


def _quality_gate(stack, results, spacing: float, path: Path) -> set[int]:
    """The frames whose columns are not credible (``locate.quality.credible``), each said on
    stderr; a UserError with the reason when no frame passes (no column list is written)."""
    import numpy as np

    from stem_live.locate.quality import credible

    failed = {}
    for k, (img, cols) in enumerate(zip(stack, results)):
        ok, why = credible(cols, np.asarray(img, dtype=np.float32), spacing_px=spacing)
        if not ok:
            failed[k] = why
    if len(failed) == len(stack):
        which = "" if len(stack) == 1 else f"any of its {len(stack)} frames ({next(iter(failed.values()))})"
        raise UserError(f"{path.name}: {failed[0]}" if len(stack) == 1 else f"{path.name}: no credible columns in "
                        f"{which}; --no-quality-gate writes them anyway")
    for k, why in failed.items():
        print(f"frame {k} skipped: {why}", file=sys.stderr)
    return set(failed)


def add_parser(sub) -> None:
    """Add this module's command(s) to the ``stem-live`` subparsers ``sub``."""
    s = sub.add_parser("locate", help="find atomic columns in an image or stack: CSV/npz + overlay PNG")
    s.add_argument("file", type=Path, help=".npy or .tif image or stack")
    s.add_argument("--out", type=Path, default=None, help="positions file (.csv or .npz); default: FILE-stem_columns.csv in the current folder")
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
    s.add_argument("--denoise", choices=tuple(DENOISE), default="auto",
                   help="classical locator: auto (default): the lattice-periodic denoiser, then a search of the "
                        "frame less the fitted columns for weaker columns beside bright ones (the C atoms bonded to "
                        "a Si dopant); on: the denoiser alone; off: the plain band-pass")
    s.add_argument("--contrast", choices=("bright", "dark", "auto"), default="bright",
                   help="bright columns (HAADF/ADF, default), dark columns (BF/ABF: the image is inverted first), or "
                        "auto: decided from the first frame (said on stderr)")
    s.add_argument("--no-quality-gate", dest="quality_gate", action="store_false",
                   help="write the columns of every frame, even where they are not credible (noise, vacuum, a blank "
                        "frame, contamination: by default such a frame gets no column list, and a file with no "
                        "credible frame exits with status 2)")
    s.add_argument("--cross-check", action="store_true",
                   help="locate every frame with the other locator too (classical <-> U-Net; about twice the time) and "
                        "flag the frames where the two lists disagree (F1 < 0.8); frames with few columns for the area "
                        "they occupy are flagged without it (one line on stderr; CSV column / npz field `unsure`)")
    s.add_argument("--tracked", action="store_true",
                   help="a stack of one area: locate every frame with the lattice of all the other frames as its "
                        "prior (two passes; more precise positions; a column that moved gets none); without "
                        "--flyback-px the flyback is measured from the stack where it drifts")
    s.set_defaults(func=cmd_locate)
