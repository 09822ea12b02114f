"""Latent space: a diffusers AutoencoderKL loaded from a local folder, and latents cached to disk.

Latents are scaled by the VAE's `scaling_factor` (0.18215 for the SD VAE), as DiT does. The
cache file is keyed by the dataset, the resolution and the VAE, and written atomically.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import DitkitError
from ..files import atomic_path, check_writable


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


class LatentDataset(Dataset):
    """Cached latents with their labels. With `hflip`, the flipped images are extra items."""

    def __init__(self, latents: Tensor, labels: Tensor, source: Dataset, vae_scale: int):
        self.latents, self.labels, self.vae_scale = latents, labels, vae_scale
        self.channels = latents.shape[1]
        self.num_classes = source.num_classes
        self.class_names = source.class_names

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.latents[index], int(self.labels[index])


def cached_latents(dataset: Dataset, vae_path: str | Path, cache_dir: str | Path, hflip: bool,
                   batch_size: int = 16, device: str | torch.device = "cpu", progress: bool = True) -> LatentDataset:
    vae = load_vae(vae_path, device)
    config_text = json.dumps(dict(vae.config), sort_keys=True, default=str)
    key = hashlib.sha1(f"{dataset.cache_key}|{Path(vae_path).resolve()}|{config_text}|{hflip}".encode())
    path = Path(cache_dir) / f"latents-{key.hexdigest()[:20]}.safetensors"
    if path.is_file():
        try:
            tensors = load_file(path)
            return LatentDataset(tensors["latents"], tensors["labels"], dataset, vae_scale(vae))
        except Exception:  # a damaged cache is rebuilt, not trusted
            path.unlink()
    check_writable(cache_dir, "latent cache")  # before the encoding, not after it
    latents, labels = [], []
    for start in tqdm(range(0, len(dataset), batch_size), desc="encoding latents", disable=not progress):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        images = torch.stack([x for x, _ in items])
        latents.append(encode(vae, images).cpu())
        if hflip:
            latents.append(encode(vae, images.flip(-1)).cpu())
        labels += [y for _, y in items] * (2 if hflip else 1)
    tensors = {"latents": torch.cat(latents).float().contiguous(), "labels": torch.tensor(labels).long()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp)
    return LatentDataset(tensors["latents"], tensors["labels"], dataset, vae_scale(vae))
