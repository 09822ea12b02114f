"""Image-folder dataset: class subfolders give labels; a flat folder is unconditional.

Sized for ImageNet (`train/n01440764/*.JPEG`, 1.28M files): construction lists the folder once
(no file is opened: an unreadable one is found where it is read) and keeps that list in a small
cache file, keyed by the folder's absolute path, that later starts (and every process of a run)
read instead of walking the tree again. The list is rebuilt when the modification time of the
folder or of any folder below it changed (adding, removing or renaming a file changes its folder's
time): one stat per folder, none per file. A folder changed in the two seconds before it is listed
is not cached (a change within the same tick of the file system's clock would go unseen).
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path

import numpy as np
from torch import Tensor

from ..errors import DitkitError
from .source import UNREADABLE, ImageSource, Unreadable, cache_file, decode, digest, read_cache, write_cache

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")
LISTING_VERSION = 1
# A folder changed this shortly before it was listed may change again within the same tick of its
# file system's clock (2 s on FAT) without its time changing: such a listing is used, not cached.
RACY_NS = 2_000_000_000

__all__ = ["IMAGE_EXTENSIONS", "UNREADABLE", "ImageFolderDataset", "Unreadable", "image_files", "list_folder"]


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder` (all depths, hidden folders too), in a fixed order."""
    listing = _walk(Path(folder), Path(folder))
    return [Path(folder) / name for name in listing["files"]]


def _sort_key(name: str) -> tuple[str, ...]:
    return tuple(name.split("/"))  # the order of sorted(Path, ...): part by part


def _walk(top: Path, root: Path) -> dict:
    """The image files under `top` (paths relative to `root`, sorted as paths) and the modification
    time of every folder walked (symbolic links to folders below `top` are not followed)."""
    files, folders = [], {}
    for folder, _, names in os.walk(top):
        relative = Path(folder).relative_to(root).as_posix()
        folders[relative] = os.stat(folder).st_mtime_ns
        prefix = "" if relative == "." else relative + "/"
        files += [prefix + name for name in names if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS]
    return {"files": sorted(files, key=_sort_key), "folders": folders}


def list_folder(root: Path) -> dict:
    """The listing of an image folder: `classes` (its non-hidden subfolders, sorted; none for a
    flat folder), `files` (relative image paths: under the class folders, or anywhere for a flat
    folder), `stray` (images beside class folders) and the `folders` times that make it stale."""
    with os.scandir(root) as entries:
        entries = sorted(entries, key=lambda entry: entry.name)
        classes = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
        stray = [e.name for e in entries if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS]
    if not classes:
        return {"classes": [], **_walk(root, root), "stray": []}
    files, folders = [], {".": os.stat(root).st_mtime_ns}
    for name in classes:
        part = _walk(root / name, root)
        files += part["files"]
        folders.update(part["folders"])
    return {"classes": classes, "files": files, "folders": folders, "stray": stray}


def _fresh(listing: dict | None, root: Path) -> bool:
    """Whether a cached listing still describes `root`: every folder it walked has its time."""
    if not listing or listing.get("version") != LISTING_VERSION or listing.get("root") != str(root):
        return False
    try:
        return all(os.stat(root / name).st_mtime_ns == mtime for name, mtime in listing["folders"].items())
    except OSError:
        return False


def cached_listing(root: Path, cache_dir: str | Path | None) -> dict:
    """`list_folder(root)`, read from the cache folder when it is fresh, else walked and cached."""
    path = cache_file(cache_dir, "listings", f"folder|{root}")
    listing = read_cache(path)
    if _fresh(listing, root):
        return listing
    started = time.time_ns()
    listing = {"version": LISTING_VERSION, "root": str(root), **list_folder(root)}
    listing["digest"] = digest(listing["classes"], listing["files"], sorted(listing["folders"].items()))
    if max(listing["folders"].values()) < started - RACY_NS:
        write_cache(path, listing)
    return listing


class ImageFolderDataset(ImageSource):
    """Images under `root`, resized and center-cropped to `resolution`, as RGB in [-1, 1].

    `root/<class>/*.png` gives class labels (sorted folder names); images directly in `root`
    make an unconditional dataset. Unreadable files are found where they are read: `read(i)`
    raises `Unreadable` naming the file, `ds[i]` skips to the next readable one with a warning.
    The file list is cached in `cache_dir` (default: `default_cache_dir()`; see the module).
    """

    def __init__(self, root: str | Path, resolution: int, cache_dir: str | Path | None = None):
        self.root = Path(root)
        self.resolution = resolution
        self.source = str(self.root)
        if not self.root.is_dir():
            raise DitkitError(f"data folder {self.root} does not exist or is not a folder")
        listing = cached_listing(self.root.resolve(), cache_dir)
        self.class_names = listing["classes"]
        # one numpy array of encoded names, not a list of strings: DataLoader workers forked from this
        # process share its pages (a list's reference counts would copy them into every worker)
        self.names = np.array([name.encode("utf-8", "surrogateescape") for name in listing["files"]], dtype=bytes)
        if not len(self.names):
            raise DitkitError(f"data folder {self.root} has no image files: put {', '.join(IMAGE_EXTENSIONS)} "
                              "images in it (or in one subfolder per class)")
        labels = {name: label for label, name in enumerate(self.class_names)}
        self.labels = np.array([labels[name.split("/", 1)[0]] for name in listing["files"]] if labels else
                               np.zeros(len(self.names)), dtype=np.int64)
        self._key = f"folder-{listing['digest']}-{resolution}"
        if self.class_names:
            self._check_classes(listing["stray"])

    def _check_classes(self, stray: list[str]) -> None:
        """Every class folder holds an image file (an empty one would still take a class index,
        which a model then learns without data), and images beside the class folders are said to
        be left out (they belong to no class)."""
        used = set(np.unique(self.labels).tolist())
        empty = [name for label, name in enumerate(self.class_names) if label not in used]
        if empty:
            raise DitkitError(f"data folder {self.root}: the class folder(s) {', '.join(empty[:5])} hold no image "
                              "file: add images or remove the folder (every class folder is a class)")
        if stray:
            warnings.warn(f"data folder {self.root}: {len(stray)} image(s) beside the class folders (e.g. "
                          f"{stray[0]}) belong to no class and are left out: move them into a class folder",
                          stacklevel=3)

    def name(self, index: int) -> str:
        """Item `index`'s file, relative to the root."""
        return self.names[index].decode("utf-8", "surrogateescape")

    @property
    def files(self) -> list[str]:
        """Every item's file, relative to the root (built on demand)."""
        return [self.name(i) for i in range(len(self))]

    @property
    def samples(self) -> list[tuple[Path, int]]:
        """(file, label) of every item (built on demand: the dataset itself keeps relative names)."""
        return [(self.root / name, int(label)) for name, label in zip(self.files, self.labels, strict=True)]

    @property
    def cache_key(self) -> str:
        """The listing (names, labels, folder times) and the resolution; no file is opened or stat'ed.
        A file replaced in place under the same name keeps the key (its folder's time is unchanged)."""
        return self._key

    def __len__(self) -> int:
        return len(self.names)

    def load(self, index: int) -> tuple[Tensor, int]:
        path = self.root / self.name(index)
        return decode(path, self.resolution, str(path)), int(self.labels[index])
