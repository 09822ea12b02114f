"""Training: the typed train config and the Accelerate loop (checkpoints: `ditkit.checkpoint`)."""

from .config import TrainConfig, load_config
from .trainer import Trainer, train

__all__ = ["TrainConfig", "load_config", "Trainer", "train"]
