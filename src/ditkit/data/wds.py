"""WebDataset tar shards with random access: `.jpg` / `.jpeg` / `.png` / `.webp` images with a
`.cls` label (an integer as text) or a `.json` label ({"label": 3}, key configurable).

The shards are given as a brace pattern (`/data/train-{000000..001023}.tar`, expanded with
webdataset's own `expand_urls`), one `.tar` file, or a folder of them. Each shard is indexed once:
Python's `tarfile` walks its member headers (seeking past the data) and reads the small label
members; samples are grouped by webdataset's key convention (`base_plus_ext`: the name up to the
first dot of its file name). The index (each image's offset and size, each label) is cached per shard
in the cache folder, stale when the shard's size or time changed. Reading item i then reads just its
image's bytes. Uncompressed tars only (a compressed one cannot be read at an offset).
"""

from __future__ import annotations

import json
import os
import tarfile
from pathlib import Path

import numpy as np
from torch import Tensor

from ..errors import DitkitError
from .source import ImageSource, cache_file, class_names_from_labels, decode, digest, read_cache, write_cache

IMAGE_SUFFIXES = ("jpg", "jpeg", "png", "webp")
LABEL_SUFFIXES = ("cls", "json")
INDEX_VERSION = 1


def shard_files(source: str) -> list[Path]:
    """The shards `source` names: a folder's `.tar` files (sorted), else the brace expansion of a
    pattern (in its order); missing shards are a one-line error."""
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix == ".tar" and p.is_file())
    from webdataset.shardlists import expand_urls

    shards = [Path(name) for name in expand_urls(source)]
    missing = [str(p) for p in shards if not p.is_file()]
    if missing:
        raise DitkitError(f"{len(missing)} of the {len(shards)} shards that {source} names do not exist (e.g. "
                          f"{missing[0]}): check the pattern")
    return shards


def _label(data: bytes, suffix: str, label_key: str, where: str) -> int:
    """A `.cls` member's integer, or a `.json` member's `label_key` entry."""
    try:
        value = json.loads(data)[label_key] if suffix == "json" else int(data.decode().strip())
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
        kind = f"a JSON object with an integer {label_key!r}" if suffix == "json" else "an integer"
        raise DitkitError(f"{where}.{suffix} is not {kind} ({error!r}): fix the shard, or name the JSON key with "
                          "data.label_column") from error
    if isinstance(value, bool) or not isinstance(value, int):
        raise DitkitError(f"{where}.{suffix}: the label {value!r} is not an integer: labels are class indices")
    return value


def index_shard(path: Path, label_key: str) -> dict:
    """Every sample of one shard that has an image: its key, the image's offset, size and suffix, and
    its label (None when it has none)."""
    from webdataset.tariterators import base_plus_ext

    samples: dict[str, dict] = {}
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, suffix = base_plus_ext(member.name)
                if not member.isfile() or key is None or suffix is None:
                    continue
                sample = samples.setdefault(key, {"key": key, "label": None})
                suffix = suffix.lower()
                if suffix in IMAGE_SUFFIXES and "offset" not in sample:
                    sample.update(offset=member.offset_data, size=member.size, suffix=suffix)
                elif suffix in LABEL_SUFFIXES and sample["label"] is None:
                    data = tar.extractfile(member).read()
                    sample["label"] = _label(data, suffix, label_key, f"{path}: {key}")
    except tarfile.TarError as error:
        raise DitkitError(f"{path} is not a readable uncompressed tar ({error}): write the shards with "
                          "webdataset's TarWriter / ShardWriter (no compression)") from error
    return {"samples": [s for s in samples.values() if "offset" in s]}


def cached_index(path: Path, label_key: str, cache_dir: str | Path | None) -> dict:
    """`index_shard(path)`, from the cache when the shard's size and time are those it was indexed at."""
    stat = os.stat(path)
    identity = {"version": INDEX_VERSION, "path": str(path.resolve()), "size": stat.st_size,
                "mtime": stat.st_mtime_ns, "label_key": label_key}
    where = cache_file(cache_dir, "shard-indexes", f"wds|{path.resolve()}|{label_key}")
    index = read_cache(where)
    if index and all(index.get(name) == value for name, value in identity.items()):
        return index
    index = {**identity, **index_shard(path, label_key)}
    write_cache(where, index)
    return index


class WebDatasetShards(ImageSource):
    """WebDataset tar shards read at random (see the module): item i is the i-th image sample in
    shard order; the label comes from its `.cls` or `.json` member."""

    def __init__(self, source: str | Path, resolution: int, label_key: str = "label",
                 labels_file: str | Path | None = None, cache_dir: str | Path | None = None):
        self.source, self.resolution = str(source), resolution
        self.shards = shard_files(self.source)
        if not self.shards:
            raise DitkitError(f"{source} names no .tar shards: give a folder of them, one .tar or a pattern such "
                              "as /data/train-{000000..000009}.tar")
        shard_of, offsets, sizes, labels, self.keys, stats = [], [], [], [], [], []
        unlabelled = None
        for number, path in enumerate(self.shards):
            index = cached_index(path, label_key, cache_dir)
            stats.append((index["path"], index["size"], index["mtime"]))
            for sample in index["samples"]:
                if sample["label"] is None:
                    unlabelled = unlabelled or f"{path}: {sample['key']}"
                shard_of.append(number)
                offsets.append(sample["offset"])
                sizes.append(sample["size"])
                labels.append(-1 if sample["label"] is None else sample["label"])
                self.keys.append(f"{sample['key']}.{sample['suffix']}")
        if not labels:
            raise DitkitError(f"the shards of {source} hold no images (.{', .'.join(IMAGE_SUFFIXES)}): write image "
                              "samples into them")
        if unlabelled:
            count = labels.count(-1)
            raise DitkitError(f"{count} of the {len(labels)} images in {source} have no .cls or .json label (e.g. "
                              f"{unlabelled}): write a label with each image")
        self.shard_of, self.offsets, self.sizes = (np.array(a, dtype=np.int64) for a in (shard_of, offsets, sizes))
        self.labels = np.array(labels, dtype=np.int64)
        self.keys = np.array([key.encode() for key in self.keys], dtype=bytes)  # shared, not copied, by workers
        self.class_names = class_names_from_labels(self.labels, None, labels_file, self.source)
        self._key = f"wds-{digest(stats, label_key, self.class_names)}-{resolution}"
        self._open = {}

    @property
    def cache_key(self) -> str:
        """Each shard's path, size and time (one stat per shard), the label key, the class names, the resolution."""
        return self._key

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self):
        return {**self.__dict__, "_open": {}}  # file handles stay in their process

    def load(self, index: int) -> tuple[Tensor, int]:
        shard = int(self.shard_of[index])
        if shard not in self._open:
            self._open[shard] = open(self.shards[shard], "rb")  # noqa: SIM115 (kept open for later reads)
        handle = self._open[shard]
        handle.seek(int(self.offsets[index]))
        data = handle.read(int(self.sizes[index]))
        name = f"{self.shards[shard]}: {self.keys[index].decode()}"
        return decode(data, self.resolution, name), int(self.labels[index])
