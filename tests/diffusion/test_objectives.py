import math

import torch

from ditkit.diffusion import DDPMObjective, FlowMatchingObjective, build_objective
from ditkit.diffusion.objectives import discretized_gaussian_log_likelihood, normal_kl
from ditkit.record import DiffusionSettings


class Recorder(torch.nn.Module):
    """A fake model that returns a fixed function of its inputs and remembers them."""

    def __init__(self, fn):
        super().__init__()
        self.fn, self.calls = fn, []

    def forward(self, x, t, y):
        self.calls.append((x, t, y))
        return self.fn(x, t, y)


def test_flow_loss_is_mse_to_noise_minus_data_on_the_straight_path():
    objective = FlowMatchingObjective()
    x0 = torch.randn(3, 2, 4, 4)
    model = Recorder(lambda x, t, y: torch.zeros_like(x))
    loss = objective.loss(model, x0, None, torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(1)
    t = torch.rand(3, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t, t_in, _ = model.calls[0]
    torch.testing.assert_close(t_in, t * 1000)
    torch.testing.assert_close(x_t, (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * noise)
    torch.testing.assert_close(loss, ((noise - x0) ** 2).mean())


def test_flow_logit_normal_timesteps_are_in_the_open_interval():
    t = FlowMatchingObjective("logit_normal").sample_t(1000, torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1 and abs(t.mean() - 0.5) < 0.05


def oracle_eps(objective, x0):
    """The exact noise, recovered from x_t since the model is told x0: the loss minimiser."""
    ac = objective.scheduler.alphas_cumprod

    def fn(x, t, y):
        a = ac[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    return fn


def test_ddpm_oracle_has_zero_loss():
    objective = DDPMObjective(learn_sigma=False)
    x0 = torch.rand(4, 1, 4, 4) * 2 - 1
    loss = objective.loss(Recorder(oracle_eps(objective, x0)), x0, None, torch.Generator().manual_seed(0))
    assert loss.item() < 1e-8


def test_ddpm_variance_bound_vanishes_for_the_true_posterior_variance():
    objective = DDPMObjective(learn_sigma=True)
    x0 = torch.rand(64, 1, 4, 4) * 2 - 1
    eps = oracle_eps(objective, x0)
    # var output -1 selects the lower end of the learned range: the true posterior variance (t > 0).
    model = Recorder(lambda x, t, y: torch.cat([eps(x, t, y), -torch.ones_like(x)], dim=1))
    g = torch.Generator().manual_seed(0)
    loss = objective.loss(model, x0, None, g)
    t = model.calls[0][1]
    assert (t > 0).all() and loss.item() < 1e-6
    # the upper end (beta_t) is a different variance: the bound is positive
    wrong = Recorder(lambda x, t, y: torch.cat([eps(x, t, y), torch.ones_like(x)], dim=1))
    assert objective.loss(wrong, x0, None, torch.Generator().manual_seed(0)).item() > 1e-4


def test_normal_kl_and_discretized_likelihood():
    m, lv = torch.randn(5), torch.randn(5)
    torch.testing.assert_close(normal_kl(m, lv, m, lv), torch.zeros(5))
    torch.testing.assert_close(normal_kl(torch.zeros(1), torch.zeros(1), torch.ones(1), torch.zeros(1)),
                               torch.tensor([0.5]))
    # the 256 bins of [-1, 1] carry all the probability mass
    centers = torch.linspace(-1, 1, 256)
    probs = discretized_gaussian_log_likelihood(centers, torch.full_like(centers, 0.1),
                                                torch.full_like(centers, math.log(0.3))).exp()
    assert abs(probs.sum().item() - 1) < 1e-4


def test_a_runs_diffusion_settings_build_its_objective():
    ddpm = build_objective(DiffusionSettings(objective="ddpm", learn_sigma=False))
    flow = build_objective(DiffusionSettings(objective="flow", timestep_sampling="logit_normal"))
    assert isinstance(ddpm, DDPMObjective) and not ddpm.learn_sigma
    assert isinstance(flow, FlowMatchingObjective) and flow.timestep_sampling == "logit_normal"
