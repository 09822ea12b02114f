"""DiffuSSM: "Diffusion Models Without Attention" (Yan, Gu, Rush; arXiv 2311.18257, CVPR 2024).

No official code exists; this follows the paper's equations (see README, "DiffuSSM", for the
choices where the paper is ambiguous). The residual stream holds one token per M horizontally
adjacent latent cells (M = `hourglass`, a 1 x M stem), so the dense layers run at length L/M;
inside each block the `ssm` mixer expands every token back into its M cells and scans the
full-length raster sequence (L = H*W latent cells, 1024 at 256 px) in both directions. Blocks
are pre-LayerNorm with adaLN-Zero conditioning on timestep + class (plus the condition added at
every position before the norm), and a residual skip; a linear decoder maps each token to its M
cells' noise and variance. No positional embedding: the
scans are order-aware, and the S4D kernels are computed for any length, so any size runs.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from ..config import AT_LEAST_1, ranged
from ..errors import DitkitError
from ..mixers import Grid, build_mixer
from ..mixers.base import map_to_tokens
from ..mixers.registry import mixer_options
from .layers import ConditionedBlocks, Conditioning, FinalLayer, LabelEmbedder, TimestepEmbedder, adaln_zero_init
from .registry import BackboneConfig, register_backbone, register_model


@dataclass
class DiffuSSMConfig(BackboneConfig):
    hidden_size: int = ranged(1152, AT_LEAST_1)
    depth: int = ranged(29, AT_LEAST_1)
    num_heads: int = ranged(16, AT_LEAST_1)  # only for mixers that use heads; the ssm mixer does not
    hourglass: int = ranged(2, AT_LEAST_1)  # M: dense layers run at length L/M, the SSM at L
    state_size: int = 64  # S4D state dimension N (N/2 complex modes per channel)
    mixer: str = "ssm"

    @property
    def grid_reduction(self) -> int:
        """M: the stem merges M cells along a row (tokens: the SSM scans one position per cell, the
        paper's L). Both sides are checked against it, though only the width needs it."""
        return self.hourglass

    def block_mixer_options(self) -> dict:
        """The mixer's options: the backbone's hourglass and state size where the mixer takes them."""
        shared = {"hourglass": self.hourglass, "state_size": self.state_size}
        accepted = mixer_options(self.mixer)
        return {**{k: v for k, v in shared.items() if k in accepted}, **self.mixer_options}


class DiffuSSMBlock(nn.Module):
    """x + gate * mixer(modulate(LN(x + bias))), with (bias, shift, scale, gate) from the condition."""

    def __init__(self, cfg: DiffuSSMConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm = nn.LayerNorm(D, elementwise_affine=False, eps=1e-6)
        self.mixer = build_mixer(cfg.mixer, D, cfg.num_heads, **cfg.block_mixer_options())
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 4 * D))

    def forward(self, x: Tensor, c: Tensor, grid: Grid) -> Tensor:
        bias, shift, scale, gate = self.adaLN_modulation(c).unsqueeze(1).chunk(4, dim=-1)
        h = self.norm(x + bias)  # the condition added at every position, as the paper words it
        return x + gate * self.mixer(h * (1 + scale) + shift, grid)


@register_backbone("diffussm", DiffuSSMConfig)
class DiffuSSM(Conditioning, nn.Module):
    """Attention-free diffusion backbone: (x, t, y) -> (B, out_channels, H, W) for W a multiple of M."""

    def __init__(self, config: DiffuSSMConfig):
        super().__init__()
        self.config = cfg = config
        M, D = cfg.hourglass, cfg.hidden_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, D, (1, M), stride=(1, M))  # merges M cells of a row
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder.for_config(cfg, D)
        self.blocks = ConditionedBlocks(DiffuSSMBlock(cfg) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, M * cfg.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's adaLN-Zero init for the dense layers (the S4D parameters keep their own), so every
        block starts as the identity."""
        adaln_zero_init(self, embedders=[self.y_embedder, self.t_embedder], outputs=[self.final_layer.linear])

    def token_grid(self, height: int, width: int) -> Grid:
        M = self.config.hourglass
        if width % M:
            wider = width + M - width % M
            raise DitkitError(f"DiffuSSM input {height}x{width}: the width must be a multiple of the hourglass "
                              f"factor {M} (each token holds {M} cells of a row); use e.g. width {wider}")
        return height, width // M

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        grid = self.token_grid(x.shape[-2], x.shape[-1])
        tokens = map_to_tokens(self.x_embedder(x))
        c = self.condition(t, y)
        tokens = self.blocks(tokens, c, grid)
        return self.unpatchify(self.final_layer(tokens, c), grid)

    def unpatchify(self, x: Tensor, grid: Grid) -> Tensor:
        """(B, H*W/M, M*C) -> (B, C, H, W): token j's outputs go to its M cells, left to right."""
        M, C = self.config.hourglass, self.config.out_channels
        x = x.reshape(x.shape[0], grid[0], grid[1], M, C)
        return x.permute(0, 4, 1, 2, 3).reshape(x.shape[0], C, grid[0], grid[1] * M)


_DIFFUSSM_SIZES = {  # depth, width
    "DiffuSSM-XL": (29, 1152),  # the paper's model
    # Small configs for CPU work (not in the paper): DiT-S and DiT-Nano widths, one layer more.
    "DiffuSSM-S": (13, 384),
    "DiffuSSM-Nano": (5, 128),
}
for _name, (_depth, _width) in _DIFFUSSM_SIZES.items():
    register_model(_name, "diffussm", depth=_depth, hidden_size=_width)
