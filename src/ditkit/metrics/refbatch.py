"""ADM reference batches: the `.npz` files of openai/guided-diffusion's evaluator
(`VIRTUAL_imagenet256_labeled.npz`, ...), read and written in their layout so that either side reads
the other's:

- `arr_0`: images, uint8, (N, H, W, 3) (NHWC, RGB);
- `mu`, `sigma`: mean (2048,) and covariance (2048, 2048) of the Inception pool_3 features;
- `mu_s`, `sigma_s`: the same of the spatial mixed_6/conv features (2023,), (2023, 2023).

A file holds images, statistics or both; the evaluator uses the statistics when `mu` is there and
computes them from the images otherwise (precision/recall always need the images). Other arrays (a
labelled batch's `arr_1`) are ignored. Images are read and written in batches, never all at once.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import DitkitError
from ..files import atomic_path
from .adm import POOL_DIM, SPATIAL_DIM

IMAGES = "arr_0"
STATISTICS = {"mu": (POOL_DIM,), "sigma": (POOL_DIM, POOL_DIM), "mu_s": (SPATIAL_DIM,),
              "sigma_s": (SPATIAL_DIM, SPATIAL_DIM)}


def is_reference_batch(source: str | Path) -> bool:
    """Whether a --ref names an .npz reference batch (rather than a built-in dataset or a folder)."""
    return str(source).lower().endswith(".npz")


@dataclass
class ReferenceBatch:
    """A checked reference batch: `image_shape` (N, H, W, 3) of `arr_0` or None, and the Inception
    `statistics` (mu, sigma, mu_s, sigma_s, float64) or None."""

    path: Path
    image_shape: tuple[int, ...] | None
    statistics: dict[str, np.ndarray] | None

    @property
    def num_images(self) -> int:
        return 0 if self.image_shape is None else self.image_shape[0]

    @property
    def image_size(self) -> tuple[int, int] | None:
        return None if self.image_shape is None else tuple(self.image_shape[1:3])

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """The images, uint8 (B, H, W, 3), read from the file `batch_size` at a time."""
        if self.image_shape is None:
            raise DitkitError(f"{self.path} holds no images ({IMAGES})")
        per_image = int(np.prod(self.image_shape[1:]))
        with zipfile.ZipFile(self.path) as archive, archive.open(f"{IMAGES}.npy") as stream:
            _read_header(stream)
            for start in range(0, self.num_images, batch_size):
                count = min(batch_size, self.num_images - start)
                data = stream.read(count * per_image)
                if len(data) != count * per_image:
                    raise DitkitError(f"{self.path} is truncated: {IMAGES} ends after {start} images")
                yield np.frombuffer(data, np.uint8).reshape(count, *self.image_shape[1:])


def _read_header(stream) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) of the .npy file open in `stream`, which is left at its data."""
    version = np.lib.format.read_magic(stream)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
    return read(stream)


def read_reference_batch(path: str | Path) -> ReferenceBatch:
    """Check an ADM reference batch and read its statistics (images are read later, in batches).
    Anything missing or malformed is a one-line DitkitError."""
    path = Path(path)
    if not path.is_file():
        raise DitkitError(f"reference batch {path} does not exist: give an ADM .npz (e.g. VIRTUAL_imagenet256_labeled"
                          ".npz) or write one with ditkit eval --write-ref")
    try:
        with zipfile.ZipFile(path) as archive:
            names = {Path(name).stem for name in archive.namelist() if name.endswith(".npy")}
            image_shape = _image_shape(path, archive) if IMAGES in names else None
    except (zipfile.BadZipFile, ValueError, OSError) as error:
        raise DitkitError(f"{path} is not a readable .npz reference batch ({error})") from None
    statistics = _statistics(path, names)
    if image_shape is None and statistics is None:
        raise DitkitError(f"{path} has neither images ({IMAGES}) nor statistics ({', '.join(STATISTICS)}): "
                          "an ADM reference batch holds at least one of them")
    return ReferenceBatch(path, image_shape, statistics)


def _image_shape(path: Path, archive: zipfile.ZipFile) -> tuple[int, ...]:
    with archive.open(f"{IMAGES}.npy") as stream:
        shape, fortran, dtype = _read_header(stream)
    if dtype != np.uint8 or fortran or len(shape) != 4 or shape[3] != 3 or 0 in shape:
        raise DitkitError(f"{path}: {IMAGES} must be uint8 images (N, H, W, 3) in C order, as ADM's batches, got "
                          f"{dtype} {tuple(shape)}{' in Fortran order' if fortran else ''}")
    return tuple(int(side) for side in shape)


def _statistics(path: Path, names: set[str]) -> dict[str, np.ndarray] | None:
    present = [key for key in STATISTICS if key in names]
    if not present:
        return None
    if len(present) < len(STATISTICS):
        missing = ", ".join(key for key in STATISTICS if key not in names)
        raise DitkitError(f"{path} has {', '.join(present)} but not {missing}: a reference batch's statistics "
                          "are all four (mu, sigma, mu_s, sigma_s) or none")
    with np.load(path, allow_pickle=False) as arrays:
        statistics = {key: arrays[key] for key in STATISTICS}
    for key, shape in STATISTICS.items():
        array = statistics[key]
        if array.shape != shape or not np.issubdtype(array.dtype, np.floating):
            raise DitkitError(f"{path}: {key} must be a float array of shape {shape} (Inception features), got "
                              f"{array.dtype} {array.shape}")
        if not np.isfinite(array).all():
            raise DitkitError(f"{path}: {key} has NaN or infinite values: write the reference batch again")
    return {key: array.astype(np.float64) for key, array in statistics.items()}


Statistics = dict[str, np.ndarray]


def write_reference_batch(path: str | Path, statistics: Statistics | Callable[[], Statistics],
                          images: Iterable[np.ndarray] | None = None,
                          image_shape: tuple[int, ...] | None = None) -> Path:
    """Write an ADM reference batch atomically: where given, `images` (uint8 (B, H, W, 3) batches adding
    up to `image_shape` (N, H, W, 3)), streamed into `arr_0`; then the four statistics, or what the
    function `statistics` returns once the images are written (so that one pass over a stream both
    writes its images and accumulates their statistics)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
        if images is not None:
            _write_images(archive, images, image_shape)
        arrays = statistics() if callable(statistics) else statistics
        if set(arrays) != set(STATISTICS):
            raise DitkitError(f"a reference batch needs the statistics {', '.join(STATISTICS)}, got "
                              f"{', '.join(arrays)}")
        for key in STATISTICS:
            with archive.open(f"{key}.npy", "w", force_zip64=True) as stream:
                np.lib.format.write_array(stream, np.asarray(arrays[key], np.float64), allow_pickle=False)
    return path


def _write_images(archive: zipfile.ZipFile, images: Iterable[np.ndarray], image_shape: tuple[int, ...]) -> None:
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": tuple(image_shape)}
    written = 0
    with archive.open(f"{IMAGES}.npy", "w", force_zip64=True) as stream:
        np.lib.format.write_array_header_2_0(stream, header)
        for batch in images:
            if batch.dtype != np.uint8 or batch.shape[1:] != tuple(image_shape[1:]):
                raise DitkitError(f"reference images must be uint8 {tuple(image_shape[1:])}, got {batch.dtype} "
                                  f"{batch.shape[1:]}")
            stream.write(np.ascontiguousarray(batch).tobytes())
            written += len(batch)
    if written != image_shape[0]:
        raise DitkitError(f"{written} reference images were written where {image_shape[0]} were announced")
