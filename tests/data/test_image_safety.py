"""Image folders (issue 16): 16-bit PNGs keep their scale, and images beyond PIL's
decompression-bomb limit are skipped with a warning like other unreadable files."""

import numpy as np
import pytest
import torch
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
    dataset = ImageFolderDataset(tmp_path, 8)  # found where it is read, not at construction
    with pytest.warns(UserWarning, match="skipping unreadable image .*bomb.png"):
        assert torch.equal(dataset[0][0], dataset.read(1)[0])  # small.png stands in for it


def test_a_float_tiff_is_read_as_zero_to_one_not_black(tmp_path):
    Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32), mode="F").save(tmp_path / "gray.tif")
    image, _ = ImageFolderDataset(tmp_path, 8)[0]
    assert abs(float(image.mean())) < 0.01  # 0.5 -> 128 -> ~0 in [-1, 1], not -1


def test_a_float_image_of_an_unknown_range_is_skipped_with_a_warning(tmp_path):
    Image.fromarray(np.full((8, 8), 700.0, dtype=np.float32), mode="F").save(tmp_path / "odd.tif")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "black.png")
    dataset = ImageFolderDataset(tmp_path, 8)
    with pytest.warns(UserWarning, match="odd.tif.*values up to 700"):
        images = [dataset[i][0] for i in range(len(dataset))]
    assert all(float(image.max()) == -1 for image in images)  # the black image stood in for it


def test_exif_orientation_is_applied_as_a_viewer_shows_the_photo(tmp_path):
    array = np.zeros((8, 16, 3), dtype=np.uint8)
    array[:, :8] = 255  # left half white, as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to view"
    Image.fromarray(array).save(tmp_path / "photo.jpg", exif=exif, quality=100)
    dataset = ImageFolderDataset(tmp_path, 8)
    image, _ = dataset[0]  # upright it is 16 high, 8 wide: the crop keeps the middle 8 rows, white on top
    upright = np.rot90(array, k=-1)[4:12]
    assert np.abs((image.permute(1, 2, 0).numpy() + 1) * 127.5 - upright).max() < 40


def test_an_empty_class_folder_is_refused_and_stray_images_are_named(tmp_path):
    from ditkit.errors import DitkitError

    for name in ("cats", "dogs"):
        (tmp_path / name).mkdir()
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "cats" / "a.png")
    with pytest.raises(DitkitError, match="class folder.*dogs hold no image file"):
        ImageFolderDataset(tmp_path, 8)
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "dogs" / "b.png")
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "stray.png")
    with pytest.warns(UserWarning, match="1 image.*stray.png.*belong to no class"):
        dataset = ImageFolderDataset(tmp_path, 8)
    assert dataset.class_names == ["cats", "dogs"] and len(dataset) == 2
