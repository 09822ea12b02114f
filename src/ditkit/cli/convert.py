"""`ditkit convert` (published weights -> a ditkit checkpoint) and `ditkit export` (-> diffusers)."""

from __future__ import annotations

from .args import SharedFlags


def add_parsers(sub, shared: SharedFlags) -> None:
    convert = sub.add_parser("convert", help="published weights (facebookresearch DiT .pt, diffusers DiT folders, "
                                             "official U-DiT) -> a ditkit checkpoint folder")
    convert.add_argument("source", help="the published checkpoint file or folder")
    convert.add_argument("--out", required=True, help="the ditkit checkpoint folder to write")
    convert.add_argument("--vae", help="a diffusers AutoencoderKL folder (latent-space models decode with it)")
    convert.add_argument("--resolution", type=int, help="training resolution in pixels, where the weights do not "
                                                        "fix it")
    convert.add_argument("--num-heads", type=int, help="attention heads, where the width matches no published config")
    convert.set_defaults(func=run_convert)

    export = sub.add_parser("export", help="a ditkit checkpoint -> a diffusers DiTPipeline folder")
    export.add_argument("ckpt", help="run folder, checkpoint folder or .safetensors file")
    export.add_argument("--to", choices=["diffusers"], default="diffusers", help="the target format")
    export.add_argument("out", help="the folder to write")
    export.add_argument("--no-ema", action="store_true", help="export the raw training weights, not the EMA")
    export.add_argument("--approximate-timesteps", action="store_true",
                        help="export a DiT trained with the official timestep frequencies anyway (diffusers' DiT "
                             "has only its own, as the hub's DiT folders); the difference is reported")
    export.set_defaults(func=run_export)


def run_convert(args) -> None:
    from ..checkpoint import load_checkpoint
    from ..convert.pretrained import ConvertOptions, convert_to_checkpoint

    options = ConvertOptions(vae=args.vae, resolution=args.resolution, num_heads=args.num_heads)
    folder = convert_to_checkpoint(args.source, args.out, options)
    _, record = load_checkpoint(folder)
    cfg, d = record.model, record.diffusion
    sampler = d.sampler or (d.scheduler or {}).get("_class_name") or "default"
    print(f"wrote {folder}: {cfg.backbone} ({record.origin['format']}), {record.resolution} px, "
          f"{cfg.num_classes} classes, sampling {d.objective} ({sampler}) x {d.sample_steps}, "
          f"cfg {d.cfg_scale:g}" + ("" if record.vae else "; no VAE: give --vae to sample images"))


def run_export(args) -> None:
    import json

    from ..convert.diffusers_dit import export_diffusers

    out = export_diffusers(args.ckpt, args.out, ema=not args.no_ema, approximate_timesteps=args.approximate_timesteps)
    print(f"wrote {out}")
    report = out / "export_report.json"
    if report.is_file():
        moved = json.loads(report.read_text())["timestep_approximation"]
        print(f"approximation: diffusers' timestep frequencies move the outputs by {moved['mean_abs']:.3g} on average "
              f"(max {moved['max_abs']:.3g}; outputs' std {moved['output_std']:.3g}) on a probe batch")
