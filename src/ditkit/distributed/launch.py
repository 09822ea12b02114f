"""The process-group lifecycle, written once: a process started by torchrun joins the group
(`process_group`), works, and leaves it together with the others. `ditkit sample/generate
--parallel patch` (one strip per process) and sharded `ditkit distill` run inside it; sharded
training checks for it (`require_process_group`).

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK and the rendezvous address; without it a command runs
in this process alone and no group is formed.
"""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from accelerate import PartialState
from torch import nn

from ..errors import DitkitError
from .patch import PatchParallelDiT

MODES = ("none", "patch")


@dataclass(frozen=True)
class Processes:
    """This process's place among the ones torchrun started (one process: rank 0 of 1)."""

    device: str
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        """The process that prints and writes files."""
        return self.rank == 0


@dataclass(frozen=True)
class SamplingSession(Processes):
    mode: str = "none"

    def wrap(self, model: nn.Module) -> nn.Module:
        return PatchParallelDiT(model) if self.mode == "patch" else model


def default_device(device: str | None) -> str:
    """The device a command runs on: `device` (--device) when this torch can use it, else cuda when
    available, else cpu. Every command's --device passes here, so a device torch cannot use (cuda on a
    CPU-only build, a misspelt name) is one line before any work."""
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        kind = torch.device(device).type
    except (RuntimeError, ValueError) as error:
        raise DitkitError(f"--device {device!r} is not a device torch knows: use cpu, cuda or cuda:N") from error
    backend = getattr(torch, kind, None) if kind != "cpu" else None
    if kind != "cpu" and not (backend is not None and hasattr(backend, "is_available") and backend.is_available()):
        raise DitkitError(f"--device {device}: this torch ({torch.__version__}) cannot use {kind} (a build without "
                          f"it, or no {kind} device visible): leave --device unset, or use cpu")
    return device


def torchrun_processes() -> int:
    """How many processes torchrun started (WORLD_SIZE); 0 without torchrun."""
    return int(os.environ.get("WORLD_SIZE", 0))


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


def leave_process_group() -> None:
    """Leave together: the models (and the communication they hold) go while the group still lives,
    and a process tearing gloo down while its peer still talks to it can abort."""
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


@contextmanager
def process_group(device: str | None, join: bool = True) -> Iterator[Processes]:
    """Yields this process's Processes: with `join`, in the process group torchrun set up (joined
    here, and left after, unless it already existed), otherwise in this process alone. After an
    error the group is not torn down: the other processes may be inside a collective, and torchrun
    stops them when this one exits."""
    if not join:
        yield Processes(default_device(device))
        return
    device, formed = join_process_group(device)
    yield Processes(device, dist.get_rank(), dist.get_world_size())
    if formed:
        leave_process_group()


@contextmanager
def sampling_session(mode: str, device: str | None = None) -> Iterator[SamplingSession]:
    """Yields a SamplingSession; with mode "patch" under torchrun, one process per strip."""
    if mode not in MODES:
        raise DitkitError(f"unknown --parallel {mode!r}: choose one of {', '.join(MODES)}")
    with process_group(device, join=mode == "patch" and torchrun_processes() > 1) as processes:
        yield SamplingSession(processes.device, processes.rank, processes.world_size, mode=mode)


def sharded_processes(sharding: str, device: str | None = None):
    """The processes of a `sharding: fsdp` run started by torchrun (one process is a group too);
    an unsharded run, or one without torchrun (the sharded code then names the fix), runs alone."""
    return process_group(device, join=sharding == "fsdp" and torchrun_processes() > 0)


def require_process_group(command: str) -> tuple[int, int]:
    """(rank, world size) of the process group torchrun made; sharding cannot start without one."""
    if not (dist.is_available() and dist.is_initialized()):
        raise DitkitError(f"sharding=fsdp needs a process group: start with torchrun --nproc_per_node N -m "
                          f"ditkit.cli.main {command} ... (N = 1 works too)")
    return dist.get_rank(), dist.get_world_size()


def is_main_process() -> bool:
    """Whether this is the process that prints: accelerate's view, which `ditkit train` runs under."""
    return PartialState().is_main_process
