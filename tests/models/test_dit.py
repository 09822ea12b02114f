import math

import pytest
import torch

from ditkit import DitkitError, model_config
from ditkit.models import config_from_dict, config_to_dict
from ditkit.models.layers import sincos_pos_embed_2d, timestep_embedding
from helpers import tiny_backbone


@pytest.mark.parametrize("size", [(8, 8), (6, 10), (16, 4)])
def test_output_shape_for_any_grid(size):
    model = tiny_backbone()
    x = torch.randn(2, 3, *size)
    out = model(x, torch.tensor([10.0, 999.0]), torch.tensor([0, 4]))
    assert out.shape == (2, 6, *size)  # learned sigma doubles the channels


def test_without_learned_sigma_output_matches_input_channels():
    out = tiny_backbone(learn_sigma=False)(torch.randn(1, 3, 4, 4), torch.zeros(1), torch.zeros(1, dtype=torch.long))
    assert out.shape[1] == 3


def test_zero_init_output_is_zero_and_blocks_start_as_identity():
    model = tiny_backbone()
    out = model(torch.randn(2, 3, 8, 8), torch.tensor([1.0, 2.0]), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0
    block = model.blocks[0]
    x, c = torch.randn(2, 16, 32), torch.randn(2, 32)
    torch.testing.assert_close(block(x, c, (4, 4)), x)


def test_conditioning_changes_the_output():
    model = tiny_backbone(randomize=0.05)  # break the zero init so every path matters
    x = torch.randn(1, 3, 8, 8)
    a = model(x, torch.tensor([5.0]), torch.tensor([1]))
    assert not torch.allclose(a, model(x, torch.tensor([500.0]), torch.tensor([1])))
    assert not torch.allclose(a, model(x, torch.tensor([5.0]), torch.tensor([2])))


def test_size_not_divisible_by_patch_is_a_clear_error():
    with pytest.raises(DitkitError, match="not divisible by the patch size 2"):
        tiny_backbone()(torch.randn(1, 3, 7, 8), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_unconditional_and_missing_labels():
    model = tiny_backbone(num_classes=0)
    assert model.y_embedder is None
    model(torch.randn(1, 3, 4, 4), torch.zeros(1))
    with pytest.raises(DitkitError, match="class-conditional"):
        tiny_backbone()(torch.randn(1, 3, 4, 4), torch.zeros(1))


def test_label_dropout_uses_the_null_label_at_the_configured_rate():
    model = tiny_backbone(class_dropout_prob=0.25)
    labels = torch.zeros(20000, dtype=torch.long)
    dropped = model.y_embedder.drop_labels(labels, torch.Generator().manual_seed(0))
    assert set(dropped.unique().tolist()) == {0, 5}
    assert abs((dropped == 5).float().mean().item() - 0.25) < 0.02
    assert model.y_embedder.embedding_table.num_embeddings == 6


def test_sincos_position_embedding_formula():
    dim, grid = 8, (3, 5)
    emb = sincos_pos_embed_2d(dim, grid)
    assert emb.shape == (15, 8)
    row, col = 2, 3
    token = emb[row * grid[1] + col]
    omega = [1.0, 1 / 100.0]  # 1 / 10000^(i / (dim/4)), i = 0, 1
    expected = [math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega] \
        + [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega]
    torch.testing.assert_close(token, torch.tensor(expected))


def test_timestep_embedding_is_cos_then_sin():
    emb = timestep_embedding(torch.tensor([3.0]), 4)
    freqs = torch.tensor([1.0, math.exp(-math.log(10000) / 2)])
    torch.testing.assert_close(emb[0], torch.cat([torch.cos(3 * freqs), torch.sin(3 * freqs)]))


def test_config_round_trip_and_unknown_fields():
    config = model_config("DiT-S/4", mixer_options={"a": 1})
    assert config_from_dict(config_to_dict(config)) == config
    with pytest.raises(DitkitError, match="has no field depht"):
        model_config("DiT-S/4", depht=3)
    with pytest.raises(DitkitError, match="unknown model 'DiT-Q/2'"):
        model_config("DiT-Q/2")
    with pytest.raises(DitkitError, match="unknown backbone"):
        config_from_dict({"backbone": "unet"})
