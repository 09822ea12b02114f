"""`ditkit train` and `ditkit distill`: a YAML config (a file or a built-in name) plus key=value overrides."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

from .args import SharedFlags, overrides_anywhere, resolve_config, split_config_and_overrides

# `ditkit distill` flags that set a DistillConfig key (flag dest -> config key); unset flags leave the
# config's value. The config's own defaults live in DistillConfig.
DISTILL_FLAGS = {
    "teacher": "teacher", "radius": "radius", "resolution": "resolution", "teacher_steps": "teacher_steps",
    "prompt_embeds": "prompt_embeds", "down_factor": "down_factor", "backend": "backend",
    "num_samples": "num_samples", "steps": "steps", "batch_size": "batch_size", "optimizer": "optimizer",
    "lr": "lr", "task_weight": "weights.task", "output_weight": "weights.output",
    "attention_weight": "weights.attention", "attention_every": "attention_every", "eval_num": "eval_num",
    "eval_steps": "eval_steps", "ckpt_every": "ckpt_every", "seed": "seed", "out": "out_dir",
}


def add_parsers(sub, shared: SharedFlags) -> None:
    train = sub.add_parser("train", help="train a model from a YAML config (output folder: train.out_dir)",
                           parents=[shared.run_folder, shared.progress])
    train.add_argument("config", help="a YAML file, or a built-in config name (e.g. digits)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100")
    overrides_anywhere(train, "overrides")
    train.set_defaults(func=run_train)

    distill = sub.add_parser("distill", parents=[shared.run_folder, shared.device, shared.progress],
                             help="CLEAR linearization: distil a full-attention teacher into a local-attention "
                                  "student (flags override the config; defaults are DistillConfig's)")
    distill.add_argument("items", nargs="*", metavar="[CONFIG] KEY=VALUE",
                         help="a YAML file of DistillConfig keys, then overrides, e.g. radius=8 weights.task=1")
    distill.add_argument("--teacher", help="ditkit checkpoint, or a diffusers transformer folder")
    distill.add_argument("--radius", type=float, help="local attention radius in tokens (default 8)")
    distill.add_argument("--resolution", type=int, help="training resolution in pixels (default: the teacher's; "
                                                        "512 for diffusers teachers)")
    distill.add_argument("--teacher-steps", type=int, help="sampling steps for the teacher's samples "
                                                           "(default: the teacher's own; 28 for diffusers)")
    distill.add_argument("--prompt-embeds", help="diffusers teachers: safetensors with prompt_embeds and "
                                                 "pooled_prompt_embeds (default: random embeddings, for trials)")
    distill.add_argument("--down-factor", type=int, help="pooled global tokens over f x f blocks (0 = off)")
    distill.add_argument("--backend", help="clear backend: auto, reference, tiled, flex")
    distill.add_argument("--num-samples", type=int, help="teacher samples to generate and train on (default 1024)")
    distill.add_argument("--steps", type=int, help="training steps (default 500)")
    distill.add_argument("--batch-size", type=int, help="default 32")
    distill.add_argument("--optimizer", help="adamw (default) or prodigy")
    distill.add_argument("--lr", type=float, help="learning rate (default 1e-4; 1.0 for prodigy)")
    distill.add_argument("--task-weight", type=float,
                         help="weight of the teacher's objective (default 0.1; CLEAR: 1)")
    distill.add_argument("--output-weight", type=float,
                         help="weight of MSE(student, teacher output) (default 1; CLEAR: 0.5)")
    distill.add_argument("--attention-weight", type=float, help="weight of attention-output matching (default 0.5)")
    distill.add_argument("--attention-every", type=int, help="match every k-th attention layer (default 1)")
    distill.add_argument("--eval-num", type=int, help="held-out samples for the agreement report (default 8)")
    distill.add_argument("--eval-steps", type=int, help="sampling steps for the report (default: the teacher's)")
    distill.add_argument("--ckpt-every", type=int, help="default 250")
    distill.add_argument("--seed", type=int, help="default 0")
    distill.add_argument("--out", help="output folder (default runs/distill)")
    overrides_anywhere(distill, "items")
    distill.set_defaults(func=run_distill)


def run_train(args) -> None:
    from accelerate import PartialState

    from ..train import load_config, train

    cfg = load_config(resolve_config(args.config), args.overrides)
    final = train(cfg, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    if PartialState().is_main_process:
        print(f"done: checkpoint {final}; samples in {Path(cfg.train.out_dir) / 'samples'}")


def run_distill(args) -> None:
    from ..distill import DistillConfig, Distiller, format_agreement, load_teacher
    from ..train import load_config

    config, overrides = split_config_and_overrides(args.items)
    flags = {key: getattr(args, dest) for dest, key in DISTILL_FLAGS.items() if getattr(args, dest) is not None}
    cfg = load_config(config and resolve_config(config), overrides, kind=DistillConfig, settings=flags)
    with distill_processes(cfg, args.device) as (device, is_main):
        agreement = Distiller(load_teacher(cfg, device), cfg, device=device, progress=not args.no_progress).run(
            resume=args.resume, overwrite=args.overwrite)
    if is_main:
        print(format_agreement(agreement, cfg))
        print(f"done: student checkpoint in {Path(cfg.out_dir) / 'checkpoints'}; "
              f"report {Path(cfg.out_dir) / 'agreement.json'}, compare-*.png")


@contextmanager
def distill_processes(cfg, device: str | None):
    """(this process's device, whether it is the main one): sharded distillation joins the process
    group torchrun set up (and leaves it after), an unsharded one runs in this process alone."""
    import gc
    import os

    import torch.distributed as dist

    from ..distributed.launch import default_device, join_process_group

    if cfg.sharding != "fsdp" or "WORLD_SIZE" not in os.environ:  # the Distiller names the fix without torchrun
        yield default_device(device), True
        return
    device, formed = join_process_group(device)
    yield device, dist.get_rank() == 0
    if formed:  # not after an error: the other processes may be inside a collective (torchrun stops them)
        gc.collect()  # the sharded models (and communication they hold) go while the group still lives
        dist.barrier()
        dist.destroy_process_group()
