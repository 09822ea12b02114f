"""What several subcommands parse: shared flags (argparse `parents=`) and value parsers.

Each shared flag is written once here; a subcommand names the groups it takes, e.g.
`sub.add_parser("sample", parents=[SHARED.device, SHARED.mixer, ...])`.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import DitkitError

BUILTIN_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def flag_group(*flags: tuple[tuple[str, ...], dict]) -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    for names, options in flags:
        parent.add_argument(*names, **options)
    return parent


@dataclass(frozen=True)
class SharedFlags:
    """Parent parsers of the flags that mean the same in every subcommand."""

    device: argparse.ArgumentParser
    mixer: argparse.ArgumentParser
    weights: argparse.ArgumentParser
    seed: argparse.ArgumentParser
    progress: argparse.ArgumentParser
    sampling: argparse.ArgumentParser


def shared_flags() -> SharedFlags:
    return SharedFlags(
        device=flag_group((("--device",), dict(help="cpu, cuda, ... (default: cuda when available)"))),
        mixer=flag_group((("--mixer",), dict(help="swap the token mixer at load time (e.g. clear)")),
                         (("--mixer-opt",), dict(action="append", metavar="KEY=VALUE",
                                                 help="mixer option, e.g. radius=8 (repeatable)"))),
        weights=flag_group((("--no-ema",), dict(action="store_true",
                                                help="use the raw training weights, not the EMA"))),
        seed=flag_group((("--seed",), dict(type=int, default=0, help="random seed (default 0)"))),
        progress=flag_group((("--no-progress",), dict(action="store_true", help="no progress bars"))),
        sampling=flag_group(
            (("--resolution",), dict(help="pixels, e.g. 64 or 64x128 (default: the training resolution)")),
            (("--steps",), dict(type=int, help="sampling steps (default: the run's diffusion.sample_steps)")),
            (("--cfg",), dict(type=float, help="classifier-free guidance scale (1 = off; default: the run's)")),
            (("--sampler",), dict(help="ddpm or ddim (DDPM models), euler (flow models)"))),
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


def parse_value(text: str):
    """A YAML value; numbers YAML leaves as strings (1e9, 1e-4: no dot) become floats."""
    value = yaml.safe_load(text)
    if isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            return value
        if not math.isfinite(number):
            raise DitkitError(f"option value {text!r} is not a finite number")
        return number
    return value


def parse_options(items: list[str] | None) -> dict:
    """--mixer-opt KEY=VALUE items -> {key: value}."""
    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise DitkitError(f"mixer option {item!r} is not key=value (e.g. radius=8)")
        options[key] = parse_value(value)
    return options


def resolve_config(name: str) -> Path:
    """A config path, or the name of a config that ships with ditkit (e.g. `digits`)."""
    path = Path(name)
    if path.is_file():
        return path
    builtin = BUILTIN_CONFIGS / f"{name}.yaml"
    if builtin.is_file():
        return builtin
    shipped = ", ".join(sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml")))
    raise DitkitError(f"config {name!r} is neither a file nor a built-in config ({shipped})")


def split_config_and_overrides(items: list[str]) -> tuple[str | None, list[str]]:
    """Positionals `[CONFIG] [KEY=VALUE ...]`: the first item is the config unless it is an override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, list(items)
