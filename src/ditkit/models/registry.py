"""Backbones and named model configs: `model_config("DiT-XL/2")`, `build_model(config)`.

A config is a dataclass of its backbone, subclassing `BackboneConfig`; `config_to_dict` /
`config_from_dict` turn it into the plain record stored in every checkpoint, so a checkpoint
rebuilds its own model.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from ..config import AT_LEAST_0, AT_LEAST_1, FRACTION, check_fields, ranged
from ..errors import DitkitError
from ..mixers.registry import mixer_class

BACKBONES: dict[str, tuple[type, type[nn.Module]]] = {}  # name -> (config class, model class)
NAMED_MODELS: dict[str, tuple[str, dict[str, Any]]] = {}  # "DiT-XL/2" -> (backbone, fields)


@dataclass
class BackboneConfig:
    """The fields every backbone has. Each backbone's config subclasses it, adds its own fields
    (widths, depths, patch) and overrides defaults where it differs (U-DiT's mixer, DiffuSSM's)."""

    backbone: ClassVar[str]  # the registered name, set by `register_backbone`

    in_channels: int = ranged(4, AT_LEAST_1)
    num_classes: int = ranged(1000, AT_LEAST_0)  # 0: unconditional
    class_dropout_prob: float = ranged(0.1, FRACTION)  # 1 would never show the model a label
    learn_sigma: bool = True  # predict the variance too (2x output channels), as DiT
    mixer: str = "full"
    mixer_options: dict = field(default_factory=dict)
    vae_scale: int = ranged(8, AT_LEAST_1)  # pixels per input cell: 8 for SD-VAE latents, 1 for pixel-space models

    def __post_init__(self):
        """Every field against the range it declares, and the widths against the heads, when the config is
        made (a named config with overrides, a checkpoint's record): a model of 0 blocks, 0 channels or
        heads that do not split the width is never built."""
        check_fields(self, "model.args.")
        width, heads = getattr(self, "hidden_size", None), getattr(self, "num_heads", None)
        if width is not None and heads is not None and width % heads:
            fits = max(d for d in range(1, heads + 1) if width % d == 0)
            raise DitkitError(f"config key model.args.num_heads={heads} does not divide model.args.hidden_size="
                              f"{width} (each head takes an equal share of the width): use num_heads={fits}, or "
                              "a hidden_size that is a multiple of it")
        ratio = getattr(self, "mlp_ratio", None)
        if width is not None and ratio is not None and int(width * ratio) < 2:
            raise DitkitError(f"config keys model.args.mlp_ratio={ratio} x hidden_size={width} leave the MLP "
                              f"{int(width * ratio)} hidden units: raise mlp_ratio (DiT: 4)")

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def tokens(self, height: int, width: int) -> int:
        """The longest token sequence for an input of height x width cells: one per cell unless
        the backbone patchifies."""
        return height * width

    @property
    def grid_reduction(self) -> int:
        """Input cells along a side per token of the coarsest grid the mixers see (the patch for DiT)."""
        raise DitkitError(f"{type(self).__name__} must define grid_reduction: the input cells along a side per "
                          "token of its coarsest token grid")

    def block_mixer_options(self) -> dict:
        """The options each block's mixer is built with."""
        return self.mixer_options

    @property
    def downsample(self) -> int:
        """Inputs must be a multiple of this along each side (the grid reduction x what the mixer needs)."""
        return self.grid_reduction * mixer_class(self.mixer).grid_multiple(**self.block_mixer_options())


def register_backbone(name: str, config_class: type[BackboneConfig]):
    def decorate(model_class: type[nn.Module]) -> type[nn.Module]:
        if name in BACKBONES:
            raise ValueError(f"backbone {name!r} is registered twice")
        BACKBONES[name] = (config_class, model_class)
        config_class.backbone = name
        return model_class

    return decorate


def register_model(name: str, backbone: str, **fields: Any) -> None:
    """Name a config of a registered backbone (e.g. "DiT-XL/2": dit with these fields)."""
    if name in NAMED_MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    if backbone not in BACKBONES:
        raise ValueError(f"model {name!r} names backbone {backbone!r}, which is not registered: register it first")
    NAMED_MODELS[name] = (backbone, fields)


def _replace(config, overrides: dict[str, Any]):
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise DitkitError(
            f"{type(config).__name__} has no field {', '.join(unknown)}: valid fields are {', '.join(sorted(known))}"
        )
    return dataclasses.replace(config, **overrides)


def model_config(name: str, **overrides: Any):
    """The config of a named model (e.g. "DiT-XL/2"), with field overrides."""
    if name not in NAMED_MODELS:
        raise DitkitError(f"unknown model {name!r}: choose one of {', '.join(NAMED_MODELS)}")
    backbone, fields = NAMED_MODELS[name]
    config_class, _ = BACKBONES[backbone]
    return _replace(config_class(**fields), overrides)


def build_model(config) -> nn.Module:
    _, model_class = BACKBONES[config.backbone]
    return model_class(config)


def config_to_dict(config) -> dict[str, Any]:
    """A JSON-ready record (tuples become lists, as they come back from a checkpoint)."""
    return json.loads(json.dumps({"backbone": config.backbone, **dataclasses.asdict(config)}))


def config_from_dict(record: dict[str, Any]):
    record = dict(record)
    backbone = record.pop("backbone", None)
    if backbone not in BACKBONES:
        raise DitkitError(f"unknown backbone {backbone!r} in model config: this ditkit knows {', '.join(BACKBONES)}")
    config_class, _ = BACKBONES[backbone]
    return _replace(config_class(), record)
