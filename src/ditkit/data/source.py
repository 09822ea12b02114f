"""What every image source shares (folders, Hugging Face datasets, WebDataset shards): decoding one
item to DiT's crop in [-1, 1], `read(i)` (item i exactly, or `Unreadable`), `ds[i]` (item i or the
next readable one, with one warning per unreadable item), class names, and the small cache files
(file lists, shard indexes) kept in the cache folder."""

from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DitkitError
from ..files import atomic_write_text
from .images import center_crop, pil_to_tensor, to_rgb

# What PIL raises for files it cannot read: damaged (OSError, SyntaxError, ValueError), not an
# image (UnidentifiedImageError), or more pixels than its decompression-bomb limit allows.
UNREADABLE = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


class Unreadable(Exception):
    """An item whose file cannot be decoded: `name` says which, `reason` what the decoder said."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


def default_cache_dir() -> Path:
    """$DITKIT_CACHE, else $XDG_CACHE_HOME/ditkit, else ~/.cache/ditkit."""
    if os.environ.get("DITKIT_CACHE"):
        return Path(os.environ["DITKIT_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "ditkit"
    return Path.home() / ".cache" / "ditkit"


def decode(data: bytes | str | Path, resolution: int, name: str) -> Tensor:
    """Image bytes (or a file) as DiT's center crop at `resolution`, RGB in [-1, 1]; `Unreadable`
    naming `name` when PIL cannot decode it."""
    try:
        with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
            image = to_rgb(image)
        return pil_to_tensor(center_crop(image, resolution))
    except UNREADABLE as error:
        raise Unreadable(name, str(error)) from error


class ImageSource(Dataset):
    """An indexed, class-labelled image source. Subclasses set `resolution`, `class_names` and
    `source` (what the user named) and implement `__len__`, `load(i)` -> (tensor, label) (raising
    `Unreadable`) and `cache_key`."""

    channels = 3
    source: str
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self, index: int) -> tuple[Tensor, int]:
        raise NotImplementedError

    def read(self, index: int) -> tuple[Tensor, int]:
        """Item `index` exactly, or `Unreadable` naming it (for callers that record skips)."""
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} of a source of {len(self)}")
        return self.load(index)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Item `index`, or the next readable one after it (training draws need an item every time);
        each unreadable item is named in one warning (per process)."""
        skipped = self.__dict__.setdefault("_warned", set())
        for offset in range(len(self)):
            try:
                return self.read((index + offset) % len(self))
            except Unreadable as error:
                if error.name not in skipped:
                    skipped.add(error.name)
                    warnings.warn(f"skipping unreadable image {error.name}: {error.reason}", stacklevel=2)
        raise DitkitError(f"no image in {self.source} could be read: check the files (they are named in the "
                          "warnings above)")


def class_names_from_labels(labels, names: list[str] | None, labels_file: str | Path | None,
                            source: str) -> list[str]:
    """The class names of a source whose integer labels are `labels` (a numpy array): `names`
    (from the source's own metadata), else the lines of `labels_file`, else "0", "1", ... up to the
    largest label. Labels outside the names are a one-line error."""
    if labels.size and labels.min() < 0:
        raise DitkitError(f"{source} has negative labels (e.g. {int(labels.min())}; a split without labels, "
                          "such as ImageNet's test split, uses -1): train on a labelled split")
    if names is not None and labels_file is not None:
        warnings.warn(f"data.labels_file {labels_file} is not used: {source} names its classes itself "
                      f"({', '.join(names[:3])}, ...)", stacklevel=3)
    if names is None and labels_file is not None:
        path = Path(labels_file)
        if not path.is_file():
            raise DitkitError(f"labels file {path} does not exist: name a text file with one class name per line")
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if names is None:
        return [str(i) for i in range(int(labels.max()) + 1 if labels.size else 0)]
    if labels.size and labels.max() >= len(names):
        raise DitkitError(f"{source} has label {int(labels.max())} but only {len(names)} class names: give a "
                          "labels file with one name per class (line i names label i)")
    return list(names)


def digest(*parts: object) -> str:
    """A short hex digest of `parts` (paths, sizes, mtimes, ...)."""
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


def cache_file(cache_dir: str | Path | None, kind: str, key: str) -> Path:
    """Where the small cache file of `kind` (listings, indexes) for `key` lives."""
    return Path(cache_dir or default_cache_dir()) / kind / f"{digest(key)}.json"


def read_cache(path: Path) -> dict | None:
    """A cache file's content, or None when it is missing or damaged (then it is rebuilt)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def write_cache(path: Path, content: dict) -> None:
    """Write a cache file atomically; a cache folder that cannot be written is a warning only (the
    caller keeps what it built in memory and builds it again next time)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(content))
    except (OSError, DitkitError) as error:
        warnings.warn(f"could not write the cache file {path} ({error}): it is rebuilt at every start; set "
                      "data.cache_dir to a writable folder", stacklevel=3)
