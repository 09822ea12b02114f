"""`ditkit convert`: published weights -> a ditkit checkpoint folder."""

from __future__ import annotations

from ..checkpoint import load_checkpoint
from ..convert.pretrained import ConvertOptions, convert_to_checkpoint
from .args import COMMANDS, SharedFlags


def add_parser(sub, shared: SharedFlags) -> None:
    convert = sub.add_parser("convert", help=COMMANDS["convert"])
    convert.add_argument("source", help="the published checkpoint file or folder")
    convert.add_argument("--out", required=True, help="the ditkit checkpoint folder to write")
    convert.add_argument("--vae", help="a diffusers AutoencoderKL folder (latent-space models decode with it)")
    convert.add_argument("--resolution", type=int, help="training resolution in pixels, where the weights do not "
                                                        "fix it")
    convert.add_argument("--num-heads", type=int, help="attention heads, where the width matches no published config")
    convert.set_defaults(func=run)


def run(args) -> None:
    options = ConvertOptions(vae=args.vae, resolution=args.resolution, num_heads=args.num_heads)
    folder = convert_to_checkpoint(args.source, args.out, options)
    _, record = load_checkpoint(folder)
    cfg, d = record.model, record.diffusion
    sampler = d.sampler or (d.scheduler or {}).get("_class_name") or "default"
    print(f"wrote {folder}: {cfg.backbone} ({record.origin['format']}), {record.resolution} px, "
          f"{cfg.num_classes} classes, sampling {d.objective} ({sampler}) x {d.sample_steps}, "
          f"cfg {d.cfg_scale:g}" + ("" if record.vae else "; no VAE: give --vae to sample images"))
