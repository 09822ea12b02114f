"""Built-in datasets that need no download: they load with their packages' own loaders.

- `digits`: scikit-learn's 1,797 handwritten 8x8 digits (10 classes), upscaled; 1 channel.
- `photos`: random square crops, at any size, of the photos that ship with scikit-image
  (up to 1411 x 1411); RGB, unconditional. Crop i is a fixed function of (seed, i).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from .images import pil_to_tensor


class DigitsDataset(Dataset):
    channels = 1
    num_classes = 10
    class_names = [str(i) for i in range(10)]

    def __init__(self, resolution: int = 32):
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
        images = F.interpolate(images, size=(resolution, resolution), mode="bicubic", align_corners=False)
        self.images = images.clamp(0, 1) * 2 - 1
        self.labels = torch.from_numpy(digits.target).long()
        self.resolution = resolution
        self.cache_key = f"digits-{resolution}"

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        return self.images[index], int(self.labels[index])


# scikit-image photos that ship inside the package (others need a download).
PHOTO_NAMES = ("astronaut", "brick", "camera", "cat", "cell", "clock", "coffee", "coins", "colorwheel",
               "grass", "gravel", "hubble_deep_field", "immunohistochemistry", "logo", "moon", "page",
               "retina", "rocket", "text")


def load_photos() -> list[Image.Image]:
    import skimage.data

    photos = []
    for name in PHOTO_NAMES:
        array = np.asarray(getattr(skimage.data, name)())
        if array.ndim == 2:
            array = np.stack([array] * 3, axis=-1)
        photos.append(Image.fromarray(array[..., :3].astype(np.uint8)))
    return photos


class PhotosDataset(Dataset):
    """`length` crops of size `resolution`: each picks a photo and a square of side between
    `resolution` and the photo's short side (so crops range from close-ups to whole photos),
    resized to `resolution`. Photos smaller than `resolution` are upscaled first."""

    channels = 3
    num_classes = 0
    class_names: list[str] = []

    def __init__(self, resolution: int = 256, length: int = 2000, seed: int = 0):
        self.photos = load_photos()
        self.resolution, self.length, self.seed = resolution, length, seed
        self.cache_key = f"photos-{resolution}-{length}-{seed}"

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        rng = np.random.default_rng([self.seed, index])
        photo = self.photos[rng.integers(len(self.photos))]
        R = self.resolution
        if min(photo.size) < R:
            scale = R / min(photo.size)
            photo = photo.resize((max(R, round(photo.size[0] * scale)), max(R, round(photo.size[1] * scale))),
                                 resample=Image.BICUBIC)
        side = int(rng.integers(R, min(photo.size) + 1))
        left = int(rng.integers(0, photo.size[0] - side + 1))
        top = int(rng.integers(0, photo.size[1] - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        if side != R:
            crop = crop.resize((R, R), resample=Image.BICUBIC if side < R else Image.LANCZOS)
        return pil_to_tensor(crop), 0
