import pytest
import torch

from ditkit import DitkitError
from ditkit.diffusion import DDPMObjective, FlowMatchingObjective, sample
from ditkit.diffusion.sampling import guided_output


class PointMassOracle(torch.nn.Module):
    """The exact denoiser for data that is always the tensor `c`."""

    def __init__(self, c, objective):
        super().__init__()
        self.c, self.objective = c, objective
        self.weight = torch.nn.Parameter(torch.zeros(1))  # sample() reads device and dtype from parameters

    def forward(self, x, t, y):
        if isinstance(self.objective, FlowMatchingObjective):
            s = (t / 1000).view(-1, 1, 1, 1)
            return (x - self.c) / s  # velocity = noise - data
        a = self.objective.scheduler.alphas_cumprod[t.long()].view(-1, 1, 1, 1)
        return (x - a.sqrt() * self.c) / (1 - a).sqrt()


@pytest.mark.parametrize("objective,sampler", [(FlowMatchingObjective(), "euler"),
                                               (DDPMObjective(learn_sigma=False), "ddim"),
                                               (DDPMObjective(learn_sigma=False), "ddpm")])
def test_samplers_recover_a_point_mass(objective, sampler):
    c = torch.linspace(-0.8, 0.8, 16).view(1, 1, 4, 4)
    out = sample(PointMassOracle(c, objective), objective, (3, 1, 4, 4), steps=10, sampler=sampler, progress=False)
    torch.testing.assert_close(out, c.expand(3, -1, -1, -1), atol=2e-3, rtol=0)


def test_same_seed_same_samples_other_seed_other_samples():
    objective = DDPMObjective(learn_sigma=False)
    model = PointMassOracle(torch.zeros(1, 1, 4, 4), objective)
    model.forward = lambda x, t, y: torch.tanh(x)  # any non-trivial denoiser
    kwargs = dict(steps=5, sampler="ddpm", progress=False)
    a = sample(model, objective, (2, 1, 4, 4), seed=3, **kwargs)
    assert torch.equal(a, sample(model, objective, (2, 1, 4, 4), seed=3, **kwargs))
    assert not torch.equal(a, sample(model, objective, (2, 1, 4, 4), seed=4, **kwargs))


def test_classifier_free_guidance_extrapolates_noise_channels_only():
    def model(x, t, y):  # prediction = label value on the noise channels, 7 on the variance channels
        eps = y.float().view(-1, 1, 1, 1).expand_as(x)
        return torch.cat([eps, torch.full_like(x, 7.0)], dim=1)

    x, t = torch.zeros(2, 2, 3, 3), torch.zeros(2)
    out = guided_output(model, x, t, torch.tensor([4, 4]), cfg_scale=3.0, null_label=1)
    torch.testing.assert_close(out[:, :2], torch.full_like(x, 1 + 3 * (4 - 1)))
    torch.testing.assert_close(out[:, 2:], torch.full_like(x, 7.0))
    torch.testing.assert_close(guided_output(model, x, t, torch.tensor([4, 4]), 1.0, 1)[:, :2], torch.full_like(x, 4.0))


def test_sampler_must_fit_the_objective():
    model = PointMassOracle(torch.zeros(1, 1, 2, 2), FlowMatchingObjective())
    with pytest.raises(DitkitError, match="does not fit the flow objective: use euler"):
        sample(model, FlowMatchingObjective(), (1, 1, 2, 2), sampler="ddim", progress=False)
