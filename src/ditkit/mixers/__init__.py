"""Token mixers: the one seam through which every backbone mixes tokens."""

from . import full  # noqa: F401  (registers "full")
from .base import AttentionMixer, Grid, TokenMixer
from .registry import MIXERS, build_mixer, mixer_options, register_mixer, swap_mixers

__all__ = ["AttentionMixer", "Grid", "TokenMixer", "MIXERS", "build_mixer", "mixer_options",
           "register_mixer", "swap_mixers"]
