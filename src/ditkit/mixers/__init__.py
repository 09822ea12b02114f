"""Token mixers: the one seam through which every backbone mixes tokens."""

from . import clear, downsampled, full, ssm  # noqa: F401  (register the mixers)
from .base import AttentionMixer, Grid, TokenMixer
from .registry import MIXERS, build_mixer, mixer_options, register_mixer, swap_mixers
from .strip import Strip

__all__ = ["AttentionMixer", "Grid", "TokenMixer", "MIXERS", "Strip", "build_mixer", "mixer_options",
           "register_mixer", "swap_mixers"]
