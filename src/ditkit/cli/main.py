"""The `ditkit` command line: info, train, sample."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ..errors import DitkitError

BUILTIN_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def parse_size(text: str) -> tuple[int, int]:
    """"256" -> (256, 256); "256x512" -> (256, 512) as height x width."""
    parts = text.lower().split("x")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        sizes = []
    if len(sizes) not in (1, 2) or min(sizes) <= 0:
        raise DitkitError(f"resolution {text!r} is not a size: use e.g. 256 or 256x512 (height x width)")
    return (sizes[0], sizes[-1])


def parse_options(items: list[str]) -> dict:
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise DitkitError(f"mixer option {item!r} is not key=value (e.g. radius=8)")
        options[key] = yaml.safe_load(value)
    return options


def resolve_config(name: str) -> Path:
    """A config path, or the name of a config that ships with ditkit (e.g. `digits`)."""
    path = Path(name)
    if path.is_file():
        return path
    builtin = BUILTIN_CONFIGS / f"{name}.yaml"
    if builtin.is_file():
        return builtin
    shipped = ", ".join(sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml")))
    raise DitkitError(f"config {name!r} is neither a file nor a built-in config ({shipped})")


def cmd_info(args) -> None:
    import torch

    from ..metrics import model_cost
    from ..mixers import MIXERS
    from ..models import NAMED_MODELS, build_model, model_config

    if args.list or not args.model:
        print("models: " + ", ".join(NAMED_MODELS))
        print("mixers: " + ", ".join(sorted(MIXERS)))
        return
    options = parse_options(args.mixer_opt)
    if args.model in NAMED_MODELS:
        overrides = {"mixer": args.mixer} if args.mixer else {}
        config = model_config(args.model, **overrides, **({"mixer_options": options} if options else {}))
        with torch.device("meta"):  # counting needs shapes only: no memory, no init time
            model = build_model(config)
        label, default_resolution = args.model, 256
    elif not Path(args.model).exists():
        names = ", ".join(NAMED_MODELS)
        raise DitkitError(f"unknown model {args.model!r}: choose one of {names}, or a checkpoint path")
    else:
        from ..train.checkpoint import load_checkpoint

        model, record = load_checkpoint(args.model, mixer=args.mixer, mixer_options=options or None)
        label, default_resolution = str(args.model), record["data"]["resolution"]
    from ..diffusion.pipeline import input_size

    height, width = parse_size(args.resolution) if args.resolution else (default_resolution, default_resolution)
    h, w = input_size(model, height, width)
    cfg = model.config
    cost = model_cost(model, h, w)
    space = f"{cfg.in_channels}x{h}x{w} " + (f"latent (VAE /{cfg.vae_scale})" if cfg.vae_scale > 1 else "pixels")
    options = f" {cfg.mixer_options}" if cfg.mixer_options else ""
    tokens = cfg.tokens(h, w)
    print(f"model       {label} ({cfg.backbone}, mixer {cfg.mixer}{options})")
    print(f"input       {height}x{width} px -> {space} -> {tokens} tokens")
    print(f"parameters  {cost.params / 1e6:.2f}M ({cost.params:,})")
    print(f"forward     {cost.macs / 1e9:.2f} GFLOPs, counting one multiply-add as 1 FLOP (the DiT paper's unit);")
    print(f"            {cost.flops / 1e9:.2f} GFLOPs counting it as 2 (one sample, attention and FFTs included)")


def cmd_train(args) -> None:
    from ..train import load_config, train

    cfg = load_config(resolve_config(args.config), args.overrides)
    from accelerate import PartialState

    final = train(cfg, resume=(args.resume if args.resume else None), progress=not args.no_progress)
    if PartialState().is_main_process:
        print(f"done: checkpoint {final}; samples in {Path(cfg.train.out_dir) / 'samples'}")


def cmd_sample(args) -> None:
    import torch

    from ..data.images import image_grid
    from ..diffusion.pipeline import generate
    from ..train.checkpoint import load_checkpoint

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, record = load_checkpoint(args.ckpt, ema=not args.no_ema, mixer=args.mixer,
                                    mixer_options=parse_options(args.mixer_opt) or None, device=device)
    default = record["data"]["resolution"]
    height, width = parse_size(args.resolution) if args.resolution else (default, default)
    labels = parse_labels(args.labels, record, args.num)
    diffusion = record["diffusion"]
    images = generate(model, record, num=args.num, height=height, width=width,
                      steps=args.steps or diffusion["sample_steps"],
                      cfg_scale=diffusion["cfg_scale"] if args.cfg is None else args.cfg, seed=args.seed,
                      sampler=args.sampler or diffusion.get("sampler"), labels=labels)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    image_grid(images).save(out)
    print(f"wrote {out} ({args.num} images, {height}x{width})")


def parse_labels(text: str | None, record: dict, num: int):
    import torch

    if text is None:
        return None
    names = record["data"].get("class_names") or []
    labels = []
    for item in text.split(","):
        item = item.strip()
        if item in names:
            labels.append(names.index(item))
        elif item.lstrip("-").isdigit():
            labels.append(int(item))
        else:
            raise DitkitError(f"class {item!r} is neither an index nor a class name ({', '.join(names) or 'none'})")
    return torch.tensor([labels[i % len(labels)] for i in range(num)])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditkit", description="Efficient diffusion backbones for high resolution.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameters and forward GFLOPs of a named model or a checkpoint")
    info.add_argument("model", nargs="?", help="a named model (e.g. DiT-XL/2) or a checkpoint path")
    info.add_argument("--resolution", help="pixels, e.g. 256 or 256x512 (default: 256, or the checkpoint's)")
    info.add_argument("--mixer", help="token mixer to use instead of the model's")
    info.add_argument("--mixer-opt", action="append", metavar="KEY=VALUE", help="mixer option (repeatable)")
    info.add_argument("--list", action="store_true", help="list the named models and mixers")
    info.set_defaults(func=cmd_info)

    train = sub.add_parser("train", help="train a model from a YAML config")
    train.add_argument("config", help="a YAML file, or a built-in config name (e.g. digits)")
    train.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. train.steps=100")
    train.add_argument("--resume", nargs="?", const=True, default=None, metavar="CKPT",
                       help="continue from the latest checkpoint of train.out_dir, or from CKPT")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    sample = sub.add_parser("sample", help="sample an image grid from a checkpoint")
    sample.add_argument("--ckpt", required=True, help="run folder, checkpoint folder or .safetensors file")
    sample.add_argument("--resolution", help="pixels, e.g. 64 or 64x128 (default: the training resolution)")
    sample.add_argument("--num", type=int, default=16, help="number of images")
    sample.add_argument("--steps", type=int, help="sampling steps (default: the run's diffusion.sample_steps)")
    sample.add_argument("--cfg", type=float, help="classifier-free guidance scale (1 = off)")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--sampler", help="ddpm or ddim (DDPM models), euler (flow models)")
    sample.add_argument("--labels", help="comma-separated class indices or names, cycled over the grid")
    sample.add_argument("--mixer", help="swap the token mixer at load time (e.g. clear)")
    sample.add_argument("--mixer-opt", action="append", metavar="KEY=VALUE", help="mixer option (repeatable)")
    sample.add_argument("--no-ema", action="store_true", help="use the raw training weights, not the EMA")
    sample.add_argument("--device", help="cpu, cuda, ... (default: cuda when available)")
    sample.add_argument("--out", default="samples.png", help="output PNG grid")
    sample.set_defaults(func=cmd_sample)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except DitkitError as error:
        print(f"ditkit: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ditkit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
