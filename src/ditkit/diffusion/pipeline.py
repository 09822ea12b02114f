"""From a trained model and its run record to images: sample, then decode latents.

    generate(model, record, num=4, steps=20)            # unset settings come from the record
    generate_upscaled(model, record, Sampling(num=4, height=512, width=512),
                      UpscaleChain(base_height=256, base_width=256, strength=0.7))
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.latents import decode, load_vae
from ..errors import DitkitError
from ..models.extrapolation import set_extrapolation
from ..record import RunRecord, Sampling
from .objectives import build_objective
from .sampling import sample


def input_size(model, height: int, width: int) -> tuple[int, int]:
    """Pixels -> model input cells, with a clear error when the size does not fit the model."""
    cfg = model.config
    multiple = cfg.vae_scale * cfg.downsample
    if height % multiple or width % multiple or height <= 0 or width <= 0:
        raise DitkitError(f"resolution {height}x{width} does not fit this model: height and width must be "
                          f"positive multiples of {multiple} "
                          f"(VAE scale {cfg.vae_scale} x model downsampling {cfg.downsample})")
    return height // cfg.vae_scale, width // cfg.vae_scale


def cycled_labels(num: int, num_classes: int) -> Tensor:
    """The labels ditkit samples with when none are given: 0, 1, ..., num_classes - 1, 0, 1, ..."""
    return torch.arange(num) % num_classes


def default_labels(model, num: int) -> Tensor | None:
    embedder = getattr(model, "y_embedder", None)
    return None if embedder is None else cycled_labels(num, embedder.num_classes)


def train_input_size(model, record: RunRecord) -> tuple[int, int]:
    """The model input size (cells) at the run's training resolution."""
    return input_size(model, record.resolution, record.resolution)


def check_labels(model, labels: Tensor | None, num: int) -> Tensor | None:
    if labels is None:
        return default_labels(model, num)
    if getattr(model, "y_embedder", None) is None:
        raise DitkitError("this model is unconditional: it takes no class labels")
    if labels.numel() and (labels.min() < 0 or labels.max() >= model.y_embedder.num_classes):
        raise DitkitError(f"class labels must be in 0..{model.y_embedder.num_classes - 1}")
    return labels


def sample_inputs(model, record: RunRecord, sampling: Sampling, init: Tensor | None = None, strength: float = 1.0,
                  progress: bool = True) -> Tensor:
    """Samples in the model's input space (latents for VAE runs), with the size options applied;
    `sampling` must be complete (`record.sampling(...)`)."""
    s = sampling
    h, w = input_size(model, s.height, s.width)
    set_extrapolation(model, (h, w), train_input_size(model, record), attention_scale=s.attention_scale,
                      positions=s.positions)
    try:
        return sample(model, build_objective(record.diffusion), (s.num, model.config.in_channels, h, w),
                      labels=check_labels(model, s.labels, s.num), steps=s.steps, cfg_scale=s.cfg_scale, seed=s.seed,
                      sampler=s.sampler, progress=progress, init=init, strength=strength,
                      guidance_channels=record.diffusion.guidance_channels,
                      scheduler_config=record.diffusion.scheduler,
                      step_like_dit_pipeline=record.diffusion.step_like_dit_pipeline,
                      timestep_spacing=s.timestep_spacing)
    finally:
        set_extrapolation(model, (h, w), (h, w))  # back to the trained behaviour


def check_decodable(model, record: RunRecord, vae=None) -> None:
    """A latent-space model's samples are images only through its VAE: refuse before sampling."""
    if getattr(model.config, "vae_scale", 1) > 1 and not record.vae and vae is None:
        raise DitkitError("this checkpoint samples VAE latents but names no VAE to decode them: convert it with "
                          "--vae PATH (a diffusers AutoencoderKL folder, e.g. stabilityai/sd-vae-ft-ema)")


def to_images(x: Tensor, record: RunRecord, vae=None) -> Tensor:
    """Model inputs -> images in [-1, 1]: decoded by the run's VAE, or clamped pixels."""
    if record.vae:
        vae = vae or load_vae(record.vae, x.device)
        return decode(vae, x)
    return x.clamp(-1, 1)


def generate(model, record: RunRecord, sampling: Sampling | None = None, *, vae=None, progress: bool = True,
             **changes) -> Tensor:
    """Images (num, C, height, width) in [-1, 1]. `sampling` and `changes` (its fields by name, e.g.
    num=4, steps=20) say how; whatever they leave unset comes from the run record."""
    sampling = record.sampling(sampling, **changes)
    check_decodable(model, record, vae)
    return to_images(sample_inputs(model, record, sampling, progress=progress), record, vae)


@dataclass(frozen=True)
class UpscaleChain:
    """CLEAR's high-resolution chain: where the base image comes from and how much of it to keep.

    base_height, base_width: the size (pixels) the base image is sampled at.
    strength: noise level of the upsampled base (0 = kept as is, 1 = plain sampling at the full size).
    base_model, base_record: the checkpoint for the base size (default: the full-size model itself).
    base_steps, base_cfg_scale, base_sampler: default to the base run's own settings; guidance and the
    sampler follow an explicitly given full-size value, and the sampler that of the same run.
    """

    base_height: int
    base_width: int
    strength: float = 0.7
    base_model: Any = None
    base_record: RunRecord | None = None
    base_steps: int | None = None
    base_cfg_scale: float | None = None
    base_sampler: str | None = None

    def __post_init__(self):
        if not 0.0 <= self.strength <= 1.0:
            raise DitkitError(f"strength must be between 0 and 1, got {self.strength}")

    def base_sampling(self, sampling: Sampling, record: RunRecord) -> Sampling:
        """The base pass's complete settings, from the caller's own (unfilled) `sampling`."""
        base_record = self.base_record or record
        same_run = base_record is record
        return base_record.sampling(
            sampling, height=self.base_height, width=self.base_width, steps=self.base_steps,
            cfg_scale=sampling.cfg_scale if self.base_cfg_scale is None else self.base_cfg_scale,
            sampler=self.base_sampler or (sampling.sampler if same_run else None),
            attention_scale=False, positions="none")


def upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic upsampling in the model's input space (pixels, or VAE latents)."""
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


def check_upscale(model, record: RunRecord, base_model, base_record: RunRecord, size: tuple[int, int],
                  base_size: tuple[int, int]) -> None:
    if base_size[0] > size[0] or base_size[1] > size[1]:
        raise DitkitError(f"--upscale-from {base_size[0]}x{base_size[1]} is larger than the target "
                          f"{size[0]}x{size[1]}: the base image must be the smaller one")
    if base_size[0] * size[1] != base_size[1] * size[0]:
        raise DitkitError(f"--upscale-from {base_size[0]}x{base_size[1]} and the target {size[0]}x{size[1]} have "
                          "different aspect ratios: scale both sides by the same factor")
    if base_model.config.in_channels != model.config.in_channels or base_record.vae != record.vae:
        raise DitkitError("the base checkpoint and the upscaling checkpoint work in different input spaces "
                          "(channels or VAE differ): use checkpoints trained on the same data space")


def generate_upscaled(model, record: RunRecord, sampling: Sampling | None = None, chain: UpscaleChain | None = None,
                      *, vae=None, progress: bool = True, **changes) -> Tensor:
    """CLEAR's high-resolution chain (SDEdit): sample at the base size with the chain's base model
    (default: `model`), upsample bicubically in input space, noise to `strength` and denoise at the
    full size with `model`. Nothing is tiled: the full-size pass sees the whole image.

    `changes` may name fields of `Sampling` (the full-size pass) and of `UpscaleChain`."""
    chain_fields = {f.name for f in dataclasses.fields(UpscaleChain)}
    chain_changes = {k: v for k, v in changes.items() if k in chain_fields}
    chain = dataclasses.replace(chain, **chain_changes) if chain else UpscaleChain(**chain_changes)
    asked = dataclasses.replace(sampling or Sampling(), **{k: v for k, v in changes.items() if k not in chain_fields})
    full = record.sampling(asked)
    check_decodable(model, record, vae)
    base_model, base_record = chain.base_model or model, chain.base_record or record
    check_upscale(model, record, base_model, base_record, (full.height, full.width),
                  (chain.base_height, chain.base_width))
    labels = check_labels(model, full.labels, full.num)
    full = dataclasses.replace(full, labels=labels)
    base_labels = labels if getattr(base_model, "y_embedder", None) is not None else None
    base = sample_inputs(base_model, base_record,
                         dataclasses.replace(chain.base_sampling(asked, record), labels=base_labels),
                         progress=progress)
    if not base_record.vae:
        base = base.clamp(-1, 1)  # a pixel-space base is the image one would have saved
    init = upsample(base, input_size(model, full.height, full.width))
    x = sample_inputs(model, record, full, init=init, strength=chain.strength, progress=progress)
    return to_images(x, record, vae)
