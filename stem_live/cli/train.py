"""``stem-live train-locator``, ``train-rvae`` and ``encode-rvae``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from stem_live.cli.common import positive, rvae_source_args


def cmd_train_locator(a: argparse.Namespace) -> int:
    from stem_live.lab.train_unet import reevaluate, train

    if a.eval_only:
        return reevaluate(a.out)
    train(a.out, minutes=a.minutes, seed=a.seed, max_steps=a.steps, progress=print)
    return 0


def cmd_train_rvae(a: argparse.Namespace) -> int:
    from stem_live.cli.rvae_sources import train_rvae_main

    train_rvae_main(a.source, a.out, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                    latent_dim=a.latent_dim, symmetry_order=a.symmetry_order, patch_size=a.patch_size,
                    angle_prior_sigma=a.angle_prior_sigma, shift_prior_sigma=tuple(a.shift_prior_sigma),
                    content_prior_sigma=a.content_prior_sigma, recon_sigma=a.recon_sigma, frames=a.count, size=a.size,
                    spacing_px=a.spacing_px, kind=a.kind, max_seconds=a.max_seconds, progress=print)
    return 0


def cmd_encode_rvae(a: argparse.Namespace) -> int:
    from stem_live.cli.rvae_sources import encode_rvae_main

    encode_rvae_main(a.source, a.checkpoint, a.out, frames=a.count, size=a.size, seed=a.seed, spacing_px=a.spacing_px,
                     kind=a.kind, progress=print)
    return 0


def add_parser(sub) -> None:
    """Add this module's command(s) to the ``stem-live`` subparsers ``sub``."""
    s = sub.add_parser("train-locator", help="train the U-Net column locator on simulated frames (seeded)")
    s.add_argument("--out", type=Path, required=True, help="weights to write (.msgpack); MODEL.md goes beside them")
    s.add_argument("--minutes", type=positive(float), default=20.0, help="wall-clock training budget")
    s.add_argument("--steps", type=positive(int), default=None,
                   help="train for this many steps instead of --minutes (a length that does not depend on "
                        "the machine's speed; the committed weights: 12000)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--eval-only", action="store_true",
                   help="no training: re-evaluate the weights at --out and rewrite their metrics.json and MODEL.md")
    s.set_defaults(func=cmd_train_locator)

    s = sub.add_parser("train-rvae", help="train an rVAE on a recording, image, patch stack or the simulator")
    rvae_source_args(s)
    s.add_argument("--out", type=Path, required=True, help="checkpoint to write (.msgpack)")
    s.add_argument("--epochs", type=positive(int), default=20)
    s.add_argument("--batch-size", type=positive(int), default=128)
    s.add_argument("--lr", type=positive(float), default=1e-3)
    s.add_argument("--latent-dim", type=positive(int), default=2, help="content latents")
    s.add_argument("--symmetry-order", type=positive(int), default=None, help="angles modulo 2*pi/n")
    s.add_argument("--patch-size", type=positive(int), default=32)
    s.add_argument("--angle-prior-sigma", type=positive(float), default=None, help="rad (default pi/n)")
    s.add_argument("--shift-prior-sigma", type=positive(float), nargs=2, default=(1.0, 1.0), metavar=("SY", "SX"),
                   help="px, per axis")
    s.add_argument("--content-prior-sigma", type=positive(float), default=1.0)
    s.add_argument("--recon-sigma", type=positive(float), default=0.5, help="Gaussian likelihood sigma")
    s.add_argument("--max-seconds", type=positive(float), default=None, help="stop training after this long")
    s.set_defaults(func=cmd_train_rvae)

    s = sub.add_parser("encode-rvae", help="latents (angle, shift, content, with sigmas) of any source -> .npz")
    rvae_source_args(s)
    s.add_argument("--checkpoint", type=Path, required=True)
    s.add_argument("--out", type=Path, required=True, help=".npz to write")
    s.set_defaults(func=cmd_encode_rvae)
