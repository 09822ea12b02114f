"""`swap_mixers`: put another mixer into a trained model (CLEAR into a full-attention DiT), keeping
the weights the two mixers share."""

from __future__ import annotations

from torch import nn

from ..errors import DitkitError
from .base import TokenMixer
from .registry import build_mixer
from .spec import MixerSpec


def swap_mixers(model: nn.Module, mixer: str | MixerSpec, **options) -> list[str]:
    """Replace every TokenMixer inside `model` by `mixer` (a name, a spec such as "clear:radius=8", or
    a MixerSpec; `options` are merged into it), keeping the weights they share.

    Returns the names of parameters the new mixers added (freshly initialised). Raises if the
    new mixer cannot hold weights the old one had (they would be silently dropped).
    """
    spec = MixerSpec.parse(mixer).merged(options)
    name, options = spec.name, spec.options
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
