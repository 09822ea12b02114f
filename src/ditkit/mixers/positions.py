"""CLEAR local attention over image tokens at given positions: several images in one sequence.

`clear.local_attention` takes one image grid in row-major order. Some sequences hold more than one
image: FLUX.1 Kontext appends a context image's tokens after the generated image's, with rotary
positions (row, column) on the same plane (both start at (0, 0); the first id axis tells them
apart). CLEAR's window is defined by the positions the model itself sees: an image query at (y, x)
sees every image key, of any image, with (y - ky)^2 + (x - kx)^2 < r^2. On one grid this is
exactly `local_attention` (tested); with a context image each query also sees the context's tokens
around the same place. Global (text) tokens and pooled tokens are seen as in `local_attention`.

Backends ("auto": flex on CUDA, the dense reference for <= 1024 keys, tiled otherwise):
  reference  dense boolean mask over every pair (tests and tiny inputs)
  tiled      queries grouped by T x T square of the plane; each group attends to the keys in its
             square grown by r - 1 on every side (of every image), with its disc mask: work grows
             with N, not N^2
  flex       flex_attention with a block mask over tokens sorted by 8 x 16 squares of the plane
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import DitkitError
from .flex import TILE, compiled_flex
from .tiled import default_tile

BACKENDS = ("auto", "reference", "tiled", "flex")


def _near(qpos: Tensor, kpos: Tensor, radius: float) -> Tensor:
    """(queries, keys) boolean: the key lies strictly inside the query's disc."""
    delta = (qpos[:, None, :] - kpos[None, :, :]).float()
    return (delta * delta).sum(-1) < radius * radius


def check_positions(positions: Tensor, num_global: int, q: Tensor, k: Tensor) -> None:
    if positions.ndim != 2 or positions.shape[1] != 2:
        raise DitkitError(f"token positions must be (N, 2) rows and columns, got {tuple(positions.shape)}")
    N = positions.shape[0]
    if q.shape[-2] != num_global + N or k.shape[-2] != num_global + N:
        raise DitkitError(f"{N} image positions with {num_global} global tokens need q, k, v of {num_global + N} "
                          f"tokens, got {q.shape[-2]} and {k.shape[-2]}: give one position per image token")


def reference_positions_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, radius: float,
                                  num_global: int = 0, extra_k: Tensor | None = None,
                                  extra_v: Tensor | None = None) -> Tensor:
    """The definition, written densely over (G + N) x (G + N + extra) pairs."""
    G, N = num_global, positions.shape[0]
    E = 0 if extra_k is None else extra_k.shape[-2]
    if E:
        k, v = torch.cat([k, extra_k], dim=-2), torch.cat([v, extra_v], dim=-2)
    mask = torch.ones(G + N, G + N + E, dtype=torch.bool, device=q.device)
    mask[G:, G:G + N] = _near(positions, positions, radius)
    mask[:G, G + N:] = False  # global queries do not see pooled tokens
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


ImageGrid = tuple[int, int, int, int]  # (top, left, rows, columns): one image's tokens, a whole grid in row-major order


def grids_positions(grids: tuple[ImageGrid, ...], device: torch.device | str = "cpu") -> Tensor:
    """(N, 2) positions of images that are whole grids, one after the other in the sequence."""
    parts = []
    for top, left, rows, columns in grids:
        ys, xs = torch.meshgrid(torch.arange(rows) + top, torch.arange(columns) + left, indexing="ij")
        parts.append(torch.stack([ys.flatten(), xs.flatten()], 1))
    return torch.cat(parts).to(device)


@dataclass(frozen=True)
class SquarePlan:
    """Which keys each square of queries reads (the tiled backend's work list): per non-empty T x T
    square of the plane, its queries, the image keys of the squares its discs can reach, and which of
    those each query sees; `inverse` puts the squares' outputs back in sequence order."""

    groups: list[tuple[Tensor, Tensor, Tensor]]  # (query indices, key indices, seen (queries, keys))
    inverse: Tensor


def square_plan(positions: Tensor, radius: float, tile: int) -> SquarePlan:
    """O(N) work list: tokens sorted by square once, each square's keys the runs of its neighbours."""
    reach = math.ceil(radius) - 1
    y, x = positions[:, 0] - positions[:, 0].min(), positions[:, 1] - positions[:, 1].min()
    rows, columns = int(y.max()) // tile + 1, int(x.max()) // tile + 1
    square = (y // tile) * columns + x // tile
    order = torch.argsort(square, stable=True)
    counts = torch.bincount(square, minlength=rows * columns).tolist()
    starts = [0]
    for count in counts[:-1]:
        starts.append(starts[-1] + count)

    def run(j: int) -> Tensor:  # the tokens of square j
        return order[starts[j]:starts[j] + counts[j]]

    n = -(-reach // tile)  # squares a disc reaches beyond its own, each way
    groups = []
    for j in (j for j in range(rows * columns) if counts[j]):
        sy, sx = divmod(j, columns)
        keys = torch.cat([run(ky * columns + kx) for ky in range(max(0, sy - n), min(rows, sy + n + 1))
                          for kx in range(max(0, sx - n), min(columns, sx + n + 1))])
        groups.append((run(j), keys, _near(positions[run(j)], positions[keys], radius)))
    return SquarePlan(groups, torch.argsort(order))


@lru_cache(maxsize=2)  # a plan holds a boolean per (query, key read): ~150 MB for Kontext at 4K
def _cached_square_plan(grids: tuple[ImageGrid, ...], radius: float, tile: int, device: torch.device) -> SquarePlan:
    return square_plan(grids_positions(grids, device), radius, tile)


def tiled_positions_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, radius: float,
                              num_global: int = 0, extra_k: Tensor | None = None, extra_v: Tensor | None = None,
                              tile: int | None = None, grids: tuple[ImageGrid, ...] | None = None) -> Tensor:
    """Same result as `reference_positions_attention`; each square of queries attends to the global
    and pooled keys and to the image keys of the squares its discs can reach. With `grids` (the images
    as whole grids) the work list is cached: every layer and step of a sampling run shares it."""
    G, T = num_global, tile or default_tile(radius)
    plan = (_cached_square_plan(grids, float(radius), T, q.device) if grids is not None
            else square_plan(positions, radius, T))
    image_q, image_k, image_v = q[..., G:, :], k[..., G:, :], v[..., G:, :]
    shared_k = torch.cat([k[..., :G, :]] + ([extra_k] if extra_k is not None else []), dim=-2)
    shared_v = torch.cat([v[..., :G, :]] + ([extra_v] if extra_v is not None else []), dim=-2)
    outputs = []
    for queries, keys, near in plan.groups:
        seen = torch.cat([near.new_ones(len(queries), shared_k.shape[-2]), near], dim=1)
        # Additive and 4-D: lets PyTorch take its fused CPU kernel, not the math path (as tiled.py).
        mask = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill(~seen, float("-inf"))[None, None]
        outputs.append(F.scaled_dot_product_attention(
            image_q.index_select(-2, queries), torch.cat([shared_k, image_k.index_select(-2, keys)], dim=-2),
            torch.cat([shared_v, image_v.index_select(-2, keys)], dim=-2), attn_mask=mask))
    image_out = torch.cat(outputs, dim=-2).index_select(-2, plan.inverse)  # back to sequence order
    if not G:
        return image_out
    global_out = F.scaled_dot_product_attention(q[..., :G, :], k, v)  # global queries see every token
    return torch.cat([global_out, image_out], dim=-2)


def _flex_order(positions: Tensor) -> Tensor:
    """Image tokens sorted by 8 x 16 squares of the plane: a block of 128 is a compact region."""
    ty, tx = TILE
    y, x = positions[:, 0] - positions[:, 0].min(), positions[:, 1] - positions[:, 1].min()
    return torch.argsort((y // ty) * (int(x.max()) // tx + 1) + x // tx, stable=True)


def _flex_block_mask(positions: Tensor, radius: float, num_global: int, num_extra: int, device: torch.device):
    """The block mask over [global | image tokens in `_flex_order` | pooled], and that order."""
    from torch.nn.attention.flex_attention import create_block_mask

    G, N, E = num_global, positions.shape[0], num_extra
    order = _flex_order(positions).to(device)
    kind = torch.cat([torch.zeros(G), torch.ones(N), torch.full((E,), 2)]).long().to(device)  # global/image/pooled
    ys, xs = (F.pad(positions[:, axis].to(device).long()[order], (G, E)) for axis in (0, 1))
    r2 = radius * radius

    def mask_mod(b, h, qi, ki):
        near = (ys[qi] - ys[ki]) ** 2 + (xs[qi] - xs[ki]) ** 2 < r2
        image_query = (kind[qi] == 1) & ((kind[ki] != 1) | near)
        return image_query | ((kind[qi] == 0) & (kind[ki] != 2))

    n_q, n_kv = G + N, G + N + E
    return create_block_mask(mask_mod, None, None, n_q, n_kv, device=device, _compile=n_q * n_kv > 2**26), order


@lru_cache(maxsize=8)
def _cached_flex_block_mask(grids: tuple[ImageGrid, ...], radius: float, num_global: int, num_extra: int,
                            device: torch.device):
    return _flex_block_mask(grids_positions(grids, device), radius, num_global, num_extra, device)


def flex_positions_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, radius: float,
                             num_global: int = 0, extra_k: Tensor | None = None, extra_v: Tensor | None = None,
                             compile: bool | None = None, grids: tuple[ImageGrid, ...] | None = None) -> Tensor:
    """Same result as `reference_positions_attention` with flex_attention (block mask over tokens in
    `_flex_order`; cached per image layout with `grids`, as the one-grid flex backend caches its own).
    Compiled on CUDA by default; eager elsewhere (tests)."""
    from torch.nn.attention.flex_attention import flex_attention

    G, E = num_global, 0 if extra_k is None else extra_k.shape[-2]
    if grids is not None:
        block_mask, order = _cached_flex_block_mask(grids, float(radius), G, E, q.device)
    else:
        block_mask, order = _flex_block_mask(positions, radius, G, E, q.device)

    def to_flex(x: Tensor, extra: Tensor | None) -> Tensor:
        return torch.cat([x[..., :G, :], x[..., G:, :].index_select(-2, order)]
                         + ([extra] if extra is not None else []), dim=-2)

    attention = compiled_flex() if (q.is_cuda if compile is None else compile) else flex_attention
    out = attention(to_flex(q, None), to_flex(k, extra_k), to_flex(v, extra_v), block_mask=block_mask)
    image_out = out[..., G:, :].index_select(-2, torch.argsort(order))
    return torch.cat([out[..., :G, :], image_out], dim=-2)


def positions_local_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, radius: float,
                              num_global: int = 0, extra_k: Tensor | None = None, extra_v: Tensor | None = None,
                              backend: str = "auto", grids: tuple[ImageGrid, ...] | None = None) -> Tensor:
    """CLEAR local attention over (B, heads, G + N, d) tensors whose N image tokens lie at
    `positions` (N, 2) (rows, columns: integers, any order, several images may share the plane).
    `grids`, when every image is a whole grid in row-major order ((top, left, rows, columns) each, in
    sequence order: `positions` is then `grids_positions(grids)`), lets the tiled and flex backends
    reuse their work list and block mask across calls (every layer and step of a sampling run)."""
    check_positions(positions, num_global, q, k)
    if positions.dtype != torch.long:
        positions = positions.round().long()
    positions = positions.to(q.device)  # a no-op when the caller holds them there (the CLEAR processors)
    if backend == "auto":
        backend = "flex" if q.is_cuda else ("reference" if k.shape[-2] <= 1024 else "tiled")
    if backend == "reference":
        return reference_positions_attention(q, k, v, positions, radius, num_global, extra_k, extra_v)
    if backend == "tiled":
        return tiled_positions_attention(q, k, v, positions, radius, num_global, extra_k, extra_v, grids=grids)
    if backend == "flex":
        return flex_positions_attention(q, k, v, positions, radius, num_global, extra_k, extra_v, grids=grids)
    raise DitkitError(f"unknown clear backend {backend!r}: choose one of {', '.join(BACKENDS)}")
