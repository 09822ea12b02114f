"""One horizontal strip of the token grid, as a mixer sees it during patch-parallel sampling.

Patch-parallel sampling runs each block on one strip of image rows per process; only the token
mixers need rows of other strips. A mixer gets them through `TokenMixer.forward_strip(x, strip)`
and the collectives of the `Strip` it is handed:

  gather         every strip's tokens, concatenated in image order (exact for any mixer, no saving)
  exchange_halo  the rows around this strip, up to `halo` rows away (local attention)
  all_reduce     the sum over strips of per-strip partial results (CLEAR's pooled tokens)
  all_reduce_max the largest value over strips (the shift that merges partial softmaxes of text
                 queries exactly: `clear.global_attention_of_strips`)

This module only describes them, so mixers stay below `parallel`: `ditkit.distributed` implements
them on torch.distributed (one process per strip), and tests implement them in one process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from .base import Grid

Bounds = list[tuple[int, int]]  # [start, stop) token rows of each strip, in rank order
KV_EXCHANGES = ("halo", "allgather")


def halo(radius: float, grid: Grid) -> int:
    """How far (in tokens) a CLEAR query of `radius` can see along one axis, capped by the grid: the
    rows a strip reads from its neighbours."""
    return max(0, min(math.ceil(radius) - 1, max(grid) - 1))


def rows_needed(bounds: Bounds, rank: int, halo: int) -> tuple[int, int]:
    """The rows a strip's local attention reads: its own plus `halo` on each side, cut at the image."""
    start, stop = bounds[rank]
    return max(0, start - halo), min(bounds[-1][1], stop + halo)


@dataclass(frozen=True)
class Strip:
    """This process's rows of the token grid, and the collectives that reach the other strips.

    kv_exchange: "halo" lets local attention read only the rows it reaches; "allgather" makes
    it read every row (equally exact: the baseline that benchmarks compare the halo with).
    Subclasses implement the collectives; every strip must call them in the same order.
    """

    grid: Grid  # the whole image's token grid
    bounds: Bounds
    rank: int
    kv_exchange: str = "halo"

    @property
    def rows(self) -> tuple[int, int]:
        return self.bounds[self.rank]

    @property
    def local_grid(self) -> Grid:
        return self.rows[1] - self.rows[0], self.grid[1]

    @property
    def tokens(self) -> slice:
        """This strip's tokens within the whole grid's row-major image tokens."""
        return slice(self.rows[0] * self.grid[1], self.rows[1] * self.grid[1])

    def token_counts(self) -> list[int]:
        return [(stop - start) * self.grid[1] for start, stop in self.bounds]

    def gather(self, x: Tensor, dim: int) -> Tensor:
        """Every strip's `x` (this strip's tokens along `dim`) concatenated in image order."""
        raise NotImplementedError

    def exchange_halo(self, x: Tensor, halo: int) -> Tensor:
        """x holds this strip's tokens along dim -2; returns those of `rows_needed(bounds, rank, halo)`."""
        raise NotImplementedError

    def all_reduce(self, x: Tensor) -> Tensor:
        """The sum of `x` over all strips."""
        raise NotImplementedError

    def all_reduce_max(self, x: Tensor) -> Tensor:
        """The elementwise maximum of `x` over all strips."""
        raise NotImplementedError
