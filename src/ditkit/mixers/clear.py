"""`clear`: CLEAR's convolution-like local attention (arXiv 2412.16112).

An image query at (qy, qx) sees the image keys with (qy-ky)^2 + (qx-kx)^2 < r^2: a disc of
radius r tokens, cut at the image borders (no padding, wrap or shift). Global tokens (text,
registers; first in the sequence) are seen by every query, and global queries see every token.
With `down_factor` f > 0, keys and values are also pooled over f x f blocks with learnable
weights (initialised 1/f^2) and the pooled tokens are seen by every image query, not by global
ones.

Backends, chosen by `backend` ("auto" picks by device and size):
  reference  dense boolean mask + scaled_dot_product_attention (N x N: tests and tiny inputs)
  tiled      2-D query tiles attend to their tile plus a halo of r-1 tokens: cost grows with N
  flex       torch flex_attention with a block mask over tile-ordered tokens (CUDA)

On one strip of rows (patch-parallel sampling, `strip_local_attention`) a query reads only its
strip plus `halo(r)` rows from the neighbours: every owned query's disc lies inside that region and
the region ends where the disc cannot reach, so the result is exactly whole-grid attention. The
pooled tokens (down_factor) are partial sums per strip, all-reduced. Global (text) tokens are whole
on every strip; their queries see every image token, so each strip attends them to its own rows and
the partial softmaxes are merged exactly by their log-sum-exps (`global_attention_of_strips`).
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import DitkitError
from .base import AttentionMixer, Grid
from .flex import flex_local_attention
from .registry import register_mixer
from .strip import Strip, halo, rows_needed
from .tiled import tiled_local_attention

BACKENDS = ("auto", "reference", "tiled", "flex")


def disc_size(radius: float) -> int:
    """Lattice points strictly inside the disc: keys per interior query (193 for r=8)."""
    h = math.ceil(radius) - 1
    return sum(1 for dy in range(-h, h + 1) for dx in range(-h, h + 1) if dy * dy + dx * dx < radius * radius)


def local_pairs(grid: Grid, radius: float, key_grid: Grid | None = None) -> int:
    """(query, key) image-token pairs inside the disc over a whole grid, borders cut: attention work
    of `clear` relative to the H*W * H*W pairs of full attention. With `key_grid`, the pairs between
    the queries of `grid` and the keys of another image on the same position plane (both from (0, 0),
    as FLUX Kontext's context image: `ditkit.mixers.positions`)."""
    (H, W), (Hk, Wk) = grid, key_grid or grid
    h = math.ceil(radius) - 1

    def overlap(queries: int, keys: int, shift: int) -> int:  # q in [0, queries) with q + shift in [0, keys)
        return max(0, min(queries, keys - shift) - max(0, -shift))

    return sum(overlap(H, Hk, dy) * overlap(W, Wk, dx) for dy in range(-h, h + 1) for dx in range(-h, h + 1)
               if dy * dy + dx * dx < radius * radius)


Rows = tuple[int, int]  # [start, stop) rows of a grid, as in `local_attention(query_rows=...)`


@lru_cache(maxsize=16)
def _reference_mask(grid: Grid, radius: float, num_global: int, num_extra: int, device: torch.device,
                    query_rows: Rows | None = None) -> Tensor:
    """(G + queries, G + H*W + extra) boolean mask; the image queries are rows [a, b) of `grid`."""
    H, W = grid
    a, b = query_rows or (0, H)
    ys, xs = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    qys, qxs = ys[a * W:b * W], xs[a * W:b * W]
    local = (qys[:, None] - ys[None]) ** 2 + (qxs[:, None] - xs[None]) ** 2 < radius * radius
    G, N = num_global, H * W
    mask = torch.ones(G + len(qys), G + N + num_extra, dtype=torch.bool, device=device)
    mask[G:, G:G + N] = local
    mask[:G, G + N:] = False  # global queries do not see pooled tokens
    return mask


def reference_local_attention(q: Tensor, k: Tensor, v: Tensor, grid: Grid, radius: float, num_global: int = 0,
                              extra_k: Tensor | None = None, extra_v: Tensor | None = None,
                              query_rows: Rows | None = None) -> Tensor:
    """The definition, written densely: builds an N x N mask (queries x N with `query_rows`). For
    tests and tiny inputs."""
    num_extra = 0 if extra_k is None else extra_k.shape[-2]
    if num_extra:
        k, v = torch.cat([k, extra_k], dim=-2), torch.cat([v, extra_v], dim=-2)
    rows = None if query_rows is None else tuple(query_rows)
    mask = _reference_mask(tuple(grid), float(radius), num_global, num_extra, q.device, rows)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def check_query_rows(query_rows: Rows, grid: Grid, num_global: int, q: Tensor, k: Tensor) -> None:
    """One-line refusals for a band of query rows that does not fit the grid or the tensors."""
    (a, b), (H, W) = query_rows, grid
    if not 0 <= a < b <= H:
        raise DitkitError(f"clear query_rows {query_rows} must satisfy 0 <= a < b <= {H} (the grid's rows): "
                          "pass a non-empty band of the grid, or None for every row")
    if q.shape[-2] != num_global + (b - a) * W or k.shape[-2] != num_global + H * W:
        raise DitkitError(f"clear query_rows {query_rows} on a {H}x{W} grid needs q with {num_global} + "
                          f"{(b - a) * W} tokens and k, v with {num_global} + {H * W}, got {q.shape[-2]} and "
                          f"{k.shape[-2]}: pass the band's queries and the whole grid's keys")


def local_attention(q: Tensor, k: Tensor, v: Tensor, grid: Grid, radius: float, num_global: int = 0,
                    extra_k: Tensor | None = None, extra_v: Tensor | None = None, backend: str = "auto",
                    query_rows: Rows | None = None) -> Tensor:
    """CLEAR local attention over (B, heads, G + H*W, d) tensors, by the chosen backend.

    query_rows=(a, b): q holds the G global queries, then only the image queries of rows [a, b) of
    `grid` (row-major), while k and v still hold G + H*W tokens; the output has q's shape and equals
    those rows of the whole-grid result. Every backend then computes only those queries (a strip
    attends from its own rows, reading its neighbours' rows as keys).

    "auto": flex on CUDA, the dense reference for tiny inputs (<= 1024 keys), tiled otherwise.
    """
    if query_rows is not None:
        query_rows = tuple(query_rows)
        check_query_rows(query_rows, grid, num_global, q, k)
    if backend == "auto":
        if q.is_cuda:
            backend = "flex"
        else:
            backend = "reference" if k.shape[-2] <= 1024 else "tiled"
    if backend == "reference":
        return reference_local_attention(q, k, v, grid, radius, num_global, extra_k, extra_v, query_rows)
    if backend == "tiled":
        return tiled_local_attention(q, k, v, grid, radius, num_global, extra_k, extra_v, query_rows=query_rows)
    if backend == "flex":
        return flex_local_attention(q, k, v, grid, radius, num_global, extra_k, extra_v, query_rows=query_rows)
    raise DitkitError(f"unknown clear backend {backend!r}: choose one of {', '.join(BACKENDS)}")


def pool_tokens(x: Tensor, grid: Grid, num_global: int, weight: Tensor) -> Tensor:
    """(B, heads, G + H*W, d) -> (B, heads, H/f * W/f, d): image tokens pooled over f x f blocks with
    one learnable weight per block position (`weight` holds f*f values)."""
    f, (H, W) = math.isqrt(weight.numel()), grid
    check_poolable(grid, f)
    B, nh, _, d = x.shape
    blocks = x[:, :, num_global:].reshape(B, nh, H // f, f, W // f, f, d)
    weights = weight.view(1, 1, 1, f, 1, f, 1).to(x.dtype)
    return (blocks * weights).sum(dim=(3, 5)).reshape(B, nh, (H // f) * (W // f), d)


def check_poolable(grid: Grid, down_factor: int) -> None:
    if grid[0] % down_factor or grid[1] % down_factor:
        raise DitkitError(f"clear down_factor {down_factor} needs a token grid divisible by {down_factor}, got "
                          f"{grid[0]}x{grid[1]}: use a resolution whose token grid is a multiple of "
                          f"{down_factor}, or down_factor=0")


def pooled_tokens_of_strip(kv: Tensor, strip: Strip, weight: Tensor) -> Tensor:
    """The f x f pooled tokens of the whole grid from (..., B, heads, strip tokens, d): each strip
    pools the blocks it touches (rows of other strips as zeros), and the partial sums add up over
    the strips."""
    f, (H, W), (start, stop) = math.isqrt(weight.numel()), strip.grid, strip.rows
    check_poolable(strip.grid, f)
    lo, hi = start // f * f, -(-stop // f) * f  # the block rows this strip touches
    span = kv.new_zeros(*kv.shape[:-2], (hi - lo) * W, kv.shape[-1])
    span[..., (start - lo) * W:(stop - lo) * W, :] = kv
    partial = pool_tokens(span.flatten(0, 1), (hi - lo, W), 0, weight)
    pooled = kv.new_zeros(*kv.shape[:3], (H // f) * (W // f), kv.shape[-1])
    pooled[..., lo // f * (W // f):hi // f * (W // f), :] = partial.view(*kv.shape[:3], -1, kv.shape[-1])
    return strip.all_reduce(pooled)


def strip_local_attention(q: Tensor, k: Tensor, v: Tensor, strip: Strip, radius: float, num_global: int = 0,
                          pool_weight: Tensor | None = None, backend: str = "auto") -> Tensor:
    """CLEAR on one strip: (B, heads, G + strip tokens, d), the G global tokens first and whole on
    every strip -> the same shape, equal to those rows of `local_attention` over the whole grid.

    Image queries read the global tokens, this strip's rows plus the rows their discs reach
    (`halo(r)` from the neighbours, point to point; every row with kv_exchange "allgather") and the
    pooled tokens (partial sums all-reduced). The neighbours' rows enter as keys and values only: the
    call's queries are this strip's rows (`query_rows`), so no attention is computed for rows another
    strip owns. Global queries see every image token (not the pooled ones): attended directly when
    every strip's region is the whole grid, else merged across strips."""
    G, W = num_global, strip.grid[1]
    reach = halo(radius, strip.grid) if strip.kv_exchange == "halo" else strip.grid[0]
    image_kv = torch.stack([k[..., G:, :], v[..., G:, :]])
    region_k, region_v = strip.exchange_halo(image_kv, reach)
    first, last = rows_needed(strip.bounds, strip.rank, reach)
    # Image queries see the global keys as they see the pooled ones (every image query, no disc), so
    # both go in as extra keys and the call computes image queries only: the global queries' own
    # attention is computed once, below, not also over this strip's region.
    extra_k, extra_v = k[..., :G, :], v[..., :G, :]
    if pool_weight is not None:
        pooled_k, pooled_v = pooled_tokens_of_strip(image_kv, strip, pool_weight)
        extra_k, extra_v = torch.cat([extra_k, pooled_k], dim=-2), torch.cat([extra_v, pooled_v], dim=-2)
    own_rows = (strip.rows[0] - first, strip.rows[1] - first)
    image_out = local_attention(q[..., G:, :], region_k, region_v, (last - first, W), radius, 0,
                                extra_k if extra_k.shape[-2] else None, extra_v if extra_v.shape[-2] else None,
                                backend, own_rows)
    if not G:
        return image_out
    if every_strip_reads_every_row(strip, reach):  # the region is the whole grid: attend it directly
        global_out = F.scaled_dot_product_attention(q[..., :G, :], torch.cat([k[..., :G, :], region_k], dim=-2),
                                                    torch.cat([v[..., :G, :], region_v], dim=-2))
    else:
        global_out = global_attention_of_strips(q[..., :G, :], k, v, image_kv, strip)
    return torch.cat([global_out, image_out], dim=-2)


def every_strip_reads_every_row(strip: Strip, reach: int) -> bool:
    """Whether every strip's region is the whole grid: then global queries need no merge. Decided
    for all strips alike, since the merge is a collective every strip must join."""
    return all(rows_needed(strip.bounds, rank, reach) == (0, strip.grid[0]) for rank in range(len(strip.bounds)))


# Bytes of float32 scores the global queries' partial attention holds at once (chunks of queries).
GLOBAL_SCORES_BUDGET = 256 * 2**20


def global_attention_of_strips(q: Tensor, k: Tensor, v: Tensor, image_kv: Tensor, strip: Strip) -> Tensor:
    """Global queries (B, heads, G, d) over every token of every strip, without moving image keys.

    Each strip scores its own image keys (the first strip also the global keys, which all strips
    hold) and keeps its partial output o_s and log-sum-exp l_s; with m = max_s l_s, the exact
    softmax over all keys is sum_s e^(l_s - m) o_s / sum_s e^(l_s - m). That moves G x (d + 2)
    values per head and strip (a max and one sum) instead of every strip's image keys and values.
    Computed in float32: the merge is exact to rounding at any dtype of the inputs. The scores are
    made for a chunk of queries at a time (GLOBAL_SCORES_BUDGET): FLUX at 8K px on 8 processes
    would otherwise hold 512 text x 32,768 strip tokens x 24 heads of them (1.6 GB) per layer."""
    G = q.shape[-2]
    keys, values = image_kv[0], image_kv[1]
    if strip.rank == 0:
        keys, values = torch.cat([k[..., :G, :], keys], dim=-2), torch.cat([v[..., :G, :], values], dim=-2)
    keys, values = keys.float(), values.float()
    per_query = 4 * keys.shape[-2] * math.prod(q.shape[:-2])
    chunk = max(1, GLOBAL_SCORES_BUDGET // per_query)
    partials = [_partial_attention(part, keys, values) for part in q.float().split(chunk, dim=-2)]
    partial, lse = (torch.cat(parts, dim=-2) for parts in zip(*partials, strict=True))
    weight = torch.exp(lse - strip.all_reduce_max(lse))
    merged = strip.all_reduce(torch.cat([partial * weight, weight], dim=-1))
    return (merged[..., :-1] / merged[..., -1:]).to(q.dtype)


def _partial_attention(q: Tensor, keys: Tensor, values: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax attention of q over these keys only, and the log-sum-exp of its scores (float32)."""
    scores = (q * q.shape[-1] ** -0.5) @ keys.transpose(-1, -2)
    lse = scores.logsumexp(dim=-1, keepdim=True)
    return torch.exp(scores - lse) @ values, lse


def check_clear_options(radius: float, down_factor: int, backend: str) -> None:
    if radius < 1:
        raise DitkitError(f"clear radius must be at least 1 token, got {radius}")
    if backend not in BACKENDS:
        raise DitkitError(f"unknown clear backend {backend!r}: choose one of {', '.join(BACKENDS)}")
    if down_factor < 0 or down_factor == 1:
        raise DitkitError(f"clear down_factor must be 0 (off) or >= 2, got {down_factor}")


def initial_pool_weight(down_factor: int) -> nn.Parameter:
    """One learnable weight per position in the f x f block, initialised to plain averaging."""
    return nn.Parameter(torch.full((down_factor * down_factor,), 1.0 / down_factor**2))


def initial_added_parameters(model: nn.Module) -> dict[str, Tensor]:
    """The parameters CLEAR adds to a model it switches, by name, at their initial values: the
    pooling weights of every CLEAR mixer or processor with a `down_factor` (both keep theirs as
    `pool_weight`). A teacher's weights file cannot hold them; a student loaded onto the meta
    device (sharded distillation) takes them from here."""
    with torch.device("cpu"):  # real values, even when called inside a meta-device context
        return {f"{path}.pool_weight" if path else "pool_weight": initial_pool_weight(m.down_factor).detach()
                for path, m in model.named_modules()
                if getattr(m, "down_factor", 0) and isinstance(getattr(m, "pool_weight", None), nn.Parameter)}


@register_mixer("clear")
class ClearAttention(AttentionMixer):
    """CLEAR local attention with DiT's projections: a drop-in replacement for `full`."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, radius: float = 8, down_factor: int = 0,
                 backend: str = "auto"):
        super().__init__(dim, num_heads, qkv_bias)
        check_clear_options(radius, down_factor, backend)
        self.radius, self.down_factor, self.backend = radius, down_factor, backend
        if down_factor:
            self.pool_weight = initial_pool_weight(down_factor)

    @classmethod
    def check_options(cls, radius: float = 8, down_factor: int = 0, backend: str = "auto", **_) -> None:
        check_clear_options(radius, down_factor, backend)

    @classmethod
    def grid_multiple(cls, down_factor: int = 0, **_) -> int:
        return max(1, down_factor)

    def attention_work(self, grid: Grid) -> float:
        """The disc's pairs (borders cut) over all pairs; pooled tokens add (H*W)^2 / f^2 / (H*W)^2."""
        tokens = grid[0] * grid[1]
        pooled = tokens / self.down_factor**2 if self.down_factor else 0
        return (local_pairs(grid, self.radius) + tokens * pooled) / tokens**2

    def pool(self, x: Tensor, grid: Grid, num_global: int) -> Tensor:
        return pool_tokens(x, grid, num_global, self.pool_weight)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, grid: Grid, num_global: int) -> Tensor:
        extra_k = extra_v = None
        if self.down_factor:
            extra_k, extra_v = self.pool(k, grid, num_global), self.pool(v, grid, num_global)
        return local_attention(q, k, v, grid, self.radius, num_global, extra_k, extra_v, self.backend)

    def forward_strip(self, x: Tensor, strip: Strip) -> Tensor:
        """Local attention over this strip plus the rows its discs reach (`strip_local_attention`)."""
        q, k, v = self.split_heads(x, strip.grid)
        pool_weight = self.pool_weight if self.down_factor else None
        return self.merge_heads(strip_local_attention(q, k, v, strip, self.radius, 0, pool_weight, self.backend))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, radius={self.radius}, down_factor={self.down_factor}, backend={self.backend}"
