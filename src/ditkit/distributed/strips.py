"""How the token grid's rows split into one horizontal strip per process.

Heights follow `torch.tensor_split`: the first rows % P strips are one row taller. Every
process computes the whole plan from (rows, P), so no process needs to ask another. The rows a
strip reads (`rows_needed`) are defined with the `Strip` that mixers see, in `mixers.strip`.
"""

from __future__ import annotations

from ..errors import DitkitError
from ..mixers.strip import Bounds, rows_needed


def strip_bounds(rows: int, parts: int) -> Bounds:
    """[start, stop) rows of each of `parts` strips covering `rows` rows, heights differing by at most 1."""
    if rows < parts:
        raise DitkitError(f"the token grid has {rows} rows, fewer than the {parts} processes: "
                          f"sample a taller image or start at most {rows} processes")
    base, extra = divmod(rows, parts)
    bounds, start = [], 0
    for rank in range(parts):
        stop = start + base + (rank < extra)
        bounds.append((start, stop))
        start = stop
    return bounds


def overlap(a: tuple[int, int], b: tuple[int, int]) -> tuple[int, int] | None:
    start, stop = max(a[0], b[0]), min(a[1], b[1])
    return (start, stop) if start < stop else None


def halo_plan(bounds: Bounds, rank: int, halo: int) -> tuple[list, list]:
    """Who sends what: (receives, sends), each a list of (peer, start, stop) row ranges.

    A strip shorter than the halo simply makes its neighbour read from the next strip too.
    """
    needed = rows_needed(bounds, rank, halo)
    receives = [(peer, *rows) for peer, own in enumerate(bounds)
                if peer != rank and (rows := overlap(needed, own))]
    sends = [(peer, *rows) for peer in range(len(bounds))
             if peer != rank and (rows := overlap(rows_needed(bounds, peer, halo), bounds[rank]))]
    return receives, sends
