"""Process-group setup for `ditkit sample --parallel patch` under torchrun.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; without it (or with
one process) sampling runs as a single strip and no process group is formed.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..errors import DitkitError
from .patch import PatchParallelDiT

MODES = ("none", "patch")


@dataclass(frozen=True)
class SamplingSession:
    mode: str
    device: str
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """The process that prints and writes files."""
        return self.rank == 0

    def wrap(self, model: nn.Module) -> nn.Module:
        return PatchParallelDiT(model) if self.mode == "patch" else model


def default_device(device: str | None) -> str:
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def join_process_group(device: str | None) -> tuple[str, bool]:
    """(this process's device, whether we formed the group): NCCL on GPUs (one per local rank), gloo on CPU."""
    device = default_device(device)
    if dist.is_initialized():
        return device, False
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DitkitError("--device cuda but torch sees no GPU: use --device cpu")
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
        return f"cuda:{local_rank}", True
    dist.init_process_group("gloo")
    return device, True


@contextmanager
def sampling_session(mode: str, device: str | None = None):
    """Yields a SamplingSession; with mode "patch" under torchrun, one process per strip."""
    if mode not in MODES:
        raise DitkitError(f"unknown --parallel {mode!r}: choose one of {', '.join(MODES)}")
    if mode == "none" or int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        yield SamplingSession(mode, default_device(device))
        return
    device, formed = join_process_group(device)
    try:
        yield SamplingSession(mode, device, dist.get_rank(), dist.get_world_size())
        if formed:  # leave together: a process tearing gloo down while its peer still talks to it can abort
            dist.barrier()
    finally:
        if formed:
            dist.destroy_process_group()
