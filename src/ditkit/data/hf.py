"""Hugging Face `datasets` on disk, never downloaded: a `save_to_disk` folder (read with
`datasets.load_from_disk`: memory-mapped Arrow) or parquet files (read with pyarrow), with an image
column (the `Image` feature's {bytes, path}, raw bytes or a file path) and an integer label column.

Random access reads one item, not the dataset: a `load_from_disk` folder is memory-mapped; a parquet
item is read with the row group that holds it (the last row group read is kept, so reading in order,
as `ditkit prepare` does, reads each row group once). Nothing is copied into a cache. Class names come
from the label column's `ClassLabel` feature (in the folder's dataset_info.json, or the parquet
schema's Hugging Face metadata), else from a labels file (line i names label i), else they are
"0", "1", ... up to the largest label.
"""

from __future__ import annotations

import glob
import json
import os
from pathlib import Path

import numpy as np
from torch import Tensor

from ..errors import DitkitError
from .source import ImageSource, Unreadable, class_names_from_labels, decode, digest

PARQUET = ".parquet"


def _require_pyarrow():
    try:
        import pyarrow  # noqa: F401
    except ImportError as error:
        raise DitkitError("reading parquet or datasets folders needs pyarrow and datasets: "
                          "pip install datasets") from error


def _check_columns(schema, image_column: str, label_column: str, source: str) -> None:
    """The named columns exist, the image column holds images and the label column integers."""
    import pyarrow as pa

    missing = [name for name in (image_column, label_column) if name not in schema.names]
    if missing:
        raise DitkitError(f"{source} has no column {' or '.join(map(repr, missing))} (its columns: "
                          f"{', '.join(schema.names)}): name them with data.image_column and data.label_column")
    image_type = schema.field(image_column).type
    is_image = (pa.types.is_struct(image_type) and image_type.get_field_index("bytes") >= 0) or \
        pa.types.is_binary(image_type) or pa.types.is_large_binary(image_type) or pa.types.is_string(image_type)
    if not is_image:
        raise DitkitError(f"{source}: column {image_column!r} holds {image_type}, not images (the datasets Image "
                          "feature, bytes or file paths): name the image column with data.image_column")
    label_type = schema.field(label_column).type
    if not pa.types.is_integer(label_type):
        raise DitkitError(f"{source}: label column {label_column!r} holds {label_type}, not integers: name an "
                          "integer (or ClassLabel) column with data.label_column")


def _label_array(column, source: str, label_column: str) -> np.ndarray:
    if column.null_count:
        raise DitkitError(f"{source}: label column {label_column!r} has {column.null_count} empty value(s): "
                          "every item needs a label")
    return column.to_numpy().astype(np.int64)


def _class_label_names(features, label_column: str) -> list[str] | None:
    """The names of a `ClassLabel` label feature, or None for a plain integer column."""
    names = getattr(features.get(label_column) if features else None, "names", None)
    return list(names) if names else None


def decode_value(value, resolution: int, name: str) -> Tensor:
    """An image column's value (the Image feature's {bytes, path}, bytes, or a path) decoded."""
    if isinstance(value, dict):
        value = value.get("bytes") or value.get("path")
    if not value:
        raise Unreadable(name, "the item has no image (neither bytes nor a path)")
    return decode(value, resolution, name)


class ColumnSource(ImageSource):
    """What the datasets folder and the parquet source share: columns, labels, class names."""

    def _setup(self, labels: np.ndarray, features, image_column: str, label_column: str,
               labels_file: str | Path | None, resolution: int) -> None:
        self.resolution, self.image_column, self.label_column = resolution, image_column, label_column
        if not len(labels):
            raise DitkitError(f"{self.source} has no rows: name a dataset with images in it")
        self.labels = labels
        self.class_names = class_names_from_labels(labels, _class_label_names(features, label_column),
                                                   labels_file, self.source)

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> tuple[Tensor, int]:
        value = self.image_value(index)
        return decode_value(value, self.resolution, f"{self.source} item {index}"), int(self.labels[index])

    def image_value(self, index: int):
        raise NotImplementedError


def is_datasets_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file())


class DatasetsFolder(ColumnSource):
    """A folder written by `datasets.Dataset.save_to_disk`, memory-mapped by `load_from_disk`."""

    def __init__(self, root: str | Path, resolution: int, image_column: str = "image", label_column: str = "label",
                 labels_file: str | Path | None = None):
        self.root, self.source = Path(root), str(root)
        if (self.root / "dataset_dict.json").is_file():
            splits = json.loads((self.root / "dataset_dict.json").read_text()).get("splits", [])
            raise DitkitError(f"{root} holds several splits ({', '.join(splits)}): name one split's folder, "
                              f"e.g. {self.root / (splits[0] if splits else 'train')}")
        _require_pyarrow()
        import datasets

        self.dataset = datasets.load_from_disk(str(self.root), keep_in_memory=False)
        table = self.dataset.data
        _check_columns(table.schema, image_column, label_column, self.source)
        labels = _label_array(table.column(label_column), self.source, label_column)
        self._setup(labels, self.dataset.features, image_column, label_column, labels_file, resolution)
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in self.root.iterdir() if p.is_file())
        fingerprint = digest(self.root.resolve(), files, image_column, label_column, self.class_names)
        self._key = f"hf-{fingerprint}-{resolution}"

    @property
    def cache_key(self) -> str:
        """The folder's files (names, sizes, times: a handful), the columns, the class names, the resolution."""
        return self._key

    def image_value(self, index: int):
        return self.dataset.data.column(self.image_column)[index].as_py()


def parquet_files(source: str) -> list[Path]:
    """The parquet files that `source` names: one file, a folder of them (not its subfolders), or a
    glob pattern; sorted by name."""
    path = Path(source)
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix == PARQUET and p.is_file())
    if glob.has_magic(source):
        return [Path(p) for p in sorted(glob.glob(source)) if p.endswith(PARQUET)]
    return [path] if path.is_file() else []


class ParquetDataset(ColumnSource):
    """Parquet files (as `datasets.Dataset.to_parquet` and the Hugging Face hub write them) read a
    row group at a time with pyarrow; file handles are opened lazily in each process."""

    def __init__(self, source: str | Path, resolution: int, image_column: str = "image", label_column: str = "label",
                 labels_file: str | Path | None = None):
        self.source = str(source)
        self.files = parquet_files(self.source)
        if not self.files:
            raise DitkitError(f"{source} names no parquet files: give a .parquet file, a folder of them or a glob "
                              "such as data/train-*.parquet")
        _require_pyarrow()
        import datasets
        import pyarrow.parquet as pq

        groups, labels, schema = [], [], None
        for number, path in enumerate(self.files):
            handle = pq.ParquetFile(path)
            schema = handle.schema_arrow
            _check_columns(schema, image_column, label_column, str(path))
            groups += [(number, group, handle.metadata.row_group(group).num_rows)
                       for group in range(handle.metadata.num_row_groups)]
            labels.append(_label_array(handle.read(columns=[label_column]).column(0), str(path), label_column))
        self.groups = np.array([(file, group) for file, group, _ in groups], dtype=np.int64).reshape(-1, 2)
        self.group_starts = np.cumsum([0] + [rows for _, _, rows in groups])
        features = datasets.Features.from_arrow_schema(schema) if schema.metadata else None
        self._setup(np.concatenate(labels), features, image_column, label_column, labels_file, resolution)
        stats = [(str(p.resolve()), os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in self.files]
        self._key = f"parquet-{digest(stats, image_column, label_column, self.class_names)}-{resolution}"
        self._open, self._group = {}, (None, None)

    @property
    def cache_key(self) -> str:
        """Each file's path, size and time (one stat per file), the columns, the class names, the resolution."""
        return self._key

    def __getstate__(self):
        return {**self.__dict__, "_open": {}, "_group": (None, None)}  # pyarrow handles stay in their process

    def image_value(self, index: int):
        import pyarrow.parquet as pq

        position = int(np.searchsorted(self.group_starts, index, side="right")) - 1
        file, group = (int(v) for v in self.groups[position])
        if self._group[0] != (file, group):
            if file not in self._open:
                self._open[file] = pq.ParquetFile(self.files[file])
            self._group = ((file, group), self._open[file].read_row_group(group, columns=[self.image_column]))
        return self._group[1].column(0)[index - int(self.group_starts[position])].as_py()
