"""`ditkit export`: a ditkit checkpoint -> a diffusers DiTPipeline folder; a FLUX CLEAR student -> CLEAR's
official weights file (`--to clear-official`)."""

from __future__ import annotations

import json

from ..convert.diffusers_dit import export_diffusers
from ..diffusers.official_clear import export_official
from ..errors import DitkitError
from .args import COMMANDS, SharedFlags


def add_parser(sub, shared: SharedFlags) -> None:
    export = sub.add_parser("export", help=COMMANDS["export"])
    export.add_argument("ckpt", help="run folder, checkpoint folder or .safetensors file")
    export.add_argument("--to", choices=["diffusers", "clear-official"], default="diffusers",
                        help="the target format: a diffusers folder, or (a FLUX student of ditkit distill) the "
                             "layout of CLEAR's released weights, one .safetensors file")
    export.add_argument("out", help="the folder to write (clear-official: the file, e.g. "
                                    "clear_local_8_down_4.safetensors)")
    export.add_argument("--no-ema", action="store_true", help="export the raw training weights, not the EMA")
    export.add_argument("--approximate-timesteps", action="store_true",
                        help="export a DiT trained with the official timestep frequencies anyway (diffusers' DiT "
                             "has only its own, as the hub's DiT folders); the difference is reported")
    export.set_defaults(func=run)


def run(args) -> None:
    if args.to == "clear-official":
        if args.no_ema or args.approximate_timesteps:
            raise DitkitError("--no-ema and --approximate-timesteps belong to --to diffusers: a student is exported "
                              "as trained")
        print(f"wrote {export_official(args.ckpt, args.out)}")
        return
    out = export_diffusers(args.ckpt, args.out, ema=not args.no_ema, approximate_timesteps=args.approximate_timesteps)
    print(f"wrote {out}")
    report = out / "export_report.json"
    if report.is_file():
        moved = json.loads(report.read_text())["timestep_approximation"]
        print(f"approximation: diffusers' timestep frequencies move the outputs by {moved['mean_abs']:.3g} on average "
              f"(max {moved['max_abs']:.3g}; outputs' std {moved['output_std']:.3g}) on a probe batch")
