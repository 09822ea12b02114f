"""DiT: "Scalable Diffusion Models with Transformers" (Peebles & Xie, ICCV 2023).

The whole backbone in one file, following the official models.py, with one change: each
block's token mixing is a `TokenMixer` chosen by name (`config.mixer`), so the same weights
run with full attention, local attention, and so on.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import DitkitError
from ..mixers import Grid, build_mixer
from ..mixers.base import Extrapolation, map_to_tokens
from ..mixers.registry import mixer_class
from .layers import FinalLayer, LabelEmbedder, Mlp, TimestepEmbedder, modulate, sincos_pos_embed_2d
from .registry import register_backbone, register_model


@dataclass
class DiTConfig:
    in_channels: int = 4
    patch_size: int = 2
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_classes: int = 1000  # 0: unconditional
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True  # predict the variance too (2x output channels), as DiT
    mixer: str = "full"
    mixer_options: dict = field(default_factory=dict)
    vae_scale: int = 8  # pixels per input cell: 8 for SD-VAE latents, 1 for pixel-space models

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    def tokens(self, height: int, width: int) -> int:
        """Image tokens for an input of height x width cells."""
        return (height // self.patch_size) * (width // self.patch_size)

    @property
    def downsample(self) -> int:
        """Inputs must be a multiple of this along each side (patch x what the mixer needs)."""
        return self.patch_size * mixer_class(self.mixer).grid_multiple(**self.mixer_options)


class DiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: token mixer, then MLP."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mixer = build_mixer(cfg.mixer, D, cfg.num_heads, **cfg.mixer_options)
        self.norm2 = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(D, int(D * cfg.mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(self, x: Tensor, c: Tensor, grid: Grid) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.mixer(modulate(self.norm1(x), shift_msa, scale_msa), grid)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


@register_backbone("dit", DiTConfig)
class DiT(nn.Module):
    """Diffusion transformer: (x, t, y) -> (B, out_channels, H, W) for any H, W divisible by the patch."""

    extrapolation: Extrapolation | None = None  # sampling beyond the training size (models.extrapolation)
    encodes_positions = True  # its sin-cos embedding follows `extrapolation.positions`

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        cfg = config
        self.x_embedder = nn.Conv2d(cfg.in_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.t_embedder = TimestepEmbedder(cfg.hidden_size)
        self.y_embedder = (LabelEmbedder(cfg.num_classes, cfg.hidden_size, cfg.class_dropout_prob)
                           if cfg.num_classes > 0 else None)
        self.blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(cfg.hidden_size, cfg.patch_size**2 * cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's init: xavier linears, zero adaLN modulation and output (each block starts as identity)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        w = self.x_embedder.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def token_grid(self, height: int, width: int) -> Grid:
        p = self.config.patch_size
        if height % p or width % p:
            raise DitkitError(
                f"input {height}x{width} is not divisible by the patch size {p}: "
                f"use a resolution whose latent side is a multiple of {p}"
            )
        return height // p, width // p

    def condition(self, t: Tensor, y: Tensor | None) -> Tensor:
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                raise DitkitError("this model is class-conditional: pass class labels")
            c = c + self.y_embedder(y)
        return c

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        grid = self.token_grid(x.shape[-2], x.shape[-1])
        tokens = map_to_tokens(self.x_embedder(x))
        tokens = tokens + sincos_pos_embed_2d(self.config.hidden_size, grid, self.extrapolation).to(tokens)
        c = self.condition(t, y)
        for block in self.blocks:
            tokens = block(tokens, c, grid)
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
