"""Done when: a new attention mixer written in one file (windowed_mixer.py), registered with
`@register_mixer` and edited nowhere else, works in DiT, U-DiT, patch-parallel sampling and
sampling beyond the training size. Patch-parallel sampling with 2 processes is checked in
tests/parallel/test_patch.py (its worker imports the same file)."""

import pytest
import torch

from ditkit.distributed import PatchParallelDiT
from ditkit.mixers.base import Extrapolation
from ditkit.models.extrapolation import set_extrapolation
from helpers import tiny_backbone
from mixers.windowed_mixer import NAME as MIXER
from mixers.windowed_mixer import WindowedAttention

pytestmark = pytest.mark.usefixtures("windowed_mixer")  # registered for each test, removed after it


def inputs(batch=2, side=16):
    return torch.randn(batch, 3, side, side), torch.tensor([10.0, 600.0])[:batch], torch.arange(batch) % 5


@pytest.mark.parametrize("backbone", ["dit", "udit"])
def test_it_trains_in_dit_and_udit(backbone, one_thread):
    model = tiny_backbone(backbone, randomize=0.05, mixer=MIXER)
    assert sum(isinstance(m, WindowedAttention) for m in model.modules()) > 0
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape[0] == 2 and out.shape[-2:] == x.shape[-2:]
    out.square().mean().backward()
    assert all(m.qkv.weight.grad.abs().sum() > 0 for m in model.modules() if isinstance(m, WindowedAttention))


def test_one_process_patch_parallel_is_the_plain_forward(one_thread):
    model = tiny_backbone("dit", randomize=0.05, mixer=MIXER).eval()
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(PatchParallelDiT(model)(x, t, y), model(x, t, y), atol=1e-6, rtol=0)


def test_its_queries_and_positions_follow_the_extrapolation_setting(one_thread):
    mixer = WindowedAttention(16, 2).eval()
    x, grid = torch.randn(1, 8 * 8, 16), (8, 8)
    with torch.no_grad():
        plain = mixer(x, grid)
        for setting in (Extrapolation((2.0, 2.0), attention_scale=True), Extrapolation((2.0, 2.0), positions="ntk")):
            mixer.extrapolation = setting
            assert not torch.allclose(mixer(x, grid), plain, atol=1e-4), setting


@pytest.mark.parametrize("option", [{"attention_scale": True}, {"positions": "ntk"}])
def test_set_extrapolation_reaches_it_in_udit(option, one_thread):
    """U-DiT has no position encoding of its own: with this mixer, the mixer's rotary is the one scaled."""
    model = tiny_backbone("udit", randomize=0.05, mixer=MIXER).eval()
    x, t, y = inputs(side=32)
    with torch.no_grad():
        plain = model(x, t, y)
        set_extrapolation(model, (32, 32), (32, 32), **option)  # at the training size: a no-op
        torch.testing.assert_close(model(x, t, y), plain)
        set_extrapolation(model, (32, 32), (16, 16), **option)
        mixers = [m for m in model.modules() if isinstance(m, WindowedAttention)]
        assert all(m.extrapolation is not None and m.extrapolation.stretch == (2.0, 2.0) for m in mixers)
        assert not torch.allclose(model(x, t, y), plain, atol=1e-4)
