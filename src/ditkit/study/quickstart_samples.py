"""The quickstart's sample sets (which model, at which multiple of the training size, from noise or
by the upscale chain) and the files that hold them: read by the stages and by the report."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..files import atomic_path

UPSCALE_STRENGTH = 0.5


def save_images(path: Path, images: torch.Tensor, seconds: float) -> None:
    with atomic_path(path) as tmp:
        save_file({"images": images.contiguous()}, tmp, metadata={"seconds": f"{seconds:.4f}"})


def load_images(path: Path) -> tuple[torch.Tensor, float]:
    """(images, seconds it took to make them)."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor("images"), float((f.metadata() or {}).get("seconds", "nan"))


@dataclass(frozen=True)
class SampleSet:
    """One row of a sample grid: `model`'s samples at `scale` x the training resolution, from
    noise, or (`upscaled`) by the high-resolution chain from the teacher's 1x samples."""

    model: str  # "teacher" or "student"
    scale: int
    upscaled: bool = False

    @property
    def name(self) -> str:
        return f"{self.model}-{self.scale}x" + ("-upscaled" if self.upscaled else "")

    @property
    def label(self) -> str:
        if self.upscaled:
            return (f"{self.model}, upscaled from the teacher's 1x (strength {UPSCALE_STRENGTH}, "
                    "interpolated positions)")
        return self.model


SAMPLE_SETS = (SampleSet("teacher", 1), SampleSet("student", 1), SampleSet("teacher", 4), SampleSet("student", 4),
               SampleSet("student", 4, upscaled=True))
