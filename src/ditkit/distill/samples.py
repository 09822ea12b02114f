"""The teacher's own samples: the distillation data, generated once and cached on disk.

Samples are made in chunks; chunk i is a pure function of (teacher, seed, i), written atomically
as `chunk_00000.safetensors` holding the clean samples in the model's input space (latents when
the teacher works on latents) and the conditions they were generated with. An interrupted run
resumes at the first missing chunk; a cache made with other settings is refused, not mixed in.
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


def teacher_samples(teacher: Teacher, folder: str | Path, num: int, seed: int = 0,
                    progress: bool = True) -> tuple[Tensor, Tensor | None]:
    """(x0, cond) for `num` teacher samples, generating the chunks not yet in `folder`."""
    if num < 1:
        raise DitkitError(f"--num-samples must be at least 1, got {num}")
    folder = Path(folder)
    _check_settings(folder, _settings(teacher, num, seed))
    xs, conds = [], []
    chunks = range((num + CHUNK - 1) // CHUNK)
    for index in tqdm(chunks, desc="teacher samples", unit="chunk", disable=not progress, dynamic_ncols=True):
        path = folder / f"chunk_{index:05d}.safetensors"
        if not path.is_file():
            x0, cond = generate_chunk(teacher, seed, index, min(CHUNK, num - index * CHUNK))
            tensors = {"x0": x0.contiguous()} | ({} if cond is None else {"cond": cond.contiguous()})
            with atomic_path(path) as tmp:
                save_file(tensors, tmp)
        with safe_open(str(path), framework="pt") as f:
            xs.append(f.get_tensor("x0"))
            conds.append(f.get_tensor("cond") if "cond" in f.keys() else None)
    return torch.cat(xs), (None if conds[0] is None else torch.cat(conds))
