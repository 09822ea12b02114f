"""`ditkit train`: a YAML config (a file or a built-in name) plus key=value overrides."""

from __future__ import annotations

from pathlib import Path

from ..config import resolve_config
from ..distributed.launch import is_main_process
from ..train import load_config, train
from .args import COMMANDS, SharedFlags, overrides_anywhere


def add_parser(sub, shared: SharedFlags) -> None:
    train = sub.add_parser("train", help=COMMANDS["train"],
                           parents=[shared.run_folder, shared.progress])
    train.add_argument("config", help="a YAML file, or a built-in config name (e.g. digits)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100")
    overrides_anywhere(train, "overrides")
    train.set_defaults(func=run)


def run(args) -> None:
    cfg = load_config(resolve_config(args.config), args.overrides)
    final = train(cfg, resume=args.resume, progress=not args.no_progress, overwrite=args.overwrite)
    if is_main_process():
        print(f"done: checkpoint {final}; samples in {Path(cfg.train.out_dir) / 'samples'}")
