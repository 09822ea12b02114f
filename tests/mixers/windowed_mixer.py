"""`test-windowed`: a new attention mixer written in this one file and nowhere else.

It shows that registering a mixer is the only step: registered under `NAME` (`registered()`, for
one test: the `windowed_mixer` fixture; or `register_mixer(NAME)` in a worker process) it is
available to DiT and U-DiT (by name), to patch-parallel sampling (through the default
`forward_strip`, exact) and to sampling beyond the training size (attention scale from
`AttentionMixer`, rotary positions through `encodes_positions`), with no edit to the library.

Each image query sees the keys of its own `window` x `window` block of the grid; global tokens
see, and are seen by, every token. Queries and keys of image tokens are rotated by 2D rotary
positions of their grid coordinates.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ditkit import DitkitError
from ditkit.mixers import AttentionMixer, Grid, registered_mixer
from ditkit.mixers.downsampled import apply_rope, rope_2d_angles


def window_mask(grid: Grid, window: int, num_global: int, device: torch.device) -> Tensor:
    """(G + H*W, G + H*W) boolean: True where the query (row) may see the key (column)."""
    ys, xs = torch.meshgrid(torch.arange(grid[0], device=device), torch.arange(grid[1], device=device),
                            indexing="ij")
    block = (ys.flatten() // window) * grid[1] + xs.flatten() // window
    tokens = num_global + grid[0] * grid[1]
    mask = torch.ones(tokens, tokens, dtype=torch.bool, device=device)
    mask[num_global:, num_global:] = block[:, None] == block[None]
    return mask


NAME = "test-windowed"


class WindowedAttention(AttentionMixer):
    """Attention within non-overlapping window x window blocks, with 2D rotary positions."""

    encodes_positions = True  # the rotary angles follow `extrapolation.positions`

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, window: int = 2):
        super().__init__(dim, num_heads, qkv_bias)
        self.window = window

    @classmethod
    def grid_multiple(cls, window: int = 2, **_) -> int:
        return window

    def attend(self, q: Tensor, k: Tensor, v: Tensor, grid: Grid, num_global: int) -> Tensor:
        if grid[0] % self.window or grid[1] % self.window:
            raise DitkitError(f"test-windowed needs a token grid divisible by {self.window}, got "
                              f"{grid[0]}x{grid[1]}: use a resolution whose token grid is a multiple of it")
        ys, xs = torch.meshgrid(torch.arange(grid[0], device=q.device), torch.arange(grid[1], device=q.device),
                                indexing="ij")
        angles = rope_2d_angles(self.head_dim, ys.flatten(), xs.flatten(), extrapolation=self.extrapolation)
        G = num_global
        q = torch.cat([q[..., :G, :], apply_rope(q[..., G:, :], angles)], dim=-2)
        k = torch.cat([k[..., :G, :], apply_rope(k[..., G:, :], angles)], dim=-2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=window_mask(grid, self.window, G, q.device))


def registered():
    """A context in which `test-windowed` is registered (a test's own mixer stays out of the registry)."""
    return registered_mixer(NAME, WindowedAttention)
