"""The `ditkit` command line: info, train, prepare, sample, distill, eval, bench, quickstart, convert, export,
generate, study.

The CLI only parses and calls the library. Each subcommand is one module named after it (`info.py`,
`train.py`, `eval.py`, ...), holding its argument declarations and its call; flags that mean the same
everywhere
(--device, --mixer, --no-ema, --seed, --no-progress, the sampling settings) are written once in
`args.py` and shared through argparse `parents=`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .. import __version__
from ..errors import DitkitError
from ..files import storage_fault_message
from .args import COMMANDS, shared_flags

__all__ = ["build_parser", "main"]


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """Every command's parser (`command` None), or `command`'s in full and only the name and summary of
    the others (all `ditkit --help` lists). A command's module imports the library it calls (torch,
    diffusers, ...), so only the command that runs is imported."""
    parser = argparse.ArgumentParser(prog="ditkit", description="Efficient diffusion backbones for high resolution.")
    parser.add_argument("--version", action="version", version=f"ditkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    shared = shared_flags()
    for name, summary in COMMANDS.items():
        if command is None or command == name:
            importlib.import_module(f"{__package__}.{name}").add_parser(sub, shared)
        else:
            sub.add_parser(name, help=summary)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((item for item in argv if not item.startswith("-")), "")  # the top level has no valued flags
    args = build_parser(command if command in COMMANDS else "").parse_args(argv)
    try:
        args.func(args)
    except DitkitError as error:
        print(f"ditkit: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a storage fault outside the write paths that name it: still one line
        message = storage_fault_message(error)
        if message is None:
            raise
        print(f"ditkit: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ditkit: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
