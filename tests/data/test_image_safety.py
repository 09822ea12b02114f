"""Image folders (issue 16): 16-bit PNGs keep their scale, and images beyond PIL's
decompression-bomb limit are skipped with a warning like other unreadable files."""

import numpy as np
import pytest
from PIL import Image

from ditkit.data.folder import ImageFolderDataset


def test_a_16_bit_png_loads_at_its_own_scale(tmp_path):
    Image.fromarray(np.full((8, 8), 32768, dtype=np.uint16)).save(tmp_path / "gray16.png")  # mid-gray
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    image, _ = ImageFolderDataset(tmp_path, 8)[0]
    assert image.shape == (3, 8, 8) and abs(float(image.mean())) < 0.01  # not white (+1)


def test_an_image_beyond_the_decompression_limit_is_skipped_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses images of more than twice this
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    Image.new("RGB", (20, 20)).save(tmp_path / "bomb.png")
    with pytest.warns(UserWarning, match="skipping unreadable image .*bomb.png"):
        dataset = ImageFolderDataset(tmp_path, 8)
    assert [path.name for path, _ in dataset.samples] == ["small.png"]
