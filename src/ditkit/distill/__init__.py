"""CLEAR linearization: distil a full-attention teacher into a local-attention student."""

from .distiller import DistillConfig, Distiller
from .losses import AttentionTaps, LossWeights, PairedDenoiser, distillation_loss
from .samples import teacher_samples
from .teacher import DitkitTeacher, Teacher

__all__ = ["AttentionTaps", "DistillConfig", "Distiller", "DitkitTeacher", "LossWeights", "PairedDenoiser",
           "Teacher", "distillation_loss", "teacher_samples"]
