"""`local_attention(query_rows=(a, b))`: queries for a band of rows only, keys of the whole grid.

Every backend must equal rows [a, b) (and the global queries) of the whole-grid reference, forward
and backward, and must compute attention for the band's queries alone: a strip's neighbour rows
are keys, not discarded queries.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from ditkit import DitkitError
from ditkit.distributed.strips import strip_bounds
from ditkit.mixers import clear
from ditkit.mixers.clear import local_attention, pool_tokens, reference_local_attention, strip_local_attention
from ditkit.mixers.flex import block_density, flex_local_attention
from ditkit.mixers.tiled import tiled_local_attention
from thread_strips import on_thread_strips

BANDS = [  # (H, W, radius, global tokens, pooled tokens, tile, query rows)
    (12, 12, 3, 0, 0, 4, (0, 4)),  # top, a whole tile row
    (12, 12, 3, 0, 0, 4, (5, 9)),  # middle, not aligned to the tiles of the whole grid
    (10, 13, 3, 2, 0, 4, (7, 10)),  # bottom, non-square, not a multiple of the tile
    (11, 6, 4, 5, 0, 8, (6, 7)),  # a single row, shorter than the halo (3)
    (16, 16, 5, 3, 16, 8, (3, 5)),  # global and pooled tokens, band shorter than the halo (4)
    (16, 16, 5, 3, 16, 8, (0, 16)),  # the whole grid
    (5, 17, 2.5, 1, 0, 3, (1, 4)),  # fractional radius, the tile cuts the band's last row
    (9, 7, 20, 0, 0, None, (2, 8)),  # radius larger than the grid: the band reads every row
    (30, 9, 4, 1, 0, 4, (11, 18)),  # the key map's rows all inside the grid: no padding rows
]
BAND_IDS = [f"{H}x{W}-r{r}-G{G}-E{E}-rows{a}:{b}" for H, W, r, G, E, _, (a, b) in BANDS]


def band_inputs(H, W, G, E, rows, requires_grad=True):
    """Whole-grid leaves q, k, v (and pooled keys/values), and the band's queries cut from q."""
    g = torch.Generator().manual_seed(H * 100 + W + rows[0])
    q, k, v = (torch.randn(2, 3, G + H * W, 16, generator=g).requires_grad_(requires_grad) for _ in range(3))
    extra = [torch.randn(2, 3, E, 16, generator=g).requires_grad_(requires_grad) for _ in range(2 if E else 0)]
    return q, k, v, *(extra or [None, None]), band(q, G, W, rows)


def band(x, G, W, rows):
    """The global tokens and the image tokens of rows [a, b) of a (..., G + H*W, d) tensor."""
    a, b = rows
    return torch.cat([x[..., :G, :], x[..., G + a * W:G + b * W, :]], dim=-2)


def run_backend(backend, qb, k, v, grid, radius, G, ek, ev, tile, rows):
    if backend == "tiled":
        return tiled_local_attention(qb, k, v, grid, radius, G, ek, ev, tile=tile, query_rows=rows)
    if backend == "flex":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "called without torch.compile": expected on CPU
            return flex_local_attention(qb, k, v, grid, radius, G, ek, ev, query_rows=rows)
    return local_attention(qb, k, v, grid, radius, G, ek, ev, backend, query_rows=rows)


@pytest.mark.parametrize("backend", ["reference", "tiled"])
@pytest.mark.parametrize("H,W,radius,G,E,tile,rows", BANDS, ids=BAND_IDS)
def test_band_equals_the_whole_grid_rows_forward_and_backward(backend, H, W, radius, G, E, tile, rows, one_thread):
    q, k, v, ek, ev, qb = band_inputs(H, W, G, E, rows)
    leaves = [t for t in (q, k, v, ek, ev) if t is not None]
    expected = band(reference_local_attention(q, k, v, (H, W), radius, G, ek, ev), G, W, rows)
    got = run_backend(backend, qb, k, v, (H, W), radius, G, ek, ev, tile, rows)
    assert got.shape == qb.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(expected)
    for want, have in zip(torch.autograd.grad(expected, leaves, grad), torch.autograd.grad(got, leaves, grad),
                          strict=True):
        torch.testing.assert_close(have, want, atol=1e-5, rtol=1e-5)


def test_tiled_band_gradients_reach_the_key_rows_outside_the_band(one_thread):
    """The halo rows above and below the band are real keys: their k, v gradients are not zero."""
    H, W, radius, rows = 12, 12, 3, (5, 9)
    q, k, v, _, _, qb = band_inputs(H, W, 0, 0, rows)
    dk, dv = torch.autograd.grad(tiled_local_attention(qb, k, v, (H, W), radius, tile=4, query_rows=rows).sum(),
                                 (k, v))
    per_row = dk.abs().sum(dim=(0, 1, 3)).view(H, W).sum(dim=1) + dv.abs().sum(dim=(0, 1, 3)).view(H, W).sum(dim=1)
    reached = per_row > 0
    assert reached.tolist() == [3 <= y < 11 for y in range(H)]  # rows [a - 2, b + 2): the halo of r=3


@pytest.mark.parametrize("order", ["tiles", "rows"])
@pytest.mark.parametrize("H,W,radius,G,E,tile,rows", BANDS, ids=BAND_IDS)
def test_flex_band_equals_the_whole_grid_rows(order, H, W, radius, G, E, tile, rows, one_thread):
    # flex_attention has no backward on CPU; its backward is checked on CUDA below.
    q, k, v, ek, ev, qb = band_inputs(H, W, G, E, rows, requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = flex_local_attention(qb, k, v, (H, W), radius, G, ek, ev, order=order, query_rows=rows)
    expected = band(reference_local_attention(q, k, v, (H, W), radius, G, ek, ev), G, W, rows)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex backward needs CUDA")
@pytest.mark.parametrize("H,W,radius,G,E,tile,rows", BANDS, ids=BAND_IDS)
def test_flex_band_backward_on_cuda(H, W, radius, G, E, tile, rows):
    q, k, v, ek, ev, _ = (t.cuda().detach().requires_grad_() if t is not None else None
                          for t in band_inputs(H, W, G, E, rows))
    leaves = [t for t in (q, k, v, ek, ev) if t is not None]
    expected = band(reference_local_attention(q, k, v, (H, W), radius, G, ek, ev), G, W, rows)
    got = flex_local_attention(band(q, G, W, rows), k, v, (H, W), radius, G, ek, ev, query_rows=rows)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(expected)
    for want, have in zip(torch.autograd.grad(expected, leaves, grad), torch.autograd.grad(got, leaves, grad),
                          strict=True):
        torch.testing.assert_close(have, want, atol=1e-4, rtol=1e-4)


class AttentionCalls:
    """Wraps F.scaled_dot_product_attention and sums the queries and (query, key) pairs it is given."""

    def __init__(self):
        self.queries = self.pairs = 0
        self.original = F.scaled_dot_product_attention

    def __call__(self, q, k, v, *args, **kwargs):
        self.queries += q.shape[:-1].numel()
        self.pairs += q.shape[:-1].numel() * k.shape[-2]
        return self.original(q, k, v, *args, **kwargs)


@pytest.mark.parametrize("rows", [(7, 23), (0, 16), (7, 8)])
def test_tiled_band_attends_from_the_band_only(rows, monkeypatch, one_thread):
    """On a strip's region (16 own rows + 7 halo rows each side, r=8), the attention call holds the
    band's query tiles only: its size follows the band, not the region."""
    H, W, radius, tile = 30, 32, 8, 8
    q, k, v, _, _, qb = band_inputs(H, W, 0, 0, rows, requires_grad=False)
    calls = AttentionCalls()
    monkeypatch.setattr(F, "scaled_dot_product_attention", calls)
    tiled_local_attention(qb, k, v, (H, W), radius, tile=tile, query_rows=rows)
    band_tiles = math.ceil((rows[1] - rows[0]) / tile) * (W // tile)
    window = (tile + 2 * 7) ** 2
    assert (calls.queries, calls.pairs) == (2 * 3 * band_tiles * tile * tile, 2 * 3 * band_tiles * tile * tile * window)
    calls.queries = calls.pairs = 0
    tiled_local_attention(q, k, v, (H, W), radius, tile=tile)
    assert calls.queries == 2 * 3 * math.ceil(H / tile) * (W // tile) * tile * tile  # the region's, for comparison


def test_flex_band_computes_the_band_blocks_only():
    """A band of a quarter of the grid's rows computes about a quarter of the whole grid's blocks."""
    whole = block_density((64, 64), 8)
    for rows in [(0, 16), (24, 40), (48, 64)]:
        assert block_density((64, 64), 8, query_rows=rows) <= whole / 3
    assert block_density((64, 64), 8, query_rows=(0, 64)) == whole


@pytest.mark.parametrize("backend", ["reference", "tiled", "flex"])
@pytest.mark.parametrize("grid, radius, parts, G, down_factor", [
    ((12, 6), 3, 2, 3, 0),  # text queries merged across strips
    ((12, 6), 3, 3, 0, 2),  # pooled tokens, three strips of 4 rows (halo 2)
    ((6, 4), 5, 2, 2, 0),  # strips shorter than the halo: every strip reads every row, text read directly
])
def test_strips_attend_from_their_own_rows_and_equal_the_whole_grid(backend, grid, radius, parts, G, down_factor,
                                                                    monkeypatch, one_thread):
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, G + grid[0] * grid[1], 8) for _ in range(3))
    weight = torch.rand(down_factor**2) if down_factor else None
    extra = [pool_tokens(x, grid, G, weight) for x in (k, v)] if weight is not None else [None, None]
    whole = reference_local_attention(q, k, v, grid, radius, G, *extra)
    query_counts = []

    def counting(q, *args, **kwargs):
        query_counts.append(q.shape[-2])
        return local_attention(q, *args, **kwargs)

    monkeypatch.setattr(clear, "local_attention", counting)

    def run_strip(strip):
        mine = [torch.cat([x[..., :G, :], x[..., G:, :][..., strip.tokens, :]], dim=-2) for x in (q, k, v)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return strip_local_attention(*mine, strip, radius, G, weight, backend)

    outputs = on_thread_strips(grid, parts, "halo", run_strip)
    torch.testing.assert_close(torch.cat([out[..., G:, :] for out in outputs], dim=-2), whole[..., G:, :],
                               atol=1e-5, rtol=1e-5)
    for out in outputs:
        torch.testing.assert_close(out[..., :G, :], whole[..., :G, :], atol=1e-5, rtol=1e-5)
    own_tokens = [(stop - start) * grid[1] for start, stop in strip_bounds(grid[0], parts)]
    # the image queries of its own rows only: no neighbour row, and no global query (attended apart, once)
    assert sorted(query_counts) == sorted(own_tokens)


def test_bad_query_rows_name_the_fix():
    q, k, v = (torch.randn(1, 1, 2 + 16, 4) for _ in range(3))
    with pytest.raises(DitkitError, match=r"0 <= a < b <= 4"):
        local_attention(q[..., :6, :], k, v, (4, 4), 2, 2, query_rows=(3, 3))
    with pytest.raises(DitkitError, match=r"0 <= a < b <= 4"):
        local_attention(q, k, v, (4, 4), 2, 2, query_rows=(2, 5))
    with pytest.raises(DitkitError, match=r"needs q with 2 \+ 4 tokens.*pass the band's queries"):
        local_attention(q, k, v, (4, 4), 2, 2, query_rows=(1, 2))
    with pytest.raises(DitkitError, match=r"k, v with 2 \+ 16"):
        local_attention(q[..., :6, :], k[..., :10, :], v[..., :10, :], (4, 4), 2, 2, query_rows=(1, 2))
