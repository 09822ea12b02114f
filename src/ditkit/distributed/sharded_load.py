"""A pre-trained model loaded straight into its FSDP2 shards, never whole on any process.

A 12B-parameter teacher (FLUX.1-dev) is 48 GB in fp32: loading it whole on every process, then a
copy as the student, before sharding, does not fit a GPU, nor 8 processes' host memory. Instead:

1. `empty_model` builds the model with its parameters on the meta device (shapes, no data) and
   its buffers real: the constructor computes them exactly as a plain load does, including the
   non-persistent ones a weights file does not hold (position tables and the like).
2. the caller casts and `fully_shard`s it as usual (sharding a meta model allocates nothing);
3. `materialize` allocates each process's local shards (`to_empty`) and puts the buffers back;
4. `load_shards` streams the weights from the safetensors file(s) one file and one tensor at a
   time, each process reading only its own Shard(0) rows (`safe_open(...).get_slice(name)[a:b]`:
   safetensors maps the file and copies just those rows' bytes), then copying them into its shard,
   cast to the parameter's dtype.

A process so holds its shards, the (small, replicated) buffers and one tensor's rows in flight:
about 1/N of the model, never the whole of it. The open file is mapped, not read: its pages are
read from disk when touched, i.e. this process's rows only (PyTorch's profiler books the mapping
as one allocation of the file's size; resident memory does not grow by it).
Parameters the files do not hold (those CLEAR adds, such as pooling weights) take the initial
values the caller gives; any other missing, unexpected or misshapen tensor is a one-line
DitkitError before anything is allocated.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from ..errors import DitkitError
from .sharding import shard_rows


@dataclass(frozen=True)
class StoredTensor:
    """One tensor of a safetensors file: its `name` in `file`, and its shape."""

    file: Path
    name: str
    shape: tuple[int, ...]


@dataclass
class WeightFiles:
    """The tensors of a pre-trained model's safetensors file(s) by name. A model tensor named
    `prefix + name` is the files' tensor `name` (a teacher wrapped in a denoiser adds a prefix)."""

    tensors: dict[str, StoredTensor]
    source: str  # the folder or file, for messages
    prefix: str = ""
    fix: str = "use the folder's own config.json"  # what to do when the model and the files disagree

    def model_name(self, name: str) -> str:
        return self.prefix + name


def stored_tensors(file: Path, source: str) -> dict[str, StoredTensor]:
    """Every tensor of one safetensors file, from its header (no weights are read)."""
    try:
        with safe_open(file, framework="pt") as f:
            return {name: StoredTensor(file, name, tuple(f.get_slice(name).get_shape())) for name in f.keys()}
    except FileNotFoundError as error:
        raise DitkitError(f"weights file {file} of {source} is missing: download or copy it again") from error
    except (SafetensorError, OSError) as error:  # truncated, or not a safetensors file
        raise DitkitError(f"weights file {file} of {source} is damaged ({error}): download or copy it again") from error


def single_weight_file(file: str | Path, prefix: str = "", fix: str = WeightFiles.fix) -> WeightFiles:
    """All weights in one safetensors file (a ditkit checkpoint's model or ema.safetensors)."""
    return WeightFiles(stored_tensors(Path(file), str(file)), str(file), prefix, fix)


def read_rows(stored: StoredTensor, rows: tuple[int, int] | None, opened) -> Tensor:
    """Rows [start, stop) of a stored tensor (None: all of it) from its `safe_open`ed file."""
    if rows is None:
        return opened.get_tensor(stored.name)
    return opened.get_slice(stored.name)[rows[0]:rows[1]]


def empty_model(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` with its parameters on the meta device and its buffers real (see the module
    docstring): accelerate's init_empty_weights, which diffusers' own loading uses."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    for path, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                yield f"{path}.{name}" if path else name, buffer


def check_weights(model: nn.Module, files: WeightFiles, initial: dict[str, Tensor]) -> None:
    """Every parameter and persistent buffer of `model` has its tensor in `files` (same shape) or an
    initial value in `initial`; every tensor of `files` belongs to the model."""
    wanted = {name: tuple(t.shape) for name, t in [*model.named_parameters(), *_persistent_buffers(model)]}
    given = {files.model_name(name): stored.shape for name, stored in files.tensors.items()}
    for name, shape in wanted.items():
        if name in given:
            if given[name] != shape:
                raise DitkitError(f"{name.removeprefix(files.prefix)} in {files.source} has shape {list(given[name])}, "
                                  f"the model built from its config wants {list(shape)}: the config does not "
                                  f"match the weights; {files.fix}")
        elif name not in initial:
            raise DitkitError(f"{files.source} lacks the weight {name.removeprefix(files.prefix)}: the config does "
                              f"not match the weights; {files.fix}")
    if extra := sorted(set(given) - set(wanted)):
        raise DitkitError(f"{files.source} holds {extra[0].removeprefix(files.prefix)}, which the model built from "
                          f"its config lacks ({len(extra)} such): {files.fix}")


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate the parameters' local shards (uninitialised) on `device`; buffers keep their values.
    `to_empty` replaces buffers with empty ones too, so they are put back after it."""
    buffers = dict(model.named_buffers())
    persistent = dict(_persistent_buffers(model))
    if unset := [name for name, b in buffers.items() if b.is_meta and name not in persistent]:
        raise DitkitError(f"buffer {unset[0]} was built on the meta device and no file holds it: build the model "
                          "with empty_model (real buffers), or load it with sharding=none")
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buffer in buffers.items():
            if not buffer.is_meta:
                owner, _, attr = name.rpartition(".")
                model.get_submodule(owner)._buffers[attr] = buffer.to(device)


def local_rows(param: Tensor) -> tuple[int, int] | None:
    """The rows [start, stop) of the full tensor that this process's shard of `param` holds, as
    FSDP2's Shard(0) cuts them (torch.chunk: chunks of ceil(rows / N), the last ones shorter or
    empty; the padding lives only in FSDP's storage); None: the process holds all of it."""
    if not isinstance(param, DTensor) or param.ndim == 0:
        return None
    placements = tuple(param.placements)
    if all(isinstance(p, Replicate) for p in placements):
        return None
    if len(placements) != 1 or placements[0] != Shard(0):
        raise DitkitError(f"cannot stream weights into placements {placements}: ditkit shards with one Shard(0) "
                          "(FSDP2's default); load the model with sharding=none")
    rows = param.shape[0]
    start, stop = shard_rows(rows, param.device_mesh.size(), param.device_mesh.get_local_rank())
    if param.to_local().shape[0] != stop - start:  # FSDP2 changed how it cuts: refuse rather than misplace rows
        raise DitkitError(f"this process's shard holds {param.to_local().shape[0]} of {rows} rows where ditkit "
                          f"expects {stop - start}: this PyTorch shards differently; load with sharding=none")
    return start, stop


@torch.no_grad()
def load_shards(model: nn.Module, files: WeightFiles, initial: dict[str, Tensor] | None = None) -> None:
    """Copy each parameter's (and persistent buffer's) values into the materialised, possibly sharded
    `model`: its own rows from `files`, or from `initial` (full tensors) for what the files lack."""
    initial = initial or {}
    check_weights(model, files, initial)
    file_names = {files.model_name(name): name for name in files.tensors}
    targets = dict([*model.named_parameters(), *_persistent_buffers(model)])
    for file in sorted({stored.file for stored in files.tensors.values()}):  # one mapped file at a time
        with safe_open(file, framework="pt") as opened:
            for name, stored in files.tensors.items():
                if stored.file == file and (part := local_part(targets[files.model_name(name)])):
                    part[1].copy_(read_rows(stored, part[0], opened))
    for name in targets.keys() - file_names.keys():  # parameters the files lack: their initial values
        if part := local_part(targets[name]):
            rows = part[0] or (0, len(initial[name]))
            part[1].copy_(initial[name][rows[0]:rows[1]] if initial[name].ndim else initial[name])


def local_part(target: Tensor) -> tuple[tuple[int, int] | None, Tensor] | None:
    """(the rows of the full tensor this process holds, or None for all; the local tensor holding
    them), or None when it holds no rows (more processes than rows)."""
    local = target.to_local() if isinstance(target, DTensor) else target
    return (local_rows(target), local) if local.numel() else None
