"""`MixerSpec`: a token mixer and its options, written one way everywhere.

    clear                              the mixer with its default options
    clear:radius=8,down_factor=4       a name, then `key=value` options separated by commas

Values are YAML scalars (8, 2.5, tiled, true; 1e9 is a number), and numbers must be finite. A spec is
checked against the registered mixer when it is made: an unknown mixer, an option it does not take or
a value of the wrong type (or one the mixer refuses, e.g. a CLEAR radius below 1) is a one-line
`DitkitError` naming the valid ones. So a config or a flag fails when it is read, not when the model
is built. `str(spec)` is canonical (options in the mixer's own order) and parses back to an equal spec.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import DitkitError
from .registry import check_mixer_options, mixer_options


def parse_value(text: str) -> Any:
    """A YAML scalar; numbers YAML leaves as strings (1e9, 1e-4: no dot) become floats. Infinite and
    NaN numbers are refused."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise DitkitError(f"option value {text!r} is not a YAML scalar (a number, a word, true or false)") from error
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            return value
    if isinstance(value, float) and not math.isfinite(value):
        raise DitkitError(f"option value {text!r} is not a finite number")
    if isinstance(value, list | dict):
        raise DitkitError(f"option value {text!r} is not a YAML scalar (a number, a word, true or false)")
    return value


def parse_items(items: list[str], example: str = "radius=8") -> dict[str, Any]:
    """`key=value` items -> {key: value}, each value parsed by `parse_value`."""
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise DitkitError(f"mixer option {item!r} is not key=value (e.g. {example})")
        options[key.strip()] = parse_value(value.strip())
    return options


def format_value(value: Any) -> str:
    """The text that `parse_value` reads back as `value`."""
    if isinstance(value, bool) or value is None:
        return json.dumps(value)  # true, false, null
    text = repr(value) if isinstance(value, float) else str(value)
    if isinstance(value, str) and (any(c in value for c in ",:=\"'") or parse_value(value) != value):
        text = json.dumps(value)  # a word YAML would read otherwise (yes, 8, null): quoted
    return text


@dataclass(frozen=True)
class MixerSpec:
    """A registered token mixer and the options it is built with, validated when made.

    `MixerSpec("clear", {"radius": 8})` or `MixerSpec.parse("clear:radius=8")`; equal specs build the
    same mixer. `options` holds only the options given; `option(key)` falls back to the mixer's default.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise DitkitError(f"mixer {self.name!r} is no mixer name: use e.g. clear or clear:radius=8")
        options = dict(self.options or {})
        check_mixer_options(self.name, options)
        object.__setattr__(self, "options", options)

    @classmethod
    def parse(cls, text: str | MixerSpec) -> MixerSpec:
        """`name` or `name:key=value,...` (a spec passes through unchanged)."""
        if isinstance(text, MixerSpec):
            return text
        if not isinstance(text, str):
            raise DitkitError(f"mixer {text!r} is not a mixer spec: use e.g. clear or clear:radius=8")
        name, _, rest = text.strip().partition(":")
        items = [item for item in rest.split(",") if item.strip()] if rest.strip() else []
        return cls(name.strip(), parse_items(items, f"{name.strip() or 'clear'}:radius=8"))

    def merged(self, options: dict[str, Any] | None) -> MixerSpec:
        """This spec with `options` added (they win over its own), validated again."""
        return MixerSpec(self.name, {**self.options, **(options or {})}) if options else self

    def option(self, key: str) -> Any:
        """The value of option `key`: as given, else the mixer's default."""
        return self.options[key] if key in self.options else mixer_options(self.name)[key]

    def items(self) -> list[str]:
        """The options as `key=value` texts (what `--mixer-opt` takes), in the mixer's own order."""
        order = list(mixer_options(self.name))
        return [f"{key}={format_value(self.options[key])}" for key in sorted(self.options, key=order.index)]

    def __str__(self) -> str:
        return ":".join([self.name, ",".join(self.items())]) if self.options else self.name

    def __hash__(self) -> int:
        return hash((self.name, frozenset(self.options.items())))
