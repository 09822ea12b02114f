"""`ditkit study CONFIG [KEY=VALUE ...]`: a compute-matched comparison of arms, resumable, into a report folder."""

from __future__ import annotations

from pathlib import Path

from ..config import resolve_config
from ..distributed.launch import default_device
from ..errors import DitkitError
from ..study import StudyConfig, run_study
from ..train.config import load_config
from .args import COMMANDS, SharedFlags, check_output_folder, overrides_anywhere


def add_parser(sub, shared: SharedFlags) -> None:
    study = sub.add_parser("study", parents=[shared.run_folder, shared.device, shared.progress],
                           help=COMMANDS["study"])
    study.add_argument("config", help="a study YAML, or a built-in one (study-backbones, study-backbones-64, "
                       "study-distillation)")
    study.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                       help="config overrides, e.g. budget.gflops=500 seeds=[0] arms.udit=null")
    study.add_argument("--out", help="the study folder (default runs/<config name>); --resume continues it")
    study.add_argument("--features-path", metavar="PATH", help="where the ditkit-digits FID extractor is cached "
                       "(default: ~/.cache/ditkit/features/ditkit-digits-v1.pt; trained there on first use)")
    overrides_anywhere(study, "overrides")
    study.set_defaults(func=run)


def run(args) -> None:
    if args.resume not in (None, True):
        raise DitkitError(f"ditkit study --resume takes no checkpoint (got {args.resume}): it continues the study "
                          "in --out")
    path = resolve_config(args.config)
    config = load_config(path, args.overrides, kind=StudyConfig)
    out = check_output_folder(args.out or Path("runs") / path.stem)
    report = run_study(config, out, resume=bool(args.resume), overwrite=args.overwrite,
                       device=default_device(args.device), features_path=args.features_path,
                       progress=not args.no_progress)
    print(f"done: open {report}")
