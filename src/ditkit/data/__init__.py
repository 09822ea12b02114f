"""Datasets: image folders, the built-in `digits` and `photos`, and cached VAE latents."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ..errors import DitkitError
from .builtin import DigitsDataset, PhotosDataset
from .folder import ImageFolderDataset
from .latents import LatentDataset, cached_latents, load_vae

BUILTIN = ("digits", "photos")


def build_dataset(source: str, resolution: int, photos_length: int = 2000, seed: int = 0,
                  cache_dir: str | Path | None = None) -> Dataset:
    """`source` is a built-in name (digits, photos) or a path to an image folder (its file list is
    cached in `cache_dir`, default `default_cache_dir()`)."""
    if source == "digits":
        return DigitsDataset(resolution)
    if source == "photos":
        return PhotosDataset(resolution, length=photos_length, seed=seed)
    if not Path(source).exists():
        raise DitkitError(f"data {source!r} is neither a built-in dataset ({', '.join(BUILTIN)}) "
                          "nor an existing folder")
    return ImageFolderDataset(source, resolution, cache_dir=cache_dir)


__all__ = ["BUILTIN", "DigitsDataset", "PhotosDataset", "ImageFolderDataset", "LatentDataset",
           "build_dataset", "cached_latents", "load_vae"]
