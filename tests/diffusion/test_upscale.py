"""The high-resolution chain (SDEdit upscaling) and sampling beyond the training size."""

import math

import pytest
import torch

from ditkit import DitkitError
from ditkit.diffusion import DDPMObjective, FlowMatchingObjective, sample
from ditkit.diffusion.pipeline import generate, generate_upscaled, upsample
from ditkit.diffusion.sampling import make_scheduler, start_index
from ditkit.metrics.memory import largest_tensor
from ditkit.mixers.base import Extrapolation
from ditkit.models import build_model, config_to_dict, model_config
from ditkit.models.extrapolation import set_extrapolation
from ditkit.models.layers import sincos_pos_embed_2d
from ditkit.record import RunRecord

pytestmark = pytest.mark.usefixtures("one_thread")

SAMPLERS = [(FlowMatchingObjective(), "euler"), (DDPMObjective(learn_sigma=False), "ddim"),
            (DDPMObjective(learn_sigma=False), "ddpm")]


def tiny_model(mixer="full", **options):
    config = model_config("DiT-Nano/4", in_channels=1, vae_scale=1, depth=2, hidden_size=32, num_heads=2,
                          num_classes=10, learn_sigma=False, mixer=mixer, mixer_options=options)
    model = build_model(config).eval()
    for p in model.parameters():  # DiT starts as the identity map; give it something to do
        p.data.normal_(0, 0.2)
    return model


RECORD = RunRecord.from_dict({"model": config_to_dict(tiny_model().config), "data": {"resolution": 16, "vae": None},
                              "diffusion": {"objective": "flow", "learn_sigma": False, "sample_steps": 4,
                                            "cfg_scale": 2.0}})
CHAIN = dict(num=2, height=32, width=32, base_height=16, base_width=16, steps=4, base_steps=3, cfg_scale=2.0,
             seed=5, progress=False)


class Recorder(torch.nn.Module):
    """A denoiser that remembers its inputs."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.inputs = []

    def forward(self, x, t, y):
        self.inputs.append((x.clone(), t.clone()))
        return torch.tanh(x)


@pytest.mark.parametrize("objective,sampler", SAMPLERS)
def test_strength_one_is_plain_sampling_and_zero_returns_the_input(objective, sampler):
    init = torch.rand(2, 1, 4, 4)
    kwargs = dict(steps=6, sampler=sampler, seed=3, progress=False)
    plain = sample(Recorder(), objective, (2, 1, 4, 4), **kwargs)
    assert torch.equal(sample(Recorder(), objective, (2, 1, 4, 4), init=init, strength=1.0, **kwargs), plain)
    assert torch.equal(sample(Recorder(), objective, (2, 1, 4, 4), init=init, strength=0.0, **kwargs), init)


def test_partial_strength_starts_from_the_noised_input_and_runs_the_last_steps():
    objective, init = FlowMatchingObjective(), torch.rand(2, 1, 4, 4)
    model = Recorder()
    sample(model, objective, (2, 1, 4, 4), init=init, strength=0.5, steps=10, seed=3, progress=False)
    scheduler = make_scheduler(objective, "euler")
    scheduler.set_timesteps(10)
    assert start_index(10, 0.5) == 5 and len(model.inputs) == 5
    noise = torch.randn((2, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    sigma = scheduler.sigmas[5]
    first_x, first_t = model.inputs[0]
    torch.testing.assert_close(first_x, sigma * noise + (1 - sigma) * init)
    torch.testing.assert_close(first_t, scheduler.timesteps[5].expand(2))
    second_x = first_x + (scheduler.sigmas[6] - sigma) * torch.tanh(first_x)  # Euler from step 5, not step 0
    torch.testing.assert_close(model.inputs[1][0], second_x)


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_partial_strength_for_ddpm_models_noises_with_alpha_bar(sampler):
    objective, init, model = DDPMObjective(learn_sigma=False), torch.rand(2, 1, 4, 4), Recorder()
    sample(model, objective, (2, 1, 4, 4), init=init, strength=0.3, steps=10, seed=3, sampler=sampler,
           progress=False)
    scheduler = make_scheduler(objective, sampler)
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[7]
    alpha_bar = scheduler.alphas_cumprod[t]
    noise = torch.randn((2, 1, 4, 4), generator=torch.Generator().manual_seed(3))
    assert len(model.inputs) == 3
    torch.testing.assert_close(model.inputs[0][0], alpha_bar.sqrt() * init + (1 - alpha_bar).sqrt() * noise)
    torch.testing.assert_close(model.inputs[0][1], t.float().expand(2))


def test_strength_outside_zero_one_is_refused():
    with pytest.raises(DitkitError, match="strength must be between 0 and 1"):
        sample(Recorder(), FlowMatchingObjective(), (1, 1, 4, 4), init=torch.zeros(1, 1, 4, 4), strength=1.5)


def test_chain_shapes_and_determinism():
    model = tiny_model("clear", radius=2)
    a = generate_upscaled(model, RECORD, strength=0.7, **CHAIN)
    assert a.shape == (2, 1, 32, 32) and a.abs().max() <= 1
    assert torch.equal(a, generate_upscaled(model, RECORD, strength=0.7, **CHAIN))
    assert not torch.equal(a, generate_upscaled(model, RECORD, strength=0.7, **{**CHAIN, "seed": 6}))


def test_chain_at_strength_zero_is_the_upsampled_base_and_at_one_plain_sampling():
    teacher, student = tiny_model("full"), tiny_model("clear", radius=2)
    chain = dict(base_model=teacher, base_record=RECORD, **CHAIN)
    base = generate(teacher, RECORD, num=2, height=16, width=16, steps=3, cfg_scale=2.0, seed=5, progress=False)
    zero = generate_upscaled(student, RECORD, strength=0.0, **chain)
    torch.testing.assert_close(zero, upsample(base, (32, 32)).clamp(-1, 1))
    one = generate_upscaled(student, RECORD, strength=1.0, **chain)
    plain = generate(student, RECORD, num=2, height=32, width=32, steps=4, cfg_scale=2.0, seed=5, progress=False)
    assert torch.equal(one, plain)


@pytest.mark.parametrize("change,message", [
    (dict(base_height=64, base_width=64), "larger than the target"),
    (dict(base_height=16, base_width=32), "different aspect ratios"),
    (dict(height=30, width=30), "does not fit this model"),
])
def test_inconsistent_sizes_are_refused(change, message):
    with pytest.raises(DitkitError, match=message):
        generate_upscaled(tiny_model(), RECORD, strength=0.5, **{**CHAIN, **change})


def test_base_model_in_another_input_space_is_refused():
    other = build_model(model_config("DiT-Nano/4", in_channels=3, vae_scale=1, depth=1, hidden_size=32, num_heads=2,
                                     num_classes=10, learn_sigma=False))
    with pytest.raises(DitkitError, match="different input spaces"):
        generate_upscaled(tiny_model(), RECORD, strength=0.5, base_model=other, base_record=RECORD, **CHAIN)


def test_query_scale_is_sqrt_log_ratio():
    ext = Extrapolation(stretch=(2.0, 2.0), attention_scale=True)
    assert ext.query_scale((8, 8)) == pytest.approx(math.sqrt(math.log(64) / math.log(16)))
    assert Extrapolation(stretch=(2.0, 2.0)).query_scale((8, 8)) == 1.0


def test_ntk_keeps_the_fastest_frequency_and_slows_the_slowest_by_the_stretch():
    dim, grid = 64, (1, 32)
    plain = sincos_pos_embed_2d(dim, grid)
    ntk = sincos_pos_embed_2d(dim, grid, Extrapolation(stretch=(1.0, 4.0), positions="ntk"))
    interp = sincos_pos_embed_2d(dim, grid, Extrapolation(stretch=(1.0, 4.0), positions="interpolate"))
    k = dim // 4  # column channels: sin of k frequencies, then cos
    torch.testing.assert_close(ntk[:, 0], plain[:, 0])  # fastest frequency unchanged
    slowest = 1.0 / 10000 ** ((k - 1) / k)
    torch.testing.assert_close(ntk[:, k - 1], torch.sin(torch.arange(32.0) * slowest / 4))
    torch.testing.assert_close(interp[:, 0], torch.sin(torch.arange(32.0) / 4))
    torch.testing.assert_close(ntk[:, 2 * k:], plain[:, 2 * k:])  # rows did not grow: unchanged


@pytest.mark.parametrize("name", ["DiT-Nano/4", "U-DiT-Nano"])
def test_extrapolation_is_off_by_default_and_a_no_op_at_the_training_size(name):
    config = model_config(name, in_channels=1, vae_scale=1, num_classes=0, learn_sigma=False)
    model = build_model(config).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.2)
    x, t = torch.randn(1, 1, 32, 32), torch.tensor([500.0])
    with torch.no_grad():
        plain = model(x, t)
        set_extrapolation(model, (32, 32), (32, 32), attention_scale=True, positions="ntk")
        torch.testing.assert_close(model(x, t), plain)
        set_extrapolation(model, (32, 32), (16, 16), attention_scale=True, positions="ntk")
        assert not torch.allclose(model(x, t), plain, atol=1e-4)
        set_extrapolation(model, (32, 32), (16, 16))
        assert torch.equal(model(x, t), plain)


def test_diffussm_refuses_attention_and_position_options():
    model = build_model(model_config("DiffuSSM-Nano", in_channels=1, vae_scale=1, num_classes=0))
    with pytest.raises(DitkitError, match="no position encoding"):
        set_extrapolation(model, (32, 32), (16, 16), positions="ntk")
    with pytest.raises(DitkitError, match="needs attention layers"):
        set_extrapolation(model, (32, 32), (16, 16), attention_scale=True)


def test_clear_sampling_step_builds_no_n_by_n_tensor():
    """64 x 64 tokens: an N x N boolean mask is 16 MiB (fp32 scores: 64 MiB); on the default path the
    largest tensor is the MLP's hidden activation (N x 128 floats, linear in N)."""
    tokens = 64 * 64
    x, t, y = torch.randn(1, 1, 256, 256), torch.tensor([500.0]), torch.tensor([3])
    with torch.no_grad():
        largest = largest_tensor(lambda: tiny_model("clear", radius=4)(x, t, y))
        dense = largest_tensor(lambda: tiny_model("clear", radius=4, backend="reference")(x, t, y))
    assert dense >= tokens * tokens  # the tracker sees the reference backend's mask...
    assert largest <= tokens * 128 * 4 < tokens * tokens / 4  # ...and nothing quadratic on the default path


@pytest.mark.parametrize("name", ["U-DiT-Nano", "DiffuSSM-Nano"])
def test_chain_works_with_every_backbone(name):
    model = build_model(model_config(name, in_channels=1, vae_scale=1, num_classes=10, learn_sigma=False)).eval()
    out = generate_upscaled(model, RECORD, strength=0.5, **{**CHAIN, "steps": 2, "base_steps": 1})
    assert out.shape == (2, 1, 32, 32) and torch.isfinite(out).all()


def test_guidance_on_the_first_channels_only_keeps_the_others_conditional():
    """The official DiT sample.py guides 3 of the 4 latent channels (`forward_with_cfg`)."""
    from ditkit.diffusion.sampling import guided_output

    class Fixed(torch.nn.Module):  # conditional output 1, unconditional output 0, on 8 channels
        def forward(self, x, t, y):
            return (y != 9).float().view(-1, 1, 1, 1).expand(-1, 8, *x.shape[2:])

    x, t, labels = torch.zeros(2, 4, 2, 2), torch.zeros(2), torch.tensor([1, 2])
    out = guided_output(Fixed(), x, t, labels, cfg_scale=4.0, null_label=9, guidance_channels=3)
    assert out[:, :3].eq(4.0).all() and out[:, 3:].eq(1.0).all()
    out = guided_output(Fixed(), x, t, labels, cfg_scale=4.0, null_label=9)
    assert out[:, :4].eq(4.0).all() and out[:, 4:].eq(1.0).all()
