import pytest
import torch

from ditkit import build_mixer, build_model, model_config
from ditkit.metrics import config_cost, count_flops, model_cost

# The DiT paper's Table (256x256, latent 32x32x4): params, GFLOPs (= multiply-adds).
DIT_TABLE = {"DiT-S/2": (33e6, 6.06), "DiT-B/2": (130e6, 23.01), "DiT-L/2": (458e6, 80.71), "DiT-XL/2": (675e6, 118.64)}


@pytest.mark.parametrize("name", DIT_TABLE)
def test_dit_paper_table(name):
    params, gflops = DIT_TABLE[name]
    cost = config_cost(model_config(name), 32, 32)
    assert abs(cost.params - params) / params < 0.01
    assert abs(cost.macs / 1e9 - gflops) / gflops < 0.03


def test_dit_xl_at_512():
    assert abs(config_cost(model_config("DiT-XL/2"), 64, 64).macs / 1e9 - 524.6) / 524.6 < 0.03


def test_fused_attention_is_counted():
    mixer = build_mixer("full", dim=64, num_heads=4)
    N, D = 100, 64
    x = torch.randn(1, N, D)
    linear = 2 * N * D * 3 * D + 2 * N * D * D
    assert count_flops(mixer, x, (10, 10)) == linear + 4 * N * N * D


def test_meta_count_equals_real_count():
    config = model_config("DiT-Nano/4", depth=2)
    real = model_cost(build_model(config), 16, 16)
    meta = config_cost(config, 16, 16)
    assert (real.params, real.flops) == (meta.params, meta.flops)
