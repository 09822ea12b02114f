"""Training: typed config, the Accelerate loop, and atomic safetensors checkpoints."""

from .checkpoint import find_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, load_config
from .trainer import Trainer, train

__all__ = ["find_checkpoint", "load_checkpoint", "save_checkpoint", "TrainConfig", "load_config", "Trainer", "train"]
