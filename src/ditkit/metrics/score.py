"""One way to score a model, for `ditkit eval`, the studies and the quickstart: sample a checkpoint
(`score_checkpoint`) or take images already made (`score_images`), then FID/KID/IS against reference
images, legibility (digits models: does the classifier read the class asked for) and, where asked,
PSNR/SSIM agreement with paired images. The result is a plain record (`Scores`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from ..record import RunRecord, Sampling
from .agreement import agreement
from .quality import evaluate, folder_agreement, legibility, open_reference, sample_checkpoint
from .refbatch import ReferenceBatch


@dataclass
class Scores:
    """What `score_images` measured: `quality` is `evaluate`'s dict (FID, KID, IS, features, counts);
    `legibility` is None where the question has no answer (no digits model), `agreement` None where
    no pairs were given; `seconds` is the time sampling took (0 for images given)."""

    images: Tensor
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
