"""Sources at the papers' scale (issue 25): a datasets folder, parquet files and WebDataset shards made
from an image folder give the folder's items, exactly; bad input is one line before any work."""

import io
import pickle
import socket
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit import DitkitError
from ditkit.checkpoint import load_checkpoint
from ditkit.data import DatasetsFolder, ImageFolderDataset, ParquetDataset, WebDatasetShards, build_dataset, source_kind
from ditkit.data.folder import Unreadable
from ditkit.train import load_config, train
from helpers import tiny_run

datasets = pytest.importorskip("datasets")
webdataset = pytest.importorskip("webdataset")

CLASSES = ["cat", "dog", "fox"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Three class folders of PNGs of different shapes (PNG: the bytes decode identically everywhere)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for label, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(label + 2):
            array = rng.integers(0, 255, (10 + i, 14 + label, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / name / f"{i}.png")
    return root


def items(folder):
    """(png bytes, label) of the folder's images, in the folder dataset's order."""
    dataset = ImageFolderDataset(folder, 8)
    return [((folder / name).read_bytes(), int(label)) for name, label in zip(dataset.files, dataset.labels,
                                                                               strict=True)]


def hf_dataset(rows, class_names=CLASSES, label_feature=None):
    features = datasets.Features({"image": datasets.Image(),
                                  "label": label_feature or datasets.ClassLabel(names=class_names)})
    return datasets.Dataset.from_dict({"image": [None if data is None else {"bytes": data, "path": None}
                                                 for data, _ in rows],
                                       "label": [label for _, label in rows]}, features=features)


def write_shards(rows, pattern, maxcount=4, label="cls"):
    with webdataset.ShardWriter(pattern, maxcount=maxcount, verbose=0) as sink:
        for i, (data, target) in enumerate(rows):
            sample = {"__key__": f"{i:06d}", "png": data}
            if label == "cls":
                sample["cls"] = target
            elif label == "json":
                sample["json"] = {"label": target}
            sink.write(sample)


def assert_same_items(dataset, reference):
    assert len(dataset) == len(reference) and dataset.num_classes == reference.num_classes
    for i in range(len(reference)):
        image, label = dataset.read(i)
        expected, expected_label = reference.read(i)
        assert label == expected_label and torch.equal(image, expected), f"item {i} differs"


@pytest.fixture
def offline(monkeypatch):
    """Any attempt to reach the network fails the test."""
    monkeypatch.setattr(socket.socket, "connect", lambda *a: pytest.fail("tried to reach the network"))


def test_a_datasets_folder_gives_the_items_of_the_image_folder(folder, tmp_path, offline):
    hf_dataset(items(folder)).save_to_disk(str(tmp_path / "disk"))
    dataset = build_dataset(str(tmp_path / "disk"), 8)
    assert isinstance(dataset, DatasetsFolder) and dataset.class_names == CLASSES
    assert_same_items(dataset, ImageFolderDataset(folder, 8))
    assert dataset.cache_key == build_dataset(str(tmp_path / "disk"), 8).cache_key
    copy = pickle.loads(pickle.dumps(dataset))  # as DataLoader workers receive it
    assert torch.equal(copy.read(4)[0], dataset.read(4)[0])


def test_parquet_files_give_the_items_of_the_image_folder(folder, tmp_path, offline):
    rows = items(folder)
    data = hf_dataset(rows)
    data.to_parquet(str(tmp_path / "one.parquet"), batch_size=2)  # row groups of 2: reads cross them
    (tmp_path / "parts").mkdir()
    data.select(range(5)).to_parquet(str(tmp_path / "parts" / "train-0.parquet"), batch_size=3)
    data.select(range(5, len(rows))).to_parquet(str(tmp_path / "parts" / "train-1.parquet"), batch_size=3)
    reference = ImageFolderDataset(folder, 8)
    for source in (tmp_path / "one.parquet", tmp_path / "parts", tmp_path / "parts" / "train-*.parquet"):
        dataset = build_dataset(str(source), 8)
        assert isinstance(dataset, ParquetDataset) and dataset.class_names == CLASSES  # from the schema metadata
        assert_same_items(dataset, reference)
    backwards = pickle.loads(pickle.dumps(dataset))
    for i in reversed(range(len(rows))):  # out of order, each row group read again
        assert torch.equal(backwards.read(i)[0], reference.read(i)[0])


def test_webdataset_shards_give_the_items_of_the_image_folder(folder, tmp_path):
    rows = items(folder)
    write_shards(rows, str(tmp_path / "cls-%03d.tar"))
    (tmp_path / "json").mkdir()
    write_shards(rows, str(tmp_path / "json" / "json-%03d.tar"), maxcount=5, label="json")
    labels_file = tmp_path / "classes.txt"
    labels_file.write_text("\n".join(CLASSES) + "\n")
    reference = ImageFolderDataset(folder, 8)
    for source in (str(tmp_path / "cls-{000..002}.tar"), str(tmp_path / "json")):
        dataset = build_dataset(source, 8, labels_file=labels_file, cache_dir=tmp_path / "cache")
        assert isinstance(dataset, WebDatasetShards) and dataset.class_names == CLASSES
        assert_same_items(dataset, reference)
    unnamed = build_dataset(str(tmp_path / "cls-000.tar"), 8, cache_dir=tmp_path / "cache")
    assert unnamed.class_names == ["0", "1"] and len(unnamed) == 4  # the labels of its first four images
    copy = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(copy.read(6)[0], reference.read(6)[0])


def test_a_shard_index_is_built_once_and_rebuilt_when_the_shard_changes(folder, tmp_path, monkeypatch):
    import ditkit.data.wds as wds

    rows = items(folder)
    write_shards(rows, str(tmp_path / "s-%03d.tar"), maxcount=100)
    first = WebDatasetShards(tmp_path / "s-000.tar", 8, cache_dir=tmp_path / "cache")
    with monkeypatch.context() as patch:
        patch.setattr(wds, "index_shard", lambda *a: pytest.fail("indexed the shard again"))
        again = WebDatasetShards(tmp_path / "s-000.tar", 8, cache_dir=tmp_path / "cache")
    assert again.keys.tolist() == first.keys.tolist()
    write_shards(rows[:3], str(tmp_path / "s-%03d.tar"), maxcount=100)
    assert len(WebDatasetShards(tmp_path / "s-000.tar", 8, cache_dir=tmp_path / "cache")) == 3


def test_an_undecodable_item_is_unreadable_and_substituted(folder, tmp_path):
    rows = items(folder)
    rows[2] = (b"\x89PNG damaged", rows[2][1])
    hf_dataset(rows).to_parquet(str(tmp_path / "damaged.parquet"))
    write_shards(rows, str(tmp_path / "damaged-%03d.tar"), maxcount=100)
    for dataset in (build_dataset(str(tmp_path / "damaged.parquet"), 8),
                    build_dataset(str(tmp_path / "damaged-000.tar"), 8, cache_dir=tmp_path / "cache")):
        with pytest.raises(Unreadable, match="item 2|000002.png"):
            dataset.read(2)
        with pytest.warns(UserWarning, match="skipping unreadable image"):
            assert torch.equal(dataset[2][0], dataset.read(3)[0])


def test_without_class_label_names_come_from_a_labels_file_or_the_largest_label(folder, tmp_path):
    rows = items(folder)
    hf_dataset(rows, label_feature=datasets.Value("int64")).to_parquet(str(tmp_path / "plain.parquet"))
    assert build_dataset(str(tmp_path / "plain.parquet"), 8).class_names == ["0", "1", "2"]
    (tmp_path / "names.txt").write_text("a\nb\nc\n")
    assert build_dataset(str(tmp_path / "plain.parquet"), 8, labels_file=tmp_path / "names.txt").class_names == \
        ["a", "b", "c"]
    hf_dataset(rows).to_parquet(str(tmp_path / "named.parquet"))
    with pytest.warns(UserWarning, match="names.txt is not used: .* names its classes itself"):
        assert build_dataset(str(tmp_path / "named.parquet"), 8, labels_file=tmp_path / "names.txt").class_names == \
            CLASSES
    (tmp_path / "short.txt").write_text("a\nb\n")
    with pytest.raises(DitkitError, match="label 2 but only 2 class names"):
        build_dataset(str(tmp_path / "plain.parquet"), 8, labels_file=tmp_path / "short.txt")


def test_other_column_names_are_configurable(folder, tmp_path):
    rows = items(folder)
    hf_dataset(rows).rename_columns({"image": "jpg", "label": "cls"}).to_parquet(str(tmp_path / "renamed.parquet"))
    dataset = build_dataset(str(tmp_path / "renamed.parquet"), 8, image_column="jpg", label_column="cls")
    assert_same_items(dataset, ImageFolderDataset(folder, 8))


# ---------------------------------------------------------------- bad input: one line, before any work

def test_parquet_without_the_named_columns_names_the_columns_it_has(folder, tmp_path):
    hf_dataset(items(folder)).to_parquet(str(tmp_path / "x.parquet"))
    with pytest.raises(DitkitError, match=r"no column 'target' \(its columns: image, label\)") as error:
        build_dataset(str(tmp_path / "x.parquet"), 8, label_column="target")
    assert "\n" not in str(error.value)


def test_a_label_column_that_is_not_integers_is_refused(folder, tmp_path):
    rows = [(data, CLASSES[label]) for data, label in items(folder)]
    hf_dataset(rows, label_feature=datasets.Value("string")).save_to_disk(str(tmp_path / "strings"))
    with pytest.raises(DitkitError, match="label column 'label' holds string, not integers"):
        build_dataset(str(tmp_path / "strings"), 8)


def test_a_tar_with_no_labels_is_refused(folder, tmp_path):
    write_shards(items(folder), str(tmp_path / "bare-%03d.tar"), maxcount=100, label=None)
    with pytest.raises(DitkitError, match="9 of the 9 images in .* have no .cls or .json label"):
        build_dataset(str(tmp_path / "bare-000.tar"), 8, cache_dir=tmp_path / "cache")


@pytest.mark.parametrize("kind", ["folder", "parquet", "tar", "pattern"])
def test_an_empty_source_is_one_line(kind, tmp_path):
    if kind == "folder":
        (tmp_path / "empty").mkdir()
        source, match = tmp_path / "empty", "has no image files"
    elif kind == "parquet":
        hf_dataset([]).to_parquet(str(tmp_path / "empty.parquet"))
        source, match = tmp_path / "empty.parquet", "has no rows"
    elif kind == "tar":
        tarfile.open(tmp_path / "empty.tar", "w").close()
        source, match = tmp_path / "empty.tar", "hold no images"
    else:
        tarfile.open(tmp_path / "a-0.tar", "w").close()
        source, match = str(tmp_path / "a-{0..2}.tar"), "2 of the 3 shards .* do not exist"
    with pytest.raises(DitkitError, match=match) as error:
        build_dataset(str(source), 8, cache_dir=tmp_path / "cache")
    assert "\n" not in str(error.value)


def test_the_spelling_of_each_source(folder, tmp_path):
    hf_dataset(items(folder)).save_to_disk(str(tmp_path / "disk"))
    hf_dataset(items(folder)).save_to_disk(str(tmp_path / "dict" / "train"))
    (tmp_path / "dict" / "dataset_dict.json").write_text('{"splits": ["train"]}')
    assert source_kind(str(folder)) == "folder" and source_kind(str(tmp_path / "disk")) == "datasets"
    assert source_kind(str(tmp_path / "x-*.parquet")) == "parquet"
    assert source_kind(str(tmp_path / "x-{000..009}.tar")) == "webdataset"
    with pytest.raises(DitkitError, match="holds several splits .*name one split's folder, e.g. .*dict/train"):
        build_dataset(str(tmp_path / "dict"), 8)
    (tmp_path / "notes.txt").write_text("not data")
    with pytest.raises(DitkitError, match="none of what a source can be: expected a built-in dataset .*parquet"):
        build_dataset(str(tmp_path / "notes.txt"), 8)


def test_a_damaged_image_value_keeps_its_name(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    hf_dataset([(buffer.getvalue(), 0), (None, 0)], class_names=["only"]).to_parquet(str(tmp_path / "n.parquet"))
    dataset = build_dataset(str(tmp_path / "n.parquet"), 8)
    with pytest.raises(Unreadable, match=r"n.parquet item 1: the item has no image"):
        dataset.read(1)


def test_training_a_few_steps_from_a_datasets_folder(folder, tmp_path):
    hf_dataset(items(folder)).rename_column("label", "target").save_to_disk(str(tmp_path / "disk"))
    overrides = [f"data.source={tmp_path / 'disk'}", "data.label_column=target", "train.steps=2"]
    config = load_config(None, tiny_run(tmp_path / "run", *overrides))
    final = train(config, progress=False)
    model, record = load_checkpoint(final / "ema.safetensors")
    assert record.data.class_names == CLASSES and model.config.num_classes == 3 and model.config.in_channels == 3
