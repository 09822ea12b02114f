"""`score_checkpoint` is sampling then scoring, nothing else: the same numbers as its parts."""

import pytest
import torch

from ditkit.metrics.quality import evaluate, legibility, load_reference, sample_checkpoint
from ditkit.metrics.score import score_checkpoint, score_images
from ditkit.record import Sampling

pytestmark = pytest.mark.usefixtures("one_thread")


def test_scoring_a_checkpoint_equals_sampling_then_evaluating(tiny_ckpt, digits_features_path):
    sampling = Sampling(num=6, seed=3)
    scores = score_checkpoint(tiny_ckpt, sampling, "digits", num_reference=12, features_path=digits_features_path,
                              batch_size=4, seed=1, progress=False)
    images, record = sample_checkpoint(tiny_ckpt, sampling, batch_size=4, progress=False)
    reference = load_reference("digits", 12, resolution=images.shape[-2], seed=1)
    assert torch.equal(scores.images, images) and scores.seconds > 0
    assert scores.quality == evaluate(images, reference, features_path=digits_features_path, batch_size=4, seed=1,
                                      progress=False)
    expected = legibility(images, record, "ditkit-digits", features_path=digits_features_path, batch_size=4)
    assert expected is not None and scores.legibility == expected
    assert scores.agreement is None


def test_pairs_are_compared_and_the_summary_is_what_eval_writes(tiny_ckpt, digits_features_path):
    images, record = sample_checkpoint(tiny_ckpt, Sampling(num=4, seed=0), progress=False)
    reference = load_reference("digits", 8, resolution=images.shape[-2])
    scores = score_images(images, reference, features_path=digits_features_path, pair_with=images, progress=False)
    assert scores.legibility is None and scores.agreement["psnr"] == float("inf")  # no record: no classes asked
    summary = scores.summary(source="a", reference="digits")
    assert summary["source"] == "a" and summary["agreement"] == scores.agreement and "label_accuracy" not in summary
    assert {key: summary[key] for key in scores.quality} == scores.quality
