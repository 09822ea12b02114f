"""CLEAR over image tokens at given positions (`ditkit.mixers.positions`): on one grid it is
`local_attention` exactly; with several images on one plane every backend equals the dense
definition, and a query sees the other image's tokens around its own position."""

import pytest
import torch

from ditkit.errors import DitkitError
from ditkit.mixers.clear import local_attention
from ditkit.mixers.positions import grids_positions, positions_local_attention


def grid_positions(rows: int, columns: int, top: int = 0, left: int = 0):
    ys, xs = torch.meshgrid(torch.arange(rows) + top, torch.arange(columns) + left, indexing="ij")
    return torch.stack([ys.flatten(), xs.flatten()], 1)


def tensors(tokens: int, extra: int = 0):
    q, k, v = (torch.randn(2, 3, tokens, 8) for _ in range(3))
    pooled = (torch.randn(2, 3, extra, 8), torch.randn(2, 3, extra, 8)) if extra else (None, None)
    return q, k, v, *pooled


@pytest.mark.parametrize("backend", ["reference", "tiled", "flex"])
@pytest.mark.parametrize("radius", [1, 2.5, 6])
def test_one_grid_is_local_attention(backend, radius):
    torch.manual_seed(0)
    G, (H, W) = 4, (11, 19)
    q, k, v, ek, ev = tensors(G + H * W, extra=5)
    expected = local_attention(q, k, v, (H, W), radius, G, ek, ev, backend="reference")
    out = positions_local_attention(q, k, v, grid_positions(H, W).float(), radius, G, ek, ev, backend=backend)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["tiled", "flex"])
@pytest.mark.parametrize("radius", [1, 3, 9.5])  # the tiled plan reads 0, 1 and 2 neighbouring squares each way
def test_several_images_equal_the_dense_definition(backend, radius):
    """Also with the image places given (`grids`): the cached work list and block mask, twice."""
    torch.manual_seed(1)
    grids = ((0, 0, 12, 20), (3, 2, 7, 9))  # a context of its own size, at an offset
    positions = grids_positions(grids)
    assert torch.equal(positions, torch.cat([grid_positions(12, 20), grid_positions(7, 9, top=3, left=2)]))
    G = 6
    q, k, v, ek, ev = tensors(G + len(positions), extra=3)
    expected = positions_local_attention(q, k, v, positions, radius, G, ek, ev, backend="reference")
    for places in (None, grids, grids):
        out = positions_local_attention(q, k, v, positions, radius, G, ek, ev, backend=backend, grids=places)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_a_query_sees_the_other_images_tokens_at_its_position_and_no_farther():
    """Values are one-hot per token: the output of a query is the softmax weight it gives each key."""
    first, second = grid_positions(5, 5), grid_positions(5, 5)
    positions = torch.cat([first, second])
    N = len(positions)
    q, k = torch.zeros(1, 1, N, N), torch.zeros(1, 1, N, N)  # equal scores: weights 1 / keys seen
    v = torch.eye(N).view(1, 1, N, N)
    weights = positions_local_attention(q, k, v, positions, 1.5, backend="tiled")[0, 0]
    centre = 12  # (2, 2) of the first image
    seen = torch.nonzero(weights[centre] > 0).squeeze(1).tolist()
    neighbours = [7, 11, 12, 13, 17, 16, 6, 8, 18]  # the 3 x 3 square around (2, 2): distance^2 <= 2 < 2.25
    assert sorted(seen) == sorted(neighbours + [n + 25 for n in neighbours])


def test_bad_positions_are_one_line():
    q, k, v, _, _ = tensors(10)
    with pytest.raises(DitkitError, match="give one position per image token"):
        positions_local_attention(q, k, v, grid_positions(3, 3), 2, 0)
    with pytest.raises(DitkitError, match=r"must be \(N, 2\)"):
        positions_local_attention(q, k, v, torch.zeros(10, 3), 2, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled flex needs CUDA")
def test_compiled_flex_on_cuda_equals_the_dense_definition_forward_and_backward():
    torch.manual_seed(2)
    grids = ((0, 0, 24, 40), (0, 0, 16, 24))  # Kontext-like: both images from (0, 0)
    positions = grids_positions(grids, "cuda")
    q, k, v, ek, ev = (t.cuda().requires_grad_() for t in tensors(8 + len(positions), extra=4))
    inputs = [q, k, v, ek, ev]
    expected = positions_local_attention(q, k, v, positions, 5, 8, ek, ev, backend="reference")
    got = positions_local_attention(q, k, v, positions, 5, 8, ek, ev, backend="flex", grids=grids)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    grad = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad(expected, inputs, grad), torch.autograd.grad(got, inputs, grad), strict=True):
        torch.testing.assert_close(b, a, atol=1e-3, rtol=1e-3)
