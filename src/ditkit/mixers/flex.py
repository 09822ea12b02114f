"""Local attention with torch's flex_attention and a BlockMask (what the CLEAR authors use).

flex skips whole 128 x 128 blocks of (query, key) pairs that the mask leaves empty. With
row-major tokens a block of 128 queries is a thin strip of the image, whose discs touch many
key blocks (at r=8 and 2048 px, 17% of blocks computed where ~1% is needed). Ordering the tokens
in 2-D tiles of 8 x 16 (one tile per block) makes the blocks compact, so far fewer are touched.
`order="rows"` keeps the authors' row-major layout, for comparison.

Sequence seen by flex: [global tokens | image tokens in block order, padded | pooled tokens].
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
    if order == "rows":
        return torch.arange(H * W), H * W
    ty, tx = TILE
    Hp, Wp = math.ceil(H / ty) * ty, math.ceil(W / tx) * tx
    ys, xs = torch.meshgrid(torch.arange(Hp), torch.arange(Wp), indexing="ij")
    tiled = lambda a: a.reshape(Hp // ty, ty, Wp // tx, tx).transpose(1, 2).flatten()  # noqa: E731
    ys, xs = tiled(ys), tiled(xs)
    index = torch.where((ys < H) & (xs < W), ys * W + xs, -1)
    return index, Hp * Wp


@lru_cache(maxsize=16)
def _block_mask(grid: Grid, radius: float, num_global: int, num_extra: int, order: str, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    H, W = grid
    index, n_image = image_order(grid, order)
    G, E = num_global, num_extra
    # Per sequence position: kind (0 global, 1 image, 2 padding, 3 pooled) and image coordinates.
    kind = torch.cat([torch.zeros(G), torch.where(index >= 0, 1, 2), torch.full((E,), 3)]).long().to(device)
    safe = index.clamp(min=0)
    ys = torch.cat([torch.zeros(G), safe // W, torch.zeros(E)]).long().to(device)
    xs = torch.cat([torch.zeros(G), safe % W, torch.zeros(E)]).long().to(device)
    r2 = radius * radius

    def mask_mod(b, h, q, k):
        q_kind, k_kind = kind[q], kind[k]
        near = (ys[q] - ys[k]) ** 2 + (xs[q] - xs[k]) ** 2 < r2
        image_query = (q_kind == 1) & ((k_kind == 0) | (k_kind == 3) | ((k_kind == 1) & near))
        global_query = (q_kind == 0) & ((k_kind == 0) | (k_kind == 1))
        padding_query = (q_kind == 2) & (k == q)  # sees itself only: no empty rows
        return image_query | global_query | padding_query

    n_q = G + n_image
    return create_block_mask(mask_mod, None, None, n_q, n_q + E, device=device, BLOCK_SIZE=BLOCK,
                             _compile=n_q * (n_q + E) > 2**26), index.to(device)


@lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_local_attention(q: Tensor, k: Tensor, v: Tensor, grid: Grid, radius: float, num_global: int = 0,
                         extra_k: Tensor | None = None, extra_v: Tensor | None = None, order: str = "tiles",
                         compile: bool | None = None) -> Tensor:
    """Same result as `reference_local_attention`. Compiled on CUDA by default; eager elsewhere
    (the eager fallback materialises all scores: for tests only)."""
    from torch.nn.attention.flex_attention import flex_attention

    G, E = num_global, 0 if extra_k is None else extra_k.shape[-2]
    block_mask, index = _block_mask(tuple(grid), float(radius), G, E, order, q.device)
    gather = index.clamp(min=0)

    def to_flex(x: Tensor, extra: Tensor | None) -> Tensor:
        parts = [x[:, :, :G], x[:, :, G:].index_select(2, gather)]
        return torch.cat(parts + ([extra] if extra is not None else []), dim=2)

    attention = _compiled_flex() if (q.is_cuda if compile is None else compile) else flex_attention
    out = attention(to_flex(q, None), to_flex(k, extra_k), to_flex(v, extra_v), block_mask=block_mask)
    # Back to row-major: each image token appears once at a non-padding position.
    positions = torch.nonzero(index >= 0).squeeze(1)
    image_out = torch.empty_like(q[:, :, G:]).index_copy(2, index[positions], out[:, :, G:].index_select(2, positions))
    return torch.cat([out[:, :, :G], image_out], dim=2)


def block_density(grid: Grid, radius: float, order: str = "tiles") -> float:
    """Fraction of 128 x 128 blocks that flex computes for an image-only sequence."""
    block_mask, _ = _block_mask(tuple(grid), float(radius), 0, 0, order, torch.device("cpu"))
    n = math.ceil(block_mask.shape[-2] / BLOCK) * math.ceil(block_mask.shape[-1] / BLOCK)
    computed = block_mask.kv_num_blocks.sum() + (block_mask.full_kv_num_blocks.sum()
                                                 if block_mask.full_kv_num_blocks is not None else 0)
    return float(computed) / n
