"""One way to score a model, for `ditkit eval`, the studies and the quickstart: sample a checkpoint
(`score_checkpoint`) or take images already made (`score_images`), then FID/KID/IS against reference
images, legibility (digits models: does the classifier read the class asked for) and, where asked,
PSNR/SSIM agreement with paired images. The result is a plain record (`Scores`).

At scale (FID-50K), `score_checkpoint_sharded` samples into a samples folder of `.npz` shards, in
every process torchrun started (`shards.py`: resumable, the same images whatever the process count),
and `score_sample_folder` scores such a folder in one streaming pass (`streaming.py`): no image set
is ever held in memory."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from ..diffusion.pipeline import cycled_labels
from ..distributed.launch import process_group, torchrun_processes
from ..record import RunRecord, Sampling
from .agreement import agreement
from .features import build_features
from .quality import (
    evaluate,
    extract,
    folder_agreement,
    legibility,
    open_reference,
    reads_its_classes,
    sample_checkpoint,
)
from .refbatch import ReferenceBatch
from .shards import labels_text, plan_of, read_manifest, sample_shards, shard_batches
from .streaming import AdmScores, FeatureScores, Legibility, StreamingMetric, stream


@dataclass
class Scores:
    """What `score_images` measured: `quality` is `evaluate`'s dict (FID, KID, IS, features, counts);
    `legibility` is None where the question has no answer (no digits model), `agreement` None where
    no pairs were given; `seconds` is the time sampling took (0 for images given). `images` is None
    for a samples folder scored in a streaming pass (the images are in its shards)."""

    images: Tensor | None
    quality: dict
    legibility: float | None = None
    agreement: dict | None = None
    record: RunRecord | None = None
    seconds: float = 0.0

    def summary(self, source: str, reference: str) -> dict:
        """The scores as `ditkit eval` writes them (`format_scores` reads this)."""
        result = {**self.quality, "source": source, "reference": reference}
        if self.legibility is not None:
            result["label_accuracy"] = self.legibility
        if self.agreement is not None:
            result["agreement"] = self.agreement
        return result


def score_images(images: Tensor, reference: Tensor | ReferenceBatch | str, features: str = "ditkit-digits", *,
                 extractor: nn.Module | None = None, record: RunRecord | None = None,
                 pair_with: Tensor | str | Path | None = None, num_reference: int = 1000,
                 inception_weights: str | Path | None = None, features_path: str | Path | None = None,
                 batch_size: int = 64, device: str = "cpu", seed: int = 0, progress: bool = True) -> Scores:
    """Score `images` against `reference` (images, or a built-in dataset or folder of which
    `num_reference` images are loaded at the samples' size, or an ADM reference batch: an .npz path or
    `ReferenceBatch`, used whole). `extractor` is the built `features`
    network, if the caller holds one; `record` (the images' run) makes legibility measurable;
    `pair_with` (images, or a folder of same-index images) adds PSNR/SSIM agreement."""
    if isinstance(reference, str):
        reference = open_reference(reference, num_reference, resolution=images.shape[-2], seed=seed)
    quality = evaluate(images, reference, extractor if extractor is not None else features,
                       inception_weights=inception_weights, features_path=features_path, batch_size=batch_size,
                       device=device, seed=seed, progress=progress)
    legible = None if record is None else legibility(images, record, features, features_path=features_path,
                                                     batch_size=batch_size, device=device, classifier=extractor)
    paired = None
    if isinstance(pair_with, Tensor):
        paired = agreement(images, pair_with)
    elif pair_with is not None:
        paired = folder_agreement(images, pair_with)
    return Scores(images, quality, legible, paired, record)


def score_checkpoint(ckpt: str | Path, sampling: Sampling, reference: Tensor | ReferenceBatch | str,
                     features: str = "ditkit-digits", *, ema: bool = True, mixer: str | None = None,
                     mixer_options: dict | None = None, batch_size: int = 64, device: str = "cpu",
                     progress: bool = True, **scoring) -> Scores:
    """Sample `ckpt` with `sampling` (unset values from its record; classes cycle 0, 1, 2, ... unless
    `sampling.labels` says otherwise), in batches of `batch_size`, then `score_images` them
    (`scoring`: its keyword arguments)."""
    began = time.perf_counter()
    images, record = sample_checkpoint(ckpt, sampling, batch_size=batch_size, ema=ema, mixer=mixer,
                                       mixer_options=mixer_options, device=device, progress=progress)
    seconds = time.perf_counter() - began
    scores = score_images(images, reference, features, record=record, batch_size=batch_size, device=device,
                          progress=progress, **scoring)
    scores.seconds = seconds
    return scores


def score_sample_folder(folder: str | Path, reference: Tensor | ReferenceBatch | str,
                        features: str = "ditkit-digits", *,
                        extractor: nn.Module | None = None, record: RunRecord | None = None,
                        extra_metrics: Sequence[StreamingMetric] = (), num_reference: int = 1000,
                        inception_weights: str | Path | None = None, features_path: str | Path | None = None,
                        batch_size: int = 64, device: str = "cpu", seed: int = 0, progress: bool = True) -> Scores:
    """Score the samples of a samples folder (`shards.sample_shards`) in one streaming pass, reading
    its shards in order, one in memory at a time: FID/KID/IS as `score_images` computes them, the
    legibility of a digits model sampled with the cycled classes (`record`: the samples' run), and
    whatever `extra_metrics` (accumulators, see `streaming.py`) compute."""
    manifest = read_manifest(folder)
    found = manifest["settings"]
    if isinstance(reference, str):
        reference = open_reference(reference, num_reference, resolution=found["height"], seed=seed)
    if extractor is None:
        extractor = build_features(features, inception_weights=inception_weights, features_path=features_path,
                                   progress=progress)
    extractor = extractor.to(device)
    if hasattr(extractor, "adm_outputs"):  # the Inception network: the ADM evaluator's scores
        scores = AdmScores(extractor, reference, batch_size, seed=seed, device=device, progress=progress)
    else:
        real = extract(extractor, reference, batch_size, progress, "reference features")
        scores = FeatureScores(extractor, real, seed=seed, device=device)
    metrics = [scores, *extra_metrics]
    if record is not None and reads_its_classes(record, features) and \
            found["labels"] == labels_text(cycled_labels(found["num"], record.num_classes)):
        metrics.append(Legibility(extractor, record.num_classes, device))
    result = stream(shard_batches(folder, batch_size), metrics, progress, total=found["num"])
    legible = result.pop("label_accuracy", None)
    quality = {**result, "samples_folder": str(folder), "shards": plan_of(manifest).count}
    return Scores(None, quality, legible, None, record)


def score_checkpoint_sharded(ckpt: str | Path, sampling: Sampling, sample_dir: str | Path,
                             reference: Tensor | ReferenceBatch | str,
                             features: str = "ditkit-digits", *, ema: bool = True, mixer: str | None = None,
                             mixer_options: dict | None = None, batch_size: int = 64, shard_size: int | None = None,
                             device: str | None = None, progress: bool = True, **scoring) -> Scores | None:
    """Sample `ckpt` into `sample_dir` (`shards.sample_shards`: shards of `shard_size` samples, in
    batches of `batch_size`; finished shards of an earlier run with the same settings are kept), in
    every process when torchrun started several (one process group, left once the shards are
    written), then score the folder on the main process (`score_sample_folder`; `scoring`: its
    keyword arguments). Returns the Scores on the main process, None on the others."""
    with process_group(device, join=torchrun_processes() > 1) as processes:
        made = sample_shards(ckpt, sampling, sample_dir, batch_size=batch_size, shard_size=shard_size, ema=ema,
                             mixer=mixer, mixer_options=mixer_options, processes=processes, progress=progress)
    if not processes.is_main:
        return None
    scores = score_sample_folder(sample_dir, reference, features, record=made.record, batch_size=batch_size,
                                 device=processes.device, progress=progress, **scoring)
    scores.seconds = made.seconds
    return scores
