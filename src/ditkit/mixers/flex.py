"""Local attention with torch's flex_attention and a BlockMask (what the CLEAR authors use).

flex skips whole 128 x 128 blocks of (query, key) pairs that the mask leaves empty. With
row-major tokens a block of 128 queries is a thin strip of the image, whose discs touch many
key blocks (at r=8 and 2048 px, 17% of blocks computed where ~1% is needed). Ordering the tokens
in 2-D tiles of 8 x 16 (one tile per block) makes the blocks compact, so far fewer are touched.
`order="rows"` keeps the authors' row-major layout, for comparison.

Sequence seen by flex: [global tokens | image tokens in block order, padded | pooled tokens].
With `query_rows=(a, b)` the query sequence holds only rows [a, b) (tiles starting at row a) and
the key sequence every row: the block mask is Q_LEN x KV_LEN, so no block of other rows' queries
exists to compute. A padding query takes the coordinates of the nearest image query of its tile
(clamped into the band and the grid): it sees only keys that an image query of its tile sees (no
block of its own, unlike a query seeing itself at another position), and its row is never empty.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
from torch import Tensor

from .base import Grid

BLOCK = 128
TILE = (8, 16)  # rows x columns of image tokens per 128-token block


def image_order(grid: Grid, order: str) -> tuple[Tensor, int]:
    """Row-major index of the image token at each position of the flex sequence (-1 = padding),
    and the padded image length."""
    H, W = grid
    ys, xs = image_coordinates(grid, order)
    index = torch.where((ys < H) & (xs < W), ys * W + xs, -1)
    return index, len(index)


def _sequence(grid: Grid, order: str, num_global: int, num_extra: int, rows: tuple[int, int], device):
    """Per position of a flex sequence holding image rows [a, b): the row-major index of its image
    token among those rows (-1 = padding), its kind (0 global, 1 image, 2 padding, 3 pooled) and the image
    coordinates (padding clamped to the nearest image token of its tile)."""
    (a, b), W = rows, grid[1]
    index, _ = image_order((b - a, W), order)
    ys, xs = image_coordinates((b - a, W), order)
    G, E = num_global, num_extra
    kind = torch.cat([torch.zeros(G), torch.where(index >= 0, 1, 2), torch.full((E,), 3)]).long().to(device)
    ys = torch.cat([torch.zeros(G), ys.clamp(max=b - a - 1) + a, torch.zeros(E)]).long().to(device)
    xs = torch.cat([torch.zeros(G), xs.clamp(max=W - 1), torch.zeros(E)]).long().to(device)
    return index.to(device), kind, ys, xs


def image_coordinates(grid: Grid, order: str) -> tuple[Tensor, Tensor]:
    """(row, column) of each position of `image_order(grid, order)`, padding positions included."""
    H, W = grid
    if order == "rows":
        return torch.arange(H * W) // W, torch.arange(H * W) % W
    ty, tx = TILE
    Hp, Wp = math.ceil(H / ty) * ty, math.ceil(W / tx) * tx
    ys, xs = torch.meshgrid(torch.arange(Hp), torch.arange(Wp), indexing="ij")
    tiled = lambda a: a.reshape(Hp // ty, ty, Wp // tx, tx).transpose(1, 2).flatten()  # noqa: E731
    return tiled(ys), tiled(xs)


@lru_cache(maxsize=16)
def _block_mask(grid: Grid, radius: float, num_global: int, num_extra: int, order: str, device: torch.device,
                query_rows: tuple[int, int] | None = None):
    """The block mask, and the image index of each image query position (among rows [a, b)) and of
    each image key position (-1 = padding)."""
    from torch.nn.attention.flex_attention import create_block_mask

    G, E, r2 = num_global, num_extra, radius * radius
    q_index, q_kind, q_ys, q_xs = _sequence(grid, order, G, 0, query_rows or (0, grid[0]), device)
    k_index, k_kind, k_ys, k_xs = _sequence(grid, order, G, E, (0, grid[0]), device)

    def mask_mod(b, h, q, k):
        near = (q_ys[q] - k_ys[k]) ** 2 + (q_xs[q] - k_xs[k]) ** 2 < r2
        # A padding query sees what the image query at its clamped coordinates sees: no empty rows.
        image_query = (q_kind[q] >= 1) & ((k_kind[k] == 0) | (k_kind[k] == 3) | ((k_kind[k] == 1) & near))
        global_query = (q_kind[q] == 0) & ((k_kind[k] == 0) | (k_kind[k] == 1))
        return image_query | global_query

    n_q, n_kv = len(q_kind), len(k_kind)
    block_mask = create_block_mask(mask_mod, None, None, n_q, n_kv, device=device, BLOCK_SIZE=BLOCK,
                                   _compile=n_q * n_kv > 2**26)
    return block_mask, q_index, k_index


@lru_cache(maxsize=1)
def compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_local_attention(q: Tensor, k: Tensor, v: Tensor, grid: Grid, radius: float, num_global: int = 0,
                         extra_k: Tensor | None = None, extra_v: Tensor | None = None, order: str = "tiles",
                         compile: bool | None = None, query_rows: tuple[int, int] | None = None) -> Tensor:
    """Same result as `reference_local_attention`, q optionally holding the image queries of rows
    [a, b) only (`query_rows`, see `clear.local_attention`). Compiled on CUDA by default; eager
    elsewhere (the eager fallback materialises all scores: for tests only)."""
    from torch.nn.attention.flex_attention import flex_attention

    G, E = num_global, 0 if extra_k is None else extra_k.shape[-2]
    rows = None if query_rows is None else tuple(query_rows)
    block_mask, q_index, k_index = _block_mask(tuple(grid), float(radius), G, E, order, q.device, rows)
    q_gather = q_index.clamp(min=0)

    def to_flex(x: Tensor, gather: Tensor, extra: Tensor | None) -> Tensor:
        parts = [x[:, :, :G], x[:, :, G:].index_select(2, gather)]
        return torch.cat(parts + ([extra] if extra is not None else []), dim=2)

    k_gather = k_index.clamp(min=0)
    attention = compiled_flex() if (q.is_cuda if compile is None else compile) else flex_attention
    out = attention(to_flex(q, q_gather, None), to_flex(k, k_gather, extra_k), to_flex(v, k_gather, extra_v),
                    block_mask=block_mask)
    # Back to row-major: each image query appears once at a non-padding position.
    positions = torch.nonzero(q_index >= 0).squeeze(1)
    image_out = torch.empty_like(q[:, :, G:]).index_copy(2, q_index[positions],
                                                         out[:, :, G:].index_select(2, positions))
    return torch.cat([out[:, :, :G], image_out], dim=2)


def block_density(grid: Grid, radius: float, order: str = "tiles", query_rows: tuple[int, int] | None = None) -> float:
    """Fraction of 128 x 128 blocks that flex computes for an image-only sequence (of the whole
    grid's query blocks times key blocks, also with `query_rows`)."""
    block_mask, _, _ = _block_mask(tuple(grid), float(radius), 0, 0, order, torch.device("cpu"), query_rows)
    whole, _, _ = _block_mask(tuple(grid), float(radius), 0, 0, order, torch.device("cpu"))
    n = math.ceil(whole.shape[-2] / BLOCK) * math.ceil(whole.shape[-1] / BLOCK)
    computed = block_mask.kv_num_blocks.sum() + (block_mask.full_kv_num_blocks.sum()
                                                 if block_mask.full_kv_num_blocks is not None else 0)
    return float(computed) / n
