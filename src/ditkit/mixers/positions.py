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


def _squares(positions: Tensor, side: int) -> Tensor:
    """The index of each position's side x side square of the plane (row-major over the squares)."""
    y, x = positions[:, 0] - positions[:, 0].min(), positions[:, 1] - positions[:, 1].min()
    columns = int(x.max()) // side + 1
    return (y // side) * columns + x // side


def tiled_positions_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, radius: float,
                              num_global: int = 0, extra_k: Tensor | None = None, extra_v: Tensor | None = None,
                              tile: int | None = None) -> Tensor:
    """Same result as `reference_positions_attention`; each square of queries attends to the global
    and pooled keys and to the image keys its discs can reach (the square grown by r - 1)."""
    G, T = num_global, tile or default_tile(radius)
    reach = math.ceil(radius) - 1
    image_q, image_k, image_v = q[..., G:, :], k[..., G:, :], v[..., G:, :]
    shared_k = torch.cat([k[..., :G, :]] + ([extra_k] if extra_k is not None else []), dim=-2)
    shared_v = torch.cat([v[..., :G, :]] + ([extra_v] if extra_v is not None else []), dim=-2)
    squares = _squares(positions, T)
    order = torch.argsort(squares, stable=True)
    counts = torch.bincount(squares[order]).tolist()
    ys, xs = positions[:, 0], positions[:, 1]
    outputs = []
    for queries in torch.split(order, counts):
        if not len(queries):
            continue
        qy, qx = ys[queries], xs[queries]
        keys = torch.nonzero((ys >= qy.min() - reach) & (ys <= qy.max() + reach)
                             & (xs >= qx.min() - reach) & (xs <= qx.max() + reach)).squeeze(1)
        seen = torch.cat([torch.ones(len(queries), shared_k.shape[-2], dtype=torch.bool, device=q.device),
                          _near(positions[queries], positions[keys], radius)], dim=1)
        # Additive and 4-D: lets PyTorch take its fused CPU kernel, not the math path (as tiled.py).
        mask = torch.zeros(seen.shape, dtype=q.dtype, device=q.device).masked_fill(~seen, float("-inf"))[None, None]
        outputs.append(F.scaled_dot_product_attention(
            image_q.index_select(-2, queries), torch.cat([shared_k, image_k.index_select(-2, keys)], dim=-2),
            torch.cat([shared_v, image_v.index_select(-2, keys)], dim=-2), attn_mask=mask))
    image_out = torch.cat(outputs, dim=-2).index_select(-2, torch.argsort(order))  # back to sequence order
    if not G:
        return image_out
    global_out = F.scaled_dot_product_attention(q[..., :G, :], k, v)  # global queries see every token
    return torch.cat([global_out, image_out], dim=-2)


def flex_positions_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, radius: float,
                             num_global: int = 0, extra_k: Tensor | None = None, extra_v: Tensor | None = None,
                             compile: bool | None = None) -> Tensor:
    """Same result as `reference_positions_attention` with flex_attention: the image tokens sorted by
    8 x 16 squares of the plane, so that a block of 128 queries is a compact region whose discs
    touch few key blocks. Compiled on CUDA by default; eager elsewhere (tests)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    G, N = num_global, positions.shape[0]
    E = 0 if extra_k is None else extra_k.shape[-2]
    ty, tx = TILE
    y, x = positions[:, 0] - positions[:, 0].min(), positions[:, 1] - positions[:, 1].min()
    order = torch.argsort((y // ty) * (int(x.max()) // tx + 1) + x // tx, stable=True)
    sorted_positions = positions[order].to(q.device)
    kind = torch.cat([torch.zeros(G), torch.ones(N), torch.full((E,), 2)]).long().to(q.device)  # global/image/pooled
    ys = torch.cat([torch.zeros(G, dtype=torch.long, device=q.device), sorted_positions[:, 0].long(),
                    torch.zeros(E, dtype=torch.long, device=q.device)])
    xs = torch.cat([torch.zeros(G, dtype=torch.long, device=q.device), sorted_positions[:, 1].long(),
                    torch.zeros(E, dtype=torch.long, device=q.device)])
    r2 = radius * radius

    def mask_mod(b, h, qi, ki):
        near = (ys[qi] - ys[ki]) ** 2 + (xs[qi] - xs[ki]) ** 2 < r2
        image_query = (kind[qi] == 1) & ((kind[ki] != 1) | near)
        return image_query | ((kind[qi] == 0) & (kind[ki] != 2))

    n_q, n_kv = G + N, G + N + E
    block_mask = create_block_mask(mask_mod, None, None, n_q, n_kv, device=q.device, _compile=n_q * n_kv > 2**26)
    gather = order.to(q.device)

    def to_flex(x: Tensor, extra: Tensor | None) -> Tensor:
        return torch.cat([x[..., :G, :], x[..., G:, :].index_select(-2, gather)]
                         + ([extra] if extra is not None else []), dim=-2)

    attention = compiled_flex() if (q.is_cuda if compile is None else compile) else flex_attention
    out = attention(to_flex(q, None), to_flex(k, extra_k), to_flex(v, extra_v), block_mask=block_mask)
    image_out = out[..., G:, :].index_select(-2, torch.argsort(gather))
    return torch.cat([out[..., :G, :], image_out], dim=-2)


def positions_local_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, radius: float,
                              num_global: int = 0, extra_k: Tensor | None = None, extra_v: Tensor | None = None,
                              backend: str = "auto") -> Tensor:
    """CLEAR local attention over (B, heads, G + N, d) tensors whose N image tokens lie at
    `positions` (N, 2) (rows, columns: integers, any order, several images may share the plane)."""
    check_positions(positions, num_global, q, k)
    positions = positions.round().long().to(q.device)
    if backend == "auto":
        backend = "flex" if q.is_cuda else ("reference" if k.shape[-2] <= 1024 else "tiled")
    if backend == "reference":
        return reference_positions_attention(q, k, v, positions, radius, num_global, extra_k, extra_v)
    if backend == "tiled":
        return tiled_positions_attention(q, k, v, positions, radius, num_global, extra_k, extra_v)
    if backend == "flex":
        return flex_positions_attention(q, k, v, positions, radius, num_global, extra_k, extra_v)
    raise DitkitError(f"unknown clear backend {backend!r}: choose one of {', '.join(BACKENDS)}")
