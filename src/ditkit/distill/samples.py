"""The teacher's own samples: the distillation data, generated once and cached on disk.

Samples are made in chunks; chunk i is a pure function of (teacher, seed, i), written atomically
as `chunk_00000.safetensors` holding the clean samples in the model's input space (latents when
the teacher works on latents) and the conditions they were generated with. An interrupted run
resumes at the first missing chunk; a cache made with other settings is refused, not mixed in.

Sharded distillation (several processes, a sharded teacher) splits the chunks: in each round every
process generates a different missing chunk (FSDP's forwards are collective, so a process with no
chunk left in the last round runs a one-sample stand-in and drops it), then the round's chunks are
all-gathered and every process writes those its disk lacks. P processes make the samples ~P times
faster than one, and each chunk is the same function of (teacher, seed, index) as in one process.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..diffusion.sampling import sample
from ..distributed.sharding import from_main
from ..errors import DitkitError
from ..files import atomic_path, atomic_write_text, read_json
from ..train.loop import step_generator
from .teacher import Teacher

CHUNK = 64


def _chunk_generator(seed: int, index: int) -> torch.Generator:
    return step_generator(seed, index, 0xDA7A)


def _settings(teacher: Teacher, num: int, seed: int) -> dict:
    settings = {"teacher": teacher.describe(), "num_samples": num, "seed": seed, "resolution": teacher.resolution,
                "steps": teacher.steps, "cfg_scale": teacher.cfg_scale, "sampler": teacher.sampler, "chunk": CHUNK}
    if teacher.guidance_channels is not None:  # absent otherwise, so caches made before it existed stay valid
        settings["guidance_channels"] = teacher.guidance_channels
    return settings


def _check_settings(folder: Path, settings: dict) -> None:
    path = folder / "settings.json"
    if path.is_file():
        old = read_json(path, "teacher-samples settings file")
        if old != settings:
            diff = sorted(k for k in settings if old.get(k) != settings[k])
            raise DitkitError(f"teacher samples in {folder} were made with other settings ({', '.join(diff)}): "
                              "use another --out folder or delete that one")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=2))


def generate_chunk(teacher: Teacher, seed: int, index: int, size: int) -> tuple[Tensor, Tensor | None]:
    """Chunk `index`: conditions drawn from its own generator, then the teacher's sampler."""
    generator = _chunk_generator(seed, index)
    cond = teacher.draw_conditions(size, generator)
    noise_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    shape = (size, *teacher.input_shape(teacher.resolution, teacher.resolution))
    x0 = sample(teacher.model, teacher.objective, shape, labels=cond, steps=teacher.steps,
                cfg_scale=teacher.cfg_scale, seed=noise_seed, sampler=teacher.sampler, progress=False,
                guidance_channels=teacher.guidance_channels)
    return x0.float().cpu(), cond


def teacher_samples(teacher: Teacher, folder: str | Path, num: int, seed: int = 0, progress: bool = True,
                    rank: int = 0, world: int = 1) -> tuple[Tensor, Tensor | None]:
    """(x0, cond) for `num` teacher samples, generating the chunks not yet in `folder`; with
    `world` > 1 (every process of the group calls this) the missing chunks are split over them."""
    if num < 1:
        raise DitkitError(f"--num-samples must be at least 1, got {num}")
    folder = Path(folder)
    _check_settings(folder, _settings(teacher, num, seed))
    count = (num + CHUNK - 1) // CHUNK
    sizes = [min(CHUNK, num - index * CHUNK) for index in range(count)]
    missing = [index for index in range(count) if not _chunk_path(folder, index).is_file()]
    if world > 1:
        _generate_split(teacher, folder, seed, sizes, from_main(missing), rank, world, progress)
    else:
        for index in tqdm(missing, desc="teacher samples", unit="chunk", disable=not progress, dynamic_ncols=True):
            _write_chunk(folder, index, *generate_chunk(teacher, seed, index, sizes[index]))
    xs, conds = [], []
    for index in range(count):
        with safe_open(str(_chunk_path(folder, index)), framework="pt") as f:
            xs.append(f.get_tensor("x0"))
            conds.append(f.get_tensor("cond") if "cond" in f.keys() else None)
    return torch.cat(xs), (None if conds[0] is None else torch.cat(conds))


def _chunk_path(folder: Path, index: int) -> Path:
    return folder / f"chunk_{index:05d}.safetensors"


def _write_chunk(folder: Path, index: int, x0: Tensor, cond: Tensor | None) -> None:
    tensors = {"x0": x0.contiguous()} | ({} if cond is None else {"cond": cond.contiguous()})
    with atomic_path(_chunk_path(folder, index)) as tmp:
        save_file(tensors, tmp)


def _generate_split(teacher: Teacher, folder: Path, seed: int, sizes: list[int], missing: list[int], rank: int,
                    world: int, progress: bool) -> None:
    """Round by round, process r generates missing[round + r]; every process writes the round's chunks."""
    import torch.distributed as dist

    rounds = range(0, len(missing), world)
    for start in tqdm(rounds, desc=f"teacher samples ({world} processes)", unit="round", disable=not progress,
                      dynamic_ncols=True):
        mine = missing[start + rank] if start + rank < len(missing) else None
        if mine is None:  # keep step with the others' collective forwards; the sample is dropped
            generate_chunk(teacher, seed, missing[start], 1)
            made = None
        else:
            made = (mine, *generate_chunk(teacher, seed, mine, sizes[mine]))
        everyone = [None] * world
        dist.all_gather_object(everyone, made)
        for index, x0, cond in filter(None, everyone):
            if not _chunk_path(folder, index).is_file():
                _write_chunk(folder, index, x0, cond)
