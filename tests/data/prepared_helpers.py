"""A tiny image folder and a tiny random VAE for the prepared-latents tests (and a worker script's)."""

from pathlib import Path

import numpy as np
from PIL import Image


def image_folder(root: Path, per_class: int = 5, classes: tuple[str, ...] = ("cat", "dog"), size: int = 20) -> Path:
    """`per_class` random RGB PNGs of side `size` in one folder per class, seeded (the same bytes every time)."""
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


def vae_folder(root: Path, seed: int = 0, scaling_factor: float = 0.5) -> Path:
    """A random AutoencoderKL (4 latent channels, downsampling 2) saved as a diffusers folder."""
    import torch

    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                        up_block_types=["UpDecoderBlock2D"] * 2, block_out_channels=[8, 8], latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, scaling_factor=scaling_factor)
    vae.save_pretrained(root)
    return root
