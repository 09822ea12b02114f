"""ditkit: efficient diffusion backbones for high-resolution image generation."""

from .errors import DitkitError
from .mixers import TokenMixer, build_mixer, swap_mixers
from .models import build_model, model_config

__version__ = "0.1.0"
__all__ = ["DitkitError", "TokenMixer", "build_mixer", "swap_mixers", "build_model", "model_config"]
