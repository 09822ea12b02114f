import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit import DitkitError
from ditkit.data import DigitsDataset, ImageFolderDataset, PhotosDataset, build_dataset, cached_latents
from ditkit.data.folder import Unreadable
from ditkit.data.images import center_crop, image_grid


def test_digits_are_offline_class_conditional_and_upscaled():
    data = build_dataset("digits", 32)
    assert isinstance(data, DigitsDataset) and len(data) == 1797 and data.num_classes == 10
    x, y = data[5]
    assert x.shape == (1, 32, 32) and -1 <= x.min() < x.max() <= 1
    assert sorted({int(data.labels[i]) for i in range(len(data))}) == list(range(10))


@pytest.mark.parametrize("size", [48, 1500])
def test_photos_any_size_deterministic(size):
    data = PhotosDataset(size, length=3, seed=1)
    x, y = data[2]
    assert x.shape == (3, size, size) and y == 0 and data.num_classes == 0
    assert torch.equal(x, data[2][0])
    assert -1 <= x.min() and x.max() <= 1 and x.std() > 0.01


def test_photos_include_the_largest_scikit_image_photo():
    assert max(max(p.size) for p in PhotosDataset(64, length=1).photos) == 1411


def save_image(path, color, size=(40, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_folder_with_class_subfolders(tmp_path):
    save_image(tmp_path / "cat" / "a.png", (255, 0, 0))
    save_image(tmp_path / "dog" / "b.jpg", (0, 0, 255))
    save_image(tmp_path / "dog" / "c.png", (0, 0, 255))
    data = ImageFolderDataset(tmp_path, 16)
    assert data.class_names == ["cat", "dog"] and len(data) == 3
    x, y = data[0]
    assert x.shape == (3, 16, 16) and y == 0
    torch.testing.assert_close(x[0], torch.ones(16, 16))  # red, full intensity
    assert [data[i][1] for i in range(3)] == [0, 1, 1]


def test_flat_folder_is_unconditional_and_corrupt_files_are_skipped(tmp_path):
    save_image(tmp_path / "good.png", (0, 255, 0))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    data = ImageFolderDataset(tmp_path, 8)  # listed, not opened: found where it is read
    assert len(data) == 2 and data.num_classes == 0
    with pytest.raises(Unreadable, match="broken.png"):
        data.read(0)
    with pytest.warns(UserWarning, match="broken.png"):
        assert data[0][1] == 0  # good.png stands in for it
    assert torch.equal(data[0][0], data.read(1)[0])


def test_truncated_image_found_at_load_time_is_skipped_with_a_warning(tmp_path):
    save_image(tmp_path / "a.png", (0, 255, 0))
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(tmp_path / "b.png")
    data = ImageFolderDataset(tmp_path, 8)
    data_bytes = (tmp_path / "b.png").read_bytes()
    (tmp_path / "b.png").write_bytes(data_bytes[: len(data_bytes) // 2])
    with pytest.warns(UserWarning, match="b.png"):
        x, _ = data[1]
    assert x.shape == (3, 8, 8)


def test_empty_and_missing_folders_are_clear_errors(tmp_path):
    with pytest.raises(DitkitError, match="has no image files"):
        ImageFolderDataset(tmp_path, 8)
    with pytest.raises(DitkitError, match="neither a built-in dataset"):
        build_dataset(str(tmp_path / "nope"), 8)
    (tmp_path / "x.png").write_bytes(b"junk")
    data = ImageFolderDataset(tmp_path, 8)  # not opened at construction: found where it is read
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(DitkitError, match="no image in .* could be read"):
            data[0]


def test_center_crop_and_grid():
    image = Image.new("RGB", (300, 100))
    assert center_crop(image, 64).size == (64, 64)
    grid = image_grid(torch.zeros(5, 1, 4, 4), ncols=3, pad=1)
    assert grid.size == (3 * 5 + 1, 2 * 5 + 1) and grid.mode == "L"


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, sample_size=16)
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


def test_latents_are_encoded_once_and_cached(tmp_path, tiny_vae, monkeypatch):
    source = PhotosDataset(16, length=5)
    latents = cached_latents(source, tiny_vae, tmp_path, hflip=True)
    assert len(latents) == 10 and latents[0][0].shape == (4, 8, 8) and latents.channels == 4
    assert len([p for p in tmp_path.glob("latents-*") if (p / "manifest.json").is_file()]) == 1

    import ditkit.data.prepared as module

    monkeypatch.setattr(module, "encode", lambda *a: pytest.fail("re-encoded despite the cache"))
    again = cached_latents(source, tiny_vae, tmp_path, hflip=True)
    assert all(torch.equal(again[i][0], latents[i][0]) for i in range(10))


def test_missing_vae_is_a_clear_error(tmp_path):
    with pytest.raises(DitkitError, match="no AutoencoderKL at"):
        cached_latents(PhotosDataset(16, length=1), tmp_path, tmp_path, hflip=False)
