"""CLEAR linearization: distil a full-attention teacher into a local-attention student."""

from .distiller import DistillConfig, Distiller, format_agreement
from .load import load_teacher
from .losses import AttentionTaps, LossWeights, PairedDenoiser, distillation_loss
from .samples import teacher_samples
from .teacher import DitkitTeacher, Teacher

__all__ = ["AttentionTaps", "DistillConfig", "Distiller", "DitkitTeacher", "LossWeights", "PairedDenoiser",
           "Teacher", "distillation_loss", "format_agreement", "load_teacher", "teacher_samples"]
