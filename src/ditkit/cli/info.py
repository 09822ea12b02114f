"""`ditkit info`: parameters and forward GFLOPs of a model, or its training memory plan."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import load_checkpoint
from ..errors import DitkitError
from ..metrics.flops import describe_cost, shapes_only_model
from ..mixers import MIXERS
from ..models import NAMED_MODELS
from ..study.memory_plan import diffusers_config_file, format_plan, load_subject, plan_memory
from .args import COMMANDS, SharedFlags, parse_options, parse_size


def add_parser(sub, shared: SharedFlags) -> None:
    info = sub.add_parser("info", help=COMMANDS["info"],
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
    info.set_defaults(func=run)


def run(args) -> None:
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
    if args.text_tokens is not None and args.text_tokens < 1:
        raise DitkitError(f"--text-tokens must be at least 1, got {args.text_tokens}")
    if args.device_memory <= 0:
        raise DitkitError(f"--device-memory must be positive GiB, got {args.device_memory:g}: e.g. 80")
    subject = load_subject(args.model, args.mixer, mixer_options, args.text_tokens)
    height, width = parse_size(args.resolution) if args.resolution else (subject.resolution, subject.resolution)
    plan = plan_memory(subject, height, width, args.processes, args.regime, args.precision, args.device_memory)
    return format_plan(plan)
