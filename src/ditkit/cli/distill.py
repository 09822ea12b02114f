"""`ditkit distill`: a DistillConfig YAML (optional) plus overrides and flags; sharded under torchrun."""

from __future__ import annotations

from pathlib import Path

from ..config import resolve_config
from ..distill import DistillConfig, Distiller, format_agreement, load_teacher
from ..distributed.launch import sharded_processes
from ..train import load_config
from .args import COMMANDS, SharedFlags, overrides_anywhere, split_config_and_overrides

# `ditkit distill` flags that set a DistillConfig key (flag dest -> config key); unset flags leave the
# config's value. The config's own defaults live in DistillConfig.
DISTILL_FLAGS = {
    "teacher": "teacher", "revision": "teacher_revision", "radius": "radius", "resolution": "resolution",
    "teacher_steps": "teacher_steps", "prompt_embeds": "prompt_embeds", "down_factor": "down_factor",
    "backend": "backend",
    "num_samples": "num_samples", "steps": "steps", "batch_size": "batch_size", "optimizer": "optimizer",
    "lr": "lr", "task_weight": "weights.task", "output_weight": "weights.output",
    "attention_weight": "weights.attention", "attention_every": "attention_every", "eval_num": "eval_num",
    "eval_steps": "eval_steps", "ckpt_every": "ckpt_every", "seed": "seed", "out": "out_dir",
}



def add_parser(sub, shared: SharedFlags) -> None:
    distill = sub.add_parser("distill", parents=[shared.run_folder, shared.device, shared.progress],
                             help=COMMANDS["distill"])
    distill.add_argument("items", nargs="*", metavar="[CONFIG] KEY=VALUE",
                         help="a YAML file of DistillConfig keys, then overrides, e.g. radius=8 weights.task=1")
    distill.add_argument("--teacher", help="ditkit checkpoint, a diffusers transformer or pipeline folder, or a "
                         "hub repository ORG/NAME in the local Hugging Face cache (HF_HOME; never downloaded)")
    distill.add_argument("--revision", help="with --teacher ORG/NAME: the cached branch, tag or commit (default main)")
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
    distill.set_defaults(func=run)


def run(args) -> None:
    config, overrides = split_config_and_overrides(args.items)
    flags = {key: getattr(args, dest) for dest, key in DISTILL_FLAGS.items() if getattr(args, dest) is not None}
    cfg = load_config(config and resolve_config(config), overrides, kind=DistillConfig, settings=flags)
    with sharded_processes(cfg.sharding, args.device) as processes:
        agreement = Distiller(load_teacher(cfg, processes.device), cfg, device=processes.device,
                              progress=not args.no_progress).run(resume=args.resume, overwrite=args.overwrite)
    if processes.is_main:
        print(format_agreement(agreement, cfg))
        print(f"done: student checkpoint in {Path(cfg.out_dir) / 'checkpoints'}; "
              f"report {Path(cfg.out_dir) / 'agreement.json'}, compare-*.png")
