"""Sharded, resumable sampling (`metrics.shards`) and the streaming pass over its shards
(`metrics.streaming`): the same images as in-memory sampling, the same statistics as in-memory
scoring, resumed after a kill to the same result, and refusals before any sampling."""

import json

import numpy as np
import pytest
import torch

import ditkit.metrics.shards as shards
from ditkit import DitkitError
from ditkit.data.images import to_uint8
from ditkit.files import FolderLock
from ditkit.metrics.quality import evaluate, label_accuracy, load_reference, sample_checkpoint
from ditkit.metrics.score import score_checkpoint_sharded, score_sample_folder
from ditkit.metrics.shards import ShardPlan, sample_shards, shard_batches, shard_path, share
from ditkit.metrics.streaming import FeatureScores, Legibility, stream
from ditkit.record import Sampling

pytestmark = pytest.mark.usefixtures("one_thread")
real_make = shards.make_shards


def shard_images(folder) -> np.ndarray:
    return np.concatenate([np.load(path)["arr_0"] for path in sorted(folder.glob("shard-*.npz"))])


def test_a_plan_covers_every_sample_once_in_whole_batches_for_any_process_count():
    plan = ShardPlan(num=10, batch_size=2, shard_size=4)
    assert plan.count == 3 and [plan.bounds(k) for k in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert plan.batches(1) == [(4, 6), (6, 8)] and plan.batches(2) == [(8, 10)]
    for world_size in (1, 2, 3, 5):
        dealt = sorted(k for rank in range(world_size) for k in share([0, 1, 2], rank, world_size))
        assert dealt == [0, 1, 2]
    assert [share([1, 3, 4, 6, 7], rank, 2) for rank in (0, 1)] == [[1, 4, 7], [3, 6]]  # a resume splits evenly
    assert ShardPlan.default(50_000, 64).shard_size == 960 and ShardPlan.default(10, 2000).shard_size == 2000
    with pytest.raises(DitkitError, match="--shard-size 10 is not a multiple of --batch-size 4.*--shard-size 8"):
        ShardPlan(num=10, batch_size=4, shard_size=10)


def test_shards_hold_the_images_in_memory_sampling_makes_with_their_labels(tiny_ckpt, tmp_path):
    sampling = Sampling(num=10, seed=3)
    made = sample_shards(tiny_ckpt, sampling, tmp_path / "s", batch_size=4, shard_size=8, progress=False)
    images, record = sample_checkpoint(tiny_ckpt, sampling, batch_size=4, progress=False)
    assert made.made == [0, 1] and made.plan.count == 2
    assert np.array_equal(shard_images(tmp_path / "s"), to_uint8(images))  # (N, H, W, C) uint8: ADM's layout
    labels = np.concatenate([np.load(shard_path(tmp_path / "s", k))["arr_1"] for k in range(2)])
    assert labels.tolist() == [i % 10 for i in range(10)]
    manifest = json.loads((tmp_path / "s" / "manifest.json").read_text())
    assert manifest["settings"]["steps"] == record.diffusion.sample_steps and manifest["settings"]["seed"] == 3
    assert manifest["settings"]["fingerprint"].startswith("sha256:") and manifest["kind"] == "ditkit eval samples"
    batches = list(shard_batches(tmp_path / "s", 3))
    assert [len(b) for b in batches] == [3, 3, 2, 2] and batches[0].dtype == torch.uint8
    assert np.array_equal(torch.cat(batches).permute(0, 2, 3, 1).numpy(), to_uint8(images))


def test_the_streaming_pass_computes_what_in_memory_scoring_does(tiny_ckpt, tmp_path, digits_features_path):
    sample_shards(tiny_ckpt, Sampling(num=12), tmp_path / "s", batch_size=4, progress=False)
    images = torch.from_numpy(shard_images(tmp_path / "s")).permute(0, 3, 1, 2)
    scores = score_sample_folder(tmp_path / "s", "digits", num_reference=16, features_path=digits_features_path,
                                 batch_size=5, seed=1, progress=False)
    reference = load_reference("digits", 16, resolution=16, seed=1)
    expected = evaluate(images, reference, features_path=digits_features_path, batch_size=5, seed=1, progress=False)
    for key, value in expected.items():  # FID sums batch by batch: equal up to float64 rounding
        assert scores.quality[key] == (pytest.approx(value, rel=1e-9) if isinstance(value, float) else value), key
    assert scores.images is None and scores.quality["shards"] == 1 and scores.legibility is None  # no record given


def test_legibility_streams_over_the_cycled_classes(digits_features_path):
    from ditkit.data import DigitsDataset
    from ditkit.metrics.features import digits_features

    classifier = digits_features(digits_features_path)
    digits = DigitsDataset(16)
    order = torch.cat([torch.nonzero(digits.labels == i % 10)[0] for i in range(23)])
    images = ((digits.images[order] + 1) * 127.5).round().to(torch.uint8)
    streamed = stream(images.split(4), [Legibility(classifier, 10)])
    assert streamed["label_accuracy"] == pytest.approx(label_accuracy(classifier, images, torch.arange(23) % 10))


def test_a_killed_run_resumes_to_the_same_samples_and_statistics(tiny_ckpt, tmp_path, digits_features_path,
                                                                 monkeypatch):
    score = dict(num_reference=16, features_path=digits_features_path, batch_size=2, shard_size=4, progress=False)
    whole = score_checkpoint_sharded(tiny_ckpt, Sampling(num=14), tmp_path / "whole", "digits", **score)
    real_write, written = shards.write_shard, []

    def killed_after_two(path, images, labels):
        if len(written) == 2:
            path.with_name(f".{path.name}.tmp4242").write_bytes(b"half a shard")  # what a kill mid-write leaves
            raise KeyboardInterrupt
        real_write(path, images, labels)
        written.append(path.name)

    monkeypatch.setattr(shards, "write_shard", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        score_checkpoint_sharded(tiny_ckpt, Sampling(num=14), tmp_path / "resumed", "digits", **score)
    assert sorted(p.name for p in (tmp_path / "resumed").glob("shard-*")) == ["shard-000000.npz", "shard-000001.npz"]
    monkeypatch.setattr(shards, "write_shard", real_write)
    made = []
    monkeypatch.setattr(shards, "make_shards", lambda *args, **kwargs: (made.append(args[5]),
                                                                        real_make(*args, **kwargs)))
    resumed = score_checkpoint_sharded(tiny_ckpt, Sampling(num=14), tmp_path / "resumed", "digits", **score)
    assert made == [[2, 3]]  # only the missing shards were sampled
    assert not list((tmp_path / "resumed").glob(".*.tmp*")) and not (tmp_path / "resumed" / ".ditkit.lock").exists()
    assert np.array_equal(shard_images(tmp_path / "resumed"), shard_images(tmp_path / "whole"))
    assert {**resumed.quality, "samples_folder": None} == {**whole.quality, "samples_folder": None}
    assert resumed.legibility == whole.legibility is not None


def test_a_folder_of_other_settings_files_or_in_use_is_refused_before_sampling(tiny_ckpt, tmp_path, monkeypatch):
    sample_shards(tiny_ckpt, Sampling(num=4), tmp_path / "s", batch_size=2, progress=False)
    monkeypatch.setattr(shards, "make_shards", lambda *args, **kwargs: args[5] and pytest.fail("sampled"))
    with pytest.raises(DitkitError, match=r"holds samples made with other settings \(steps 2 there, 3 here\): give a "
                                          "new folder"):
        sample_shards(tiny_ckpt, Sampling(num=4, steps=3), tmp_path / "s", batch_size=2, progress=False)
    with pytest.raises(DitkitError, match="batch_size 2 there, 4 here"):
        sample_shards(tiny_ckpt, Sampling(num=4), tmp_path / "s", batch_size=4, progress=False)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DitkitError, match="holds files that are not ditkit samples \\(notes.txt"):
        sample_shards(tiny_ckpt, Sampling(num=4), tmp_path / "mine", batch_size=2, progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(DitkitError, match="is a file: give a folder"):
        sample_shards(tiny_ckpt, Sampling(num=4), tmp_path / "file", batch_size=2, progress=False)
    with FolderLock(tmp_path / "s", "another eval"), pytest.raises(DitkitError, match="is in use by .*another eval"):
        sample_shards(tiny_ckpt, Sampling(num=4), tmp_path / "s", batch_size=2, progress=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    sample_shards(tiny_ckpt, Sampling(num=4), tmp_path / "s", batch_size=2, progress=False)  # all there: no sampling


def test_a_damaged_or_foreign_shard_is_one_line(tmp_path):
    folder = tmp_path / "s"
    folder.mkdir()
    settings = {"num": 4, "batch_size": 2, "shard_size": 2, "height": 8, "width": 8}
    (folder / "manifest.json").write_text(json.dumps({"kind": shards.KIND, "format": shards.FORMAT,
                                                      "settings": settings}))
    shards.write_shard(shard_path(folder, 0), np.zeros((2, 8, 8, 3), np.uint8), None)
    shard_path(folder, 1).write_bytes(b"PK\x03\x04 cut short")
    batches = shard_batches(folder, 2)
    assert next(batches).shape == (2, 3, 8, 8)
    with pytest.raises(DitkitError, match="shard-000001.npz is damaged .*delete it and run again"):
        next(batches)
    shards.write_shard(shard_path(folder, 1), np.zeros((2, 4, 4, 3), np.uint8), None)
    with pytest.raises(DitkitError, match="not the 2 uint8 8x8 images of the manifest"):
        list(shard_batches(folder, 2))
    (folder / "manifest.json").write_text("{}")
    with pytest.raises(DitkitError, match="is not a ditkit samples manifest"):
        list(shard_batches(folder, 2))


class MeanColour(torch.nn.Module):
    """A stand-in feature network: each image's mean colour, and one logit."""

    def forward(self, images):
        colours = images.float().mean(dim=(2, 3))
        return colours, colours.mean(dim=1, keepdim=True)


def test_any_accumulator_plugs_into_the_stream():
    class Count:
        def __init__(self):
            self.sizes = []

        def update(self, images):
            assert images.dtype == torch.uint8 and images.shape[1:] == (3, 8, 8)
            self.sizes.append(len(images))

        def compute(self):
            return {"count": sum(self.sizes)}

    images = torch.randint(0, 256, (7, 3, 8, 8), dtype=torch.uint8)
    counter = Count()
    features = FeatureScores(MeanColour(), MeanColour()(images), kid_subset_size=3)
    result = stream(images.split(3), [features, counter])
    assert counter.sizes == [3, 3, 1] and result["count"] == 7 and result["num_generated"] == 7
    assert result["fid"] == pytest.approx(0.0, abs=1e-4) and result["features"] == "MeanColour"  # itself


def test_the_adm_scores_stream_as_the_in_memory_adm_evaluation_computes_them(tiny_ckpt, tmp_path):
    from ditkit.metrics.features import InceptionFeatures
    from metrics.standin_inception import StandInInception

    extractor = InceptionFeatures(backbone=StandInInception()).eval()
    sample_shards(tiny_ckpt, Sampling(num=12), tmp_path / "s", batch_size=4, progress=False)
    images = torch.from_numpy(shard_images(tmp_path / "s")).permute(0, 3, 1, 2)
    reference = load_reference("digits", 16, resolution=16, seed=1)
    scores = score_sample_folder(tmp_path / "s", reference, extractor=extractor, batch_size=5, seed=1, progress=False)
    expected = evaluate(images, reference, extractor, batch_size=5, seed=1, progress=False)
    assert {"fid", "sfid", "precision", "recall"} <= {key for key, value in expected.items() if value is not None}
    for key, value in expected.items():  # moments sum batch by batch: equal up to float64 rounding
        assert scores.quality[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
