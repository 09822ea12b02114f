"""Datasets: image folders, Hugging Face datasets on disk, WebDataset shards, the built-in `digits`
and `photos`, and prepared (cached) VAE latents."""

from __future__ import annotations

import glob
from pathlib import Path

from torch.utils.data import Dataset

from ..errors import DitkitError
from .builtin import DigitsDataset, PhotosDataset
from .folder import ImageFolderDataset
from .hf import PARQUET, DatasetsFolder, ParquetDataset, is_datasets_folder
from .latents import load_vae
from .prepared import PreparedLatents, cached_latents, prepare_latents
from .wds import WebDatasetShards

BUILTIN = ("digits", "photos")
SOURCE_KINDS = ("folder", "datasets", "parquet", "webdataset")
EXPECTED = ("a built-in dataset (digits, photos), an image folder, a datasets save_to_disk folder "
            "(dataset_info.json), parquet files (x.parquet, a folder of them, or a glob like data/train-*.parquet) "
            "or WebDataset shards (x.tar, a folder of them, or a pattern like train-{000..009}.tar)")


def _holds(folder: Path, suffix: str) -> bool:
    """Whether `folder` holds `suffix` files and no subfolders (a folder of shards, not of classes)."""
    entries = list(folder.iterdir())
    return any(p.suffix == suffix and p.is_file() for p in entries) and \
        not any(p.is_dir() and not p.name.startswith(".") for p in entries)


def source_kind(source: str) -> str:
    """Which kind of source a path names (see SOURCE_KINDS), decided from names only: a folder with
    dataset_info.json is a datasets folder; `.parquet` files (one, a glob, a folder of only them) are
    parquet; `.tar` files (one, a brace pattern, a folder of only them) are WebDataset shards; any
    other folder is an image folder. Anything else is a one-line error saying what was expected."""
    path = Path(source)
    if path.is_dir():
        if is_datasets_folder(path):
            return "datasets"
        if _holds(path, PARQUET):
            return "parquet"
        return "webdataset" if _holds(path, ".tar") else "folder"
    if source.endswith(PARQUET) and (path.is_file() or glob.has_magic(source)):
        return "parquet"
    if source.endswith(".tar") and (path.is_file() or "{" in source):
        return "webdataset"
    if not path.exists():
        raise DitkitError(f"data {source!r} is neither a built-in dataset ({', '.join(BUILTIN)}) nor an existing "
                          f"path: expected {EXPECTED}")
    raise DitkitError(f"data {source!r} is none of what a source can be: expected {EXPECTED}")


def build_dataset(source: str, resolution: int, photos_length: int = 2000, seed: int = 0,
                  cache_dir: str | Path | None = None, image_column: str = "image", label_column: str = "label",
                  labels_file: str | Path | None = None) -> Dataset:
    """The dataset `source` names: a built-in name (digits, photos) or a path (see `source_kind`).
    `cache_dir` keeps folder listings and shard indexes (default `default_cache_dir()`);
    `image_column` / `label_column` name a datasets source's columns (`label_column` is also the key
    of a WebDataset `.json` label); `labels_file` names the classes (line i: label i) where the
    source itself has no names."""
    if source == "digits":
        return DigitsDataset(resolution)
    if source == "photos":
        return PhotosDataset(resolution, length=photos_length, seed=seed)
    kind = source_kind(source)
    if kind == "datasets":
        return DatasetsFolder(source, resolution, image_column, label_column, labels_file)
    if kind == "parquet":
        return ParquetDataset(source, resolution, image_column, label_column, labels_file)
    if kind == "webdataset":
        return WebDatasetShards(source, resolution, label_column, labels_file, cache_dir)
    return ImageFolderDataset(source, resolution, cache_dir=cache_dir)


__all__ = ["BUILTIN", "SOURCE_KINDS", "DatasetsFolder", "DigitsDataset", "PhotosDataset", "ImageFolderDataset",
           "ParquetDataset", "PreparedLatents", "WebDatasetShards", "build_dataset", "cached_latents", "load_vae",
           "prepare_latents", "source_kind"]
