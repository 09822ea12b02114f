"""Evaluation reads references and samples from every data source without counting an image twice:
an unreadable file is left out (not replaced by its neighbour), and a source whose images have no one
size asks for the resolution in one line."""

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit import DitkitError
from ditkit.metrics.quality import load_reference, load_samples


def write_pngs(folder, count):
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(np.full((8, 8, 3), 20 * i, np.uint8)).save(folder / f"{i:03d}.png")


def test_an_unreadable_sample_is_left_out_not_replaced(tmp_path):
    write_pngs(tmp_path / "samples", 4)
    (tmp_path / "samples" / "001.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="001.png"):
        images = load_samples(tmp_path / "samples")
    assert len(images) == 3  # 000, 002, 003: none of them twice
    assert [round(float(x.mean()), 4) for x in images] == [round(20 * i / 127.5 - 1, 4) for i in (0, 2, 3)]


def test_an_unreadable_reference_image_is_left_out_not_replaced(tmp_path):
    write_pngs(tmp_path / "real", 4)
    (tmp_path / "real" / "002.png").write_bytes(b"broken")
    with pytest.warns(UserWarning, match="002.png"):
        images = load_reference(str(tmp_path / "real"), 4, resolution=8)
    assert len(images) == 3
    assert len({float(x.mean()) for x in images}) == 3


def test_a_datasets_reference_needs_a_resolution_and_reads_with_one(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = {"image": [Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)) for i in range(3)], "label": [0, 1, 0]}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(DitkitError, match="--resolution"):
        load_reference(str(tmp_path / "hf"), 3)
    images = load_reference(str(tmp_path / "hf"), 3, resolution=8)
    assert images.shape == (3, 3, 8, 8) and torch.isfinite(images).all()
