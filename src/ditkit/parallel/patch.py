"""Exact patch-parallel DiT inference: one horizontal strip of image tokens per process.

Every process holds the whole model and the whole noisy input. It embeds only its strip's
patches (with that strip's slice of the global position embedding), runs every block on its
strip, and all-gathers the output, so each process takes the identical scheduler step (DDPM's
variance noise included: same seed, same draws). Only the token mixers talk to each other:

  clear   local attention over the strip plus `halo(r)` rows from the neighbours (point to
          point). Every owned query's disc lies inside that region and the region ends where
          the disc cannot reach, so the result is exactly single-process attention. The pooled
          tokens (down_factor) are partial sums per strip, all-reduced.
  full    keys and values all-gathered; queries stay local.
  others  (downsampled, ssm) the mixer input is all-gathered and the mixer runs on the whole
          grid: exact, but no saving.

Queries of the neighbours' rows are not sent: their rows enter local attention with zero
queries and their outputs are dropped, which keeps every `clear` backend usable unchanged.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import DitkitError
from ..mixers.base import Grid, map_to_tokens
from ..mixers.clear import ClearAttention, halo, local_attention, pool_tokens
from ..mixers.full import FullAttention
from ..models.layers import sincos_pos_embed_2d
from .comm import all_reduce_sum, exchange_halo, gather_rows, world
from .strips import Bounds, rows_needed, strip_bounds

KV_EXCHANGES = ("halo", "allgather")


@dataclass(frozen=True)
class Strip:
    """This process's rows of the token grid."""

    grid: Grid  # the whole image's token grid
    bounds: Bounds
    rank: int

    @property
    def rows(self) -> tuple[int, int]:
        return self.bounds[self.rank]

    @property
    def local_grid(self) -> Grid:
        return self.rows[1] - self.rows[0], self.grid[1]

    def token_counts(self) -> list[int]:
        return [(stop - start) * self.grid[1] for start, stop in self.bounds]


def split_heads(mixer: nn.Module, x: Tensor, grid: Grid) -> tuple[Tensor, Tensor, Tensor]:
    """AttentionMixer's q, k, v: (B, heads, n, head_dim) each; queries scaled as for the whole `grid`
    when the model samples beyond its training size with proportional attention."""
    B, n, _ = x.shape
    q, k, v = mixer.qkv(x).view(B, n, 3, mixer.num_heads, mixer.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    if mixer.extrapolation is not None:
        q = q * mixer.extrapolation.query_scale(grid)
    return q, k, v


def merge_heads(mixer: nn.Module, out: Tensor) -> Tensor:
    B, _, n, _ = out.shape
    return mixer.proj(out.transpose(1, 2).reshape(B, n, mixer.dim))


def pooled_tokens(mixer: ClearAttention, kv: Tensor, strip: Strip) -> Tensor:
    """CLEAR's f x f pooled keys and values of the whole grid: each strip pools the blocks it
    touches (rows of other strips as zeros), and the partial sums add up over processes."""
    f, (H, W), (start, stop) = mixer.down_factor, strip.grid, strip.rows
    if H % f or W % f:
        raise DitkitError(f"clear down_factor {f} needs a token grid divisible by {f}, got {H}x{W}: "
                          f"use a resolution whose token grid is a multiple of {f}, or down_factor=0")
    lo, hi = start // f * f, -(-stop // f) * f  # the block rows this strip touches
    span = kv.new_zeros(*kv.shape[:-2], (hi - lo) * W, kv.shape[-1])
    span[..., (start - lo) * W:(stop - lo) * W, :] = kv
    partial = pool_tokens(span.flatten(0, 1), (hi - lo, W), 0, mixer.pool_weight)
    pooled = kv.new_zeros(*kv.shape[:3], (H // f) * (W // f), kv.shape[-1])
    pooled[..., lo // f * (W // f):hi // f * (W // f), :] = partial.view(*kv.shape[:3], -1, kv.shape[-1])
    return all_reduce_sum(pooled)


def clear_on_strip(mixer: ClearAttention, x: Tensor, strip: Strip, kv_exchange: str) -> Tensor:
    q, k, v = split_heads(mixer, x, strip.grid)
    reach = halo(mixer.radius, strip.grid) if kv_exchange == "halo" else strip.grid[0]
    kv = torch.stack([k, v])
    extra_k = extra_v = None
    if mixer.down_factor:
        extra_k, extra_v = pooled_tokens(mixer, kv, strip)
    kv = exchange_halo(kv, strip.bounds, strip.rank, reach, strip.grid[1])
    first, last = rows_needed(strip.bounds, strip.rank, reach)
    W = strip.grid[1]
    own = slice((strip.rows[0] - first) * W, (strip.rows[1] - first) * W)
    q_region = q.new_zeros(kv.shape[1:])
    q_region[..., own, :] = q
    out = local_attention(q_region, kv[0], kv[1], (last - first, W), mixer.radius, 0, extra_k, extra_v,
                          mixer.backend)
    return merge_heads(mixer, out[..., own, :])


def full_on_strip(mixer: FullAttention, x: Tensor, strip: Strip) -> Tensor:
    q, k, v = split_heads(mixer, x, strip.grid)
    kv = gather_rows(torch.stack([k, v]), strip.token_counts(), dim=-2)
    return merge_heads(mixer, mixer.attend(q, kv[0], kv[1], strip.grid, 0))


def any_mixer_on_strip(mixer: nn.Module, x: Tensor, strip: Strip) -> Tensor:
    """Exact for any mixer, with no saving: gather the whole input, mix, keep this strip."""
    counts = strip.token_counts()
    whole = gather_rows(x, counts, dim=1)
    first = sum(counts[:strip.rank])
    return mixer(whole, strip.grid)[:, first:first + counts[strip.rank]]


class StripMixer(nn.Module):
    """Stands in for a block's mixer while the block runs on one strip."""

    def __init__(self, mixer: nn.Module, strip: Strip, kv_exchange: str):
        super().__init__()
        self.inner, self.strip, self.kv_exchange = mixer, strip, kv_exchange

    def forward(self, x: Tensor, grid: Grid, num_global: int = 0) -> Tensor:
        assert tuple(grid) == self.strip.local_grid
        if num_global:
            raise DitkitError("patch-parallel sampling does not support global tokens: use --parallel none")
        if type(self.inner) is ClearAttention:
            return clear_on_strip(self.inner, x, self.strip, self.kv_exchange)
        if type(self.inner) is FullAttention:
            return full_on_strip(self.inner, x, self.strip)
        return any_mixer_on_strip(self.inner, x, self.strip)


@contextmanager
def strip_mixers(model: nn.Module, strip: Strip, kv_exchange: str):
    """Swap each block's mixer for its strip-aware stand-in for the length of one forward."""
    originals = [block.mixer for block in model.blocks]
    try:
        for block, mixer in zip(model.blocks, originals, strict=True):
            block.mixer = StripMixer(mixer, strip, kv_exchange)
        yield
    finally:
        for block, mixer in zip(model.blocks, originals, strict=True):
            block.mixer = mixer


class PatchParallelDiT(nn.Module):
    """A DiT that runs on this process's strip and returns the whole output, like `model(x, t, y)`.

    `kv_exchange="allgather"` makes `clear` read every row instead of its halo: the baseline
    the benchmark compares the halo exchange with (equally exact).
    """

    def __init__(self, model: nn.Module, kv_exchange: str = "halo"):
        super().__init__()
        backbone = getattr(getattr(model, "config", None), "backbone", type(model).__name__)
        if backbone != "dit":
            raise DitkitError(f"--parallel patch supports DiT models, not {backbone}: "
                              "sample this checkpoint with --parallel none")
        if kv_exchange not in KV_EXCHANGES:
            raise DitkitError(f"unknown kv_exchange {kv_exchange!r}: choose one of {', '.join(KV_EXCHANGES)}")
        self.model, self.kv_exchange = model, kv_exchange
        self.rank, self.world_size = world()

    @property
    def config(self):
        return self.model.config

    @property
    def y_embedder(self):
        return self.model.y_embedder

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        model, p = self.model, self.model.config.patch_size
        grid = model.token_grid(x.shape[-2], x.shape[-1])
        strip = Strip(grid, strip_bounds(grid[0], self.world_size), self.rank)
        start, stop = strip.rows
        tokens = map_to_tokens(model.x_embedder(x[..., start * p:stop * p, :]))
        position = sincos_pos_embed_2d(model.config.hidden_size, grid, model.extrapolation)
        position = position[start * grid[1]:stop * grid[1]]
        tokens = tokens + position.to(tokens)
        c = model.condition(t, y)
        with strip_mixers(model, strip, self.kv_exchange):
            for block in model.blocks:
                tokens = block(tokens, c, strip.local_grid)
        out = model.unpatchify(model.final_layer(tokens, c), strip.local_grid)
        return gather_rows(out, [(b - a) * p for a, b in strip.bounds], dim=-2)
