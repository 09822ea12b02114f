"""Typed configs: dataclasses loaded from YAML files or nested dicts, with `key=value` overrides.

Every ditkit config (training, distillation, studies) is a dataclass of typed fields, loaded here:

    @dataclass
    class Section:
        steps: int = ranged(2000, AT_LEAST_1)          # the range travels with the field
        precision: str = one_of("no", ("no", "bf16"))   # so do the allowed words

        def __post_init__(self):
            check_fields(self, "section.")             # direct construction is checked too

Unknown keys are errors that list the valid ones, so a typo never silently does nothing; every value
is checked against its field's type, range and choices when the config loads, so a value that would
crash or silently do nothing later (train.grad_accum=0, train.lr=nan) fails before any work.

This module sits on the ground floor: it imports nothing of ditkit but its errors.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .errors import DitkitError

BUILTIN_CONFIGS = Path(__file__).resolve().parent / "configs"


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
            return f"in [{_number(self.low)}, {_number(self.high)})"
        return f"greater than {_number(self.low)}" if self.open_low else f"at least {_number(self.low)}"


def _number(value: float) -> str:
    """A bound as a reader writes it: 2**64 in full, 0.5 as 0.5."""
    return str(value) if isinstance(value, int) else f"{value:g}"


AT_LEAST_0, AT_LEAST_1 = Range(0), Range(1)
POSITIVE = Range(0, open_low=True)
FRACTION = Range(0, 1)  # a decay: 1 would never move; a probability of dropping (1 would always drop)
SEED = Range(0, 2**64)  # what torch.manual_seed takes


def ranged(default: Any, allowed: Range) -> Any:
    """A dataclass field whose numbers must lie in `allowed` (None, for optional fields, is not checked)."""
    return dataclasses.field(default=default, metadata={"range": allowed})


def one_of(default: Any, choices: tuple[str, ...]) -> Any:
    """A dataclass field that takes one of `choices` (None, for optional fields, is not checked)."""
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)})


def check_field(field: dataclasses.Field, value: Any, key: str, whole: bool = False) -> None:
    """A one-line error when `value` is outside the range or choices declared on `field`; `key` names it.
    A ranged field takes numbers only (`whole`: whole numbers only), whatever the caller passed: values
    that bypass the YAML type check (model.args, direct construction) are checked here too."""
    if value is None:
        return
    allowed = field.metadata.get("range")
    if allowed is not None:
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or (whole and not isinstance(value, int)):
            raise DitkitError(f"config key {key} must be a {'whole ' if whole else ''}number {allowed}, got {value!r}")
        if not allowed.accepts(value):
            raise DitkitError(f"config key {key} must be {allowed}, got {value!r}")
    choices = field.metadata.get("choices")
    if choices is not None and value not in choices:
        raise DitkitError(f"config key {key} must be one of {', '.join(choices)}, got {value!r}")


def check_fields(section: Any, prefix: str) -> None:
    """Check every field of the dataclass instance `section` against what it declares (`ranged`,
    `one_of`); `prefix` (e.g. "train.") says where the section sits, in errors."""
    hints = typing.get_type_hints(type(section))
    for field in dataclasses.fields(section):
        check_field(field, getattr(section, field.name), prefix + field.name, _is_whole(hints[field.name]))


def _is_whole(hint: Any) -> bool:
    """Whether a field's type hint (int, or int | None) takes whole numbers only."""
    return hint is int or (isinstance(hint, types.UnionType) and int in typing.get_args(hint)
                           and float not in typing.get_args(hint))


def _check_type(path: str, value: Any, hint: Any) -> Any:
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


def _build(kind: type, values: dict[str, Any], prefix: str):
    if not isinstance(values, dict):
        raise DitkitError(f"config section {prefix.rstrip('.') or 'top level'} must be a mapping, got {values!r}")
    hints = typing.get_type_hints(kind)
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise DitkitError(f"config has no key {', '.join(prefix + k for k in unknown)}: "
                          f"valid keys{' in ' + prefix.rstrip('.') if prefix else ''} are {', '.join(hints)}")
    fields = {field.name: field for field in dataclasses.fields(kind)}
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, value or {}, f"{prefix}{name}.")
        else:
            kwargs[name] = _check_type(prefix + name, value, hint)
            # named where it sits in a larger config
            check_field(fields[name], kwargs[name], prefix + name, _is_whole(hint))
    return kind(**kwargs)


def config_from_dict(values: dict[str, Any] | None, kind: type, prefix: str = ""):
    """A typed config of `kind` (a dataclass of typed fields, nested dataclasses for sections) from
    nested values; `prefix` (e.g. "arms.dit.") names where they sit in a larger config, in errors."""
    return _build(kind, values or {}, prefix)


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


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The nested values of a YAML config file (empty file: none): a mapping of sections, in UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise DitkitError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise DitkitError(f"config file {path} is not UTF-8 text ({error.reason} at byte {error.start}): "
                          "save it as UTF-8") from error
    except yaml.YAMLError as error:
        raise DitkitError(f"config file {path} is not valid YAML: {error}".replace("\n", " ")) from error
    if not isinstance(values, dict):
        raise DitkitError(f"config file {path} holds a {type(values).__name__}, not a mapping of sections "
                          "(model:, data:, train: ...): write it as key: value lines")
    return values


def load_config(path: str | Path | None, overrides: list[str] = (), *, kind: type,
                settings: dict[str, Any] | None = None):
    """A YAML file (or nothing), then `settings` ({dotted key: value}, e.g. from command-line flags), then
    `key=value` overrides -> a typed config of `kind`."""
    values = read_yaml(path) if path is not None else {}
    for key, value in (settings or {}).items():
        set_value(values, key, value)
    return config_from_dict(apply_overrides(values, list(overrides)), kind)


def resolve_config(name: str | Path) -> Path:
    """A config path, or the name of a config that ships with ditkit (e.g. `digits`)."""
    path = Path(name)
    if path.is_file():
        return path
    builtin = BUILTIN_CONFIGS / f"{name}.yaml"
    if builtin.is_file():
        return builtin
    shipped = ", ".join(sorted(p.stem for p in BUILTIN_CONFIGS.glob("*.yaml")))
    raise DitkitError(f"config {name!r} is neither a file nor a built-in config ({shipped})")
