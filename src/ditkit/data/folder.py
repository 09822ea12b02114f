"""Image-folder dataset: class subfolders give labels; a flat folder is unconditional."""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset

from ..errors import DitkitError
from .images import center_crop, pil_to_tensor, to_rgb

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


# What PIL raises for files it cannot read: damaged (OSError, SyntaxError, ValueError), not an
# image (UnidentifiedImageError), or more pixels than its decompression-bomb limit allows.
UNREADABLE = (OSError, UnidentifiedImageError, SyntaxError, ValueError, Image.DecompressionBombError)


class Unreadable(Exception):
    """An item whose file cannot be decoded: `name` says which, `reason` what the decoder said."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"{name}: {reason}")
        self.name, self.reason = name, reason


def _readable(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except UNREADABLE as error:
        warnings.warn(f"skipping unreadable image {path}: {error}", stacklevel=3)
        return False


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder` (all depths, hidden folders too), in a fixed order."""
    return [f for f in sorted(folder.rglob("*")) if f.suffix.lower() in IMAGE_EXTENSIONS and f.is_file()]


class ImageFolderDataset(Dataset):
    """Images under `root`, resized and center-cropped to `resolution`, as RGB in [-1, 1].

    `root/<class>/*.png` gives class labels (sorted folder names); images directly in `root`
    make an unconditional dataset. Unreadable files are skipped with a warning naming them.
    """

    channels = 3

    def __init__(self, root: str | Path, resolution: int):
        self.root = Path(root)
        self.resolution = resolution
        if not self.root.is_dir():
            raise DitkitError(f"data folder {self.root} does not exist or is not a folder")
        subdirs = sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
        self.class_names = [p.name for p in subdirs]
        sources = [(p, i) for i, p in enumerate(subdirs)] if subdirs else [(self.root, 0)]
        candidates = [(f, label) for folder, label in sources for f in image_files(folder)]
        self.samples = [(f, label) for f, label in candidates if _readable(f)]
        if not self.samples:
            found = f"{len(candidates)} image files, none readable" if candidates else "no image files"
            raise DitkitError(f"data folder {self.root} has {found}: put {', '.join(IMAGE_EXTENSIONS)} images "
                              "in it (or in one subfolder per class)")
        if subdirs:
            self._check_classes(subdirs)

    def _check_classes(self, subdirs: list[Path]) -> None:
        """Every class folder holds a readable image (an empty one would still take a class index,
        which a model then learns without data), and images beside the class folders are said to
        be left out (they belong to no class)."""
        used = {label for _, label in self.samples}
        empty = [folder.name for label, folder in enumerate(subdirs) if label not in used]
        if empty:
            raise DitkitError(f"data folder {self.root}: the class folder(s) {', '.join(empty[:5])} hold no readable "
                              "image: add images or remove the folder (every class folder is a class)")
        stray = [f for f in sorted(self.root.iterdir()) if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
        if stray:
            warnings.warn(f"data folder {self.root}: {len(stray)} image(s) beside the class folders (e.g. "
                          f"{stray[0].name}) belong to no class and are left out: move them into a class folder",
                          stacklevel=3)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def cache_key(self) -> str:
        digest = hashlib.sha1()
        for path, label in self.samples:
            stat = path.stat()
            digest.update(f"{path}|{label}|{stat.st_size}|{stat.st_mtime_ns}".encode())
        return f"folder-{digest.hexdigest()[:16]}-{self.resolution}"

    def __len__(self) -> int:
        return len(self.samples)

    def read(self, index: int) -> tuple[Tensor, int]:
        """Item `index` exactly, or `Unreadable` naming its file (for callers that record skips)."""
        path, label = self.samples[index]
        try:
            with Image.open(path) as image:
                image = to_rgb(image)
            return pil_to_tensor(center_crop(image, self.resolution)), label
        except UNREADABLE as error:  # truncated data that passed the header check
            raise Unreadable(str(path), str(error)) from error

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        """Item `index`, or the next readable one after it (training draws need an item every time)."""
        for offset in range(len(self.samples)):
            try:
                return self.read((index + offset) % len(self.samples))
            except Unreadable as error:
                warnings.warn(f"skipping unreadable image {error.name}: {error.reason}", stacklevel=2)
        raise DitkitError(f"no image in {self.root} could be read")
