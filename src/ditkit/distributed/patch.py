"""Exact patch-parallel DiT inference: one horizontal strip of image tokens per process.

Every process holds the whole model and the whole noisy input. It embeds only its strip's
patches (with that strip's slice of the global position embedding), runs every block on its
strip, and all-gathers the output, so each process takes the identical scheduler step (DDPM's
variance noise included: same seed, same draws). Only the token mixers talk to each other, each
through its own `TokenMixer.forward_strip` hook and the collectives of a `ProcessStrip`:

  clear   local attention over the strip plus `halo(r)` rows from the neighbours (point to
          point); the pooled tokens (down_factor) are partial sums per strip, all-reduced.
  full    keys and values all-gathered; queries stay local.
  others  (downsampled, ssm, any newly registered mixer) the default hook: the mixer input is
          all-gathered and the mixer runs on the whole grid: exact, but no saving.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import Tensor, nn

from ..errors import DitkitError
from ..mixers.base import Grid, TokenMixer, map_to_tokens
from ..mixers.strip import KV_EXCHANGES, Strip
from ..models.layers import sincos_pos_embed_2d
from .comm import ProcessStrip, gather_rows, world
from .strips import strip_bounds


class StripMixer(nn.Module):
    """Stands in for a block's mixer while the block runs on one strip."""

    def __init__(self, mixer: TokenMixer, strip: Strip):
        super().__init__()
        self.inner, self.strip = mixer, strip

    def forward(self, x: Tensor, grid: Grid, num_global: int = 0) -> Tensor:
        assert tuple(grid) == self.strip.local_grid
        if num_global:
            raise DitkitError("patch-parallel sampling does not support global tokens: use --parallel none")
        return self.inner.forward_strip(x, self.strip)


@contextmanager
def strip_mixers(model: nn.Module, strip: Strip):
    """Swap each block's mixer for its strip-aware stand-in for the length of one forward."""
    originals = [block.mixer for block in model.blocks]
    try:
        for block, mixer in zip(model.blocks, originals, strict=True):
            block.mixer = StripMixer(mixer, strip)
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
        strip = ProcessStrip(grid, strip_bounds(grid[0], self.world_size), self.rank, self.kv_exchange)
        start, stop = strip.rows
        tokens = map_to_tokens(model.x_embedder(x[..., start * p:stop * p, :]))
        position = sincos_pos_embed_2d(model.config.hidden_size, grid, model.extrapolation)
        tokens = tokens + position[strip.tokens].to(tokens)
        c = model.condition(t, y)
        with strip_mixers(model, strip):
            for block in model.blocks:
                tokens = block(tokens, c, strip.local_grid)
        out = model.unpatchify(model.final_layer(tokens, c), strip.local_grid)
        return gather_rows(out, [(b - a) * p for a, b in strip.bounds], dim=-2)
