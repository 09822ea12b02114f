"""Beyond one device: exact patch-parallel sampling (one strip of image rows per process)."""

from .comm import STATS, CommStats
from .launch import SamplingSession, sampling_session
from .patch import PatchParallelDiT
from .strips import halo_plan, rows_needed, strip_bounds

__all__ = ["STATS", "CommStats", "PatchParallelDiT", "SamplingSession", "halo_plan", "rows_needed",
           "sampling_session", "strip_bounds"]
