"""Patch-parallel strips in one process: one thread per strip, the collectives of `Strip`
implemented with a barrier, so tests need no process group."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ditkit.distributed import strip_bounds
from ditkit.mixers import Grid, Strip
from ditkit.mixers.strip import rows_needed


class Board:
    """What the threads of one simulated run share: a slot per strip and a barrier."""

    def __init__(self, parts: int):
        self.slots: list[Tensor | None] = [None] * parts
        self.barrier = threading.Barrier(parts, timeout=60)

    def everyone(self, rank: int, x: Tensor) -> list[Tensor]:
        """Every strip's x, in rank order (a collective: every strip must call it)."""
        self.slots[rank] = x
        self.barrier.wait()
        shared = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return shared


@dataclass(frozen=True)
class ThreadStrip(Strip):
    """A strip run by one thread; the collectives go through the shared `Board`."""

    board: Board | None = None

    def gather(self, x: Tensor, dim: int) -> Tensor:
        return torch.cat(self.board.everyone(self.rank, x), dim=dim)

    def exchange_halo(self, x: Tensor, halo: int) -> Tensor:
        first, last = rows_needed(self.bounds, self.rank, halo)
        whole = torch.cat(self.board.everyone(self.rank, x), dim=-2)
        return whole[..., first * self.grid[1]:last * self.grid[1], :]

    def all_reduce(self, x: Tensor) -> Tensor:
        return torch.stack(self.board.everyone(self.rank, x)).sum(dim=0)

    def all_reduce_max(self, x: Tensor) -> Tensor:
        return torch.stack(self.board.everyone(self.rank, x)).amax(dim=0)


def on_thread_strips(grid: Grid, parts: int, kv_exchange: str, run: Callable[[Strip], Tensor]) -> list[Tensor]:
    """run(strip) on each of `parts` strips of `grid`, one thread each (no grad); the results in rank order."""
    bounds, board = strip_bounds(grid[0], parts), Board(parts)
    outputs: list[Tensor | None] = [None] * parts
    errors: list[BaseException] = []

    def run_strip(rank: int) -> None:
        try:
            with torch.no_grad():  # grad mode is per thread
                outputs[rank] = run(ThreadStrip(grid, bounds, rank, kv_exchange, board))
        except BaseException as error:  # noqa: BLE001  (re-raised below, in the caller's thread)
            errors.append(error)
            board.barrier.abort()  # release the strips waiting for this one

    threads = [threading.Thread(target=run_strip, args=(rank,)) for rank in range(parts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise next((e for e in errors if not isinstance(e, threading.BrokenBarrierError)), errors[0])
    return outputs
