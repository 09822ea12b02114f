"""Latent space: a diffusers AutoencoderKL loaded from a local folder, and encoding and decoding.

Latents are scaled by the VAE's `scaling_factor` (0.18215 for the SD VAE), as DiT does. Encoded
datasets (`ditkit prepare` and the latent cache of training) are `prepared.py`'s shards.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from ..errors import DitkitError


def load_vae(path: str | Path, device: str | torch.device = "cpu"):
    """A diffusers AutoencoderKL from a local folder (config.json + weights); no downloads."""
    from diffusers import AutoencoderKL

    path = Path(path)
    if not (path / "config.json").is_file():
        raise DitkitError(f"no AutoencoderKL at {path}: expected a local diffusers folder with config.json "
                          "(e.g. from AutoencoderKL.save_pretrained)")
    try:
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True)
    except Exception as error:  # diffusers raises many kinds; the user needs one line
        raise DitkitError(f"could not load AutoencoderKL from {path}: {error}") from error
    return vae.to(device).eval().requires_grad_(False)


def vae_scale(vae) -> int:
    """Pixels per latent cell along each side."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def _scaling_factor(vae) -> float:
    return float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)


@torch.no_grad()
def encode(vae, images: Tensor) -> Tensor:
    return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean * _scaling_factor(vae)


@torch.no_grad()
def decode(vae, latents: Tensor) -> Tensor:
    return vae.decode(latents.to(vae.device, vae.dtype) / _scaling_factor(vae)).sample.float().clamp(-1, 1)
