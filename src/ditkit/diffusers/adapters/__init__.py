"""One adapter per supported diffusers transformer (see `base`); importing this package registers
FLUX, SD3 and PixArt."""

from . import flux, pixart, sd3  # noqa: F401  (each registers its adapter)
from .base import (
    ADAPTERS,
    LAYOUTS,
    DiffusersAdapter,
    PatchEmbedAdapter,
    adapter_for,
    find_adapter,
    register_adapter,
    unregister_adapter,
)

__all__ = ["ADAPTERS", "LAYOUTS", "DiffusersAdapter", "PatchEmbedAdapter", "adapter_for", "find_adapter",
           "register_adapter", "unregister_adapter"]
