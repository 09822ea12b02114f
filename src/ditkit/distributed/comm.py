"""The exchanges patch-parallel sampling needs, on plain torch.distributed, each counting
the bytes it moves in `STATS` (per process) so benchmarks can compare them.

  exchange_halo  point-to-point: each strip gets the rows next to it that its local attention reads
  gather_rows    all-gather of strips of unequal height (padded to the tallest): full attention's
                 keys and values, and the model output every process needs for the scheduler step
  all_reduce_sum sum of per-strip partial results (CLEAR's pooled tokens, text queries' partial attention)
  all_reduce_max largest value over strips (the log-sum-exp shift of text queries' partial attention)

`ProcessStrip` hands them to the mixers as the collectives of `mixers.strip.Strip`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..mixers.strip import Strip
from .strips import Bounds, halo_plan, rows_needed


@dataclass
class CommStats:
    """Bytes this process sent and received (payload, padding included) since the last reset."""

    sent: int = 0
    received: int = 0

    def reset(self) -> None:
        self.sent = self.received = 0


STATS = CommStats()


def nbytes(x: Tensor) -> int:
    return x.numel() * x.element_size()


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def exchange_halo(x: Tensor, bounds: Bounds, rank: int, halo: int, width: int) -> Tensor:
    """x holds this strip's rows as row-major tokens along dim -2; returns the tokens of
    `rows_needed(bounds, rank, halo)`: the neighbours' rows around it, in image order."""
    receives, sends = halo_plan(bounds, rank, halo)
    start = bounds[rank][0]
    pending, pieces = [], {}
    for peer, lo, hi in receives:
        buffer = x.new_empty(*x.shape[:-2], (hi - lo) * width, x.shape[-1])
        pending.append(dist.irecv(buffer, src=peer))
        pieces[lo] = buffer
        STATS.received += nbytes(buffer)
    for peer, lo, hi in sends:
        rows = x[..., (lo - start) * width:(hi - start) * width, :].contiguous()
        pending.append(dist.isend(rows, dst=peer))
        STATS.sent += nbytes(rows)
    for request in pending:
        request.wait()
    pieces[start] = x
    needed = rows_needed(bounds, rank, halo)
    assert sum(p.shape[-2] for p in pieces.values()) == (needed[1] - needed[0]) * width
    return torch.cat([pieces[lo] for lo in sorted(pieces)], dim=-2)


def gather_rows(x: Tensor, sizes: list[int], dim: int) -> Tensor:
    """All-gather strips of `sizes[rank]` entries along `dim` into the whole tensor on every process."""
    rank, size = world()
    if size == 1:
        return x
    tallest = max(sizes)
    padded = torch.nn.functional.pad(x.movedim(dim, -1), (0, tallest - sizes[rank])).contiguous()
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded)
    STATS.sent += (size - 1) * nbytes(padded)
    STATS.received += (size - 1) * nbytes(padded)
    return torch.cat([part[..., :n] for part, n in zip(parts, sizes, strict=True)], dim=-1).movedim(-1, dim)


def all_reduce_sum(x: Tensor) -> Tensor:
    """Sum over processes; counted as a ring all-reduce moves it: 2 (P-1)/P of x each way."""
    return all_reduce(x, dist.ReduceOp.SUM)


def all_reduce_max(x: Tensor) -> Tensor:
    """Elementwise maximum over processes; counted like `all_reduce_sum`."""
    return all_reduce(x, dist.ReduceOp.MAX)


def all_reduce(x: Tensor, op) -> Tensor:
    _, size = world()
    if size == 1:
        return x
    x = x.clone(memory_format=torch.contiguous_format)  # reduced in place: the caller's x stays its own
    dist.all_reduce(x, op=op)
    moved = 2 * (size - 1) * nbytes(x) // size
    STATS.sent += moved
    STATS.received += moved
    return x


@dataclass(frozen=True)
class ProcessStrip(Strip):
    """This process's strip, its collectives run on torch.distributed (one process per strip)."""

    def gather(self, x: Tensor, dim: int) -> Tensor:
        return gather_rows(x, self.token_counts(), dim)

    def exchange_halo(self, x: Tensor, halo: int) -> Tensor:
        return exchange_halo(x, self.bounds, self.rank, halo, self.grid[1])

    def all_reduce(self, x: Tensor) -> Tensor:
        return all_reduce_sum(x)

    def all_reduce_max(self, x: Tensor) -> Tensor:
        return all_reduce_max(x)
