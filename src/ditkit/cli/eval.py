"""`ditkit eval`: FID, KID and Inception Score of a checkpoint's samples (or a folder of images)
against reference images, with legibility and paired agreement where they apply (`metrics.score`);
with the Inception network the ADM evaluator's FID, sFID, IS, precision and recall, against an ADM
reference batch if --ref names one. `--write-ref` writes such a batch from a folder or dataset.
With --sample-dir the samples go to resumable .npz shards, made by every process torchrun started,
and are scored in a streaming pass (`metrics.shards`, `metrics.streaming`)."""

from __future__ import annotations

import re
from pathlib import Path

from ..checkpoint import META_KEY, read_header
from ..data.images import save_image_folder
from ..distributed.launch import default_device, torchrun_processes
from ..errors import DitkitError
from ..files import refuse_output_over_inputs
from ..metrics.features import FEATURES, build_features
from ..metrics.quality import (
    check_reference,
    eval_protocol,
    format_scores,
    load_samples,
    write_reference,
    write_scores,
)
from ..metrics.refbatch import is_reference_batch, read_reference_batch
from ..metrics.score import score_checkpoint, score_checkpoint_sharded, score_images
from ..metrics.shards import ShardPlan
from ..record import TIMESTEP_SPACINGS, RunRecord, Sampling
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
                          help="reference images: a built-in dataset (digits, photos), an image folder, or an ADM "
                               "reference batch (.npz: images in arr_0 and/or the statistics mu, sigma, mu_s, sigma_s; "
                               "used whole, its statistics where present)")
    evaluate.add_argument("-n", "--num", type=int, default=256, help="images to sample (or to read from --samples; "
                          "under torchrun write -n: torchrun takes --num for its --numa-binding)")
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
    evaluate.add_argument("--timestep-spacing", choices=TIMESTEP_SPACINGS,
                          help="ddpm runs: how the steps are spaced (default: the run's)")
    evaluate.add_argument("--sample-dir", metavar="DIR", help="with --ckpt: write the samples to DIR as .npz shards "
                          "(uint8, ADM's layout) and score them in a streaming pass (memory independent of --num); "
                          "a rerun with the same settings keeps the finished shards; needed under torchrun, where "
                          "every process makes its share (the same images for any process count)")
    evaluate.add_argument("--shard-size", type=int, metavar="N", help="with --sample-dir: samples per shard, a "
                          "multiple of --batch-size (default: the largest multiple up to 1000)")
    evaluate.add_argument("--out", default="eval.json", help="JSON file for the scores")
    evaluate.add_argument("--write-ref", metavar="OUT.npz", help="instead of scoring: write --num-ref images of --ref "
                          "(a folder or built-in dataset, at --resolution) as an ADM reference batch (Inception "
                          "statistics; needs --features inception)")
    evaluate.add_argument("--with-images", action="store_true", help="with --write-ref: store the images too (arr_0, "
                          "uint8 NHWC), which precision, recall and KID need")
    evaluate.set_defaults(func=run)


def run(args) -> None:
    if args.write_ref:
        return write_ref(args)
    if args.with_images:
        raise DitkitError("--with-images goes with --write-ref (it stores the reference batch's images)")
    if bool(args.ckpt) == bool(args.samples):
        raise DitkitError("give either --ckpt (a model to sample) or --samples (a folder of generated images)")
    if args.batch_size < 1:
        raise DitkitError(f"--batch-size must be at least 1, got {args.batch_size}: images scored at a time (e.g. 64)")
    check_output_file(args.out)
    if args.save_samples:
        check_sample_folder(args.save_samples)
    check_sharding(args)
    reference = read_reference_batch(args.ref) if is_reference_batch(args.ref) else args.ref
    # The Inception network (torch-fidelity, the weights file) is built before any sampling, so that
    # a missing piece stops the run at once.
    extractor = build_features(args.features, args.inception_weights) if args.features == "inception" else None
    scoring = dict(num_reference=args.num_ref, inception_weights=args.inception_weights,
                   features_path=args.features_path, batch_size=args.batch_size, device=default_device(args.device),
                   seed=args.seed, progress=not args.no_progress, extractor=extractor)
    resolved = objective = None
    if args.ckpt:
        asked = asked_sampling(args)
        record = _header_record(args.ckpt)
        if record is not None:
            resolved, objective = record.sampling(asked), record.diffusion.objective
        _check_reference(reference, args.features, None if resolved is None else (resolved.height, resolved.width))
    if args.sample_dir:
        scores = score_sharded(args, asked, reference, scoring)
        if scores is None:  # not the main process: it made its shards, the main process scores them
            return
    elif args.ckpt:
        scores = score_checkpoint(args.ckpt, asked, reference, args.features, ema=not args.no_ema, mixer=args.mixer,
                                  mixer_options=parse_options(args.mixer_opt) or None, pair_with=args.pair_with,
                                  **scoring)
    else:
        images = load_samples(args.samples, args.num, parse_size(args.resolution)[0] if args.resolution else None)
        _check_reference(reference, args.features, tuple(images.shape[-2:]))
        scores = score_images(images, reference, args.features, pair_with=args.pair_with, **scoring)
    if args.save_samples:
        save_image_folder(scores.images, args.save_samples)
    result = scores.summary(source=str(args.ckpt or args.samples), reference=args.ref)
    result["protocol"] = eval_protocol(result, resolved, objective)
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


def _check_reference(reference, features: str, image_size: tuple[int, int] | None) -> None:
    if not isinstance(reference, str):
        check_reference(reference, features, image_size)


def _header_record(ckpt: str) -> RunRecord | None:
    """The checkpoint's record read from its header (no weights), for the checks before sampling;
    None where it has none (sampling then says what is wrong)."""
    file, metadata, _ = read_header(ckpt)
    return RunRecord.from_json(metadata[META_KEY], source=str(file)) if META_KEY in metadata else None


def write_ref(args) -> None:
    """--write-ref: an ADM reference batch of --ref (a folder or built-in dataset)."""
    if args.ckpt or args.samples:
        raise DitkitError("--write-ref writes a reference batch from --ref alone: drop --ckpt / --samples (score "
                          "against the written file in a second call, --ref OUT.npz)")
    if is_reference_batch(args.ref):
        raise DitkitError(f"--write-ref makes a reference batch from a folder or built-in dataset; --ref "
                          f"{args.ref} already is one")
    if not str(args.write_ref).lower().endswith(".npz"):
        raise DitkitError(f"--write-ref {args.write_ref}: name the reference batch with .npz")
    if args.features != "inception":
        raise DitkitError("--write-ref writes Inception statistics, as ADM's reference batches hold them: add "
                          "--features inception --inception-weights PATH")
    if Path(args.write_ref).exists():  # a downloaded or long-computed batch is not replaced by mistake
        raise DitkitError(f"--write-ref {args.write_ref} exists: give a new file name (ditkit does not replace a "
                          "reference batch)")
    check_output_file(args.write_ref)
    extractor = build_features("inception", args.inception_weights)
    written = write_reference(args.write_ref, args.ref, extractor, num=args.num_ref,
                              resolution=parse_size(args.resolution)[0] if args.resolution else None,
                              with_images=args.with_images, batch_size=args.batch_size,
                              device=default_device(args.device), seed=args.seed, progress=not args.no_progress)
    images = f"{written.num_images} images and " if written.num_images else ""
    print(f"wrote {written.path}: {images}Inception statistics (mu, sigma, mu_s, sigma_s) of {args.ref}")


def asked_sampling(args) -> Sampling:
    height, width = optional_size(args.resolution)
    return Sampling(num=args.num, height=height, width=width, steps=args.steps, cfg_scale=args.cfg,
                    sampler=args.sampler, seed=args.seed, timestep_spacing=args.timestep_spacing)


def check_sharding(args) -> None:
    """--sample-dir and its companions, checked before anything is loaded or sampled."""
    if not args.sample_dir:
        if args.shard_size is not None:
            raise DitkitError("--shard-size needs --sample-dir (the folder the shards go to)")
        if torchrun_processes() > 1:
            raise DitkitError("under torchrun each process makes a share of the samples: give --sample-dir DIR "
                              "(the .npz shards go there)")
        return
    if args.samples:
        raise DitkitError("--sample-dir is where --ckpt's samples go: with --samples, drop it")
    for flag, value in (("--save-samples", args.save_samples), ("--pair-with", args.pair_with)):
        if value:
            raise DitkitError(f"{flag} needs every image in memory, which --sample-dir avoids: drop {flag}, or "
                              "--sample-dir (then the samples are also the .npz shards there)")
    ShardPlan.default(args.num, args.batch_size, args.shard_size)  # a shard holds whole batches
    check_output_folder(args.sample_dir)
    refuse_output_over_inputs(args.sample_dir, {"checkpoint": args.ckpt, "reference folder": args.ref},
                              what="--sample-dir")


def score_sharded(args, asked: Sampling, reference, scoring: dict):
    """--sample-dir: the samples as shards (every process under torchrun), scored on the main process."""
    device = scoring.pop("device")
    return score_checkpoint_sharded(args.ckpt, asked, args.sample_dir, reference, args.features,
                                    ema=not args.no_ema, mixer=args.mixer,
                                    mixer_options=parse_options(args.mixer_opt) or None,
                                    shard_size=args.shard_size, device=device, **scoring)
