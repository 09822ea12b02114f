import pytest
import torch
from torch import nn

from ditkit import DitkitError, build_mixer, swap_mixers


def explicit_attention(mixer, x):
    """Softmax attention written out: the reference for the fused kernel."""
    B, N, D = x.shape
    H, d = mixer.num_heads, mixer.head_dim
    q, k, v = mixer.qkv(x).view(B, N, 3, H, d).permute(2, 0, 3, 1, 4)
    weights = torch.softmax(q @ k.transpose(-1, -2) / d**0.5, dim=-1)
    return mixer.proj((weights @ v).transpose(1, 2).reshape(B, N, D))


@pytest.mark.parametrize("grid,num_global", [((4, 4), 0), ((3, 5), 0), ((2, 3), 4)])
def test_full_matches_explicit_softmax_attention(grid, num_global):
    mixer = build_mixer("full", dim=32, num_heads=4)
    x = torch.randn(2, num_global + grid[0] * grid[1], 32)
    torch.testing.assert_close(mixer(x, grid, num_global), explicit_attention(mixer, x), atol=1e-5, rtol=1e-5)


def test_layout_mismatch_is_an_error():
    mixer = build_mixer("full", dim=16, num_heads=2)
    with pytest.raises(ValueError, match="does not match"):
        mixer(torch.randn(1, 10, 16), (3, 3), 0)


def test_unknown_mixer_and_option_give_clear_errors():
    with pytest.raises(DitkitError, match="unknown mixer 'nope': choose one of .*full"):
        build_mixer("nope", dim=16, num_heads=2)
    with pytest.raises(DitkitError, match="mixer 'full' has no option radius: it accepts qkv_bias"):
        build_mixer("full", dim=16, num_heads=2, radius=3)


def test_swap_keeps_shared_weights_and_reports_new_ones(scratch_mixers):
    model = nn.Sequential(build_mixer("full", dim=16, num_heads=2))
    x = torch.randn(1, 9, 16)
    before = model[0](x, (3, 3))
    added = swap_mixers(model, "test-scaled")
    assert added == ["0.gain"]
    assert model[0].name == "test-scaled"
    # gain 2 doubles the attention output before the (affine) output projection
    proj = model[0].proj
    expected = 2 * (before - proj.bias) + proj.bias
    torch.testing.assert_close(model[0](x, (3, 3)), expected, atol=1e-5, rtol=1e-5)


def test_swap_refuses_to_drop_weights(scratch_mixers):
    model = nn.Sequential(build_mixer("full", dim=16, num_heads=2))
    with pytest.raises(DitkitError, match="cannot take over the weights"):
        swap_mixers(model, "test-identity")
