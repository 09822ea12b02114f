"""Statistics of a sample stream: batches of uint8 images go through accumulators, one batch in
memory at a time, so the memory of a pass does not depend on how many samples there are.

An accumulator is anything with

    update(images)   images: uint8 (B, C, H, W), the next batch, in the samples' global order
    compute() -> dict   the statistics, once the stream has ended

`FeatureScores` (FID, KID and IS on a feature network, what `quality.evaluate` computes) and
`Legibility` (digits models) are two; `stream` runs any of them over `shards.shard_batches(folder)`
or any other iterable of batches.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch
from torch import Tensor, nn

from ..diffusion.pipeline import cycled_labels
from .adm import AdmAccumulator
from .quality import ADM_ONLY, FeatureStatistics, adm_result, reference_count, reference_statistics
from .refbatch import ReferenceBatch


class StreamingMetric(Protocol):
    def update(self, images: Tensor) -> None: ...

    def compute(self) -> dict: ...


def stream(batches: Iterable[Tensor], metrics: Sequence[StreamingMetric], progress: bool = False,
           total: int | None = None) -> dict:
    """Feed every batch to every metric, then merge what they compute (later metrics win a key);
    `total`: the sample count, for the progress bar."""
    from tqdm.auto import tqdm

    with tqdm(total=total, desc="statistics", unit="img", disable=not progress) as bar:
        for images in batches:
            for metric in metrics:
                metric.update(images)
            release_free_memory()
            bar.update(len(images))
    result = {}
    for metric in metrics:
        result.update(metric.compute())
    return result


def release_free_memory() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim; elsewhere nothing).

    Without it the resident memory of a long pass grows with the sample count although nothing is
    kept: glibc serves each batch's large temporaries (a float copy of the images) from the heap,
    the small results that metrics keep (features, logits) are then carved from the freed block,
    and the next batch's temporaries no longer fit in what is left of it, so the heap grows by one
    batch of temporaries per batch. Trimming after each batch returns those free pages."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _glibc():
    try:
        libc = ctypes.CDLL(None)
        return libc if hasattr(libc, "malloc_trim") else None
    except (OSError, AttributeError, TypeError):  # no C library to open by name (Windows)
        return None


_LIBC = _glibc()


class FeatureScores:
    """FID, KID and IS of the streamed images against `reference` features (`quality.extract`'s
    (features, logits) of the reference images), on `extractor`'s features: `quality.evaluate`
    batch by batch. Adds the extractor's name, whether it is comparable with papers, and the counts."""

    def __init__(self, extractor: nn.Module, reference: tuple[Tensor, Tensor], *, kid_subset_size: int = 1000,
                 is_splits: int = 10, seed: int = 0, device: str = "cpu"):
        self.extractor, self.device = extractor.to(device), device
        self.statistics = FeatureStatistics(reference, kid_subset_size, is_splits, seed)

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        features, logits = self.extractor(images.to(self.device))
        self.statistics.add(features.cpu(), logits.cpu())

    def compute(self) -> dict:
        return {**self.statistics.compute(), **dict.fromkeys(ADM_ONLY),
                "features": getattr(self.extractor, "name", type(self.extractor).__name__),
                "comparable_to_papers": bool(getattr(self.extractor, "comparable", False)),
                "num_generated": self.statistics.num_fake, "num_reference": self.statistics.num_real}


class AdmScores:
    """The ADM evaluator's FID, sFID, IS, precision and recall (and KID) of the streamed images, with
    an extractor that has `adm_outputs` (`quality.adm_evaluate`, batch by batch): the samples'
    moments and IS splits accumulate; their pool features are kept (precision and recall need every
    one: 50K x 2048 floats, 400 MB, as the evaluator holds them), never the images."""

    def __init__(self, extractor: nn.Module, reference: Tensor | ReferenceBatch, batch_size: int = 64, *,
                 kid_subset_size: int = 1000, seed: int = 0, device: str = "cpu", progress: bool = False):
        self.extractor, self.device = extractor.to(device), device
        self.real = reference_statistics(self.extractor, reference, batch_size, device, progress)
        self.num_reference = reference_count(reference)
        self.samples = AdmAccumulator()
        self.kid_subset_size, self.seed, self.seen = kid_subset_size, seed, 0

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        pool, spatial, logits = self.extractor.adm_outputs(images.to(self.device))
        self.samples.update(pool.cpu(), spatial.cpu(), logits.cpu())
        self.seen += len(images)

    def compute(self) -> dict:
        scores = adm_result(self.samples.result(), self.real, self.kid_subset_size, self.seed, self.device)
        return {**scores, "features": getattr(self.extractor, "name", type(self.extractor).__name__),
                "comparable_to_papers": bool(getattr(self.extractor, "comparable", False)),
                "num_generated": self.seen, "num_reference": self.num_reference}


class Legibility:
    """The share of streamed images that `classifier` (an extractor: images -> (features, logits))
    reads as the class they were sampled for, the classes cycling 0, 1, 2, ... over the stream
    (`quality.legibility`, batch by batch)."""

    def __init__(self, classifier: nn.Module, num_classes: int, device: str = "cpu"):
        self.classifier, self.num_classes, self.device = classifier.to(device), num_classes, device
        self.seen = self.correct = 0

    @torch.no_grad()
    def update(self, images: Tensor) -> None:
        _, logits = self.classifier(images.to(self.device))
        asked = cycled_labels(self.seen + len(images), self.num_classes)[self.seen:]
        self.correct += int((logits.argmax(dim=1).cpu() == asked).sum())
        self.seen += len(images)

    def compute(self) -> dict:
        return {"label_accuracy": self.correct / self.seen} if self.seen else {}
