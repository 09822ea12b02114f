"""Sampling with diffusers schedulers, classifier-free guidance and a seed.

`sample` is a small pure function: model, objective, sampler name, noise shape and seed in,
clean inputs out. Samplers: "ddpm" and "ddim" for the DDPM objective, "euler" (flow-match
Euler) for flow matching.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from torch import Tensor
from tqdm.auto import tqdm

from ..errors import DitkitError
from .objectives import DDPMObjective, FlowMatchingObjective

SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": ("euler",)}


def default_sampler(objective) -> str:
    return SAMPLERS[objective.name][0]


def make_scheduler(objective, sampler: str):
    """The diffusers scheduler for `sampler`, with the schedule `objective` was trained on."""
    if sampler not in SAMPLERS[objective.name]:
        raise DitkitError(f"sampler {sampler!r} does not fit the {objective.name} objective: "
                          f"use {' or '.join(SAMPLERS[objective.name])}")
    if isinstance(objective, FlowMatchingObjective):
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    assert isinstance(objective, DDPMObjective)
    common = dict(num_train_timesteps=objective.num_train_timesteps, beta_schedule="linear",
                  beta_start=objective.beta_start, beta_end=objective.beta_end, clip_sample=False,
                  timestep_spacing="trailing")  # "trailing" starts from the last step: pure noise
    if sampler == "ddim":
        return DDIMScheduler(**common)
    return DDPMScheduler(**common, variance_type="learned_range" if objective.learn_sigma else "fixed_small")


def guided_output(model, x: Tensor, t: Tensor, labels: Tensor | None, cfg_scale: float,
                  null_label: int | None, guidance_channels: int | None = None) -> Tensor:
    """Model output with classifier-free guidance on the first `guidance_channels` output channels
    (default: all input channels; the official DiT sample.py guides 3 of its 4 latent channels);
    the other channels, learned variance included, come from the conditional branch."""
    if labels is None or cfg_scale == 1.0:
        return model(x, t, labels)
    if null_label is None:
        raise DitkitError("this model has no null label (no class dropout in training): use --cfg 1")
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, torch.full_like(labels, null_label)]))
    cond, uncond = out.chunk(2)
    C = x.shape[1] if guidance_channels is None else guidance_channels
    guided = uncond[:, :C] + cfg_scale * (cond[:, :C] - uncond[:, :C])
    return torch.cat([guided, cond[:, C:]], dim=1)


def start_index(steps: int, strength: float) -> int:
    """Where sampling starts in a `steps`-step schedule for SDEdit at `strength`: the last
    floor(steps * strength) steps run (diffusers' img2img convention; 1 = all, 0 = none)."""
    if not 0.0 <= strength <= 1.0:
        raise DitkitError(f"strength must be between 0 and 1, got {strength}")
    return steps - min(int(steps * strength), steps)


def noised_start(scheduler, init: Tensor, noise: Tensor, index: int) -> Tensor:
    """`init` noised to the level of the schedule's step `index` (index 0: pure noise, as in plain sampling)."""
    if index == 0:
        return noise * getattr(scheduler, "init_noise_sigma", 1.0)
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        sigma = scheduler.sigmas[index]
        scheduler.set_begin_index(index)
        return sigma * noise + (1.0 - sigma) * init
    return scheduler.add_noise(init, noise, scheduler.timesteps[index : index + 1])


@torch.no_grad()
def sample(model, objective, shape: tuple[int, ...], *, labels: Tensor | None = None, steps: int = 50,
           cfg_scale: float = 1.0, seed: int = 0, sampler: str | None = None, progress: bool = True,
           noise: Tensor | None = None, init: Tensor | None = None, strength: float = 1.0,
           guidance_channels: int | None = None) -> Tensor:
    """Draw samples of `shape` (B, C, H, W) in the model's input space. Same seed, same result.

    With `init` (SDEdit / img2img): `init` is noised to `strength` (1 = pure noise: plain sampling;
    0 = returned unchanged) and denoised by the last floor(steps * strength) steps of the schedule.
    """
    if steps < 1:
        raise DitkitError(f"steps must be at least 1, got {steps}")
    first = start_index(steps, strength) if init is not None else 0
    if init is not None and tuple(init.shape) != tuple(shape):
        raise DitkitError(f"init has shape {tuple(init.shape)}, expected {tuple(shape)}")
    param = next(model.parameters())
    scheduler = make_scheduler(objective, sampler or default_sampler(objective))
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    if noise is None:
        noise = torch.randn(shape, generator=generator)
    if first == steps:
        return init.to(param.device, torch.float32)
    x = noised_start(scheduler, None if init is None else init.float().cpu(), noise.float(), first)
    x = x.to(param.device)
    embedder = getattr(model, "y_embedder", None)
    null_label = embedder.null_label if embedder is not None else None
    if labels is not None:
        labels = labels.to(param.device)
    C = shape[1]
    for t in tqdm(scheduler.timesteps[first:], desc="sampling", disable=not progress, leave=False):
        t_batch = t.to(param.device, torch.float32).expand(shape[0])
        out = guided_output(model, x.to(param.dtype), t_batch, labels, cfg_scale, null_label,
                            guidance_channels).float()
        if not isinstance(scheduler, DDPMScheduler) or scheduler.variance_type != "learned_range":
            out = out[:, :C]
        x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x
