"""Beyond one device: process-group lifecycle (`launch`), FSDP2 sharding and sharded loading
(`sharding`, `sharded_load`), and the transport of exact patch-parallel sampling (`comm`, `strips`:
one strip of image rows per process) with ditkit's DiT on it (`PatchParallelDiT`). diffusers
transformers run on the same transport through `ditkit.diffusers.patch_parallel`."""

from .comm import STATS, CommStats
from .launch import SamplingSession, sampling_session
from .patch import PatchParallelDiT
from .strips import halo_plan, rows_needed, strip_bounds

__all__ = ["STATS", "CommStats", "PatchParallelDiT", "SamplingSession", "halo_plan", "rows_needed",
           "sampling_session", "strip_bounds"]
