"""`ditkit export`: a ditkit checkpoint -> a diffusers DiTPipeline folder."""

from __future__ import annotations

import json

from ..convert.diffusers_dit import export_diffusers
from .args import COMMANDS, SharedFlags


def add_parser(sub, shared: SharedFlags) -> None:
    export = sub.add_parser("export", help=COMMANDS["export"])
    export.add_argument("ckpt", help="run folder, checkpoint folder or .safetensors file")
    export.add_argument("--to", choices=["diffusers"], default="diffusers", help="the target format")
    export.add_argument("out", help="the folder to write")
    export.add_argument("--no-ema", action="store_true", help="export the raw training weights, not the EMA")
    export.add_argument("--approximate-timesteps", action="store_true",
                        help="export a DiT trained with the official timestep frequencies anyway (diffusers' DiT "
                             "has only its own, as the hub's DiT folders); the difference is reported")
    export.set_defaults(func=run)


def run(args) -> None:
    out = export_diffusers(args.ckpt, args.out, ema=not args.no_ema, approximate_timesteps=args.approximate_timesteps)
    print(f"wrote {out}")
    report = out / "export_report.json"
    if report.is_file():
        moved = json.loads(report.read_text())["timestep_approximation"]
        print(f"approximation: diffusers' timestep frequencies move the outputs by {moved['mean_abs']:.3g} on average "
              f"(max {moved['max_abs']:.3g}; outputs' std {moved['output_std']:.3g}) on a probe batch")
