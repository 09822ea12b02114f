"""Sampling beyond the training size: proportional attention scale and position-frequency scaling.

Both are off by default. `set_extrapolation` tells a model how far the size it is about to sample
at is from its training size; the modules that scale attention then scale their queries by
sqrt(log N / log N_train) and those that encode positions (DiT's sin-cos, U-DiT's rotary) rescale
their frequencies ("ntk") or positions ("interpolate") along each axis that grew.

Which modules those are, each module says itself with two class attributes (`TokenMixer` sets both
False, so a mixer opts in): `scales_attention` and `encodes_positions`. Both kinds read the
setting from their `extrapolation` attribute.
"""

from __future__ import annotations

from torch import nn

from ..errors import DitkitError
from ..mixers.base import Extrapolation

POSITION_SCALINGS = ("none", "ntk", "interpolate")


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "scales_attention", False)]


def _position_modules(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if getattr(m, "encodes_positions", False)]


def set_extrapolation(model: nn.Module, input_size: tuple[int, int], train_input_size: tuple[int, int], *,
                      attention_scale: bool = False, positions: str = "none") -> None:
    """Configure `model` for sampling inputs of `input_size` cells when it was trained on
    `train_input_size`; with both options off, the model behaves exactly as trained."""
    if positions not in POSITION_SCALINGS:
        raise DitkitError(f"unknown position scaling {positions!r}: choose one of {', '.join(POSITION_SCALINGS)}")
    if attention_scale and not _attention_modules(model):
        raise DitkitError("proportional attention scale needs attention layers, and this model has none "
                          "(e.g. DiffuSSM): drop --attention-scale")
    if positions != "none" and not _position_modules(model):
        raise DitkitError("this model has no position encoding to scale (e.g. DiffuSSM): use --position-scaling none")
    setting = None
    if attention_scale or positions != "none":
        stretch = (input_size[0] / train_input_size[0], input_size[1] / train_input_size[1])
        setting = Extrapolation(stretch=stretch, attention_scale=attention_scale, positions=positions)
    for module in {*_attention_modules(model), *_position_modules(model)}:
        module.extrapolation = setting
