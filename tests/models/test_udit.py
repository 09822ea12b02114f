import pytest
import torch

from ditkit import DitkitError, model_config
from ditkit.metrics import config_cost
from ditkit.models import config_from_dict, config_to_dict
from helpers import tiny_backbone

# U-DiT paper, 256x256 (latent 32x32x4): GFLOPs (multiply-adds) and official params (training form).
UDIT_TABLE = {"U-DiT-S": (58.9e6, 6.04), "U-DiT-B": (231.3e6, 22.22), "U-DiT-L": (916.3e6, 85.00)}


@pytest.mark.parametrize("name", UDIT_TABLE)
def test_udit_paper_table(name):
    params, gflops = UDIT_TABLE[name]
    cost = config_cost(model_config(name), 32, 32)
    assert abs(cost.params - params) / params < 0.03
    assert abs(cost.macs / 1e9 - gflops) / gflops < 0.05


def tiny(**overrides):
    """U-DiT-Nano at its own width, zero init broken so every path matters."""
    return tiny_backbone("udit", randomize=0.05, **{"hidden_size": 32, "num_classes": 4, "vae_scale": 8, **overrides})


def test_folded_ffn_gives_the_same_output_and_follows_weight_updates():
    model = tiny()
    x, t, y = torch.randn(2, 3, 16, 24), torch.tensor([3.0, 700.0]), torch.tensor([0, 3])
    train_out = model.train()(x, t, y)
    torch.testing.assert_close(model.eval()(x, t, y), train_out, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # an in-place update, as EMA does: the folded convs must refresh
        for p in model.parameters():
            p.mul_(1.1)
    eval_out = model(x, t, y)
    torch.testing.assert_close(eval_out, model.train()(x, t, y), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(eval_out, train_out, atol=1e-3)


def test_shapes_any_multiple_and_clear_error_otherwise():
    model = tiny()
    assert model(torch.randn(1, 3, 8, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long)).shape == (1, 6, 8, 16)
    with pytest.raises(DitkitError, match="cannot be halved enough: height and width must be multiples of 8"):
        model(torch.randn(1, 3, 12, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long))


def test_other_mixers_fit_the_u_and_config_round_trip():
    model = tiny(mixer="full")
    assert model.config.downsample == 4
    assert model(torch.randn(1, 3, 4, 4), torch.zeros(1), torch.zeros(1, dtype=torch.long)).shape == (1, 6, 4, 4)
    record = config_to_dict(model.config)
    assert record["depths"] == [1, 1, 2, 1, 1] and config_from_dict(record) == model.config
    with pytest.raises(DitkitError, match="must list 5 stages"):
        model_config("U-DiT-S", depths=(2, 2))
