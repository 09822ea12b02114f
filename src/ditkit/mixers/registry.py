"""Mixers by name: `register_mixer` (and `registered_mixer` for a test's own), `build_mixer`, and the
checks of their options that `MixerSpec` (spec.py) runs."""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ..errors import DitkitError
from .base import TokenMixer

MIXERS: dict[str, type[TokenMixer]] = {}


def register_mixer(name: str) -> Callable[[type[TokenMixer]], type[TokenMixer]]:
    def decorate(cls: type[TokenMixer]) -> type[TokenMixer]:
        if name in MIXERS:
            raise ValueError(f"mixer {name!r} is registered twice")
        cls.name = name
        MIXERS[name] = cls
        return cls

    return decorate


def unregister_mixer(name: str) -> None:
    """Remove mixer `name` from the registry (what `registered_mixer` does on leaving)."""
    if name not in MIXERS:
        raise DitkitError(f"mixer {name!r} is not registered: nothing to remove")
    del MIXERS[name]


@contextmanager
def registered_mixer(name: str, cls: type[TokenMixer]) -> Iterator[type[TokenMixer]]:
    """Register `cls` as mixer `name` for the duration of a `with` block (a test's mixer), then remove it."""
    register_mixer(name)(cls)
    try:
        yield cls
    finally:
        unregister_mixer(name)


def mixer_options(name: str) -> dict[str, object]:
    """The options a mixer accepts (beyond dim and num_heads), with their defaults."""
    params = inspect.signature(mixer_class(name).__init__).parameters
    return {p: v.default for p, v in params.items() if p not in ("self", "dim", "num_heads")}


def mixer_class(name: str) -> type[TokenMixer]:
    if name not in MIXERS:
        raise DitkitError(f"unknown mixer {name!r}: choose one of {', '.join(sorted(MIXERS))}")
    return MIXERS[name]


def check_known_options(name: str, options: dict[str, Any]) -> None:
    accepted = mixer_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DitkitError(
            f"mixer {name!r} has no option {', '.join(unknown)}: it accepts {', '.join(accepted) or 'none'}"
        )


def option_types(cls: type[TokenMixer]) -> dict[str, Any]:
    """The type hints of a mixer's options (none where its annotations cannot be resolved)."""
    try:
        return typing.get_type_hints(cls.__init__)
    except (NameError, TypeError):
        return {}


# The option types a spec's values are checked against; a bool is no number (YAML reads `true` as one).
VALUE_CHECKS = {type(None): lambda v: v is None, bool: lambda v: isinstance(v, bool),
                int: lambda v: isinstance(v, int) and not isinstance(v, bool),
                float: lambda v: isinstance(v, int | float) and not isinstance(v, bool),
                str: lambda v: isinstance(v, str)}


def fits(value: Any, hint: Any) -> bool:
    """Whether an option value fits its type hint (an int fits float); hints of other types are not checked."""
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    if any(kind not in VALUE_CHECKS for kind in allowed):
        return True
    return any(VALUE_CHECKS[kind](value) for kind in allowed)


def check_mixer_options(name: str, options: dict[str, Any]) -> None:
    """One-line errors for an unknown mixer, options it does not take, values of the wrong type, and
    values the mixer itself refuses (`TokenMixer.check_options`, given every option, defaults filled in)."""
    cls = mixer_class(name)
    check_known_options(name, options)
    hints = option_types(cls)
    for key, value in options.items():
        if key in hints and not fits(value, hints[key]):
            raise DitkitError(f"mixer {name!r} option {key} must be {type_name(hints[key])}, got {value!r}")
    cls.check_options(**{**mixer_options(name), **options})


def type_name(hint: Any) -> str:
    allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    return " or ".join("null" if kind is type(None) else getattr(kind, "__name__", str(kind)) for kind in allowed)


def build_mixer(name: str, dim: int, num_heads: int, **options) -> TokenMixer:
    cls = mixer_class(name)
    check_known_options(name, options)
    return cls(dim=dim, num_heads=num_heads, **options)
