"""From a trained model and its checkpoint record to images: sample, then decode latents."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DitkitError
from ..models.extrapolation import set_extrapolation
from .objectives import build_objective
from .sampling import sample


def objective_from_record(record: dict) -> object:
    d = record["diffusion"]
    return build_objective(d["objective"], learn_sigma=d.get("learn_sigma", True),
                           timestep_sampling=d.get("timestep_sampling", "uniform"))


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


def train_input_size(model, record: dict) -> tuple[int, int]:
    """The model input size (cells) at the run's training resolution."""
    resolution = record["data"]["resolution"]
    return input_size(model, resolution, resolution)


def check_labels(model, labels: Tensor | None, num: int) -> Tensor | None:
    if labels is None:
        return default_labels(model, num)
    if getattr(model, "y_embedder", None) is None:
        raise DitkitError("this model is unconditional: it takes no class labels")
    if labels.numel() and (labels.min() < 0 or labels.max() >= model.y_embedder.num_classes):
        raise DitkitError(f"class labels must be in 0..{model.y_embedder.num_classes - 1}")
    return labels


def sample_inputs(model, record: dict, *, num: int, height: int, width: int, steps: int, cfg_scale: float,
                  seed: int, sampler: str | None = None, labels: Tensor | None = None, init: Tensor | None = None,
                  strength: float = 1.0, attention_scale: bool = False, positions: str = "none",
                  progress: bool = True) -> Tensor:
    """Samples in the model's input space (latents for VAE runs), with the size options applied."""
    h, w = input_size(model, height, width)
    set_extrapolation(model, (h, w), train_input_size(model, record), attention_scale=attention_scale,
                      positions=positions)
    try:
        return sample(model, objective_from_record(record), (num, model.config.in_channels, h, w),
                      labels=check_labels(model, labels, num), steps=steps, cfg_scale=cfg_scale, seed=seed,
                      sampler=sampler, progress=progress, init=init, strength=strength)
    finally:
        set_extrapolation(model, (h, w), (h, w))  # back to the trained behaviour


def to_images(x: Tensor, record: dict, vae=None) -> Tensor:
    """Model inputs -> images in [-1, 1]: decoded by the run's VAE, or clamped pixels."""
    if record["data"].get("vae"):
        from ..data.latents import decode, load_vae

        vae = vae or load_vae(record["data"]["vae"], x.device)
        return decode(vae, x)
    return x.clamp(-1, 1)


def generate(model, record: dict, *, num: int, height: int, width: int, steps: int, cfg_scale: float, seed: int,
             sampler: str | None = None, labels: Tensor | None = None, vae=None, progress: bool = True,
             attention_scale: bool = False, positions: str = "none") -> Tensor:
    """`num` images (num, C, height, width) in [-1, 1]; labels default to classes 0, 1, 2, ..."""
    x = sample_inputs(model, record, num=num, height=height, width=width, steps=steps, cfg_scale=cfg_scale,
                      seed=seed, sampler=sampler, labels=labels, attention_scale=attention_scale,
                      positions=positions, progress=progress)
    return to_images(x, record, vae)


def upsample(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bicubic upsampling in the model's input space (pixels, or VAE latents)."""
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


def check_upscale(model, record: dict, base_model, base_record: dict, size: tuple[int, int],
                  base_size: tuple[int, int]) -> None:
    if base_size[0] > size[0] or base_size[1] > size[1]:
        raise DitkitError(f"--upscale-from {base_size[0]}x{base_size[1]} is larger than the target "
                          f"{size[0]}x{size[1]}: the base image must be the smaller one")
    if base_size[0] * size[1] != base_size[1] * size[0]:
        raise DitkitError(f"--upscale-from {base_size[0]}x{base_size[1]} and the target {size[0]}x{size[1]} have "
                          "different aspect ratios: scale both sides by the same factor")
    if (base_model.config.in_channels != model.config.in_channels
            or base_record["data"].get("vae") != record["data"].get("vae")):
        raise DitkitError("the base checkpoint and the upscaling checkpoint work in different input spaces "
                          "(channels or VAE differ): use checkpoints trained on the same data space")


def generate_upscaled(model, record: dict, *, num: int, height: int, width: int, base_height: int, base_width: int,
                      strength: float, steps: int, base_steps: int, cfg_scale: float, seed: int,
                      base_model=None, base_record: dict | None = None, base_cfg_scale: float | None = None,
                      sampler: str | None = None, base_sampler: str | None = None, labels: Tensor | None = None,
                      vae=None, progress: bool = True, attention_scale: bool = False,
                      positions: str = "none") -> Tensor:
    """CLEAR's high-resolution chain (SDEdit): sample at the base size with `base_model` (default:
    `model`), upsample bicubically in input space, noise to `strength` and denoise at the full size
    with `model`. Nothing is tiled: the full-size pass sees the whole image."""
    base_model, base_record = base_model or model, base_record or record
    check_upscale(model, record, base_model, base_record, (height, width), (base_height, base_width))
    labels = check_labels(model, labels, num)
    base_labels = labels if getattr(base_model, "y_embedder", None) is not None else None
    base = sample_inputs(base_model, base_record, num=num, height=base_height, width=base_width, steps=base_steps,
                         cfg_scale=cfg_scale if base_cfg_scale is None else base_cfg_scale, seed=seed,
                         sampler=base_sampler, labels=base_labels, progress=progress)
    if not base_record["data"].get("vae"):
        base = base.clamp(-1, 1)  # a pixel-space base is the image one would have saved
    init = upsample(base, input_size(model, height, width))
    x = sample_inputs(model, record, num=num, height=height, width=width, steps=steps, cfg_scale=cfg_scale,
                      seed=seed, sampler=sampler, labels=labels, init=init, strength=strength,
                      attention_scale=attention_scale, positions=positions, progress=progress)
    return to_images(x, record, vae)
