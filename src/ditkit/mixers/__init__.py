"""Token mixers: the one seam through which every backbone mixes tokens."""

from . import clear, downsampled, full, ssm  # noqa: F401  (register the mixers)
from .base import AttentionMixer, Grid, TokenMixer
from .registry import (
    MIXERS,
    build_mixer,
    mixer_options,
    register_mixer,
    registered_mixer,
    unregister_mixer,
)
from .spec import MixerSpec
from .strip import Strip
from .swap import swap_mixers

__all__ = ["AttentionMixer", "Grid", "TokenMixer", "MIXERS", "MixerSpec", "Strip", "build_mixer", "mixer_options",
           "register_mixer", "registered_mixer", "swap_mixers", "unregister_mixer"]
