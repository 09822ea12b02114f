"""Diffusion objectives (DDPM, flow matching) and samplers (diffusers schedulers + CFG)."""

from .objectives import DDPMObjective, FlowMatchingObjective, build_objective
from .sampling import SAMPLERS, default_sampler, make_scheduler, sample

__all__ = ["DDPMObjective", "FlowMatchingObjective", "build_objective", "SAMPLERS", "default_sampler",
           "make_scheduler", "sample"]
