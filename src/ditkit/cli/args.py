"""What several subcommands parse: shared flags (argparse `parents=`) and value parsers.

Each shared flag is written once here; a subcommand names the groups it takes, e.g.
`sub.add_parser("sample", parents=[SHARED.device, SHARED.mixer, ...])`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..data.images import image_format
from ..errors import DitkitError
from ..files import check_writable
from ..mixers import MixerSpec
from ..mixers.spec import parse_items

# Every command and the line `ditkit --help` shows for it, in that order. A command's module (named
# after it) is imported only when that command runs (`main.build_parser`): `ditkit --help` stays fast.
COMMANDS = {
    "info": "parameters and forward GFLOPs of a named model or a checkpoint",
    "eval": "FID, KID and Inception Score of samples against reference images",
    "bench": "parameters, GFLOPs, time per sampling step and peak memory vs resolution",
    "train": "train a model from a YAML config (output folder: train.out_dir)",
    "prepare": "encode a data source with a VAE into latent shards (resumable, torchrun: one slice per process) "
               "for training with data.source=latents:DIR",
    "distill": "CLEAR linearization: distil a full-attention teacher into a local-attention student (flags "
               "override the config; defaults are DistillConfig's)",
    "sample": "sample an image grid from a checkpoint",
    "quickstart": "train a digits teacher, distil a CLEAR student, sample, score and benchmark both, and write a "
                  "report folder (resumable)",
    "convert": "published weights (facebookresearch DiT .pt, diffusers DiT folders, official U-DiT) -> a ditkit "
               "checkpoint folder",
    "export": "a ditkit checkpoint -> a diffusers DiTPipeline folder",
    "generate": "generate with a diffusers pipeline folder (FLUX, SD3, PixArt)",
    "study": "train (or distil) every arm of a study on the same compute, over seeds, measure them at points of "
             "the budget, and write a report folder (resumable)",
}


def flag_group(*flags: tuple[tuple[str, ...], dict]) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    for names, options in flags:
        parent.add_argument(*names, **options)
    return parent


class MixerFlag(argparse.Action):
    """--mixer SPEC (a MixerSpec: `clear` or `clear:radius=8,down_factor=4`), split for the commands: its
    name goes to `args.mixer` and its options to the front of `args.mixer_opt`, before the --mixer-opt
    items, which win. A spec that does not parse stays as given, for the command to refuse in one line
    when it reads it (`mixer_spec`, `load_checkpoint`): argparse would print its usage too."""

    def __call__(self, parser, namespace, value, option_string=None):
        given = list(namespace.mixer_opt or [])[len(getattr(namespace, "mixer_spec_items", [])):]
        try:
            own = MixerSpec.parse(value)
        except DitkitError:
            own = None
        namespace.mixer = value if own is None else own.name
        namespace.mixer_spec_items = [] if own is None else own.items()
        namespace.mixer_opt = [*namespace.mixer_spec_items, *given] or None


def mixer_spec(args: argparse.Namespace) -> MixerSpec | None:
    """The mixer that `--mixer SPEC --mixer-opt KEY=VALUE ...` name, validated (None without --mixer: a
    command then keeps the checkpoint's own mixer, with the --mixer-opt options if any)."""
    if args.mixer is None:
        return None
    return MixerSpec.parse(args.mixer).merged(parse_options(args.mixer_opt))


@dataclass(frozen=True)
class SharedFlags:
    """Parent parsers of the flags that mean the same in every subcommand."""

    device: argparse.ArgumentParser
    mixer: argparse.ArgumentParser
    weights: argparse.ArgumentParser
    seed: argparse.ArgumentParser
    progress: argparse.ArgumentParser
    sampling: argparse.ArgumentParser
    run_folder: argparse.ArgumentParser


def shared_flags() -> SharedFlags:
    return SharedFlags(
        device=flag_group((("--device",), dict(help="cpu, cuda, ... (default: cuda when available)"))),
        mixer=flag_group((("--mixer",), dict(action=MixerFlag, metavar="SPEC",
                                             help="swap the token mixer at load time: a name and its options, "
                                                  "e.g. clear or clear:radius=8,down_factor=4")),
                         (("--mixer-opt",), dict(action="append", metavar="KEY=VALUE",
                                                 help="mixer option, e.g. radius=8 (repeatable; merged into "
                                                      "--mixer's, over them)"))),
        weights=flag_group((("--no-ema",), dict(action="store_true",
                                                help="use the raw training weights, not the EMA"))),
        seed=flag_group((("--seed",), dict(type=int, default=0, help="random seed (default 0)"))),
        progress=flag_group((("--no-progress",), dict(action="store_true", help="no progress bars"))),
        sampling=flag_group(
            (("--resolution",), dict(help="pixels, e.g. 64 or 64x128 (default: the training resolution)")),
            (("--steps",), dict(type=int, help="sampling steps (default: the run's diffusion.sample_steps)")),
            (("--cfg",), dict(type=float, help="classifier-free guidance scale (1 = off; default: the run's)")),
            (("--sampler",), dict(help="ddpm or ddim (DDPM models), euler (flow models)"))),
        run_folder=flag_group(
            (("--resume",), dict(nargs="?", const=True, default=None, metavar="CKPT",
                                 help="continue from the latest checkpoint of the output folder, or from CKPT")),
            (("--overwrite",), dict(action="store_true",
                                    help="start afresh in an output folder that holds a previous run, deleting its "
                                         "checkpoints, metrics and samples (without --resume or this, such a folder "
                                         "is refused)"))),
    )


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


def optional_size(text: str | None) -> tuple[int | None, int | None]:
    """(height, width) of a --resolution, or (None, None) to take the run's own."""
    return parse_size(text) if text else (None, None)


def parse_options(items: list[str] | None) -> dict:
    """--mixer-opt KEY=VALUE items -> {key: value} (values as in a MixerSpec: YAML scalars, finite numbers)."""
    return parse_items(list(items or []))


def split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """Positionals `[CONFIG] [KEY=VALUE ...]`: the first item is the config unless it is an override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, list(items)


OVERRIDE = re.compile(r"[A-Za-z_][\w.]*=.*")  # train.steps=100, radius=8; not a path like runs/a=b


def overrides_anywhere(parser: argparse.ArgumentParser, dest: str) -> None:
    """Take every KEY=VALUE item of the command line into `dest`, wherever it stands: argparse fills a
    positional list only from the items before the first option (`train digits --no-progress
    train.steps=2` would leave train.steps=2 unknown), and an option with an optional value
    (`--resume train.steps=2`) would swallow the override."""
    parse_known = parser.parse_known_args

    def parse_known_args(args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)  # argparse's default
        overrides = [item for item in args if OVERRIDE.fullmatch(item) and not Path(item).exists()]
        namespace, extras = parse_known([item for item in args if item not in overrides], namespace)
        setattr(namespace, dest, [*getattr(namespace, dest), *overrides])
        return namespace, extras

    parser.parse_known_args = parse_known_args


def check_output_folder(folder: str | Path) -> Path:
    """Fail before the work, not after it: `folder` must exist or be creatable, and be writable."""
    return check_writable(folder)


def check_output_file(path: str | Path, image: bool = False) -> Path:
    """Fail before the work, not after it: `path` must be a writable file name (with an image
    extension PIL writes, for an image), and a file already there must be of the kind written
    (an image, a JSON file): a checkpoint or anything else given by mistake is never replaced."""
    path = Path(path)
    if path.is_dir():
        raise DitkitError(f"output {path} is a folder: give a file name")
    if image:
        image_format(path)
    if path.is_file() and not _is_kind(path, image):
        kind = "an image" if image else "a JSON file"
        raise DitkitError(f"output {path} exists and is not {kind} (it would be replaced): choose another file name")
    check_output_folder(path.parent)
    return path


def check_not_an_input(out: str | Path, inputs: dict[str, object]) -> None:
    """Refuse an output that would replace one of the command's own input files (`inputs`: option ->
    a path, a list of paths or None), before any work: `out` itself, or one of the numbered files
    (out-0.png, out-1.png, ...) written when it makes several."""
    out = Path(out).resolve()
    numbered = re.compile(rf"{re.escape(out.stem)}-\d+{re.escape(out.suffix)}")
    for option, value in inputs.items():
        for given in value if isinstance(value, list | tuple) else [value]:
            if given is None:
                continue
            path = Path(str(given).rpartition(":")[0] if option == "--lora" and ":" in str(given) else given)
            path = path.resolve()
            if path == out or (path.parent == out.parent and numbered.fullmatch(path.name)):
                raise DitkitError(f"--out {out} would replace the {option} input {given}: choose another file name")


def _is_kind(path: Path, image: bool) -> bool:
    """Whether the existing file `path` is what an output of that name holds: an image PIL reads,
    or (other outputs: ditkit writes JSON) a JSON document."""
    if image:
        try:
            with Image.open(path) as opened:
                opened.verify()
            return True
        except Exception:  # PIL raises many kinds for a file that is not an image
            return False
    try:
        json.loads(path.read_text())
        return True
    except (ValueError, UnicodeDecodeError):
        return False