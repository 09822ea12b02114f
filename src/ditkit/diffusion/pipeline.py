"""From a trained model and its checkpoint record to images: sample, then decode latents."""

from __future__ import annotations

import torch
from torch import Tensor

from ..errors import DitkitError
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


def default_labels(model, num: int) -> Tensor | None:
    embedder = getattr(model, "y_embedder", None)
    return None if embedder is None else torch.arange(num) % embedder.num_classes


def generate(model, record: dict, *, num: int, height: int, width: int, steps: int, cfg_scale: float, seed: int,
             sampler: str | None = None, labels: Tensor | None = None, vae=None, progress: bool = True) -> Tensor:
    """`num` images (num, C, height, width) in [-1, 1]; labels default to classes 0, 1, 2, ..."""
    h, w = input_size(model, height, width)
    if labels is None:
        labels = default_labels(model, num)
    elif getattr(model, "y_embedder", None) is None:
        raise DitkitError("this model is unconditional: it takes no class labels")
    elif labels.numel() and (labels.min() < 0 or labels.max() >= model.y_embedder.num_classes):
        raise DitkitError(f"class labels must be in 0..{model.y_embedder.num_classes - 1}")
    x = sample(model, objective_from_record(record), (num, model.config.in_channels, h, w), labels=labels,
               steps=steps, cfg_scale=cfg_scale, seed=seed, sampler=sampler, progress=progress)
    if record["data"].get("vae"):
        from ..data.latents import decode, load_vae

        vae = vae or load_vae(record["data"]["vae"], x.device)
        return decode(vae, x)
    return x.clamp(-1, 1)
