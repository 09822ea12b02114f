import warnings

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ditkit import DitkitError, build_mixer, build_model, model_config, swap_mixers
from ditkit.mixers.clear import disc_size, local_attention, reference_local_attention
from ditkit.mixers.flex import block_density, flex_local_attention
from ditkit.mixers.tiled import tiled_local_attention


@pytest.mark.parametrize("radius,keys", [(8, 193), (16, 793), (32, 3205)])
def test_interior_disc_sizes(radius, keys):
    from ditkit.mixers.clear import _reference_mask

    assert disc_size(radius) == keys
    H = W = 2 * radius + 3
    center = (H // 2) * W + W // 2
    assert int(_reference_mask((H, W), float(radius), 0, 0, torch.device("cpu"))[center].sum()) == keys


def test_reference_definition_on_a_small_grid():
    """Strict disc, cut at borders; global tokens seen by all and seeing all; pooled seen by image queries."""
    from ditkit.mixers.clear import _reference_mask

    mask = _reference_mask((3, 4), 2.0, 1, 2, torch.device("cpu"))  # 1 global, 12 image, 2 pooled
    assert mask.shape == (13, 15)
    assert mask[0, :13].all() and not mask[0, 13:].any()
    assert mask[1:, 0].all() and mask[1:, 13:].all()
    corner = mask[1, 1:13].view(3, 4)  # image token (0, 0): distance^2 < 4 -> (0,0), (0,1), (1,0), (1,1)
    assert corner.nonzero().tolist() == [[0, 0], [0, 1], [1, 0], [1, 1]]


CASES = [  # (H, W, radius, global tokens, pooled tokens, tile)
    (12, 12, 3, 0, 0, 4),
    (10, 13, 3, 0, 0, 4),  # non-square, not a multiple of the tile
    (9, 7, 20, 0, 0, None),  # radius larger than the grid
    (11, 6, 4, 5, 0, 8),  # global tokens
    (16, 16, 5, 3, 16, 8),  # global and pooled tokens
    (5, 17, 2.5, 1, 0, 3),  # fractional radius
    (1, 1, 8, 0, 0, None),
]


def random_qkv(H, W, G, E, requires_grad=True):
    g = torch.Generator().manual_seed(H * 100 + W)
    q, k, v = (torch.randn(2, 3, G + H * W, 16, generator=g).requires_grad_(requires_grad) for _ in range(3))
    extra = [torch.randn(2, 3, E, 16, generator=g).requires_grad_(requires_grad) for _ in range(2 if E else 0)]
    extra = extra or [None, None]
    return q, k, v, *extra


@pytest.mark.parametrize("H,W,radius,G,E,tile", CASES)
def test_tiled_matches_reference_forward_and_backward(H, W, radius, G, E, tile):
    q, k, v, ek, ev = random_qkv(H, W, G, E)
    inputs = [t for t in (q, k, v, ek, ev) if t is not None]
    expected = reference_local_attention(q, k, v, (H, W), radius, G, ek, ev)
    got = tiled_local_attention(q, k, v, (H, W), radius, G, ek, ev, tile=tile)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad(expected, inputs, grad), torch.autograd.grad(got, inputs, grad), strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("order", ["tiles", "rows"])
@pytest.mark.parametrize("H,W,radius,G,E,tile", CASES[:6])
def test_flex_matches_reference_forward(H, W, radius, G, E, tile, order):
    # flex_attention has no backward on CPU; its backward is checked on CUDA below.
    q, k, v, ek, ev = random_qkv(H, W, G, E, requires_grad=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "called without torch.compile": expected on CPU
        got = flex_local_attention(q, k, v, (H, W), radius, G, ek, ev, order=order)
    torch.testing.assert_close(got, reference_local_attention(q, k, v, (H, W), radius, G, ek, ev), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="flex backward needs CUDA")
@pytest.mark.parametrize("H,W,radius,G,E,tile", CASES[:6])
def test_flex_backward_on_cuda(H, W, radius, G, E, tile):
    q, k, v, ek, ev = (t.cuda().detach().requires_grad_() if t is not None else None for t in random_qkv(H, W, G, E))
    inputs = [t for t in (q, k, v, ek, ev) if t is not None]
    expected = reference_local_attention(q, k, v, (H, W), radius, G, ek, ev)
    got = flex_local_attention(q, k, v, (H, W), radius, G, ek, ev)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    grad = torch.randn_like(expected)
    for a, b in zip(torch.autograd.grad(expected, inputs, grad), torch.autograd.grad(got, inputs, grad), strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)


def test_tile_order_computes_fewer_flex_blocks_than_row_major():
    rows, tiles = block_density((64, 64), 8, "rows"), block_density((64, 64), 8, "tiles")
    assert tiles < rows


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_tiled_never_builds_an_n_by_n_tensor():
    H = W = 64
    N = H * W
    q, k, v = (torch.randn(1, 1, N, 16, requires_grad=True) for _ in range(3))
    with LargestTensor() as mode:
        tiled_local_attention(q, k, v, (H, W), 4).sum().backward()
    assert mode.largest < N * N / 16
    with LargestTensor() as mode:
        reference_local_attention(q, k, v, (H, W), 4)
    assert mode.largest >= N * N  # the check would notice one


def test_auto_backend_and_bad_backend():
    q, k, v, _, _ = random_qkv(4, 4, 0, 0, requires_grad=False)
    torch.testing.assert_close(local_attention(q, k, v, (4, 4), 2), reference_local_attention(q, k, v, (4, 4), 2))
    with pytest.raises(DitkitError, match="unknown clear backend 'fast'"):
        local_attention(q, k, v, (4, 4), 2, backend="fast")


def test_clear_with_radius_covering_the_grid_equals_full_attention():
    full = build_mixer("full", dim=32, num_heads=4)
    clear = build_mixer("clear", dim=32, num_heads=4, radius=100, backend="tiled")
    clear.load_state_dict(full.state_dict())
    x = torch.randn(2, 3 + 35, 32)
    torch.testing.assert_close(clear(x, (5, 7), num_global=3), full(x, (5, 7), num_global=3), atol=1e-5, rtol=1e-5)


def test_swapping_a_dit_to_clear_keeps_weights_and_localises():
    model = build_model(model_config("DiT-Nano/2", in_channels=3, num_classes=0, depth=2, hidden_size=32, num_heads=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, t = torch.randn(1, 3, 32, 32), torch.zeros(1)
    before = model(x, t)
    assert swap_mixers(model, "clear", radius=100) == []
    torch.testing.assert_close(model(x, t), before, atol=1e-5, rtol=1e-5)
    swap_mixers(model, "clear", radius=2)
    assert not torch.allclose(model(x, t), before, atol=1e-3)


def test_pooled_variant_parameters_and_errors():
    mixer = build_mixer("clear", dim=16, num_heads=2, radius=2, down_factor=4)
    torch.testing.assert_close(mixer.pool_weight, torch.full((16,), 1 / 16))
    assert mixer(torch.randn(1, 64, 16), (8, 8)).shape == (1, 64, 16)
    with pytest.raises(DitkitError, match="down_factor 4 needs a token grid divisible by 4, got 6x8"):
        mixer(torch.randn(1, 48, 16), (6, 8))
    full = torch.nn.Sequential(build_mixer("full", dim=16, num_heads=2))
    assert swap_mixers(full, "clear", radius=2, down_factor=4) == ["0.pool_weight"]
    with pytest.raises(DitkitError, match="radius must be at least 1"):
        build_mixer("clear", dim=16, num_heads=2, radius=0)


def test_local_pairs_counts_the_reference_mask():
    from ditkit.mixers.clear import _reference_mask, local_pairs

    for grid, radius in (((7, 5), 2.5), ((6, 6), 8), ((12, 9), 3)):
        mask = _reference_mask(grid, float(radius), 0, 0, torch.device("cpu"))
        assert local_pairs(grid, radius) == int(mask.sum())
