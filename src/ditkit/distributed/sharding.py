"""Sharded training on plain PyTorch FSDP2 (`fully_shard`) and torch.distributed.checkpoint (DCP).

`ditkit train` and `ditkit distill` with `sharding: fsdp`, started by torchrun: every repeated
block is its own FSDP unit (its parameters all-gathered just before it runs and freed after),
then the root takes the rest. The EMA is a dict of DTensors laid out like the parameters, so
its update is a local `lerp_` on each process's shard. A checkpoint's sharded state (weights,
EMA, optimizer moments) is one DCP folder, which loads on any number of processes; the full
weights are also exported as ordinary safetensors for every loader that does not shard.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import Tensor, nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from ..checkpoint import save_checkpoint, staging_folder
from ..errors import DitkitError
from ..models.layers import ConditionedBlocks

SHARDED_STATE = "sharded"  # the DCP folder inside a checkpoint folder
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The outermost transformer blocks: the items of ditkit's ConditionedBlocks lists and of
    diffusers' *transformer_blocks, leaving out blocks nested in another (U-DiT's pairs). They are
    the FSDP units and the activation-checkpointing units."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, ConditionedBlocks) or (isinstance(module, nn.ModuleList)
                                                     and name.split(".")[-1].endswith("transformer_blocks")):
            found.update((f"{name}.{index}", block) for index, block in enumerate(module))
    return [block for name, block in found.items()
            if not any(name.startswith(outer + ".") for outer in found if outer != name)]


def _recompute_in_backward(forward: Callable, *args, **kwargs):
    if not torch.is_grad_enabled():  # sampling, evaluation: nothing to save memory for
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_activations(model: nn.Module) -> int:
    """Per-block activation checkpointing: each block keeps only its inputs in the forward pass and
    recomputes the rest in backward. The block's `forward` is wrapped in place, inside the module's
    call (and so inside FSDP's hooks, which gather the weights again before the recomputation);
    parameter names and state dicts do not change. Returns the number of blocks wrapped."""
    blocks = repeated_blocks(model)
    for block in blocks:
        if not isinstance(block.forward, functools.partial):  # wrapped once, whatever calls this
            block.forward = functools.partial(_recompute_in_backward, block.forward)
    return len(blocks)


def shard_rows(rows: int, processes: int, rank: int) -> tuple[int, int]:
    """The rows [start, stop) of a tensor's dim 0 that process `rank` holds under FSDP2's Shard(0)
    (torch.chunk: chunks of ceil(rows / P), the last ones shorter or empty)."""
    chunk = -(-rows // processes)
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def shard_model(model: nn.Module, device: torch.device, first_units: Iterable[nn.Module] = (),
                compute_dtype: torch.dtype | None = None) -> nn.Module:
    """fully_shard `first_units` (modules whose dtype differs from their block's), then every
    repeated block, then the root, over all processes. `compute_dtype` (bf16) is the dtype the
    gathered weights compute in; gradients are reduced in fp32 and the outputs are fp32."""
    mesh = dist.device_mesh.init_device_mesh(device.type, (dist.get_world_size(),))
    inner = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    for unit in [*first_units, *repeated_blocks(model)]:
        fully_shard(unit, mesh=mesh, mp_policy=inner)
    outer = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32, output_dtype=torch.float32)
    return fully_shard(model, mesh=mesh, mp_policy=outer)


def sharded_ema(model: nn.Module) -> dict[str, Tensor]:
    """An fp32 copy of the (sharded) parameters, each laid out like its parameter."""
    return {name: p.detach().float().clone() for name, p in model.named_parameters()}


@torch.no_grad()
def update_sharded_ema(ema: dict[str, Tensor], model: nn.Module, decay: float) -> None:
    for name, p in model.named_parameters():
        ema[name].lerp_(p.detach().float(), 1 - decay)


def full_tensors(state: dict[str, Tensor], keep: bool) -> dict[str, Tensor]:
    """Whole CPU tensors of a state dict whose entries may be DTensors; every process must call this
    (it all-gathers one tensor at a time), and only where `keep` (the main process) are they kept."""
    out = {}
    for name, tensor in state.items():
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
        if keep:
            out[name] = full.detach().cpu()
    return out


def ema_state(model: nn.Module, ema: dict[str, Tensor]) -> dict[str, Tensor]:
    """The model's state dict with the EMA in place of its parameters (buffers are not averaged)."""
    return {name: ema.get(name, tensor) for name, tensor in model.state_dict().items()}


def _dcp_state(model: nn.Module, optimizer: torch.optim.Optimizer, extra: dict[str, dict[str, Tensor]],
               model_keys: Iterable[str] | None) -> dict:
    """What a DCP folder holds: the model (all of it, or the `model_keys` entries), the optimizer
    state, and `extra` dicts of tensors (the EMA)."""
    model_state = get_model_state_dict(model)
    if model_keys is not None:
        keys = set(model_keys)
        model_state = {k: v for k, v in model_state.items() if k in keys}
    return {"model": model_state, "optimizer": get_optimizer_state_dict(model, optimizer), **extra}


def save_sharded(folder, model: nn.Module, optimizer: torch.optim.Optimizer,
                 extra: dict[str, dict[str, Tensor]] | None = None, model_keys: Iterable[str] | None = None) -> None:
    """Every process writes its shards of the model, optimizer and `extra` into the DCP `folder`."""
    dcp.save(_dcp_state(model, optimizer, extra or {}, model_keys), checkpoint_id=str(folder))


def load_sharded(folder, model: nn.Module, optimizer: torch.optim.Optimizer,
                 extra: dict[str, dict[str, Tensor]] | None = None, model_keys: Iterable[str] | None = None) -> None:
    """Load what `save_sharded` wrote (on any number of processes: DCP re-shards) into the model,
    the optimizer and, in place, the `extra` tensors."""
    state = _dcp_state(model, optimizer, extra or {}, model_keys)
    try:
        dcp.load(state, checkpoint_id=str(folder))
    except (Exception, CheckpointException) as error:  # a BaseException holding each process's traceback
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = lines[-1][:300] if lines else type(error).__name__  # the last line names the failure
        raise DitkitError(f"the sharded state {folder} does not fit this run ({reason}): resume with the "
                          "config it was trained with") from error
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=model_keys is None))
    set_optimizer_state_dict(model, optimizer, state["optimizer"])


def check_checkpoint_kind(path: Path, sharded: bool, command: str) -> None:
    """A sharded checkpoint resumes sharded, an unsharded one unsharded: their optimizer states differ."""
    has_sharded_state = (path / SHARDED_STATE).is_dir()
    if has_sharded_state and not sharded:
        raise DitkitError(f"checkpoint {path} was written by sharded training: resume it with sharding=fsdp, started "
                          f"by torchrun --nproc_per_node N -m ditkit.cli.main {command} (any N)")
    if sharded and not has_sharded_state:
        raise DitkitError(f"checkpoint {path} has no sharded state ({SHARDED_STATE}/): resume it with sharding=none, "
                          "or start a sharded run afresh in another output folder")


def from_main(value):
    """The main process's `value` on every process (itself without a process group of several)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def broadcast_refusal(refusal: str | None) -> None:
    """Raise the main process's DitkitError message (None: no refusal) on every process."""
    refusal = from_main(refusal)
    if refusal is not None:
        raise DitkitError(refusal)


def save_staged_checkpoint(root: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                           is_main: bool, full_weights: Callable[[], tuple[dict, dict | None]],
                           extra: dict[str, dict[str, Tensor]] | None = None,
                           model_keys: Iterable[str] | None = None, **checkpoint) -> Path:
    """A sharded checkpoint: every process writes its shards (model or its `model_keys`, optimizer,
    `extra`) into the staging folder the main process makes; `full_weights()` (called on every
    process: it gathers) gives the main process the whole (model, EMA) weights, which it saves and
    completes the folder with (`save_checkpoint(**checkpoint)`); its refusal stops every process."""
    staged = from_main(staging_folder(root, step) if is_main else None)
    save_sharded(staged / SHARDED_STATE, model, optimizer, extra, model_keys)
    weights, ema = full_weights()
    refusal = None
    if is_main:
        try:
            save_checkpoint(root, step, model=weights, ema=ema, optimizer=None, staged=staged, **checkpoint)
        except DitkitError as error:
            refusal = str(error)
    broadcast_refusal(refusal)
    return root / f"step_{step:07d}"
