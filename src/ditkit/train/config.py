"""The typed training config: dataclasses loaded from YAML, with `key=value` overrides.

    model:     {name: DiT-S/2, mixer: full, mixer_options: {}, args: {depth: 6}}
    data:      {source: digits, resolution: 32, hflip: false, vae: null}
    diffusion: {objective: flow, ...}
    train:     {out_dir: runs/x, steps: 1000, batch_size: 64, lr: 1e-4, ...}

Unknown keys are errors that list the valid ones, so a typo never silently does nothing; every
number is checked against its range when the config loads (`RANGES` below), so a value that
would crash or silently do nothing later (train.grad_accum=0, train.lr=nan) fails before any work.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import DitkitError
from ..record import DiffusionSettings


@dataclass(frozen=True)
class Range:
    """The finite numbers a config field accepts: `low` <= x (`low` < x when `open_low`) and x < `high`."""

    low: float
    high: float | None = None
    open_low: bool = False

    def accepts(self, value: float) -> bool:
        above = value > self.low if self.open_low else value >= self.low
        return math.isfinite(value) and above and (self.high is None or value < self.high)

    def __str__(self) -> str:
        if self.high is not None:
            return f"in [{self.low:g}, {self.high:g})"
        return f"greater than {self.low:g}" if self.open_low else f"at least {self.low:g}"


AT_LEAST_0, AT_LEAST_1 = Range(0), Range(1)
POSITIVE = Range(0, open_low=True)
FRACTION = Range(0, 1)  # a decay: 1 would never move
MIXED_PRECISIONS = ("no", "fp16", "bf16")
SHARDINGS = ("none", "fsdp")  # fsdp: distributed/sharding.py

# field -> allowed range, per section (None values of optional fields are not checked).
RANGES = {
    "data": {"resolution": AT_LEAST_1, "photos_length": AT_LEAST_1, "num_workers": AT_LEAST_0},
    "train": {"steps": AT_LEAST_1, "batch_size": AT_LEAST_1, "grad_accum": AT_LEAST_1, "lr": POSITIVE,
              "weight_decay": AT_LEAST_0, "ssm_lr": POSITIVE, "warmup_steps": AT_LEAST_0, "grad_clip": AT_LEAST_0,
              "ema_decay": FRACTION, "seed": AT_LEAST_0, "log_every": AT_LEAST_1, "sample_every": AT_LEAST_1,
              "ckpt_every": AT_LEAST_1, "keep_checkpoints": AT_LEAST_0, "num_samples": AT_LEAST_0},
}


def check_ranges(section, ranges: dict[str, Range], prefix: str) -> None:
    """A one-line error for the first field of `section` outside its range; `prefix` names it (train.)."""
    for name, allowed in ranges.items():
        value = getattr(section, name)
        if value is not None and not allowed.accepts(value):
            raise DitkitError(f"config key {prefix}{name} must be {allowed}, got {value!r}")


def check_sharding(value: str, key: str) -> None:
    if value not in SHARDINGS:
        raise DitkitError(f"config key {key} must be one of {', '.join(SHARDINGS)}, got {value!r}")


@dataclass
class ModelSection:
    name: str = "DiT-Nano/4"  # a named config: `ditkit info --list` shows them
    mixer: str | None = None  # default: the backbone's own (full for DiT, downsampled for U-DiT)
    mixer_options: dict | None = None
    args: dict = field(default_factory=dict)  # overrides of the backbone's config fields


@dataclass
class DataSection:
    source: str = "digits"  # digits, photos, or a path to an image folder
    resolution: int = 32  # pixels
    hflip: bool = False  # random horizontal flips (not for digits!)
    vae: str | None = None  # local diffusers AutoencoderKL folder: train in its latent space
    cache_dir: str | None = None  # latent cache; default ~/.cache/ditkit
    photos_length: int = 2000  # crops per epoch of the `photos` dataset
    num_workers: int = 0

    def __post_init__(self):
        check_ranges(self, RANGES["data"], "data.")


DiffusionSection = DiffusionSettings  # stored as is in every checkpoint's run record


@dataclass
class TrainSection:
    out_dir: str = "runs/digits"
    steps: int = 2000
    batch_size: int = 64  # per process, per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.0
    ssm_lr: float | None = 1e-3  # SSM state dynamics (A, dt), no weight decay; null: lr and weight_decay as the rest
    warmup_steps: int = 0
    grad_clip: float | None = 1.0
    ema_decay: float = 0.9999
    mixed_precision: str = "no"  # no, fp16, bf16 (Accelerate)
    seed: int = 0
    log_every: int = 25
    sample_every: int = 500
    ckpt_every: int = 500
    keep_checkpoints: int = 3
    num_samples: int = 16  # images in each sample grid
    sharding: str = "none"  # none (one process, or DDP under torchrun) or fsdp (FSDP2 under torchrun)
    activation_checkpointing: bool = False  # recompute each block's activations in backward (less memory)

    def __post_init__(self):
        check_ranges(self, RANGES["train"], "train.")
        if self.mixed_precision not in MIXED_PRECISIONS:
            raise DitkitError(f"config key train.mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}, "
                              f"got {self.mixed_precision!r}")
        check_sharding(self.sharding, "train.sharding")
        if self.sharding == "fsdp" and self.mixed_precision == "fp16":
            raise DitkitError("train.mixed_precision=fp16 needs a loss scaler that sharded training does not have: "
                              "use bf16 with train.sharding=fsdp")
        if not self.out_dir:
            raise DitkitError("config key train.out_dir must name a folder, got an empty string")


@dataclass
class TrainConfig:
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _field_types(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _check_value(path: str, value: Any, hint: Any) -> Any:
    """Validate a YAML value against a field's type hint, with a one-line error."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is float and isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if option is float and isinstance(value, str):  # YAML reads 1e-4 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if option is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if option in (str, bool, dict, list) and isinstance(value, option):
            return value
    names = " or ".join("null" if o is type(None) else o.__name__ for o in options)
    raise DitkitError(f"config key {path} must be {names}, got {value!r}")


def _build(cls, values: dict[str, Any], prefix: str):
    if not isinstance(values, dict):
        raise DitkitError(f"config section {prefix.rstrip('.') or 'top level'} must be a mapping, got {values!r}")
    hints = _field_types(cls)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise DitkitError(f"config has no key {', '.join(prefix + k for k in unknown)}: "
                          f"valid keys{' in ' + prefix.rstrip('.') if prefix else ''} are {', '.join(hints)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_value(prefix + name, value, hint)
    return cls(**kwargs)


def config_from_dict(values: dict[str, Any], kind: type | None = None, prefix: str = ""):
    """A typed config (`kind`, default TrainConfig; any dataclass of typed fields) from nested values;
    `prefix` (e.g. "arms.dit.") names where they sit in a larger config, in errors."""
    return _build(kind or TrainConfig, values or {}, prefix)


def set_value(values: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted `key` (e.g. train.steps) of a nested dict, making sections as needed."""
    node = values
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise DitkitError(f"config key {key}: {part} is not a section")
    node[leaf] = value


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise DitkitError(f"override {item!r} is not key=value (e.g. train.steps=100)")
        set_value(values, key, yaml.safe_load(raw) if raw else "")
    return values


def load_config(path: str | Path | None, overrides: list[str] = (), kind: type | None = None,
                settings: dict[str, Any] | None = None):
    """A YAML file (or nothing), then `settings` ({dotted key: value}, e.g. from command-line flags), then
    `key=value` overrides -> a typed config of `kind` (default TrainConfig)."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise DitkitError(f"config file {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise DitkitError(f"config file {path} is not valid YAML: {error}".replace("\n", " ")) from error
    for key, value in (settings or {}).items():
        set_value(values, key, value)
    return config_from_dict(apply_overrides(values, list(overrides)), kind)
