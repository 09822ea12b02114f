"""Sample quality against reference images: FID, KID and Inception Score, computed by torchmetrics
on the features of a chosen extractor (see `features.py`; `ditkit-digits` works offline,
`inception` gives numbers comparable with papers).

Images everywhere are (B, C, H, W), float in [-1, 1] (ditkit's convention) or uint8.
The features of each image set are extracted once; torchmetrics' FID, KID and IS then read them
through an identity "feature extractor".
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import load_checkpoint
from ..data import build_dataset
from ..data.folder import IMAGE_EXTENSIONS, ImageFolderDataset
from ..data.latents import load_vae
from ..diffusion.pipeline import check_labels, cycled_labels, generate
from ..errors import DitkitError
from ..files import atomic_write_text
from ..record import RunRecord, Sampling
from .agreement import agreement
from .features import build_features


class _Precomputed(nn.Module):
    """Lets torchmetrics' metrics take features we already extracted."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


@torch.no_grad()
def extract(extractor: nn.Module, images: Tensor, batch_size: int = 64, progress: bool = False,
            desc: str = "features") -> tuple[Tensor, Tensor]:
    """(features, logits) of all images, in batches."""
    from tqdm.auto import tqdm

    device = next(extractor.parameters(), torch.empty(0)).device
    outputs = [extractor(batch.to(device)) for batch in tqdm(images.split(batch_size), desc=desc, disable=not progress)]
    return torch.cat([f for f, _ in outputs]).cpu(), torch.cat([logits for _, logits in outputs]).cpu()


def label_accuracy(classifier: nn.Module, images: Tensor, labels: Tensor, batch_size: int = 64) -> float:
    """The share of images that `classifier` (an extractor returning (features, logits)) reads as
    the class they were sampled for: a class-conditional model's legibility at any resolution."""
    if len(images) != len(labels) or len(images) == 0:
        raise DitkitError(f"label accuracy needs one label per image, got {len(images)} images and "
                          f"{len(labels)} labels")
    _, logits = extract(classifier, images, batch_size)
    return (logits.argmax(dim=1) == labels.cpu()).float().mean().item()


class FeatureStatistics:
    """FID and KID of generated features against reference features, and the Inception Score of the
    generated logits, accumulated batch by batch (`add`) and computed once (`compute`).

    FID keeps running sums (float64, torchmetrics), so its memory does not grow with the sample
    count; KID and IS keep each sample's features and logits (a few KiB a sample, never images)."""

    def __init__(self, real: tuple[Tensor, Tensor], kid_subset_size: int = 1000, is_splits: int = 10,
                 seed: int = 0):
        from torchmetrics.image.fid import FrechetInceptionDistance
        from torchmetrics.image.inception import InceptionScore
        from torchmetrics.image.kid import KernelInceptionDistance

        real_features, real_logits = real
        if len(real_features) < 2:
            raise DitkitError("FID needs at least 2 generated and 2 reference images: raise --num")
        self.kid_subset_size, self.is_splits, self.seed = kid_subset_size, is_splits, seed
        self.num_real, self.num_fake = len(real_features), 0
        identity = _Precomputed(real_features.shape[1])
        self.fid = FrechetInceptionDistance(feature=identity)
        with warnings.catch_warnings():  # "features are kept in memory": they are, and they are small
            warnings.simplefilter("ignore", UserWarning)
            # subset size and splits are final once the sample count is known (`compute`)
            self.kid = KernelInceptionDistance(feature=identity, subset_size=min(kid_subset_size, self.num_real))
            self.inception_score = InceptionScore(feature=_Precomputed(real_logits.shape[1]), splits=is_splits)
        for metric in (self.fid, self.kid):
            metric.update(real_features.double(), real=True)

    def add(self, features: Tensor, logits: Tensor) -> None:
        """The features and logits of the next generated images."""
        for metric in (self.fid, self.kid):
            metric.update(features.double(), real=False)
        self.inception_score.update(logits.double())
        self.num_fake += len(features)

    def compute(self) -> dict:
        if self.num_fake < 2:
            raise DitkitError("FID needs at least 2 generated and 2 reference images: raise --num")
        subset = min(self.kid_subset_size, self.num_real, self.num_fake)
        self.kid.subset_size, self.inception_score.splits = subset, min(self.is_splits, self.num_fake)
        with torch.random.fork_rng():  # KID subsets and IS splits are random: fix them for repeatable numbers
            torch.manual_seed(self.seed)
            kid_mean, kid_std = self.kid.compute()
            is_mean, is_std = self.inception_score.compute()
        return {"fid": self.fid.compute().item(), "kid_mean": kid_mean.item(), "kid_std": kid_std.item(),
                "is_mean": is_mean.item(), "is_std": is_std.item(), "kid_subset_size": subset}


def scores_from_features(real: tuple[Tensor, Tensor], fake: tuple[Tensor, Tensor], kid_subset_size: int = 1000,
                         is_splits: int = 10, seed: int = 0) -> dict:
    """FID and KID between the real and fake features; Inception Score of the fake logits."""
    if min(len(real[0]), len(fake[0])) < 2:
        raise DitkitError("FID needs at least 2 generated and 2 reference images: raise --num")
    statistics = FeatureStatistics(real, kid_subset_size, is_splits, seed)
    statistics.add(*fake)
    return statistics.compute()


def evaluate(generated: Tensor, reference: Tensor, features: str | nn.Module = "ditkit-digits", *,
             inception_weights: str | Path | None = None, features_path: str | Path | None = None,
             batch_size: int = 64, kid_subset_size: int = 1000, is_splits: int = 10, device: str = "cpu",
             seed: int = 0, progress: bool = True) -> dict:
    """FID, KID (mean, std) and IS (mean, std) of `generated` against `reference` images.

    `features` is a name (ditkit-digits, inception) or an extractor module mapping images to
    (features, logits). Returns the scores plus the extractor's name, whether the numbers are
    comparable with published ones, and the image counts."""
    extractor = features if isinstance(features, nn.Module) else build_features(
        features, inception_weights=inception_weights, features_path=features_path, progress=progress)
    extractor = extractor.to(device)
    real = extract(extractor, reference, batch_size, progress, "reference features")
    fake = extract(extractor, generated, batch_size, progress, "sample features")
    scores = scores_from_features(real, fake, kid_subset_size, is_splits, seed)
    return {**scores, "features": getattr(extractor, "name", type(extractor).__name__),
            "comparable_to_papers": bool(getattr(extractor, "comparable", False)),
            "num_generated": len(generated), "num_reference": len(reference)}


# ---------------------------------------------------------------- where the images come from

def load_reference(source: str, num: int, resolution: int | None = None, seed: int = 0) -> Tensor:
    """`num` images (at most all there are) of a built-in dataset (digits, photos) or an image folder,
    in [-1, 1], as a random subset fixed by `seed`."""
    if resolution is None:
        resolution = first_image_size(source) if Path(source).is_dir() else 32
    dataset = build_dataset(source, resolution, photos_length=max(num, 1), seed=seed)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num]
    return torch.stack([dataset[int(i)][0] for i in order])


def first_image_size(folder: str | Path) -> int:
    """Short side of the first image in a folder (reference images are center-cropped to it)."""
    from PIL import Image


    if not Path(folder).is_dir():
        raise DitkitError(f"image folder {folder} does not exist or is not a folder")
    for path in sorted(Path(folder).rglob("*")):
        if path.suffix.lower() in IMAGE_EXTENSIONS:
            with Image.open(path) as image:
                return min(image.size)
    raise DitkitError(f"no images in {folder}: put {', '.join(IMAGE_EXTENSIONS)} files in it")


def load_samples(folder: str | Path, num: int | None = None, resolution: int | None = None) -> Tensor:
    """Already generated images from a folder (sorted by name), center-cropped to `resolution`
    (default: the first image's short side)."""
    dataset = ImageFolderDataset(folder, resolution or first_image_size(folder))
    count = len(dataset) if num is None else min(num, len(dataset))
    return torch.stack([dataset[i][0] for i in range(count)])


def sample_checkpoint(ckpt: str | Path, sampling: Sampling | None = None, *, batch_size: int = 64, ema: bool = True,
                      mixer: str | None = None, mixer_options: dict | None = None, device: str = "cpu",
                      progress: bool = True, **changes):
    """`sampling.num` samples of a checkpoint (classes cycle 0, 1, 2, ... unless `sampling.labels`
    says otherwise), in batches of `batch_size`; returns (images, record). Settings left unset come
    from the checkpoint's record."""
    from tqdm.auto import tqdm

    model, record = load_checkpoint(ckpt, ema=ema, mixer=mixer, mixer_options=mixer_options, device=device)
    sampling = record.sampling(sampling, **changes)
    labels = check_labels(model, sampling.labels, sampling.num)
    vae = load_vae(record.vae, device) if record.vae else None
    batches = []
    for start in tqdm(range(0, sampling.num, batch_size), desc="sampling", disable=not progress):
        stop = min(start + batch_size, sampling.num)
        batches.append(sample_batch(model, record, sampling, labels, start, stop, vae).cpu())
    return torch.cat(batches), record


def sample_batch(model, record: RunRecord, sampling: Sampling, labels: Tensor | None, start: int, stop: int,
                 vae=None) -> Tensor:
    """Samples `start` to `stop` of the complete `sampling` (labels: all `sampling.num` of them, or
    None), as one batch seeded by `sampling.seed + start`: the same images whichever process makes
    them and whichever batches come before (sharded sampling relies on this)."""
    batch = dataclasses.replace(sampling, num=stop - start, seed=sampling.seed + start,
                                labels=None if labels is None else labels[start:stop])
    return generate(model, record, batch, vae=vae, progress=False)


def reads_its_classes(record: RunRecord, features: str) -> bool:
    """A class-conditional model of the built-in digits, scored with the digits classifier's features."""
    return features == "ditkit-digits" and record.data.source == "digits" and record.num_classes == 10


def legibility(images: Tensor, record: RunRecord, features: str, *, features_path: str | None = None,
               batch_size: int = 64, device: str = "cpu", classifier: nn.Module | None = None) -> float | None:
    """Share of samples the digits classifier behind the features reads as the class they were asked
    for (classes cycled as `sample_checkpoint` draws them); None where that question has no answer.
    `classifier`: the `features` network, where the caller has built it already."""
    if not reads_its_classes(record, features):
        return None
    if classifier is None:
        classifier = build_features(features, features_path=features_path, progress=False)
    classifier = classifier.to(device)
    return label_accuracy(classifier, images, cycled_labels(len(images), record.num_classes), batch_size)


def folder_agreement(images: Tensor, folder: str | Path) -> dict:
    """PSNR/SSIM of each image against the same-index image of `folder` (sorted by name)."""
    others = load_samples(folder, len(images), resolution=images.shape[-2])
    if len(others) < len(images):
        raise DitkitError(f"--pair-with {folder} has {len(others)} images for {len(images)} samples: "
                          "pair folders of equal size (e.g. two --save-samples runs with the same --seed)")
    if others.shape[1] != images.shape[1]:  # folders load as RGB; grayscale samples compare as gray
        others = others.mean(dim=1, keepdim=True) if images.shape[1] == 1 else others
    return agreement(images, others)


def strict_json(value):
    """Non-finite floats (PSNR of identical images is inf) -> null: strict JSON has no Infinity."""
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [strict_json(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_scores(result: dict, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, json.dumps(strict_json(result), indent=2, allow_nan=False) + "\n")
    return out


def format_scores(result: dict) -> str:
    """The scores of `evaluate` (plus agreement and legibility where present) as aligned lines."""
    note = ("comparable with published numbers at equal sample counts" if result["comparable_to_papers"]
            else "a ditkit-only scale: compare runs with each other, not with papers")
    lines = [
        f"{result['num_generated']} samples from {result.get('source', '?')} vs {result['num_reference']} "
        f"reference images from {result.get('reference', '?')}",
        f"features    {result['features']} ({note})",
        f"FID         {result['fid']:.3f}",
        f"KID         {result['kid_mean']:.5f} +- {result['kid_std']:.5f} (subsets of {result['kid_subset_size']})",
        f"IS          {result['is_mean']:.3f} +- {result['is_std']:.3f}"]
    if "agreement" in result:
        lines.append(f"paired      PSNR {result['agreement']['psnr']:.2f} dB, SSIM {result['agreement']['ssim']:.4f}")
    if "label_accuracy" in result:
        lines.append(f"legibility  {100 * result['label_accuracy']:.1f}% read by the digits classifier as the class "
                     "asked for")
    return "\n".join(lines)
