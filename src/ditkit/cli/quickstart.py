"""`ditkit quickstart`: the whole story on the built-in digits, resumable, into one report folder."""

from __future__ import annotations

from ..distributed.launch import default_device
from ..study.quickstart import SCALES, quickstart, quickstart_settings
from .args import COMMANDS, SharedFlags


def add_parser(sub, shared: SharedFlags) -> None:
    quick = sub.add_parser("quickstart", parents=[shared.progress],
                           help=COMMANDS["quickstart"])
    quick.add_argument("--out", default="runs/quickstart", help="the report folder (run it again to resume)")
    quick.add_argument("--scale", default="default", choices=list(SCALES),
                       help="default (about 7.5 min on 2 CPU cores) or tiny (a 1-layer model: about a minute, "
                            "for trials)")
    quick.add_argument("--teacher-steps", type=int, help="teacher training steps (default 1500)")
    quick.add_argument("--distill-steps", type=int, help="distillation steps (default 300)")
    quick.add_argument("--features-path", metavar="PATH", help="where the ditkit-digits FID extractor is cached "
                       "(default: ~/.cache/ditkit/features/ditkit-digits-v1.pt; trained there on first use)")
    quick.add_argument("--device", help="cpu, cuda, ... for all but training, which (as `ditkit train`) runs on "
                                        "the GPU when there is one (default: cuda when available)")
    quick.set_defaults(func=run)


def run(args) -> None:
    settings = quickstart_settings(args.scale, teacher_steps=args.teacher_steps, distill_steps=args.distill_steps)
    report = quickstart(args.out, settings, device=default_device(args.device), features_path=args.features_path,
                        progress=not args.no_progress)
    print(f"done: open {report}")
