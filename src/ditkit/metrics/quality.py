"""Sample quality against reference images: FID, KID and Inception Score, computed by torchmetrics
on the features of a chosen extractor (see `features.py`; `ditkit-digits` works offline,
`inception` gives numbers comparable with papers). With the Inception network the scores are the
ADM evaluator's (`adm.py`): FID, sFID, IS, precision and recall, plus KID; the reference may then be
an ADM reference batch (`refbatch.py`), whose precomputed statistics are used when it has them.

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

import numpy as np
import torch
from torch import Tensor, nn

from ..checkpoint import load_checkpoint
from ..data import BUILTIN, build_dataset, source_kind
from ..data.folder import IMAGE_EXTENSIONS, ImageFolderDataset, Unreadable
from ..data.latents import load_vae
from ..diffusion.pipeline import check_labels, cycled_labels, generate
from ..errors import DitkitError
from ..files import atomic_write_text
from ..record import SAMPLERS, RunRecord, Sampling
from .adm import IS_SPLIT_SIZE, AdmAccumulator, AdmStatistics, accumulate, adm_scores
from .agreement import agreement
from .features import build_features, to_unit_float
from .refbatch import ReferenceBatch, is_reference_batch, read_reference_batch, write_reference_batch


class _Precomputed(nn.Module):
    """Lets torchmetrics' metrics take features we already extracted."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def extract(extractor: nn.Module, images: Tensor, batch_size: int = 64, progress: bool = False,
            desc: str = "features") -> tuple[Tensor, Tensor]:
    """(features, logits) of all images, in batches."""
    return extract_batches(extractor, images.split(batch_size), progress, desc)


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


ADM_ONLY = ("sfid", "precision", "recall")  # what only the Inception network's features give


def evaluate(generated: Tensor, reference: Tensor | ReferenceBatch, features: str | nn.Module = "ditkit-digits", *,
             inception_weights: str | Path | None = None, features_path: str | Path | None = None,
             batch_size: int = 64, kid_subset_size: int = 1000, is_splits: int = 10, device: str = "cpu",
             seed: int = 0, progress: bool = True) -> dict:
    """FID, KID (mean, std) and IS (mean, std) of `generated` against `reference` images (or an ADM
    reference batch, used whole); with the Inception network, the ADM evaluator's FID, sFID, IS,
    precision and recall (`adm_evaluate`), which other features leave None.

    `features` is a name (ditkit-digits, inception) or an extractor module mapping images to
    (features, logits). Returns the scores plus the extractor's name, whether the numbers are
    comparable with published ones, and the image counts."""
    extractor = features if isinstance(features, nn.Module) else build_features(
        features, inception_weights=inception_weights, features_path=features_path, progress=progress)
    extractor = extractor.to(device)
    if hasattr(extractor, "adm_outputs"):
        scores = adm_evaluate(extractor, generated, reference, batch_size, kid_subset_size, seed, device, progress)
    else:
        if isinstance(reference, Tensor):
            real = extract(extractor, reference, batch_size, progress, "reference features")
        else:
            real = extract_batches(extractor, image_batches(reference, batch_size), progress, "reference features")
        fake = extract(extractor, generated, batch_size, progress, "sample features")
        scores = {**scores_from_features(real, fake, kid_subset_size, is_splits, seed), **dict.fromkeys(ADM_ONLY)}
    return {**scores, "features": getattr(extractor, "name", type(extractor).__name__),
            "comparable_to_papers": bool(getattr(extractor, "comparable", False)),
            "num_generated": len(generated), "num_reference": reference_count(reference)}


@torch.no_grad()
def extract_batches(extractor: nn.Module, batches, progress: bool = False,
                    desc: str = "features") -> tuple[Tensor, Tensor]:
    """(features, logits) of a stream of image batches."""
    from tqdm.auto import tqdm

    device = next(extractor.parameters(), torch.empty(0)).device
    outputs = [extractor(batch.to(device)) for batch in tqdm(batches, desc=desc, disable=not progress)]
    return torch.cat([f for f, _ in outputs]).cpu(), torch.cat([logits for _, logits in outputs]).cpu()


def image_batches(reference: Tensor | ReferenceBatch, batch_size: int):
    """Batches of reference images: uint8 (B, 3, H, W) from a reference batch's file, read as needed."""
    if isinstance(reference, Tensor):
        yield from reference.split(batch_size)
        return
    for batch in reference.batches(batch_size):
        yield torch.from_numpy(batch.copy()).permute(0, 3, 1, 2)


def reference_count(reference: Tensor | ReferenceBatch) -> int | None:
    """Reference images scored (None: a reference batch of statistics only, whose count is unknown)."""
    if isinstance(reference, Tensor):
        return len(reference)
    return reference.num_images or None


def adm_evaluate(extractor: nn.Module, generated: Tensor, reference: Tensor | ReferenceBatch, batch_size: int = 64,
                 kid_subset_size: int = 1000, seed: int = 0, device: str = "cpu", progress: bool = False) -> dict:
    """The ADM evaluator's FID, sFID, IS, precision and recall (and KID) with an extractor that has
    `adm_outputs`. A reference batch's precomputed statistics give FID and sFID; its images, where it
    has them, give the pool features precision, recall and KID need (all None without images)."""
    real = reference_statistics(extractor, reference, batch_size, device, progress)
    samples = accumulate(adm_outputs(extractor, generated.split(batch_size), device, progress, "sample features"))
    return adm_result(samples, real, kid_subset_size, seed, device)


def adm_outputs(extractor: nn.Module, batches, device: str, progress: bool, desc: str):
    """The extractor's (pool, spatial, logits) of each image batch."""
    from tqdm.auto import tqdm

    for batch in tqdm(batches, desc=desc, disable=not progress):
        yield extractor.adm_outputs(batch.to(device))


def reference_statistics(extractor: nn.Module, reference: Tensor | ReferenceBatch, batch_size: int = 64,
                         device: str = "cpu", progress: bool = False) -> AdmStatistics:
    """The reference's ADM statistics: a reference batch's precomputed ones where it has them, its
    images' pool features where it has images (precision, recall and KID need them)."""
    precomputed = reference.statistics if isinstance(reference, ReferenceBatch) else None
    has_images = isinstance(reference, Tensor) or reference.image_shape is not None
    real = accumulate(adm_outputs(extractor, image_batches(reference, batch_size), device, progress,
                                  "reference features"), score=False) if has_images else None
    if precomputed is not None:
        real = AdmStatistics(**precomputed, pool=None if real is None else real.pool)
    return real


def adm_result(samples: AdmStatistics, real: AdmStatistics, kid_subset_size: int = 1000, seed: int = 0,
               device: str = "cpu") -> dict:
    """`adm_scores` of the samples against the reference, plus KID where both have pool features."""
    kid = dict.fromkeys(("kid_mean", "kid_std", "kid_subset_size"))
    if real.pool is not None:
        kid = kernel_distance(real.pool, samples.pool, kid_subset_size, seed)
    return {**adm_scores(samples, real, device=device), **kid}


def kernel_distance(real: Tensor, fake: Tensor, subset_size: int = 1000, seed: int = 0) -> dict:
    """torchmetrics' KID (mean, std over random subsets fixed by `seed`) of two feature sets."""
    from torchmetrics.image.kid import KernelInceptionDistance

    subset = min(subset_size, len(real), len(fake))
    with warnings.catch_warnings():  # "features are kept in memory": they are
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Precomputed(real.shape[1]), subset_size=subset)
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return {"kid_mean": mean.item(), "kid_std": std.item(), "kid_subset_size": subset}


# ---------------------------------------------------------------- where the images come from

def load_reference(source: str, num: int, resolution: int | None = None, seed: int = 0) -> Tensor:
    """`num` images (at most all there are) of a built-in dataset (digits, photos) or an image folder,
    in [-1, 1], as a random subset fixed by `seed`."""
    dataset, order = reference_subset(source, num, resolution, seed)
    return readable_images(dataset, order)


def readable_images(dataset, indices) -> Tensor:
    """The images of `dataset` at `indices`; an unreadable one is left out with a warning naming it
    (not replaced by its neighbour, which would count one image twice in the statistics)."""
    images = []
    for index in indices:
        try:
            images.append(dataset.read(int(index))[0] if hasattr(dataset, "read") else dataset[int(index)][0])
        except Unreadable as error:
            warnings.warn(f"skipping unreadable image {error.name}: {error.reason}", stacklevel=2)
    if not images:
        raise DitkitError("none of the images asked for could be read")
    return torch.stack(images)


def reference_subset(source: str, num: int, resolution: int | None = None, seed: int = 0):
    """(dataset, the indices of `load_reference`'s random subset) of a built-in dataset or folder."""
    if resolution is None:
        resolution = reference_resolution(source)
    dataset = build_dataset(source, resolution, photos_length=max(num, 1), seed=seed)
    return dataset, torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:num]


def reference_resolution(source: str) -> int:
    """The crop a reference is read at when none is given: an image folder's first image's short side,
    the built-ins' 32; other sources (datasets, parquet, tar shards) hold images of many sizes, so the
    resolution must be said."""
    if source in BUILTIN:
        return 32
    if source_kind(source) == "folder":
        return first_image_size(source)
    raise DitkitError(f"reference {source} is a {source_kind(source)} source, whose images have no one size: give "
                      "--resolution (the samples' size, e.g. 256)")


def open_reference(source: str, num: int, resolution: int | None = None, seed: int = 0) -> Tensor | ReferenceBatch:
    """A --ref: an ADM reference batch (.npz, checked, read in batches later) or `load_reference`'s images."""
    if is_reference_batch(source):
        return read_reference_batch(source)
    return load_reference(source, num, resolution, seed)


def check_reference(reference: ReferenceBatch, features: str, image_size: tuple[int, int] | None = None) -> None:
    """Refuse, before any sampling, a reference batch that cannot serve: no images for features other
    than Inception (its statistics are Inception's), or images of another size than the samples'."""
    if reference.image_shape is None and features != "inception":
        raise DitkitError(f"{reference.path} holds only Inception statistics, which --features {features} cannot "
                          "use: pass --features inception, or a reference batch with images (arr_0)")
    if image_size is not None and reference.image_size is not None and tuple(image_size) != reference.image_size:
        (h, w), (rh, rw) = image_size, reference.image_size
        raise DitkitError(f"{reference.path} holds {rh}x{rw} images but the samples are {h}x{w}: use the reference "
                          "batch made at the samples' resolution (e.g. VIRTUAL_imagenet256_labeled.npz for 256 px)")


def to_uint8_nhwc(images: Tensor) -> np.ndarray:
    """Images (B, C, H, W) in [-1, 1] or uint8 -> uint8 RGB (B, H, W, 3), as ADM's batches hold them
    (grayscale repeated on 3 channels, as the Inception features read it)."""
    rgb = (to_unit_float(images) * 255).round().to(torch.uint8)
    if rgb.shape[1] == 1:
        rgb = rgb.expand(-1, 3, -1, -1)
    return rgb.permute(0, 2, 3, 1).contiguous().numpy()


def write_reference(out: str | Path, source: str, extractor: nn.Module, num: int = 1000, resolution: int | None = None,
                    with_images: bool = False, batch_size: int = 64, device: str = "cpu", seed: int = 0,
                    progress: bool = True) -> ReferenceBatch:
    """Write an ADM reference batch of `num` images of `source` (the subset `load_reference` takes):
    the Inception statistics of `extractor` (which has `adm_outputs`) and, with `with_images`, the
    images as uint8 NHWC. One streaming pass: the images are never all in memory. Returns the file read back."""
    from tqdm.auto import tqdm

    if not hasattr(extractor, "adm_outputs"):
        raise DitkitError("--write-ref writes the Inception statistics of ADM's layout: use --features inception")
    dataset, order = reference_subset(source, num, resolution, seed)
    if len(order) < 2:
        raise DitkitError(f"a reference batch needs at least 2 images for its covariances; {source} gives "
                          f"{len(order)} (--num-ref {num})")
    extractor = extractor.to(device)
    accumulator = AdmAccumulator(keep_pool=False, score=False)

    def batches():
        for chunk in tqdm(order.split(batch_size), desc="reference batch", disable=not progress):
            images = to_uint8_nhwc(readable_images(dataset, chunk))
            pool, spatial, _ = extractor.adm_outputs(torch.from_numpy(images).permute(0, 3, 1, 2).to(device))
            accumulator.update(pool, spatial)
            yield images

    def statistics():
        result = accumulator.result()
        return {"mu": result.mu, "sigma": result.sigma, "mu_s": result.mu_s, "sigma_s": result.sigma_s}

    if with_images:
        side = dataset[int(order[0])][0].shape[-2:]
        write_reference_batch(out, statistics, batches(), (len(order), *side, 3))
    else:
        for _ in batches():
            pass
        write_reference_batch(out, statistics())
    return read_reference_batch(out)


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
    (default: the first image's short side). An unreadable file is left out with a warning naming
    it (never replaced by another sample: a duplicate would bias the statistics)."""
    dataset = ImageFolderDataset(folder, resolution or first_image_size(folder))
    return readable_images(dataset, range(len(dataset) if num is None else min(num, len(dataset))))


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


def eval_protocol(result: dict, sampling: Sampling | None = None, objective: str | None = None) -> dict:
    """How a result was made, so that it can be set beside a paper's row: sample count, the resolved
    `sampling` (steps, guidance, sampler, timestep spacing, seed, size; None for images given), the
    reference and the feature network. `objective` names the sampler a run leaves unset."""
    made = {"steps": None, "cfg_scale": None, "sampler": None, "timestep_spacing": None, "seed": None,
            "resolution": None}
    if sampling is not None:
        sampler = sampling.sampler or (SAMPLERS[objective][0] if objective in SAMPLERS else None)
        made = {"steps": sampling.steps, "cfg_scale": sampling.cfg_scale, "sampler": sampler,
                "timestep_spacing": sampling.timestep_spacing, "seed": sampling.seed,
                "resolution": f"{sampling.height}x{sampling.width}"}
    return {"samples": result["num_generated"], **made, "reference": result.get("reference"),
            "reference_images": result["num_reference"], "features": result["features"]}


ROW_COLUMNS = ("samples", "steps", "guidance", "spacing", "sampler", "reference", "features",
               "FID", "sFID", "IS", "Precision", "Recall")


def format_row(result: dict) -> str:
    """A markdown table (header and one row) with the papers' columns and the protocol beside them;
    n/a where the features give no such number, - where the protocol has no such setting (images given,
    no timestep spacing for flow matching)."""
    protocol = result.get("protocol") or eval_protocol(result)

    def shown(value, digits=None):
        if value is None:
            return "n/a" if digits is not None else "-"
        return f"{value:.{digits}f}" if digits is not None else str(value)

    cells = [shown(protocol["samples"]), shown(protocol["steps"]), shown(protocol["cfg_scale"]),
             shown(protocol["timestep_spacing"]), shown(protocol["sampler"]),
             Path(str(protocol["reference"])).name if protocol["reference"] else "-", shown(protocol["features"]),
             shown(result["fid"], 2), shown(result.get("sfid"), 2), shown(result["is_mean"], 1),
             shown(result.get("precision"), 2), shown(result.get("recall"), 2)]
    return "\n".join(["| " + " | ".join(ROW_COLUMNS) + " |", "|" + "---|" * len(ROW_COLUMNS),
                      "| " + " | ".join(cells) + " |"])


def format_scores(result: dict) -> str:
    """The scores of `evaluate` (plus agreement and legibility where present) as aligned lines, then
    `format_row`'s table row."""
    note = ("comparable with published numbers at equal sample counts" if result["comparable_to_papers"]
            else "a ditkit-only scale: compare runs with each other, not with papers")
    count = result["num_reference"] if result["num_reference"] is not None else "the statistics of the"
    lines = [
        f"{result['num_generated']} samples from {result.get('source', '?')} vs {count} "
        f"reference images from {result.get('reference', '?')}",
        f"features    {result['features']} ({note})",
        f"FID         {result['fid']:.3f}"]
    if result.get("sfid") is not None:
        lines.append(f"sFID        {result['sfid']:.3f}")
    if result.get("kid_mean") is not None:
        lines.append(f"KID         {result['kid_mean']:.5f} +- {result['kid_std']:.5f} "
                     f"(subsets of {result['kid_subset_size']})")
    else:
        lines.append("KID         not available (the reference batch holds statistics, not images)")
    splits = f" (splits of {IS_SPLIT_SIZE:,}, as ADM)" if result.get("sfid") is not None else ""
    lines.append(f"IS          {result['is_mean']:.3f} +- {result['is_std']:.3f}{splits}")
    if result.get("precision") is not None:
        lines.append(f"precision   {result['precision']:.4f}, recall {result['recall']:.4f} (k = 3 neighbours)")
    elif result.get("sfid") is not None:
        lines.append("precision   not available, nor recall (the reference batch holds statistics, not images)")
    else:
        lines.append(f"sFID, precision, recall: not available with {result['features']} features (they read the "
                     "Inception network: --features inception)")
    if "agreement" in result:
        lines.append(f"paired      PSNR {result['agreement']['psnr']:.2f} dB, SSIM {result['agreement']['ssim']:.4f}")
    if "label_accuracy" in result:
        lines.append(f"legibility  {100 * result['label_accuracy']:.1f}% read by the digits classifier as the class "
                     "asked for")
    return "\n".join(lines + [format_row(result)])
