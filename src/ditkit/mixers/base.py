"""The token-mixer seam.

Every backbone block mixes tokens through a `TokenMixer`. A mixer sees the token tensor
``x`` of shape (B, G + H*W, D): G global tokens (text, registers) first, then the H x W
image tokens in row-major order, plus ``grid = (H, W)`` and ``num_global = G``. It returns
a tensor of the same shape. Mixers are chosen by name (see `registry`), so a trained model
can be rebuilt with another mixer in one argument.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor, nn

Grid = tuple[int, int]


@dataclass(frozen=True)
class Extrapolation:
    """Sampling beyond the training size (set on a model by `models.extrapolation`).

    stretch: the current grid over the training grid, per axis (rows, columns).
    attention_scale: proportional attention scale, softmax(q k^T sqrt(log_{N_train} N) / sqrt(d)).
    positions: "none", "ntk" or "interpolate" scaling of position frequencies (sin-cos or rotary).
    """

    stretch: tuple[float, float] = (1.0, 1.0)
    attention_scale: bool = False
    positions: str = "none"

    def query_scale(self, grid: Grid) -> float:
        """Factor on the queries for proportional attention scale: sqrt(log N / log N_train)."""
        tokens = grid[0] * grid[1]
        train_tokens = tokens / (self.stretch[0] * self.stretch[1])
        if not self.attention_scale or tokens <= 1 or train_tokens <= 1:
            return 1.0
        return math.sqrt(math.log(tokens) / math.log(train_tokens))


class TokenMixer(nn.Module):
    """Base class: mixes information across tokens. Subclasses implement `forward`."""

    name: str = ""
    extrapolation: Extrapolation | None = None  # set for sampling beyond the training size

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads

    @classmethod
    def grid_multiple(cls, **options) -> int:
        """The token grid's height and width must be multiples of this (for these options)."""
        return 1

    def forward(self, x: Tensor, grid: Grid, num_global: int = 0) -> Tensor:  # pragma: no cover
        raise NotImplementedError


class AttentionMixer(TokenMixer):
    """Softmax attention with DiT's projections (`qkv` with bias, `proj`).

    All attention mixers share these parameter names, so weights move between them; a
    subclass only decides which keys each query may see, in `attend`.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__(dim, num_heads)
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, grid: Grid, num_global: int = 0) -> Tensor:
        B, N, D = x.shape
        check_layout(N, grid, num_global)
        q, k, v = self.qkv(x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.extrapolation is not None:
            q = q * self.extrapolation.query_scale(grid)
        out = self.attend(q, k, v, grid, num_global)  # (B, heads, N, head_dim)
        return self.proj(out.transpose(1, 2).reshape(B, N, D))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, grid: Grid, num_global: int) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_heads={self.num_heads}"


def check_layout(num_tokens: int, grid: Grid, num_global: int) -> None:
    if num_tokens != num_global + grid[0] * grid[1]:
        raise ValueError(
            f"token count {num_tokens} does not match {num_global} global + {grid[0]}x{grid[1]} image tokens"
        )


def tokens_to_map(x: Tensor, grid: Grid) -> Tensor:
    """(B, H*W, D) row-major image tokens -> (B, D, H, W) feature map."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], *grid)


def map_to_tokens(x: Tensor) -> Tensor:
    """(B, D, H, W) feature map -> (B, H*W, D) row-major image tokens."""
    return x.flatten(2).transpose(1, 2)
