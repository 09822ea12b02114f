import math

import pytest
import torch

from ditkit import DitkitError, build_mixer, build_model, model_config
from ditkit.mixers.downsampled import apply_rope, rope_2d_angles, subgrid_attention


def test_subgrid_attention_equals_attention_on_each_phase_subgrid():
    B, nh, H, W, d = 2, 3, 6, 4, 8
    q, k, v = (torch.randn(B, nh, H * W, d) for _ in range(3))
    out = subgrid_attention(q, k, v, (H, W), 2)
    grid_q, grid_k, grid_v = (x.view(B, nh, H, W, d) for x in (q, k, v))
    for i in range(2):
        for j in range(2):
            sq, sk, sv = (x[:, :, i::2, j::2].reshape(B, nh, -1, d) for x in (grid_q, grid_k, grid_v))
            expected = torch.softmax(sq @ sk.transpose(-1, -2) / math.sqrt(d), dim=-1) @ sv
            got = out.view(B, nh, H, W, d)[:, :, i::2, j::2].reshape(B, nh, -1, d)
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_score_entries_are_a_quarter_of_full_attention():
    from ditkit.metrics import count_flops

    q = torch.randn(1, 1, 64, 16)
    full = count_flops(torch.nn.functional.scaled_dot_product_attention, q, q, q)
    assert count_flops(subgrid_attention, q, q, q, (8, 8), 2) * 4 == full


def test_rope_rotates_pairs_by_column_then_row_angles():
    angles = rope_2d_angles(8, torch.tensor([3]), torch.tensor([5]))
    freqs = torch.tensor([1.0, 10000 ** (-4 / 8)])
    torch.testing.assert_close(angles[0], torch.stack([5 * freqs, 3 * freqs], dim=-1).flatten())
    x = torch.randn(1, 8)
    assert torch.allclose(apply_rope(x, angles).norm(), x.norm())  # a rotation keeps the norm


def test_mixer_keeps_sub_maps_apart_when_the_conv_is_off():
    mixer = build_mixer("downsampled", dim=16, num_heads=2)
    torch.nn.init.zeros_(mixer.dwconv.weight)
    torch.nn.init.zeros_(mixer.dwconv.bias)
    x = torch.randn(1, 36, 16)
    y = x.clone()
    y[0, 0] += 1.0  # token (0, 0): sub-map (0, 0)
    changed = (mixer(x, (6, 6)) - mixer(y, (6, 6))).abs().sum(-1).view(6, 6) > 1e-6
    assert changed[0::2, 0::2].any() and not changed[1::2].any() and not changed[:, 1::2].any()


def test_errors_and_use_inside_dit():
    mixer = build_mixer("downsampled", dim=16, num_heads=2)
    with pytest.raises(DitkitError, match="divisible by 2, got 5x6"):
        mixer(torch.randn(1, 30, 16), (5, 6))
    with pytest.raises(DitkitError, match="no global tokens"):
        mixer(torch.randn(1, 37, 16), (6, 6), num_global=1)
    config = model_config("DiT-Nano/2", mixer="downsampled", depth=1, hidden_size=32, num_heads=2)
    assert config.downsample == 4  # patch 2 x the mixer's factor 2
    model = build_model(config)
    assert model(torch.randn(1, 4, 8, 12), torch.zeros(1), torch.zeros(1, dtype=torch.long)).shape == (1, 8, 8, 12)
