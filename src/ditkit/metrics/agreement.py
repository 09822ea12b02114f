"""Sample-vs-sample agreement: PSNR and SSIM between two batches of the same images (e.g. a
distilled student's samples against its teacher's, from the same noise and labels).

Value ranges. Both batches are (B, C, H, W) (or a single (C, H, W) image) and are mapped to [0, 1]
before comparing, so that the numbers do not depend on the storage format:
  - uint8 tensors are read as 0..255;
  - float tensors are read as [-1, 1], ditkit's convention (what `generate` returns), unless
    `value_range=(0, 1)` (or any other (low, high)) says otherwise. Values outside are clamped.
PSNR and SSIM are then computed by torchmetrics with data_range=1, per image, over all channels.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ..errors import DitkitError

DITKIT_RANGE = (-1.0, 1.0)
SSIM_KERNEL = 11  # the SSIM paper's Gaussian window (sigma 1.5); shrunk for images smaller than that


def to_unit_range(images: Tensor, value_range: tuple[float, float] = DITKIT_RANGE) -> Tensor:
    """uint8 (0..255) or float in `value_range` -> float32 in [0, 1], as (B, C, H, W)."""
    if images.dim() == 3:
        images = images.unsqueeze(0)
    if images.dim() != 4:
        raise DitkitError(f"images must be (B, C, H, W) or (C, H, W), got shape {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        return images.float() / 255
    low, high = value_range
    return ((images.float() - low) / (high - low)).clamp(0, 1)


def _pair(images_a: Tensor, images_b: Tensor, value_range: tuple[float, float]) -> tuple[Tensor, Tensor]:
    a, b = to_unit_range(images_a, value_range), to_unit_range(images_b, value_range)
    if a.shape != b.shape:
        raise DitkitError(f"cannot compare images of shapes {tuple(a.shape)} and {tuple(b.shape)}: "
                          "sample both batches at the same size and count")
    return a, b.to(a.device)


def psnr(images_a: Tensor, images_b: Tensor, value_range: tuple[float, float] = DITKIT_RANGE) -> Tensor:
    """Per-image PSNR in dB, shape (B,): 10 log10(1 / MSE) on [0, 1] images; inf for identical images."""
    a, b = _pair(images_a, images_b, value_range)
    return peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3))


def ssim(images_a: Tensor, images_b: Tensor, value_range: tuple[float, float] = DITKIT_RANGE) -> Tensor:
    """Per-image SSIM, shape (B,): 1 for identical images, near 0 for unrelated ones."""
    a, b = _pair(images_a, images_b, value_range)
    side = min(a.shape[-2:])
    kernel = min(SSIM_KERNEL, side - 1 if side % 2 == 0 else side)  # odd, and the reflect padding must fit
    if kernel < 3:
        raise DitkitError(f"images of {a.shape[-2]}x{a.shape[-1]} px are too small for SSIM (need at least 3x3)")
    return structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=kernel, reduction="none")


def agreement(images_a: Tensor, images_b: Tensor, value_range: tuple[float, float] = DITKIT_RANGE) -> dict:
    """{"psnr": mean dB, "ssim": mean, "psnr_per_image": [...], "ssim_per_image": [...]}.

    The mean PSNR averages finite per-image values (identical pairs are inf); it is inf only when
    every pair is identical."""
    per_psnr, per_ssim = psnr(images_a, images_b, value_range), ssim(images_a, images_b, value_range)
    finite = per_psnr[torch.isfinite(per_psnr)]
    mean_psnr = finite.mean().item() if finite.numel() else float("inf")
    return {"psnr": mean_psnr, "ssim": per_ssim.mean().item(),
            "psnr_per_image": per_psnr.tolist(), "ssim_per_image": per_ssim.tolist()}
