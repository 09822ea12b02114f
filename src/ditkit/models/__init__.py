"""Backbones (DiT, U-DiT, DiffuSSM) and their named configs."""

from . import diffussm, dit, udit  # noqa: F401  (register the backbones and their named configs)
from .dit import DiT, DiTConfig
from .registry import (
    BACKBONES,
    NAMED_MODELS,
    BackboneConfig,
    build_model,
    config_from_dict,
    config_to_dict,
    model_config,
)

__all__ = ["DiT", "DiTConfig", "BACKBONES", "NAMED_MODELS", "BackboneConfig", "build_model", "config_from_dict",
           "config_to_dict", "model_config"]
