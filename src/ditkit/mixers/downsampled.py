"""`downsampled`: U-DiT's downsampled self-attention (arXiv 2405.02730).

The token map first goes through a depthwise 5x5 conv with a shortcut, then is split into its
four 2x2 phase sub-maps (sub-map (i, j) holds positions (2h+i, 2w+j): nothing is dropped). The
four share one qkv projection, attend independently (1/4 of the score entries of full
attention), and are put back in place before the output projection. As in the released
configs, attention is cosine similarity times a learnable per-head scale (init 10, at most 100)
with 2D rotary position embeddings inside each sub-map.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DitkitError
from .base import Extrapolation, Grid, TokenMixer, map_to_tokens, tokens_to_map
from .registry import register_mixer


def rope_2d_angles(head_dim: int, ys: Tensor, xs: Tensor, theta: float = 10000.0,
                   extrapolation: Extrapolation | None = None) -> Tensor:
    """(N, head_dim/2) rotation angles for tokens at (ys, xs): complex pair 2m turns with the
    column, 2m+1 with the row, both at frequency theta^(-4m/head_dim). Beyond the training grid,
    `extrapolation.positions` rescales per axis as `sincos_pos_embed_2d` does (ntk: theta times
    s^(k/(k-1)) for k frequencies; interpolate: positions divided by s)."""
    if head_dim % 4:
        raise DitkitError(f"2D rotary embedding needs a head dimension divisible by 4, got {head_dim}")
    k = head_dim // 4
    exponents = torch.arange(0, head_dim, 4, device=ys.device)[:k].float() / head_dim
    ys, xs = ys.float(), xs.float()
    thetas = [theta, theta]
    if extrapolation is not None and extrapolation.positions != "none":
        s_y, s_x = (max(1.0, s) for s in extrapolation.stretch)
        if extrapolation.positions == "interpolate":
            ys, xs = ys / s_y, xs / s_x
        elif k > 1:
            thetas = [theta * s_y ** (k / (k - 1)), theta * s_x ** (k / (k - 1))]
    angles = torch.stack([xs[:, None] * thetas[1] ** -exponents, ys[:, None] * thetas[0] ** -exponents], dim=-1)
    return angles.reshape(len(ys), head_dim // 2)


def apply_rope(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate consecutive channel pairs of x (..., N, d) by angles (N, d/2)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    cos, sin = angles.cos(), angles.sin()
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


def subgrid_attention(q: Tensor, k: Tensor, v: Tensor, grid: Grid, factor: int = 2,
                      scale: float | None = None) -> Tensor:
    """Attention within each of the factor^2 phase sub-grids of a row-major (B, heads, H*W, d)
    token grid: sub-grid (i, j) holds positions (factor*y + i, factor*x + j)."""
    B, nh, _, d = q.shape
    f, (H, W) = factor, grid
    h, w = H // f, W // f

    def split(x: Tensor) -> Tensor:  # -> (B, heads * f*f, h*w, d): 4-D, so the fused kernel is used
        return x.reshape(B, nh, h, f, w, f, d).permute(0, 1, 3, 5, 2, 4, 6).reshape(B, nh * f * f, h * w, d)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v), scale=scale)
    return out.reshape(B, nh, f, f, h, w, d).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, nh, H * W, d)


@register_mixer("downsampled")
class DownsampledAttention(TokenMixer):
    """Attention over the four 2x2-downsampled sub-maps of the token grid."""

    scales_attention = True  # within each sub-map
    encodes_positions = True  # rotary
    accepts_global_tokens = False

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, factor: int = 2, kernel_size: int = 5):
        super().__init__(dim, num_heads)
        self.factor = factor
        self.head_dim = dim // num_heads
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)  # the official 1x1 conv, on tokens
        self.logit_scale = nn.Parameter(torch.full((num_heads, 1, 1), math.log(10.0)))

    @classmethod
    def grid_multiple(cls, factor: int = 2, **_) -> int:
        return factor

    def attention_work(self, grid: Grid) -> float:
        """Each of the factor^2 sub-maps attends within itself: 1 / factor^2 of the pairs."""
        return 1 / self.factor**2

    def forward(self, x: Tensor, grid: Grid, num_global: int = 0) -> Tensor:
        B, N, D = x.shape
        self.check_tokens(N, grid, num_global)
        f, (H, W) = self.factor, grid
        if H % f or W % f:
            raise DitkitError(f"downsampled attention needs a token grid divisible by {f}, got {H}x{W}")
        feature_map = tokens_to_map(x, grid)
        x = map_to_tokens(feature_map + self.dwconv(feature_map))
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        # Rotary positions are each token's coordinates inside its sub-map.
        ys, xs = torch.meshgrid(torch.arange(H, device=x.device), torch.arange(W, device=x.device), indexing="ij")
        angles = rope_2d_angles(self.head_dim, ys.flatten() // f, xs.flatten() // f,
                                extrapolation=self.extrapolation)
        q, k = apply_rope(q, angles), apply_rope(k, angles)
        if self.extrapolation is not None:  # each query attends within its (H/f) x (W/f) sub-map
            q = q * self.extrapolation.query_scale((H // f, W // f))
        # Cosine attention with a per-head temperature, folded into q so the fused kernel applies.
        temperature = torch.clamp(self.logit_scale, max=math.log(100.0)).exp().to(q.dtype)
        q, k = F.normalize(q, dim=-1) * temperature, F.normalize(k, dim=-1)
        out = subgrid_attention(q, k, v, grid, f, scale=1.0)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}, factor={self.factor}"
