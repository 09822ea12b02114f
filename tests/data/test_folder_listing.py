"""Image folders at ImageNet scale (issue 25): listed once and cached, no file opened at construction."""

import os
import time
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import ditkit.data.folder as folder_module
from ditkit.data.folder import ImageFolderDataset, Unreadable


def make_folder(root, classes=("cat", "dog"), per_class=2):
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / name / f"{i}.png")
    age(root)
    return root


def age(root, seconds=100):
    """Set every folder's time into the past: a listing of folders changed just now is not cached."""
    past = time.time() - seconds
    for folder, _, _ in os.walk(root):
        os.utime(folder, (past, past))


def test_the_listing_is_cached_and_read_back_without_walking_the_tree(tmp_path, monkeypatch):
    root, cache = make_folder(tmp_path / "data"), tmp_path / "cache"
    first = ImageFolderDataset(root, 8, cache_dir=cache)
    assert len(list((cache / "listings").glob("*.json"))) == 1
    monkeypatch.setattr(folder_module, "list_folder", lambda root: pytest.fail("walked the tree again"))
    second = ImageFolderDataset(root, 8, cache_dir=cache)
    assert second.files == first.files and second.class_names == ["cat", "dog"]
    assert second.cache_key == first.cache_key and torch.equal(second[3][0], first[3][0])


def test_a_changed_class_folder_makes_the_listing_stale(tmp_path):
    root, cache = make_folder(tmp_path / "data"), tmp_path / "cache"
    before = ImageFolderDataset(root, 8, cache_dir=cache)
    Image.new("RGB", (12, 12)).save(root / "dog" / "new.png")
    age(root, seconds=50)  # a time that differs from the cached one
    after = ImageFolderDataset(root, 8, cache_dir=cache)
    assert len(after) == len(before) + 1 and "dog/new.png" in after.files
    assert after.cache_key != before.cache_key


def test_a_folder_changed_just_now_is_listed_but_not_cached(tmp_path):
    root, cache = make_folder(tmp_path / "data"), tmp_path / "cache"
    Image.new("RGB", (12, 12)).save(root / "cat" / "fresh.png")  # its folder's time is now
    assert len(ImageFolderDataset(root, 8, cache_dir=cache)) == 5
    assert not (cache / "listings").exists()


def test_no_file_is_opened_at_construction(tmp_path, monkeypatch):
    root = make_folder(tmp_path / "data")
    (root / "cat" / "2.png").write_bytes(b"\x89PNG damaged")
    monkeypatch.setattr(Image, "open", lambda *a, **k: pytest.fail("opened a file at construction"))
    dataset = ImageFolderDataset(root, 8, cache_dir=tmp_path / "cache")
    monkeypatch.undo()
    assert len(dataset) == 5
    with pytest.raises(Unreadable, match="2.png"):
        dataset.read(2)
    with pytest.warns(UserWarning, match="skipping unreadable image .*2.png") as caught:
        substitute = dataset[2]
        again = dataset[2]
    assert len([w for w in caught if "2.png" in str(w.message)]) == 1  # one warning per file
    assert torch.equal(substitute[0], dataset.read(3)[0]) and torch.equal(again[0], substitute[0])


def test_an_unwritable_cache_folder_is_a_warning_only(tmp_path):
    root = make_folder(tmp_path / "data")
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")
    with pytest.warns(UserWarning, match="could not write the cache file"):
        dataset = ImageFolderDataset(root, 8, cache_dir=blocked)
    assert len(dataset) == 4


def test_the_item_order_is_that_of_sorted_paths(tmp_path):
    root = tmp_path / "data"
    for name in ("b/x/1.png", "b/a.png", "b/a-b.png", "b/x.png", "a/z.JPG"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(root / name, format="PNG")
    dataset = ImageFolderDataset(root, 8, cache_dir=tmp_path / "cache")
    expected = [(p, 0 if p.relative_to(root).parts[0] == "a" else 1)
                for p in sorted(root.rglob("*")) if p.is_file()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dataset.samples == expected
