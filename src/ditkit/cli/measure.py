"""`ditkit info`, `ditkit eval` and `ditkit bench`: what a model costs and how good its samples are."""

from __future__ import annotations

from pathlib import Path

from ..errors import DitkitError
from .args import SharedFlags, check_output_file, check_output_folder, optional_size, parse_options, parse_size


def add_parsers(sub, shared: SharedFlags) -> None:
    from ..metrics.features import FEATURES

    info = sub.add_parser("info", help="parameters and forward GFLOPs of a named model or a checkpoint",
                          parents=[shared.mixer])
    info.add_argument("model", nargs="?", help="a named model (e.g. DiT-XL/2) or a checkpoint path")
    info.add_argument("--resolution", help="pixels, e.g. 256 or 256x512 (default: 256, or the checkpoint's)")
    info.add_argument("--list", action="store_true", help="list the named models and mixers")
    plan = info.add_argument_group("memory planning (--train-memory)")
    plan.add_argument("--train-memory", action="store_true",
                      help="bytes per process for weights, grads, AdamW and EMA under DDP and FSDP, and activations "
                           "per image with and without per-block checkpointing; MODEL may also be a diffusers FLUX or "
                           "SD3 transformer config.json or folder (default resolution 1024 for those)")
    plan.add_argument("--processes", nargs="+", type=int, default=[1, 8, 64], metavar="P",
                      help="process counts to plan for (default: 1 8 64)")
    plan.add_argument("--regime", default="train", choices=["train", "distill"],
                      help="train: every weight trained, with EMA; distill: CLEAR distillation (frozen teacher, "
                           "student's attention projections trained)")
    plan.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                      help="compute precision (bf16: autocast, fp32 master weights; frozen weights stored in bf16)")
    plan.add_argument("--device-memory", type=float, default=80.0, metavar="GIB",
                      help="memory of one accelerator in GiB, for the images-per-GPU column (default: 80)")
    plan.add_argument("--text-tokens", type=int, metavar="N", help="diffusers models: prompt tokens (default: FLUX "
                      "512, SD3 333)")
    info.set_defaults(func=run_info)

    evaluate = sub.add_parser("eval", help="FID, KID and Inception Score of samples against reference images",
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
    evaluate.set_defaults(func=run_eval)

    bench = sub.add_parser("bench", help="parameters, GFLOPs, time per sampling step and peak memory vs resolution",
                           parents=[shared.device])
    bench.add_argument("--models", nargs="+", default=["DiT-S/2", "U-DiT-S"], help="named models (ditkit info --list)")
    bench.add_argument("--mixers", nargs="+", default=["full", "clear", "downsampled"], help="token mixers")
    bench.add_argument("--mixer-opt", action="append", metavar="KEY=VALUE",
                       help="mixer option, given to the mixers that accept it (e.g. radius=8; repeatable)")
    bench.add_argument("--resolutions", nargs="+", type=int, default=[256, 512, 1024, 2048],
                       help="square image sizes in pixels (tokens follow from the VAE scale and patch size)")
    bench.add_argument("--max-seconds", type=float, default=10.0,
                       help="a series stops after a step slower than this ('skipped (budget)')")
    bench.add_argument("--max-memory-mib", type=float, help="a series stops after a step with a higher peak")
    bench.add_argument("--repeats", type=int, default=3, help="timed runs per point, after one warm-up")
    bench.add_argument("--threads", type=int, help="CPU threads (default: torch's; 1 is steadier on a busy machine)")
    bench.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass (one forward less)")
    bench.add_argument("--out", default="bench", help="folder for the .md, .csv and .png")
    bench.add_argument("--stem", default="bench", help="file name stem of the outputs")
    bench.set_defaults(func=run_bench)


def run_info(args) -> None:
    from ..metrics.flops import describe_cost, shapes_only_model
    from ..mixers import MIXERS
    from ..models import NAMED_MODELS

    if args.list or not args.model:
        print("models: " + ", ".join(NAMED_MODELS))
        print("mixers: " + ", ".join(sorted(MIXERS)))
        return
    options = parse_options(args.mixer_opt) or None
    if args.train_memory:
        print(train_memory_table(args, options))
        return
    if args.model in NAMED_MODELS:
        model, default_resolution = shapes_only_model(args.model, args.mixer, options), 256
    elif Path(args.model).exists():
        from ..checkpoint import load_checkpoint
        from ..study.memory_plan import diffusers_config_file

        if diffusers_config_file(Path(args.model)) is not None:
            raise DitkitError(f"{args.model} is a diffusers transformer: ditkit info counts ditkit models; plan its "
                              "memory with --train-memory")

        model, record = load_checkpoint(args.model, mixer=args.mixer, mixer_options=options)
        default_resolution = record.resolution
    else:
        raise DitkitError(f"unknown model {args.model!r}: choose one of {', '.join(NAMED_MODELS)}, or a checkpoint "
                          "path (a diffusers transformer config is planned with --train-memory)")
    height, width = parse_size(args.resolution) if args.resolution else (default_resolution, default_resolution)
    print(describe_cost(model, args.model, height, width))


def train_memory_table(args, mixer_options: dict | None) -> str:
    from ..study.memory_plan import format_plan, load_subject, plan_memory

    if args.text_tokens is not None and args.text_tokens < 1:
        raise DitkitError(f"--text-tokens must be at least 1, got {args.text_tokens}")
    if args.device_memory <= 0:
        raise DitkitError(f"--device-memory must be positive GiB, got {args.device_memory:g}: e.g. 80")
    subject = load_subject(args.model, args.mixer, mixer_options, args.text_tokens)
    height, width = parse_size(args.resolution) if args.resolution else (subject.resolution, subject.resolution)
    plan = plan_memory(subject, height, width, args.processes, args.regime, args.precision, args.device_memory)
    return format_plan(plan)


def run_eval(args) -> None:
    from ..data.images import save_image_folder
    from ..distributed.launch import default_device
    from ..metrics.quality import (
        evaluate,
        folder_agreement,
        format_scores,
        legibility,
        load_reference,
        load_samples,
        sample_checkpoint,
        write_scores,
    )
    from ..record import Sampling

    if bool(args.ckpt) == bool(args.samples):
        raise DitkitError("give either --ckpt (a model to sample) or --samples (a folder of generated images)")
    check_output_file(args.out)
    if args.save_samples:
        check_output_folder(args.save_samples)
    device, record = default_device(args.device), None
    if args.ckpt:
        height, width = optional_size(args.resolution)
        asked = Sampling(num=args.num, height=height, width=width, steps=args.steps, cfg_scale=args.cfg,
                         sampler=args.sampler, seed=args.seed)
        images, record = sample_checkpoint(args.ckpt, asked, batch_size=args.batch_size, ema=not args.no_ema,
                                           mixer=args.mixer, mixer_options=parse_options(args.mixer_opt) or None,
                                           device=device, progress=not args.no_progress)
    else:
        images = load_samples(args.samples, args.num, parse_size(args.resolution)[0] if args.resolution else None)
    if args.save_samples:
        save_image_folder(images, args.save_samples)
    reference = load_reference(args.ref, args.num_ref, resolution=images.shape[-2], seed=args.seed)
    result = evaluate(images, reference, args.features, inception_weights=args.inception_weights,
                      features_path=args.features_path, batch_size=args.batch_size, device=device, seed=args.seed,
                      progress=not args.no_progress)
    result.update(source=str(args.ckpt or args.samples), reference=args.ref)
    if record is not None and (accuracy := legibility(images, record, args.features, features_path=args.features_path,
                                                      batch_size=args.batch_size, device=device)) is not None:
        result["label_accuracy"] = accuracy
    if args.pair_with:
        result["agreement"] = folder_agreement(images, args.pair_with)
    print(format_scores(result))
    print(f"wrote {write_scores(result, args.out)}")


def run_bench(args) -> None:
    import torch

    from ..distributed.launch import default_device
    from ..metrics.bench import device_name, run_bench, write_report

    check_output_folder(args.out)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device(args.device)
    title = (f"ditkit bench: {device_name(device)}, float32, batch 1, one forward per sampling step "
             f"(no CFG), median of {args.repeats} after warm-up")
    print(title)
    rows = run_bench(args.models, args.mixers, args.resolutions, mixer_opts=parse_options(args.mixer_opt),
                     max_seconds=args.max_seconds, max_memory_mib=args.max_memory_mib, repeats=args.repeats,
                     device=device, memory=not args.no_memory, progress=False)
    paths = write_report(rows, args.out, stem=args.stem, title=title)
    print("\n" + paths[0].read_text())
    print(f"wrote {', '.join(str(p) for p in paths)}")
