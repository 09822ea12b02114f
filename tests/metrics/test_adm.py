"""The ADM evaluator's metrics against computations written here from its definitions
(openai/guided-diffusion evaluations/evaluator.py), on random features."""

import math

import numpy as np
import pytest
import torch

from ditkit.errors import DitkitError
from ditkit.metrics.adm import (
    AdmAccumulator,
    InceptionScoreSplits,
    Moments,
    adm_scores,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
    spatial_features,
)
from ditkit.metrics.features import InceptionFeatures
from metrics.standin_inception import StandInInception

pytestmark = pytest.mark.usefixtures("one_thread")


def fid_by_definition(a: np.ndarray, b: np.ndarray) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)), the trace of the root as the sum of the
    square roots of S_a S_b's eigenvalues (numpy's mean and cov, n - 1)."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root_trace = np.sqrt(np.linalg.eigvals(s_a @ s_b).astype(complex)).real.sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a) + np.trace(s_b) - 2 * root_trace)


def features(n, d, shift=0.0, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d)) * np.linspace(0.5, 2, d) + shift


def streamed_moments(x: np.ndarray, sizes) -> tuple[np.ndarray, np.ndarray]:
    moments, start = Moments(), 0
    for size in sizes:
        moments.update(torch.from_numpy(x[start:start + size]).float() if size % 2 else x[start:start + size])
        start += size
    assert start == len(x)
    return moments.statistics()


def test_fid_from_streamed_moments_matches_its_definition():
    # features far from zero: the running sums must not lose the covariance to cancellation
    real, fake = features(300, 12, shift=1e3), features(250, 12, shift=1e3 + 0.3, seed=1)
    real, fake = real.astype(np.float32).astype(np.float64), fake.astype(np.float32).astype(np.float64)
    mu, sigma = streamed_moments(real, [1, 99, 64, 136])
    assert np.allclose(mu, real.mean(0), rtol=1e-12) and np.allclose(sigma, np.cov(real, rowvar=False), rtol=1e-9)
    mu_f, sigma_f = streamed_moments(fake, [250])
    assert frechet_distance(mu_f, sigma_f, mu, sigma) == pytest.approx(fid_by_definition(fake, real), rel=1e-6)
    assert frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0, abs=1e-8)


def test_sfid_reads_the_first_7_channels_in_tensorflow_order():
    conv = torch.randn(5, 192, 17, 17)
    nhwc = conv.numpy().transpose(0, 2, 3, 1)  # what TensorFlow hands the evaluator
    expected = nhwc[..., :7].reshape(5, -1)
    assert spatial_features(conv).shape == (5, 2023) and np.array_equal(spatial_features(conv).numpy(), expected)
    # sFID is then the Fréchet distance of those features
    a = spatial_features(torch.randn(40, 7, 3, 3)).double().numpy()
    b = spatial_features(torch.randn(30, 7, 3, 3) * 1.5 + 0.2).double().numpy()
    ma, sa = streamed_moments(a, [40])
    mb, sb = streamed_moments(b, [30])
    assert frechet_distance(mb, sb, ma, sa) == pytest.approx(fid_by_definition(b, a), rel=1e-6)


def test_the_spatial_features_come_from_mixed_6d_branch1x1():
    """TF's mixed_6/conv is torch-fidelity's Mixed_6d.branch1x1 (its output after BN + ReLU)."""
    backbone = StandInInception(pool_dim=2048, grid=17)
    seen = []
    backbone.Mixed_6d.branch1x1.register_forward_hook(lambda module, inputs, output: seen.append(output))
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    hooks = len(backbone.Mixed_6d.branch1x1._forward_hooks)
    pool, spatial, logits = InceptionFeatures(backbone=backbone).adm_outputs(images)
    assert pool.shape == (3, 2048) and spatial.shape == (3, 2023) and logits.shape == (3, 10)
    assert torch.equal(spatial, seen[0][:, :7].permute(0, 2, 3, 1).reshape(3, -1))
    assert len(backbone.Mixed_6d.branch1x1._forward_hooks) == hooks  # ditkit's own hook is gone again
    with pytest.raises(DitkitError, match="no Mixed_6d.branch1x1"):
        InceptionFeatures(backbone=torch.nn.Identity()).adm_outputs(images)


def is_by_definition(logits: np.ndarray, split_size: int) -> float:
    """The evaluator's loop: softmax, consecutive splits, exp(mean KL(p || mean p)), mean over splits."""
    preds = np.exp(logits - logits.max(1, keepdims=True))
    preds /= preds.sum(1, keepdims=True)
    scores = []
    for i in range(0, len(preds), split_size):
        part = preds[i:i + split_size]
        kl = part * (np.log(part) - np.log(part.mean(0, keepdims=True)))
        scores.append(np.exp(kl.sum(1).mean()))
    return float(np.mean(scores))


def test_inception_score_matches_the_evaluator_loop_with_its_split_rule():
    logits = np.random.default_rng(0).normal(size=(23, 10)) * 3
    mean, _ = inception_score(torch.from_numpy(logits).float(), split_size=5)  # splits 5, 5, 5, 5, 3
    assert mean == pytest.approx(is_by_definition(logits.astype(np.float32).astype(np.float64), 5), rel=1e-6)
    fed = InceptionScoreSplits(split_size=5)
    for chunk in np.array_split(logits, [2, 9, 10, 17]):  # batches across split borders
        fed.update(chunk)
    assert len(fed.scores()) == 5 and fed.compute()[0] == pytest.approx(is_by_definition(logits, 5), rel=1e-6)
    many = InceptionScoreSplits()  # the evaluator's 5,000: 10 splits at 50K, 3 at 12,000
    many.update(np.zeros((12000, 4)))
    assert len(many.scores()) == 3 and many.compute() == pytest.approx((1.0, 0.0))


def pr_by_definition(real: np.ndarray, fake: np.ndarray, k: int = 3) -> tuple[float, float]:
    """Explicit k-NN radii (squared distances; the k-th neighbour besides the point itself)."""
    def squared(a, b):
        return ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)

    real_radii = np.sort(squared(real, real), axis=1)[:, k]
    fake_radii = np.sort(squared(fake, fake), axis=1)[:, k]
    cross = squared(real, fake)  # (real, fake)
    precision = (cross <= real_radii[:, None]).any(0).mean()
    recall = (cross <= fake_radii[None, :]).any(1).mean()
    return float(precision), float(recall)


@pytest.mark.parametrize("block", [1000, 7, 13])
def test_precision_recall_match_explicit_knn_radii_whatever_the_block(block):
    real, fake = features(70, 6), features(55, 6, shift=0.7, seed=1)
    precision, recall = precision_recall(torch.from_numpy(real).float(), torch.from_numpy(fake).float(), block=block)
    expected = pr_by_definition(real.astype(np.float32).astype(np.float64),
                                fake.astype(np.float32).astype(np.float64))
    assert (precision, recall) == pytest.approx(expected, rel=1e-6) and 0 < precision < 1 and 0 < recall < 1
    radii = manifold_radii(real, block=block).numpy()
    assert np.allclose(radii, np.sort(((real[:, None] - real[None]) ** 2).sum(-1), axis=1)[:, 3], rtol=1e-9)


def test_precision_recall_need_more_points_than_neighbours():
    with pytest.raises(DitkitError, match="more than 3 images"):
        precision_recall(np.zeros((3, 4)), np.ones((10, 4)))


def test_adm_scores_of_accumulated_batches():
    rng = np.random.default_rng(0)
    real = [rng.normal(size=(b, 8)) for b in (10, 30)]
    fake = [rng.normal(size=(b, 8)) + 0.5 for b in (25, 15)]
    spatial = [rng.normal(size=(len(b), 5)) for b in real + fake]
    logits = [rng.normal(size=(len(b), 4)) for b in fake]
    reference, samples = AdmAccumulator(score=False), AdmAccumulator()
    for pool, space in zip(real, spatial[:2], strict=True):
        reference.update(torch.from_numpy(pool), torch.from_numpy(space))
    for pool, space, logit in zip(fake, spatial[2:], logits, strict=True):
        samples.update(torch.from_numpy(pool), torch.from_numpy(space), torch.from_numpy(logit))
    scores = adm_scores(samples.result(), reference.result())
    real_all, fake_all = np.concatenate(real).astype(np.float32), np.concatenate(fake).astype(np.float32)
    assert scores["fid"] == pytest.approx(fid_by_definition(fake_all.astype(float), real_all.astype(float)), rel=1e-6)
    assert scores["sfid"] == pytest.approx(fid_by_definition(np.concatenate(spatial[2:]), np.concatenate(spatial[:2])),
                                           rel=1e-6)
    assert scores["is_mean"] == pytest.approx(is_by_definition(np.concatenate(logits), 5000), rel=1e-6)
    assert (scores["precision"], scores["recall"]) == pytest.approx(
        pr_by_definition(real_all.astype(float), fake_all.astype(float)), rel=1e-6)
    assert math.isfinite(scores["is_std"])
    # statistics alone (a reference batch without images): no precision / recall
    only_statistics = reference.result()
    only_statistics.pool = None
    assert adm_scores(samples.result(), only_statistics)["precision"] is None


def test_a_reference_batch_s_statistics_win_and_its_images_give_precision_recall(tmp_path):
    """As the evaluator: precomputed mu/sigma/mu_s/sigma_s give FID and sFID, the images the pool features
    that precision and recall need; statistics alone leave those None. (Small stand-in features: the
    batch is built directly, since a file's layout fixes Inception's sizes.)"""
    from ditkit.metrics.quality import adm_evaluate
    from ditkit.metrics.refbatch import ReferenceBatch, write_reference_batch

    net = InceptionFeatures(backbone=StandInInception(pool_dim=16, grid=3))
    samples = torch.rand(12, 3, 8, 8) * 2 - 1
    reference = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    full = adm_evaluate(net, samples, reference, batch_size=4)
    measured = AdmAccumulator(score=False)
    for batch in reference.split(4):
        measured.update(*net.adm_outputs(batch)[:2])
    stats = measured.result()
    shifted = {"mu": stats.mu + 0.5, "sigma": stats.sigma, "mu_s": stats.mu_s, "sigma_s": stats.sigma_s * 2}
    only_statistics = adm_evaluate(net, samples, ReferenceBatch(tmp_path / "none.npz", None, shifted), batch_size=4)
    assert only_statistics["precision"] is None and only_statistics["recall"] is None
    assert only_statistics["kid_mean"] is None and only_statistics["is_mean"] == pytest.approx(full["is_mean"])
    pixels = reference.permute(0, 2, 3, 1).numpy()
    path = write_reference_batch(tmp_path / "both.npz", shifted, [pixels], pixels.shape)
    both = adm_evaluate(net, samples, ReferenceBatch(path, pixels.shape, shifted), batch_size=4)
    assert both["fid"] == pytest.approx(only_statistics["fid"], rel=1e-9) != pytest.approx(full["fid"], rel=1e-3)
    assert both["sfid"] == pytest.approx(only_statistics["sfid"], rel=1e-9)
    assert (both["precision"], both["recall"]) == (full["precision"], full["recall"])
    assert both["kid_mean"] == pytest.approx(full["kid_mean"], abs=1e-9)  # the same images, the same features
