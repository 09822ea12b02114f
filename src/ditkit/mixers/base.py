"""The token-mixer seam.

Every backbone block mixes tokens through a `TokenMixer`. A mixer sees the token tensor
``x`` of shape (B, G + H*W, D): G global tokens (text, registers) first, then the H x W
image tokens in row-major order, plus ``grid = (H, W)`` and ``num_global = G``. It returns
a tensor of the same shape. Mixers are chosen by name (see `registry`), so a trained model
can be rebuilt with another mixer in one argument.

Registering a mixer is all it takes to use it everywhere. What the rest of the library needs to
know about a mixer, it asks the mixer, never its class:

  forward_strip(x, strip)      patch-parallel sampling: mix one strip of rows (see `strip`); the
                               default gathers the whole grid, which is exact for any mixer
  scales_attention             honours proportional attention scale (`Extrapolation.query_scale`)
  encodes_positions            holds a position encoding that `Extrapolation.positions` rescales
  accepts_global_tokens        takes global tokens (num_global > 0)
  grid_multiple(**options)     the token grid's sides must be multiples of this
  check_options(**options)     refuses option values it cannot be built with (when a MixerSpec is read)
  attention_work(grid)         share of full attention's (query, key) pairs it scores (ditkit info)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from ..errors import DitkitError

if TYPE_CHECKING:
    from .strip import Strip

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
    """Base class: mixes information across tokens. Subclasses implement `forward`.

    The class attributes below say what a mixer supports; `models.extrapolation` and the
    contract tests read them, so a subclass states its capabilities here, once.
    """

    name: str = ""
    extrapolation: Extrapolation | None = None  # set for sampling beyond the training size
    scales_attention: bool = False  # scales its queries by `extrapolation.query_scale`
    encodes_positions: bool = False  # rescales its positions by `extrapolation.positions`
    accepts_global_tokens: bool = True  # False: refuses num_global > 0 with a DitkitError

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.dim = dim
        self.num_heads = num_heads

    @classmethod
    def check_options(cls, **options) -> None:
        """Raise a one-line DitkitError for option values this mixer cannot be built with. Called with
        every option (defaults filled in) when a `MixerSpec` is made, so a config or flag fails when it is
        read; type errors are caught before, from the constructor's annotations."""

    @classmethod
    def grid_multiple(cls, **options) -> int:
        """The token grid's height and width must be multiples of this (for these options)."""
        return 1

    def forward(self, x: Tensor, grid: Grid, num_global: int = 0) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def check_tokens(self, num_tokens: int, grid: Grid, num_global: int) -> None:
        """The layout `forward` receives fits the grid, and holds global tokens only if this mixer
        takes them (`accepts_global_tokens`)."""
        check_layout(num_tokens, grid, num_global)
        if num_global and not self.accepts_global_tokens:
            raise DitkitError(f"the {self.name} mixer takes image tokens only (no global tokens)")

    def attention_work(self, grid: Grid) -> float | None:
        """Share of full attention's (query, key) image-token pairs this mixer scores on `grid`:
        what its locality saves (`ditkit info`); None for mixers that are no attention."""
        return None

    def forward_strip(self, x: Tensor, strip: Strip) -> Tensor:
        """Mix one strip of image rows (patch-parallel sampling): x holds this strip's tokens
        (B, rows * W, D), the result their outputs, equal to the same rows of `forward` on the
        whole grid. This default gathers the whole input, mixes it and keeps this strip's rows:
        exact for any mixer, but no saving. Mixers that need fewer rows override it."""
        return self(strip.gather(x, dim=1), strip.grid)[:, strip.tokens]


class AttentionMixer(TokenMixer):
    """Softmax attention with DiT's projections (`qkv` with bias, `proj`).

    All attention mixers share these parameter names, so weights move between them; a
    subclass only decides which keys each query may see, in `attend`.
    """

    scales_attention = True

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__(dim, num_heads)
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, grid: Grid, num_global: int = 0) -> Tensor:
        self.check_tokens(x.shape[1], grid, num_global)
        q, k, v = self.split_heads(x, grid)
        return self.merge_heads(self.attend(q, k, v, grid, num_global))

    def split_heads(self, x: Tensor, grid: Grid) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v of tokens x (B, n, D): (B, heads, n, head_dim) each. The queries are scaled for
        proportional attention as for the whole `grid`, also when x holds only a strip of it."""
        B, n, _ = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        if self.extrapolation is not None:
            q = q * self.extrapolation.query_scale(grid)
        return q, k, v

    def merge_heads(self, out: Tensor) -> Tensor:
        """(B, heads, n, head_dim) attention output -> (B, n, D) through the output projection."""
        B, _, n, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(B, n, self.dim))

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
