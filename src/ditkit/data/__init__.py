"""Datasets: image folders, the built-in `digits` and `photos`, and prepared (cached) VAE latents."""

from __future__ import annotations

from pathlib import Path

from torch.utils.data import Dataset

from ..errors import DitkitError
from .builtin import DigitsDataset, PhotosDataset
from .folder import ImageFolderDataset
from .latents import load_vae
from .prepared import PreparedLatents, cached_latents, prepare_latents

BUILTIN = ("digits", "photos")


def build_dataset(source: str, resolution: int, photos_length: int = 2000, seed: int = 0) -> Dataset:
    """`source` is a built-in name (digits, photos) or a path to an image folder."""
    if source == "digits":
        return DigitsDataset(resolution)
    if source == "photos":
        return PhotosDataset(resolution, length=photos_length, seed=seed)
    if not Path(source).exists():
        raise DitkitError(f"data {source!r} is neither a built-in dataset ({', '.join(BUILTIN)}) "
                          "nor an existing folder")
    return ImageFolderDataset(source, resolution)


__all__ = ["BUILTIN", "DigitsDataset", "PhotosDataset", "ImageFolderDataset", "PreparedLatents",
           "build_dataset", "cached_latents", "load_vae", "prepare_latents"]
