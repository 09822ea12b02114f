"""The `ditkit` command line: info, train, sample, distill, eval, bench, quickstart, convert, export,
generate, study.

The CLI only parses and calls the library. Each subcommand is one module named after it (`info.py`,
`train.py`, `eval.py`, ...), holding its argument declarations and its call; flags that mean the same
everywhere
(--device, --mixer, --no-ema, --seed, --no-progress, the sampling settings) are written once in
`args.py` and shared through argparse `parents=`.
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..errors import DitkitError
from . import bench, convert, distill, export, generate, info, quickstart, sample, study, train
from . import eval as eval_command
from .args import shared_flags

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ditkit", description="Efficient diffusion backbones for high resolution.")
    parser.add_argument("--version", action="version", version=f"ditkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    shared = shared_flags()
    for command in (info, eval_command, bench, train, distill, sample, quickstart, convert, export, generate, study):
        command.add_parser(sub, shared)  # in the order `ditkit --help` lists them
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
