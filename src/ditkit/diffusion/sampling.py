"""Sampling with diffusers schedulers, classifier-free guidance and a seed.

`sample` is a small pure function: model, objective, sampler name, noise shape and seed in,
clean inputs out. Samplers: "ddpm" and "ddim" for the DDPM objective, "euler" (flow-match
Euler) for flow matching; or any diffusers scheduler from its saved config (`scheduler_config`,
e.g. a DiTPipeline's), optionally stepped exactly as DiTPipeline steps it (`step_like_dit_pipeline`).

The timestep spacing (`timestep_spacing`, from the run record): diffusers' "trailing" (ditkit's own
runs), "leading" or "linspace", or "official": DiT's `space_timesteps` respacing and posterior
(`respacing.RespacedDDPM`), the sampler of converted official DiT and U-DiT checkpoints.
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor
from tqdm.auto import tqdm

import diffusers
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

from ..errors import DitkitError
from ..record import OFFICIAL_SPACING, SAMPLERS, check_sampler, check_spacing
from .objectives import DDPMObjective, FlowMatchingObjective
from .respacing import RespacedDDPM


def default_sampler(objective) -> str:
    return SAMPLERS[objective.name][0]


def make_scheduler(objective, sampler: str, timestep_spacing: str | None = None):
    """The scheduler for `sampler`, with the schedule `objective` was trained on and the spacing
    `timestep_spacing` (default "trailing": it starts from the last step, pure noise)."""
    check_sampler(objective.name, sampler)
    check_spacing(objective.name, sampler, timestep_spacing)
    if isinstance(objective, FlowMatchingObjective):
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    assert isinstance(objective, DDPMObjective)
    if timestep_spacing == OFFICIAL_SPACING:
        return official_scheduler(objective)
    common = dict(num_train_timesteps=objective.num_train_timesteps, beta_schedule="linear",
                  beta_start=objective.beta_start, beta_end=objective.beta_end, clip_sample=False,
                  timestep_spacing=timestep_spacing or "trailing")
    if sampler == "ddim":
        return DDIMScheduler(**common)
    return DDPMScheduler(**common, variance_type="learned_range" if objective.learn_sigma else "fixed_small")


def official_scheduler(objective: DDPMObjective) -> RespacedDDPM:
    """The official DiT sampler over the objective's betas (learned-range or fixed-large variance)."""
    return RespacedDDPM(objective.num_train_timesteps, objective.beta_start, objective.beta_end,
                        learn_sigma=objective.learn_sigma)


def scheduler_from_config(config: dict, timestep_spacing: str | None = None):
    """The diffusers scheduler a saved config describes (its `_class_name`), built with `from_config`;
    a diffusers `timestep_spacing` replaces the config's own."""
    scheduler_class = getattr(diffusers, str(config.get("_class_name")), None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
        raise DitkitError(f"diffusion.scheduler names {config.get('_class_name')!r}, which is no scheduler of "
                          f"diffusers {diffusers.__version__}: name a sampler (--sampler) or upgrade diffusers")
    if timestep_spacing is None or timestep_spacing == config.get("timestep_spacing"):
        return scheduler_class.from_config(config)
    return scheduler_class.from_config(config, timestep_spacing=timestep_spacing)


def build_scheduler(objective, sampler: str | None, scheduler_config: dict | None, timestep_spacing: str | None):
    """The scheduler `sample` steps: a named sampler, else the run's saved scheduler config, else the
    objective's default; the official spacing is always the official sampler."""
    if timestep_spacing == OFFICIAL_SPACING and isinstance(objective, DDPMObjective):
        check_sampler(objective.name, sampler)
        check_spacing(objective.name, sampler, timestep_spacing)
        return official_scheduler(objective)
    if scheduler_config is not None and sampler is None:
        return scheduler_from_config(scheduler_config, timestep_spacing)
    return make_scheduler(objective, sampler or default_sampler(objective), timestep_spacing)


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


def step_options(scheduler, generator: torch.Generator) -> dict:
    """What `scheduler.step` takes besides (output, t, x): the generator, where it draws noise."""
    return {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}


def uses_learned_variance(scheduler) -> bool:
    """Whether the scheduler steps with a learned-sigma model's variance channels."""
    if isinstance(scheduler, RespacedDDPM):
        return scheduler.learn_sigma
    return isinstance(scheduler, DDPMScheduler) and scheduler.variance_type == "learned_range"


def denoise_step(scheduler, out: Tensor, t: Tensor, x: Tensor, channels: int, options: dict,
                 like_dit_pipeline: bool = False, paired: bool = False) -> Tensor:
    """One scheduler step from model output `out`. The variance channels of a learned-sigma model
    go to the scheduler only where it uses them (DDPM "learned_range"); DiTPipeline never gives
    them. `paired`: step the batch twice over, as DiTPipeline steps its guided (cond, uncond) pair,
    so that a stochastic scheduler draws its noise for 2B samples and uses the first B."""
    learned = uses_learned_variance(scheduler)
    if learned and not like_dit_pipeline and out.shape[1] != 2 * channels:
        raise DitkitError(f"the model outputs {out.shape[1]} channels, not the {2 * channels} of a learned-sigma "
                          "model: its record's diffusion.learn_sigma must be false")
    if like_dit_pipeline or not learned:
        out = out[:, :channels]
    if paired:
        out, x = torch.cat([out, out]), torch.cat([x, x])
    return scheduler.step(out, t, x, **options).prev_sample[: len(x) // 2 if paired else len(x)]


@torch.no_grad()
def sample(model, objective, shape: tuple[int, ...], *, labels: Tensor | None = None, steps: int = 50,
           cfg_scale: float = 1.0, seed: int = 0, sampler: str | None = None, progress: bool = True,
           noise: Tensor | None = None, init: Tensor | None = None, strength: float = 1.0,
           guidance_channels: int | None = None, scheduler_config: dict | None = None,
           step_like_dit_pipeline: bool = False, timestep_spacing: str | None = None) -> Tensor:
    """Draw samples of `shape` (B, C, H, W) in the model's input space. Same seed, same result.

    With `init` (SDEdit / img2img): `init` is noised to `strength` (1 = pure noise: plain sampling;
    0 = returned unchanged) and denoised by the last floor(steps * strength) steps of the schedule.

    `scheduler_config` (a diffusers scheduler config) replaces the objective's default sampler when
    no `sampler` is named. `step_like_dit_pipeline` denoises as diffusers' DiTPipeline does (see
    `denoise_step`; guidance only when cfg_scale > 1): with the same seed (the pipeline given
    `generator=torch.manual_seed(seed)`) the same latents, for schedulers whose `init_noise_sigma`
    is 1 and whose `scale_model_input` is the identity (DDPM, DDIM, DPM-Solver, UniPC, DEIS, PNDM):
    DiTPipeline neither scales the starting noise nor unscales the input it steps, where ditkit does.

    `timestep_spacing`: see the module docstring; None keeps the sampler's own ("trailing" for
    ditkit's samplers, the config's for `scheduler_config`).
    """
    if steps < 1:
        raise DitkitError(f"steps must be at least 1, got {steps}")
    first = start_index(steps, strength) if init is not None else 0
    if init is not None and tuple(init.shape) != tuple(shape):
        raise DitkitError(f"init has shape {tuple(init.shape)}, expected {tuple(shape)}")
    param = next(model.parameters())
    scheduler = build_scheduler(objective, sampler, scheduler_config, timestep_spacing)
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
    if step_like_dit_pipeline and cfg_scale <= 1:
        cfg_scale = 1.0  # DiTPipeline guides only above 1
    paired = step_like_dit_pipeline and labels is not None and cfg_scale != 1.0
    options = step_options(scheduler, generator)
    for t in tqdm(scheduler.timesteps[first:], desc="sampling", disable=not progress, leave=False):
        t_batch = t.to(param.device, torch.float32).expand(shape[0])
        x_in = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        out = guided_output(model, x_in.to(param.dtype), t_batch, labels, cfg_scale, null_label,
                            guidance_channels).float()
        x = denoise_step(scheduler, out, t, x, shape[1], options, step_like_dit_pipeline, paired)
    return x
