"""Mixers by name: `register_mixer`, `build_mixer`, and `swap_mixers` for trained models."""

from __future__ import annotations

import inspect
from collections.abc import Callable

from torch import nn

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


def mixer_options(name: str) -> dict[str, object]:
    """The options a mixer accepts (beyond dim and num_heads), with their defaults."""
    params = inspect.signature(mixer_class(name).__init__).parameters
    return {p: v.default for p, v in params.items() if p not in ("self", "dim", "num_heads")}


def mixer_class(name: str) -> type[TokenMixer]:
    if name not in MIXERS:
        raise DitkitError(f"unknown mixer {name!r}: choose one of {', '.join(sorted(MIXERS))}")
    return MIXERS[name]


def build_mixer(name: str, dim: int, num_heads: int, **options) -> TokenMixer:
    cls = mixer_class(name)
    accepted = mixer_options(name)
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        raise DitkitError(
            f"mixer {name!r} has no option {', '.join(unknown)}: it accepts {', '.join(accepted) or 'none'}"
        )
    return cls(dim=dim, num_heads=num_heads, **options)


def swap_mixers(model: nn.Module, name: str, **options) -> list[str]:
    """Replace every TokenMixer inside `model` by mixer `name`, keeping the weights they share.

    Returns the names of parameters the new mixers added (freshly initialised). Raises if the
    new mixer cannot hold weights the old one had (they would be silently dropped).
    """
    added: list[str] = []
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, TokenMixer)]
    for path, old in targets:
        new = build_mixer(name, old.dim, old.num_heads, **options)
        ref = next(old.parameters(), None)
        if ref is not None:
            new.to(device=ref.device, dtype=ref.dtype)
        try:
            result = new.load_state_dict(old.state_dict(), strict=False)
        except RuntimeError as error:  # same names, other shapes
            raise DitkitError(f"mixer {name!r} with options {options or 'default'} cannot take over the weights "
                              f"of mixer {old.name!r} (their shapes differ): give the options it was trained with"
                              ) from error
        if result.unexpected_keys:
            raise DitkitError(
                f"mixer {name!r} cannot take over the weights of mixer {old.name!r} "
                f"({', '.join(result.unexpected_keys)}): train a model with {name!r} instead"
            )
        added += [f"{path}.{k}" for k in result.missing_keys]
        parent_path, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, attr, new)
    return added
