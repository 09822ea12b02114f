"""Image helpers: DiT's resize + center crop, tensor <-> uint8 conversion, grids and image folders
(written atomically: an interrupted write never leaves a truncated image)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from ..errors import DitkitError
from ..files import atomic_path


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize the short side to `size` (box-filter halving first, then bicubic), then crop the center."""
    while min(image.size) >= 2 * size:
        image = image.resize(tuple(s // 2 for s in image.size), resample=Image.BOX)
    scale = size / min(image.size)
    image = image.resize(tuple(max(size, round(s * scale)) for s in image.size), resample=Image.BICUBIC)
    left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB, 8 bits per channel, upright. The camera's EXIF orientation is applied (as every photo
    viewer shows the image); 16-bit grayscale (PNG "I;16", "I") is scaled down, not clipped to white
    as `convert("RGB")` would; floating-point images (TIFF "F") are read as [0, 1] (or 0..255 when
    their values say so), not truncated to black."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "I" or image.mode.startswith("I;16"):
        array = np.asarray(image, dtype=np.float64) / 257  # 65535 -> 255
        image = Image.fromarray(array.round().clip(0, 255).astype(np.uint8))
    elif image.mode == "F":
        image = Image.fromarray(float_to_uint8(np.asarray(image, dtype=np.float64)))
    return image.convert("RGB")


def float_to_uint8(array: np.ndarray) -> np.ndarray:
    """A floating-point image: [0, 1] (the usual convention) or 0..255, to 8 bits; other ranges
    (or NaN) cannot be read without guessing, so they are refused (the reader skips the file)."""
    if not np.isfinite(array).all() or array.min() < 0:
        raise ValueError("a floating-point image with negative or non-finite values (expected [0, 1] or 0..255)")
    scale = 255 if array.max() <= 1 else 1
    if array.max() * scale > 255:
        raise ValueError(f"a floating-point image with values up to {array.max():.4g} (expected [0, 1] or 0..255)")
    return (array * scale).round().astype(np.uint8)


def pil_to_tensor(image: Image.Image) -> Tensor:
    """PIL image -> float tensor (C, H, W) in [-1, 1]."""
    array = np.asarray(image, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, C) uint8."""
    images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return images.permute(0, 2, 3, 1).cpu().numpy()


def image_grid(images: Tensor, ncols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile a batch (B, C, H, W) in [-1, 1] into one PIL image (grayscale if C == 1)."""
    arrays = to_uint8(images)
    B, H, W, C = arrays.shape
    ncols = ncols or math.ceil(math.sqrt(B))
    nrows = math.ceil(B / ncols)
    grid = np.full((nrows * (H + pad) + pad, ncols * (W + pad) + pad, C), 255, dtype=np.uint8)
    for i, array in enumerate(arrays):
        r, c = divmod(i, ncols)
        grid[pad + r * (H + pad): pad + r * (H + pad) + H, pad + c * (W + pad): pad + c * (W + pad) + W] = array
    return Image.fromarray(grid[:, :, 0] if C == 1 else grid)


def image_format(path: str | Path) -> str:
    """PIL's format name for `path`'s extension (PNG for .png), or a one-line error."""
    suffix = Path(path).suffix.lower()
    known = Image.registered_extensions()
    if suffix not in known:
        raise DitkitError(f"{path} has no image extension PIL can write (e.g. .png, .jpg, .webp): name the "
                          "output file with one")
    return known[suffix]


def save_image(image: Image.Image, path: str | Path) -> Path:
    """`image` written atomically to `path`, in the format its extension names."""
    path = Path(path)
    kind = image_format(path)
    with atomic_path(path) as tmp:
        image.save(tmp, format=kind)
    return path


def save_image_folder(images: Tensor, folder: str | Path) -> Path:
    """One PNG per image, named 000000.png, 000001.png, ... (grayscale if C == 1)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for i, array in enumerate(to_uint8(images)):
        save_image(Image.fromarray(array[:, :, 0] if array.shape[-1] == 1 else array), folder / f"{i:06d}.png")
    return folder


def save_grid(images: Tensor, out: str | Path) -> Path:
    """The images tiled into one grid image at `out` (its folder is created)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_image(image_grid(images), out)
