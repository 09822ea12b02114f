"""Backbones and named model configs: `model_config("DiT-XL/2")`, `build_model(config)`.

A config is a dataclass of its backbone; `config_to_dict` / `config_from_dict` turn it into
the plain record stored in every checkpoint, so a checkpoint rebuilds its own model.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from torch import nn

from ..errors import DitkitError

BACKBONES: dict[str, tuple[type, type[nn.Module]]] = {}  # name -> (config class, model class)
NAMED_MODELS: dict[str, tuple[str, dict[str, Any]]] = {}  # "DiT-XL/2" -> (backbone, fields)


def register_backbone(name: str, config_class: type):
    def decorate(model_class: type[nn.Module]) -> type[nn.Module]:
        BACKBONES[name] = (config_class, model_class)
        config_class.backbone = name
        return model_class

    return decorate


def register_model(name: str, backbone: str, **fields: Any) -> None:
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
