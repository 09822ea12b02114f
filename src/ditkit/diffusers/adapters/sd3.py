"""Stable Diffusion 3 / 3.5 (`SD3Transformer2DModel`): joint attention over [image | text], a
PatchEmbed holding a centred crop of a fixed sin-cos table."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...errors import DitkitError
from ...mixers.base import Grid
from .base import PatchEmbedAdapter, register_adapter


def sd3_interpolated_pos_embed(patch_embed: nn.Module, grid: Grid, train_grid: Grid) -> Tensor:
    """SD3's position embedding (1, H*W, D) with positions interpolated into the training crop.

    SD3's PatchEmbed holds a sin-cos table over M = pos_embed_max_size positions per axis and takes
    the centred n x n crop (rows (M - n) // 2 + i); a grid larger than M fails in stock diffusers.
    Here an axis that grew by s = n / n_train reads position (M - n_train) // 2 + i / s instead:
    the n tokens span the crop the model was trained on, at fractional table positions."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid

    M, dim = patch_embed.pos_embed_max_size, patch_embed.pos_embed.shape[-1]
    table_step = patch_embed.base_size / M / patch_embed.interpolation_scale  # as get_2d_sincos_pos_embed

    def axis_positions(n: int, n_train: int) -> Tensor:
        index = torch.arange(n, dtype=torch.float64)
        start = (M - n) // 2
        if n > n_train:
            index, start = index * n_train / n, (M - n_train) // 2
        return (start + index) * table_step

    ys, xs = axis_positions(grid[0], train_grid[0]), axis_positions(grid[1], train_grid[1])
    columns, rows = torch.meshgrid(xs, ys, indexing="xy")  # diffusers' order: the first half encodes x
    embed = get_2d_sincos_pos_embed_from_grid(dim, torch.stack([columns, rows]).reshape(2, 1, -1))
    return embed.float().unsqueeze(0).to(patch_embed.pos_embed.device)


def interpolated_crop(patch_embed: nn.Module, train_grid: Grid, height: int, width: int) -> Tensor:
    """PatchEmbed.cropped_pos_embed (latent height, width) with interpolated positions where the grid grew."""
    p = patch_embed.patch_size
    grid = (height // p, width // p)
    if grid[0] <= train_grid[0] and grid[1] <= train_grid[1]:
        return type(patch_embed).cropped_pos_embed(patch_embed, height, width)
    return sd3_interpolated_pos_embed(patch_embed, grid, train_grid)


class SD3Adapter(PatchEmbedAdapter):
    class_name, label, layout = "SD3Transformer2DModel", "SD3", "image_first"
    needed_encoders = ("text_encoder", "text_encoder_2")  # SD3 runs without its T5 (text_encoder_3)
    flow = True
    prompt_tokens = 333  # 77 CLIP + 256 T5 tokens in StableDiffusion3Pipeline

    def check_positions(self, positions: str) -> None:
        if positions == "ntk":
            raise DitkitError("SD3's sin-cos positions are a centred crop of a fixed table, so NTK frequency "
                              "scaling moves even the trained centre: use positions='interpolate' or 'none'")

    def install_positions(self, transformer: nn.Module, options, hooks) -> None:
        """"interpolate": the PatchEmbed's crop read at fractional positions where the grid grew
        (`sd3_interpolated_pos_embed`; this also lifts SD3's pos_embed_max_size limit)."""
        if options.positions != "interpolate":
            return
        patch_embed = transformer.pos_embed
        hooks.patch_attribute(patch_embed, "cropped_pos_embed",
                              lambda height, width: interpolated_crop(patch_embed, options.train_grid, height, width))

    def denoise(self, transformer: nn.Module, x: Tensor, t: Tensor, text: Tensor, pooled: Tensor,
                guidance: float) -> Tensor:
        return transformer(hidden_states=x.to(text.dtype), encoder_hidden_states=text, pooled_projections=pooled,
                           timestep=t, return_dict=False)[0]


register_adapter(SD3Adapter())
