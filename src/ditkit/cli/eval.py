"""`ditkit eval`: FID, KID and Inception Score of a checkpoint's samples (or a folder of images)
against reference images, with legibility and paired agreement where they apply (`metrics.score`)."""

from __future__ import annotations

import re
from pathlib import Path

from ..data.images import save_image_folder
from ..distributed.launch import default_device
from ..errors import DitkitError
from ..metrics.features import FEATURES
from ..metrics.quality import format_scores, load_samples, write_scores
from ..metrics.score import score_checkpoint, score_images
from ..record import Sampling
from .args import (
    COMMANDS,
    SharedFlags,
    check_output_file,
    check_output_folder,
    optional_size,
    parse_options,
    parse_size,
)


def add_parser(sub, shared: SharedFlags) -> None:
    evaluate = sub.add_parser("eval", help=COMMANDS["eval"],
                              parents=[shared.sampling, shared.mixer, shared.weights, shared.device,
                                       shared.progress])
    evaluate.add_argument("--ckpt", help="a checkpoint to sample (run folder, checkpoint folder or .safetensors)")
    evaluate.add_argument("--samples", help="instead of --ckpt: a folder of already generated images")
    evaluate.add_argument("--ref", required=True,
                          help="reference images: a built-in dataset (digits, photos) or an image folder")
    evaluate.add_argument("--num", type=int, default=256, help="images to sample (or to read from --samples)")
    evaluate.add_argument("--num-ref", type=int, default=1000, help="reference images (a random subset)")
    evaluate.add_argument("--features", default="ditkit-digits", choices=FEATURES,
                          help="feature extractor: inception (the standard FID network; needs its weights file) "
                               "or ditkit-digits (offline, trained by ditkit on the built-in digits; not comparable "
                               "with published numbers)")
    evaluate.add_argument("--inception-weights", metavar="PATH", help="the InceptionV3 FID weights file "
                          "(default: look in the torch hub checkpoints folder and ditkit's cache)")
    evaluate.add_argument("--features-path", metavar="PATH", help="where the ditkit-digits extractor is cached "
                          "(default: ~/.cache/ditkit/features/ditkit-digits-v1.pt; trained there on first use)")
    evaluate.add_argument("--seed", type=int, default=0, help="seeds the samples, the reference subset and KID")
    evaluate.add_argument("--batch-size", type=int, default=64)
    evaluate.add_argument("--save-samples", metavar="DIR", help="also write the evaluated images as PNGs here")
    evaluate.add_argument("--pair-with", metavar="DIR", help="also PSNR/SSIM against the same-index images of DIR "
                          "(e.g. a teacher's samples for the same seed)")
    evaluate.add_argument("--out", default="eval.json", help="JSON file for the scores")
    evaluate.set_defaults(func=run)


def run(args) -> None:
    if bool(args.ckpt) == bool(args.samples):
        raise DitkitError("give either --ckpt (a model to sample) or --samples (a folder of generated images)")
    if args.batch_size < 1:
        raise DitkitError(f"--batch-size must be at least 1, got {args.batch_size}: images scored at a time (e.g. 64)")
    check_output_file(args.out)
    if args.save_samples:
        check_sample_folder(args.save_samples)
    scoring = dict(num_reference=args.num_ref, pair_with=args.pair_with, inception_weights=args.inception_weights,
                   features_path=args.features_path, batch_size=args.batch_size, device=default_device(args.device),
                   seed=args.seed, progress=not args.no_progress)
    if args.ckpt:
        height, width = optional_size(args.resolution)
        asked = Sampling(num=args.num, height=height, width=width, steps=args.steps, cfg_scale=args.cfg,
                         sampler=args.sampler, seed=args.seed)
        scores = score_checkpoint(args.ckpt, asked, args.ref, args.features, ema=not args.no_ema, mixer=args.mixer,
                                  mixer_options=parse_options(args.mixer_opt) or None, **scoring)
    else:
        images = load_samples(args.samples, args.num, parse_size(args.resolution)[0] if args.resolution else None)
        scores = score_images(images, args.ref, args.features, **scoring)
    if args.save_samples:
        save_image_folder(scores.images, args.save_samples)
    result = scores.summary(source=str(args.ckpt or args.samples), reference=args.ref)
    print(format_scores(result))
    print(f"wrote {write_scores(result, args.out)}")


SAMPLE_NAME = re.compile(r"\d{6}\.png")  # what save_image_folder writes


def check_sample_folder(folder: str) -> None:
    """--save-samples: a new or empty folder, or one of earlier saved samples (replaced); never one
    holding other files (a run folder, the user's images)."""
    check_output_folder(folder)
    path = Path(folder)
    if path.is_dir() and (others := sorted(p.name for p in path.iterdir() if not SAMPLE_NAME.fullmatch(p.name))):
        raise DitkitError(f"--save-samples {folder} holds other files ({', '.join(others[:3])}): give a new or empty "
                          "folder")
