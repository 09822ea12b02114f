"""The official DiT / ADM sampler: `space_timesteps` respacing and the respaced DDPM posterior.

facebookresearch/DiT samples with `create_diffusion(str(steps))`: the 1000 training steps are
respaced to `steps` evenly spread steps (a fractional stride, each index rounded; always 0 and 999),
the respaced process gets its own betas (1 - alphas_cumprod[t] / alphas_cumprod[previous kept t]),
and each step draws x_{t-1} from the posterior with the model's learned-range variance (or the
"fixed large" variance without learned sigma), adding no noise at the last step (t = 0). Every table
is computed in float64 and read as float32, as the official code does, so a converted official
checkpoint samples as its own sample.py does.

`RespacedDDPM` is stepped by `sampling.sample` like a diffusers scheduler (timesteps, step, add_noise).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import DitkitError


def space_timesteps(num_train_timesteps: int, steps: int) -> list[int]:
    """The official respacing of one section: `steps` of the `num_train_timesteps` steps, ascending."""
    if not 1 <= steps <= num_train_timesteps:
        raise DitkitError(f"the official timestep spacing takes 1 to {num_train_timesteps} steps, got {steps}")
    stride = (num_train_timesteps - 1) / (steps - 1) if steps > 1 else 1
    position, kept = 0.0, []
    for _ in range(steps):
        kept.append(round(position))  # Python's round, as the official code: halves go to the even side
        position += stride  # accumulated, not multiplied: the same floats as the official loop
    return sorted(set(kept))


@dataclass
class StepOutput:
    prev_sample: Tensor


class RespacedDDPM:
    """DDPM sampling over the official respacing (see the module docstring), scheduler-like."""

    init_noise_sigma = 1.0

    def __init__(self, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                 learn_sigma: bool = True):
        self.num_train_timesteps, self.learn_sigma = num_train_timesteps, learn_sigma
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        self.train_alphas_cumprod = torch.cumprod(1 - betas, 0)
        self.timesteps = torch.tensor([], dtype=torch.long)

    def set_timesteps(self, steps: int) -> None:
        kept = space_timesteps(self.num_train_timesteps, steps)
        self.timesteps = torch.tensor(kept[::-1], dtype=torch.long)
        self._index = {t: i for i, t in enumerate(kept)}
        alphas_cumprod = self.train_alphas_cumprod[kept]
        previous = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        betas = 1 - alphas_cumprod / previous  # the respaced process's own betas
        posterior_variance = betas * (1 - previous) / (1 - alphas_cumprod)
        # at t = 0 the posterior variance is 0: the official code takes the next one's (its log is clipped)
        first_usable = posterior_variance[1:2] if len(kept) > 1 else betas[:1]
        fixed_large = torch.cat([first_usable, betas[1:]])
        self._tables = {
            "sqrt_recip_ac": torch.sqrt(1 / alphas_cumprod),
            "sqrt_recipm1_ac": torch.sqrt(1 / alphas_cumprod - 1),
            "mean_coef_x0": betas * torch.sqrt(previous) / (1 - alphas_cumprod),
            "mean_coef_xt": (1 - previous) * torch.sqrt(1 - betas) / (1 - alphas_cumprod),
            "min_log": torch.log(torch.cat([first_usable, posterior_variance[1:]])),
            "max_log": torch.log(betas),
            "fixed_large_log": torch.log(fixed_large),
        }

    def _at(self, name: str, index: int, like: Tensor) -> Tensor:
        return self._tables[name][index].to(like.device, torch.float32)

    def step(self, model_output: Tensor, timestep: Tensor | int, sample: Tensor,
             generator: torch.Generator | None = None) -> StepOutput:
        """x_{t-1} from x_t and the model output (epsilon, then the variance channels if learned)."""
        index = self._index[int(timestep)]
        channels = sample.shape[1]
        if self.learn_sigma and model_output.shape[1] != 2 * channels:
            raise DitkitError(f"the model outputs {model_output.shape[1]} channels, not the {2 * channels} of a "
                              "learned-sigma model: its record's diffusion.learn_sigma must be false")
        eps = model_output[:, :channels]
        pred_x0 = self._at("sqrt_recip_ac", index, sample) * sample - self._at("sqrt_recipm1_ac", index, sample) * eps
        mean = self._at("mean_coef_x0", index, sample) * pred_x0 + self._at("mean_coef_xt", index, sample) * sample
        if index == 0:  # the last step (t = 0) adds no noise
            return StepOutput(mean)
        if self.learn_sigma:
            fraction = (model_output[:, channels:] + 1) / 2  # the learned range: [-1, 1] -> [min, max] log variance
            log_variance = fraction * self._at("max_log", index, sample) + (1 - fraction) * self._at(
                "min_log", index, sample)
        else:
            log_variance = self._at("fixed_large_log", index, sample)
        noise = torch.randn(sample.shape, generator=generator).to(sample.device, sample.dtype)
        return StepOutput(mean + torch.exp(0.5 * log_variance) * noise)

    def add_noise(self, original: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """x_t for SDEdit: the clean `original` noised to the (training) timestep `timesteps`."""
        alpha_cumprod = self.train_alphas_cumprod[timesteps.long().cpu()].view(-1, *([1] * (original.ndim - 1)))
        keep, spread = alpha_cumprod.sqrt(), (1 - alpha_cumprod).sqrt()
        return keep.to(original.device, torch.float32) * original + spread.to(original.device, torch.float32) * noise
