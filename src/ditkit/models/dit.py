"""DiT: "Scalable Diffusion Models with Transformers" (Peebles & Xie, ICCV 2023).

The whole backbone in one file, following the official models.py, with one change: each
block's token mixing is a `TokenMixer` chosen by name (`config.mixer`), so the same weights
run with full attention, local attention, and so on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import AT_LEAST_1, POSITIVE, Range, ranged
from ..errors import DitkitError
from ..mixers import Grid, build_mixer
from ..mixers.base import Extrapolation, map_to_tokens
from .layers import (
    ConditionedBlocks,
    Conditioning,
    FinalLayer,
    LabelEmbedder,
    Mlp,
    TimestepEmbedder,
    adaln_zero_init,
    modulate,
    sincos_pos_embed_2d,
)
from .registry import BackboneConfig, register_backbone, register_model


@dataclass
class DiTConfig(BackboneConfig):
    patch_size: int = ranged(2, AT_LEAST_1)
    hidden_size: int = ranged(1152, AT_LEAST_1)
    depth: int = ranged(28, AT_LEAST_1)
    num_heads: int = ranged(16, AT_LEAST_1)
    mlp_ratio: float = ranged(4.0, POSITIVE)
    # Where implementations of the same DiT differ. The defaults are the official facebookresearch
    # code's; a DiT converted from diffusers' DiTTransformer2DModel sets diffusers' values.
    timestep_freq_shift: int = ranged(0, Range(0, 128))  # timestep frequencies 10000^(-i/(128 - shift)); diffusers: 1
    # eps of each block's LayerNorm before the MLP; diffusers: its norm_eps (1e-5)
    mlp_norm_eps: float = ranged(1e-6, POSITIVE)
    # None: token i sits at position i at every size. N: positions along an axis of n tokens are
    # i * N / n, so every size spans the N-token training grid (diffusers' PatchEmbed, base_size N).
    pos_embed_base_grid: int | None = ranged(None, AT_LEAST_1)

    def tokens(self, height: int, width: int) -> int:
        """Image tokens for an input of height x width cells."""
        return (height // self.patch_size) * (width // self.patch_size)

    @property
    def grid_reduction(self) -> int:
        """One token per patch."""
        return self.patch_size


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: token mixer, then MLP."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mixer = build_mixer(cfg.mixer, D, cfg.num_heads, **cfg.mixer_options)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=cfg.mlp_norm_eps)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x: Tensor, c: Tensor, grid: Grid) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.mixer(modulate(self.norm1(x), shift_msa, scale_msa), grid)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


@register_backbone("dit", DiTConfig)
class DiT(Conditioning, nn.Module):
    """Diffusion transformer: (x, t, y) -> (B, out_channels, H, W) for any H, W divisible by the patch."""

    extrapolation: Extrapolation | None = None  # sampling beyond the training size (models.extrapolation)
    encodes_positions = True  # its sin-cos embedding follows `extrapolation.positions`

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        cfg = config
        self.x_embedder = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size, freq_shift=cfg.timestep_freq_shift)
        self.y_embedder = LabelEmbedder.for_config(cfg, cfg.hidden_size)
        self.blocks = ConditionedBlocks(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.patch_size**2 * cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's adaLN-Zero init, with the official order of draws: linears (mixer convs keep
        PyTorch's init), the patch embedding, the label table, the timestep MLP."""
        linears = [m for m in self.modules() if isinstance(m, nn.Linear)]
        adaln_zero_init(self, dense=[*linears, self.x_embedder], embedders=[self.y_embedder, self.t_embedder],
                        outputs=[self.final_layer.linear])

    def token_grid(self, height: int, width: int) -> Grid:
        p = self.config.patch_size
        if height % p or width % p:
            raise DitkitError(
                f"input {height}x{width} is not divisible by the patch size {p}: "
                f"use a resolution whose latent side is a multiple of {p}"
            )
        return height // p, width // p

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        grid = self.token_grid(x.shape[-2], x.shape[-1])
        tokens = map_to_tokens(self.x_embedder(x))
        tokens = tokens + sincos_pos_embed_2d(self.config.hidden_size, grid, self.extrapolation,
                                              self.config.pos_embed_base_grid).to(tokens)
        c = self.condition(t, y)
        tokens = self.blocks(tokens, c, grid)
        return self.unpatchify(self.final_layer(tokens, c), grid)

    def unpatchify(self, x: Tensor, grid: Grid) -> Tensor:
        """(B, H*W, p*p*C) -> (B, C, H*p, W*p), with DiT's channel order."""
        p, C = self.config.patch_size, self.config.out_channels
        x = x.reshape(x.shape[0], grid[0], grid[1], p, p, C)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], C, grid[0] * p, grid[1] * p)


_DIT_SIZES = {  # depth, hidden size, heads
    "DiT-XL": (28, 1152, 16),
    "DiT-L": (24, 1024, 16),
    "DiT-B": (12, 768, 12),
    "DiT-S": (12, 384, 6),
    # Small configs for CPU work (not in the paper).
    "DiT-Ti": (12, 192, 3),
    "DiT-Nano": (4, 128, 4),
}
for _name, (_depth, _width, _heads) in _DIT_SIZES.items():
    for _patch in (2, 4, 8):
        register_model(f"{_name}/{_patch}", "dit", depth=_depth, hidden_size=_width, num_heads=_heads,
                       patch_size=_patch)
