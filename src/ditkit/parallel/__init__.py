"""Beyond one device: exact patch-parallel sampling (one strip of image rows per process), of ditkit's
DiT (`PatchParallelDiT`) and of diffusers transformers with CLEAR (`patch_parallel`)."""

from .comm import STATS, CommStats
from .diffusers_patch import disable_patch_parallel, enable_patch_parallel, patch_parallel
from .launch import SamplingSession, sampling_session
from .patch import PatchParallelDiT
from .strips import halo_plan, rows_needed, strip_bounds

__all__ = ["STATS", "CommStats", "PatchParallelDiT", "SamplingSession", "disable_patch_parallel",
           "enable_patch_parallel", "halo_plan", "patch_parallel", "rows_needed", "sampling_session", "strip_bounds"]
