"""Training objectives: DDPM epsilon prediction (DiT) and rectified flow (FLUX / SD3).

Both take every random draw from an explicit `torch.Generator`, so a training step is a pure
function of (weights, batch, generator): that is what makes resume exact.

Timestep convention for the model input: DDPM uses integer steps 0..999; flow matching uses
t in [0, 1] (t=1 is pure noise) fed to the model as 1000 * t, the diffusers convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from diffusers import DDPMScheduler

from ..errors import DitkitError
from ..record import DiffusionSettings


def mean_flat(x: Tensor) -> Tensor:
    return x.mean(dim=tuple(range(1, x.ndim)))


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)), elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log p(x) of data in [-1, 1] quantised to 256 bins under N(mean, e^(2 log_scale)) (IDDPM)."""
    inv_std = torch.exp(-log_scale)
    cdf_plus = torch.special.ndtr(inv_std * (x - mean + 1 / 255))
    cdf_min = torch.special.ndtr(inv_std * (x - mean - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


@dataclass
class DDPMObjective:
    """DiT's objective: linear betas 1e-4..0.02 over 1000 steps, MSE on epsilon, and with
    `learn_sigma` the IDDPM variational bound term that trains the variance channels."""

    learn_sigma: bool = True
    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    name = "ddpm"

    def __post_init__(self):
        self.scheduler = DDPMScheduler(num_train_timesteps=self.num_train_timesteps, beta_schedule="linear",
                                       beta_start=self.beta_start, beta_end=self.beta_end, clip_sample=False)
        betas = self.scheduler.betas.double()
        alphas_cumprod = torch.cumprod(1 - betas, 0)
        prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
        self._tables = {
            "sqrt_recip_ac": torch.sqrt(1 / alphas_cumprod),
            "sqrt_recipm1_ac": torch.sqrt(1 / alphas_cumprod - 1),
            "post_coef1": betas * torch.sqrt(prev) / (1 - alphas_cumprod),
            "post_coef2": (1 - prev) * torch.sqrt(1 - betas) / (1 - alphas_cumprod),
            "post_logvar": torch.log(torch.cat([posterior_variance[1:2], posterior_variance[1:]])),
            "log_betas": torch.log(betas),
        }

    def _at(self, name: str, t: Tensor, like: Tensor) -> Tensor:
        values = self._tables[name].to(like.device)[t].to(like.dtype)
        return values.view(-1, *([1] * (like.ndim - 1)))

    def loss(self, model, x0: Tensor, y: Tensor | None, generator: torch.Generator) -> Tensor:
        B, C = x0.shape[:2]
        t = torch.randint(0, self.num_train_timesteps, (B,), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        x_t = self.scheduler.add_noise(x0, noise, t)
        out = model(x_t, t, y)
        if out.shape[1] != (2 * C if self.learn_sigma else C):
            raise DitkitError(f"model outputs {out.shape[1]} channels but the objective expects "
                              f"{2 * C if self.learn_sigma else C}: set learn_sigma to match the model")
        eps = out[:, :C]
        loss = mean_flat((noise - eps.float()) ** 2)
        if self.learn_sigma:
            loss = loss + self._variance_bound(x0, x_t, t, eps.detach(), out[:, C:])
        return loss.mean()

    def _variance_bound(self, x0: Tensor, x_t: Tensor, t: Tensor, eps: Tensor, var_out: Tensor) -> Tensor:
        """IDDPM's L_vlb term, in bits, with the mean frozen so it only trains the variance."""
        x0, x_t, eps, var_out = x0.float(), x_t.float(), eps.float(), var_out.float()
        true_mean = self._at("post_coef1", t, x0) * x0 + self._at("post_coef2", t, x0) * x_t
        true_logvar = self._at("post_logvar", t, x0)
        pred_x0 = self._at("sqrt_recip_ac", t, x0) * x_t - self._at("sqrt_recipm1_ac", t, x0) * eps
        model_mean = self._at("post_coef1", t, x0) * pred_x0 + self._at("post_coef2", t, x0) * x_t
        frac = (var_out + 1) / 2  # "learned range": interpolate between the two bounds of the variance
        model_logvar = frac * self._at("log_betas", t, x0) + (1 - frac) * true_logvar
        kl = mean_flat(normal_kl(true_mean, true_logvar, model_mean, model_logvar)) / math.log(2.0)
        nll = -mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar)) / math.log(2.0)
        return torch.where(t == 0, nll, kl)


@dataclass
class FlowMatchingObjective:
    """Rectified flow as in FLUX / SD3: x_t = (1 - t) x0 + t noise, the model predicts the
    velocity noise - x0. `timestep_sampling`: "uniform" or "logit_normal" (SD3)."""

    timestep_sampling: str = "uniform"

    name = "flow"
    learn_sigma = False

    def __post_init__(self):
        if self.timestep_sampling not in ("uniform", "logit_normal"):
            raise DitkitError(f"unknown timestep_sampling {self.timestep_sampling!r}: use uniform or logit_normal")

    def sample_t(self, batch: int, generator: torch.Generator) -> Tensor:
        if self.timestep_sampling == "logit_normal":
            return torch.sigmoid(torch.randn(batch, generator=generator))
        return torch.rand(batch, generator=generator)

    def loss(self, model, x0: Tensor, y: Tensor | None, generator: torch.Generator) -> Tensor:
        t = self.sample_t(x0.shape[0], generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0)
        t_ = t.view(-1, *([1] * (x0.ndim - 1))).to(x0)
        x_t = (1 - t_) * x0 + t_ * noise
        v = model(x_t, t * 1000, y)
        if v.shape[1] != x0.shape[1]:
            raise DitkitError(f"model outputs {v.shape[1]} channels for {x0.shape[1]}-channel data: "
                              "flow matching needs a model with learn_sigma=false")
        return mean_flat((v.float() - (noise - x0).float()) ** 2).mean()


def build_objective(settings: DiffusionSettings) -> DDPMObjective | FlowMatchingObjective:
    """The training objective (loss, noise schedule) that a run's diffusion settings describe."""
    if settings.objective == "ddpm":
        return DDPMObjective(learn_sigma=settings.learn_sigma)
    if settings.objective == "flow":
        return FlowMatchingObjective(timestep_sampling=settings.timestep_sampling)
    raise DitkitError(f"unknown objective {settings.objective!r}: use ddpm or flow")
