"""`ditkit bench`: parameters, GFLOPs, time per sampling step and peak memory over resolutions."""

from __future__ import annotations

import torch

from ..distributed.launch import default_device
from ..errors import DitkitError
from ..metrics.bench import device_name, run_bench, write_report
from .args import COMMANDS, SharedFlags, check_output_folder, parse_options


def add_parser(sub, shared: SharedFlags) -> None:
    bench = sub.add_parser("bench", help=COMMANDS["bench"],
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
    bench.set_defaults(func=run)


def check_numbers(args) -> None:
    """Sizes, repeats and threads that would crash or measure nothing are one line before any model is built."""
    counts = {"--resolutions": args.resolutions, "--repeats": [args.repeats], "--threads": [args.threads or 1]}
    for flag, values in counts.items():
        if bad := [value for value in values if value < 1]:
            raise DitkitError(f"{flag} must be at least 1, got {bad[0]}")
    for flag, value in (("--max-seconds", args.max_seconds), ("--max-memory-mib", args.max_memory_mib)):
        if value is not None and not value > 0:
            raise DitkitError(f"{flag} must be greater than 0, got {value:g}")


def run(args) -> None:
    check_numbers(args)
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
