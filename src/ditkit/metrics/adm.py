"""Sample quality as the ADM evaluator defines it (openai/guided-diffusion `evaluations/evaluator.py`,
the suite behind the FID / sFID / IS / Precision / Recall columns of the DiT, U-DiT and DiffuSSM
papers), computed from Inception features (`features.InceptionFeatures.adm_outputs`):

- FID: the Fréchet distance between Gaussians fitted to the 2048-d pool_3 features (mean, covariance
  with n - 1), the matrix square root by scipy as in the evaluator.
- sFID: the same distance on the spatial features of `mixed_6/conv`: its first 7 channels on the
  17 x 17 grid, flattened in TensorFlow's (H, W, C) order (2023-d), so that the `mu_s` / `sigma_s`
  of an ADM reference batch line up with ditkit's.
- Inception Score: softmax of the bias-free logits (pool features times the softmax weights), split
  into consecutive chunks of 5,000 samples (10 splits at 50K), exp of the mean KL divergence to the
  chunk's marginal, averaged over the chunks.
- Precision / Recall (improved, Kynkäänniemi et al.): each set's manifold is the union of balls
  around its points with the squared distance to the k-th nearest neighbour (k = 3) as radius;
  precision is the share of samples inside the reference manifold, recall the share of reference
  images inside the samples' manifold.

Everything here streams: `Moments` and `InceptionScoreSplits` take batches and keep running sums
(float64), so a caller never holds all images; precision and recall need all pool features (50K x
2048 float32 is 400 MB), which `AdmAccumulator` keeps. Distances are computed in blocks whose size
does not change the result.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
from scipy import linalg
from torch import Tensor

from ..errors import DitkitError

POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # the evaluator keeps mixed_6/conv[..., :7]
SPATIAL_SIDE = 17
SPATIAL_DIM = SPATIAL_SIDE * SPATIAL_SIDE * SPATIAL_CHANNELS  # 2023
IS_SPLIT_SIZE = 5000  # the evaluator's split_size: 10 splits at 50K samples
NEIGHBOURS = 3  # the evaluator's nhood_sizes=(3,)
DISTANCE_BLOCK = 10000  # the evaluator's row and column batch size


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrt(sigma1 sigma2)), as the evaluator computes
    it: where the product's square root is not finite, eps is added to both diagonals."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise DitkitError(f"statistics of different sizes: means {mu1.shape} and {mu2.shape}, covariances "
                          f"{sigma1.shape} and {sigma2.shape}: compare features of the same network")
    with warnings.catch_warnings():  # the evaluator asks sqrtm for no message (disp=False) and checks the result
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        root = linalg.sqrtm(sigma1 @ sigma2)
        if not np.isfinite(root).all():
            offset = np.eye(len(sigma1)) * eps
            root = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise DitkitError(f"the Fréchet distance's matrix square root is complex (imaginary part up to "
                              f"{np.abs(root.imag).max():.3g}): the covariances are degenerate; use more images")
        root = root.real
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root))


def spatial_features(mixed_6_conv: Tensor) -> Tensor:
    """(B, C, 17, 17) output of mixed_6/conv (PyTorch's NCHW) -> (B, 2023): the first 7 channels,
    flattened as the evaluator flattens TensorFlow's NHWC tensor (row, column, channel)."""
    if mixed_6_conv.dim() != 4 or mixed_6_conv.shape[1] < SPATIAL_CHANNELS:
        raise DitkitError(f"mixed_6/conv output must be (B, C>={SPATIAL_CHANNELS}, H, W), got "
                          f"{tuple(mixed_6_conv.shape)}")
    return mixed_6_conv[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).flatten(1)


class Moments:
    """Mean and covariance (n - 1, as numpy's cov) of features fed in batches, as running float64 sums.
    The sums are taken around the first batch's mean, which keeps the covariance exact to float64
    even when the features' mean is large against their spread."""

    def __init__(self):
        self.count = 0
        self._shift = self._sum = self._outer = None

    def update(self, features: Tensor | np.ndarray) -> None:
        x = torch.as_tensor(features).detach().to("cpu", torch.float64).flatten(1)
        if len(x) == 0:
            return
        if self._shift is None:
            self._shift = x.mean(0)
            self._sum = torch.zeros_like(self._shift)
            self._outer = torch.zeros(len(self._shift), len(self._shift), dtype=torch.float64)
        x = x - self._shift
        self.count += len(x)
        self._sum += x.sum(0)
        self._outer += x.T @ x

    def statistics(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, covariance) as float64 numpy arrays."""
        if self.count < 2:
            raise DitkitError(f"a covariance needs at least 2 images, got {self.count}: raise --num / --num-ref")
        mean = self._sum / self.count
        covariance = (self._outer - self.count * torch.outer(mean, mean)) / (self.count - 1)
        return (self._shift + mean).numpy(), covariance.numpy()


class InceptionScoreSplits:
    """The evaluator's Inception Score, fed logits in batches: consecutive splits of `split_size`
    samples (the last one may be shorter); per split exp(mean_i KL(p_i || mean p)). Per split it keeps
    the count, the sum of p and the sum of p log p, since mean_i KL(p_i || m) = mean_i sum p log p
    - sum m log m. Probabilities in float64; 0 log 0 counts as 0."""

    def __init__(self, split_size: int = IS_SPLIT_SIZE):
        if split_size < 1:
            raise DitkitError(f"the Inception Score split size must be at least 1, got {split_size}")
        self.split_size = split_size
        self._splits: list[list] = []  # [count, sum of p, sum of p log p]

    def update(self, logits: Tensor | np.ndarray) -> None:
        probs = torch.softmax(torch.as_tensor(logits).detach().to("cpu", torch.float64), dim=1)
        while len(probs):
            if not self._splits or self._splits[-1][0] == self.split_size:
                self._splits.append([0, torch.zeros(probs.shape[1], dtype=torch.float64), 0.0])
            split = self._splits[-1]
            part, probs = probs[:self.split_size - split[0]], probs[self.split_size - split[0]:]
            split[0] += len(part)
            split[1] += part.sum(0)
            split[2] += torch.special.xlogy(part, part).sum().item()

    def scores(self) -> list[float]:
        """The score of each split."""
        if not self._splits:
            raise DitkitError("the Inception Score needs at least 1 image")
        scores = []
        for count, sum_p, sum_p_log_p in self._splits:
            marginal = sum_p / count
            scores.append(math.exp(sum_p_log_p / count - torch.special.xlogy(marginal, marginal).sum().item()))
        return scores

    def compute(self) -> tuple[float, float]:
        """(mean, std) over the splits; the evaluator reports the mean."""
        scores = np.array(self.scores())
        return float(scores.mean()), float(scores.std())


def inception_score(logits: Tensor | np.ndarray, split_size: int = IS_SPLIT_SIZE) -> tuple[float, float]:
    """(mean, std over splits) of the evaluator's Inception Score of all `logits` at once."""
    splits = InceptionScoreSplits(split_size)
    splits.update(logits)
    return splits.compute()


def _squared_distances(rows: Tensor, cols: Tensor) -> Tensor:
    """Pairwise squared Euclidean distances, as the evaluator writes them: |u|^2 - 2 u.v + |v|^2, floored at 0."""
    return (rows.pow(2).sum(1, keepdim=True) - 2 * rows @ cols.T + cols.pow(2).sum(1)).clamp_min(0)


def _as_features(features: Tensor | np.ndarray, dtype: torch.dtype, device: str | torch.device | None) -> Tensor:
    features = torch.as_tensor(features).detach()
    return features.to(device or features.device, dtype).flatten(1)


def manifold_radii(features: Tensor | np.ndarray, k: int = NEIGHBOURS, block: int = DISTANCE_BLOCK,
                   dtype: torch.dtype = torch.float64, device: str | torch.device | None = None) -> Tensor:
    """Each point's squared distance to its k-th nearest neighbour in `features` (the point itself is
    the 0th, as in the evaluator). Rows and columns go in blocks of `block`; the k + 1 smallest
    distances of a row are merged block by block, so memory is block x block and the block size
    does not change the radii."""
    features = _as_features(features, dtype, device)
    if len(features) <= k:
        raise DitkitError(f"precision and recall with k = {k} neighbours need more than {k} images in each set, "
                          f"got {len(features)}")
    radii = []
    for rows in features.split(block):
        nearest = None  # the k + 1 smallest distances of each row so far
        for cols in features.split(block):
            candidates = _squared_distances(rows, cols)
            if nearest is not None:
                candidates = torch.cat([nearest, candidates], dim=1)
            nearest = candidates.topk(min(k + 1, candidates.shape[1]), dim=1, largest=False).values
        radii.append(nearest[:, k])
    return torch.cat(radii)


def precision_recall(reference: Tensor | np.ndarray, samples: Tensor | np.ndarray, k: int = NEIGHBOURS,
                     block: int = DISTANCE_BLOCK, dtype: torch.dtype = torch.float64,
                     device: str | torch.device | None = None) -> tuple[float, float]:
    """(precision, recall) of `samples` against `reference` pool features: precision is the share of
    samples within some reference point's k-NN radius, recall the share of reference points within
    some sample's. Distances in float64 by default (the evaluator uses float16 where that stays
    finite, so points on a ball's edge may count differently there), in blocks of `block`."""
    reference, samples = _as_features(reference, dtype, device), _as_features(samples, dtype, device)
    reference_radii = manifold_radii(reference, k, block, dtype)
    sample_radii = manifold_radii(samples, k, block, dtype)
    samples_inside = torch.zeros(len(samples), dtype=torch.bool, device=samples.device)
    reference_inside = torch.zeros(len(reference), dtype=torch.bool, device=reference.device)
    for start_r in range(0, len(reference), block):
        rows = reference[start_r:start_r + block]
        for start_s in range(0, len(samples), block):
            distances = _squared_distances(rows, samples[start_s:start_s + block])
            end_r, end_s = start_r + len(distances), start_s + distances.shape[1]
            samples_inside[start_s:end_s] |= (distances <= reference_radii[start_r:end_r, None]).any(0)
            reference_inside[start_r:end_r] |= (distances <= sample_radii[None, start_s:end_s]).any(1)
    return samples_inside.double().mean().item(), reference_inside.double().mean().item()


# ---------------------------------------------------------------- one image set, one comparison

@dataclass
class AdmStatistics:
    """What the evaluator needs of one image set: pool and spatial mean/covariance; all pool features
    (for precision/recall; None where only precomputed statistics are known); the Inception Score
    (samples only; None elsewhere); the number of images (None where unknown)."""

    mu: np.ndarray
    sigma: np.ndarray
    mu_s: np.ndarray
    sigma_s: np.ndarray
    pool: Tensor | None = None
    inception_score: tuple[float, float] | None = None
    count: int | None = None


class AdmAccumulator:
    """Feeds batches of (pool, spatial, logits) into running statistics; `result()` gives the set's
    `AdmStatistics`. `keep_pool=False` drops the pool features (no precision/recall, constant memory);
    `score=False` skips the Inception Score (a reference set needs none)."""

    def __init__(self, keep_pool: bool = True, score: bool = True, split_size: int = IS_SPLIT_SIZE):
        self.pool_moments, self.spatial_moments = Moments(), Moments()
        self.splits = InceptionScoreSplits(split_size) if score else None
        self.pool: list[Tensor] | None = [] if keep_pool else None

    def update(self, pool: Tensor, spatial: Tensor, logits: Tensor | None = None) -> None:
        self.pool_moments.update(pool)
        self.spatial_moments.update(spatial)
        if self.pool is not None:
            self.pool.append(pool.detach().to("cpu", torch.float32))
        if self.splits is not None:
            self.splits.update(logits)

    def result(self) -> AdmStatistics:
        (mu, sigma), (mu_s, sigma_s) = self.pool_moments.statistics(), self.spatial_moments.statistics()
        return AdmStatistics(mu, sigma, mu_s, sigma_s,
                             pool=None if self.pool is None else torch.cat(self.pool),
                             inception_score=None if self.splits is None else self.splits.compute(),
                             count=self.pool_moments.count)


def adm_scores(samples: AdmStatistics, reference: AdmStatistics, k: int = NEIGHBOURS, block: int = DISTANCE_BLOCK,
               device: str | torch.device | None = None) -> dict:
    """FID, sFID, IS (mean, std) and precision/recall of `samples` against `reference`; precision and
    recall are None where either set's pool features are unknown (statistics only)."""
    scores = {"fid": frechet_distance(samples.mu, samples.sigma, reference.mu, reference.sigma),
              "sfid": frechet_distance(samples.mu_s, samples.sigma_s, reference.mu_s, reference.sigma_s),
              "is_mean": None, "is_std": None, "precision": None, "recall": None}
    if samples.inception_score is not None:
        scores["is_mean"], scores["is_std"] = samples.inception_score
    if samples.pool is not None and reference.pool is not None:
        scores["precision"], scores["recall"] = precision_recall(reference.pool, samples.pool, k, block,
                                                                 device=device)
    return scores


def accumulate(outputs: Iterable[tuple[Tensor, Tensor, Tensor]], keep_pool: bool = True,
               score: bool = True) -> AdmStatistics:
    """`AdmStatistics` of a stream of (pool, spatial, logits) batches."""
    accumulator = AdmAccumulator(keep_pool=keep_pool, score=score)
    for pool, spatial, logits in outputs:
        accumulator.update(pool, spatial, logits)
    return accumulator.result()
