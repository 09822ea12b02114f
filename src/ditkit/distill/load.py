"""Which teacher a `DistillConfig` names: a ditkit checkpoint (`DitkitTeacher`) or a diffusers
transformer (`DiffusersTeacher`): its folder, a pipeline folder holding it, or a hub repository
`ORG/NAME` in the local Hugging Face cache, resolved as `ditkit generate --pipeline` resolves one."""

from __future__ import annotations

from pathlib import Path

import torch

from ..diffusers.folders import MODEL_INDEX, is_model_folder, resolve_pipeline
from ..errors import DitkitError
from .diffusers_teacher import DiffusersTeacher
from .teacher import DitkitTeacher, Teacher


def load_teacher(cfg, device: str | torch.device = "cpu") -> Teacher:
    """The teacher a `DistillConfig` names: a ditkit checkpoint or a diffusers transformer folder,
    with the config's resolution and sampling steps where it sets them. Under sharding=fsdp it is
    built on the meta device, its weights left for the `Distiller` to load into the shards."""
    empty = cfg.sharding == "fsdp"

    if not cfg.teacher:
        raise DitkitError("no teacher: give --teacher PATH (a ditkit checkpoint, a diffusers transformer or pipeline "
                          "folder, or ORG/NAME in the Hugging Face cache) "
                          "or teacher: in the config")
    folder = teacher_folder(cfg.teacher, cfg.teacher_revision)
    if folder is not None:  # a diffusers transformer
        return DiffusersTeacher(folder, device=device, resolution=cfg.resolution,
                                steps=cfg.teacher_steps or 28, prompt_embeds=cfg.prompt_embeds, seed=cfg.seed,
                                empty=empty)
    if cfg.prompt_embeds:
        raise DitkitError("prompt_embeds is for diffusers teachers; a ditkit teacher uses its class labels")
    teacher = DitkitTeacher(cfg.teacher, device=device, empty=empty)
    teacher.resolution = cfg.resolution or teacher.resolution
    teacher.steps = cfg.teacher_steps or teacher.steps
    return teacher


def teacher_folder(teacher: str, revision: str | None = None) -> Path | None:
    """The diffusers transformer folder `teacher` names: itself, the transformer/ of a pipeline folder, or
    that of the snapshot of hub repository ORG/NAME (at `revision`) in the local Hugging Face cache
    (`folders.resolve_pipeline`: never a download; a repository missing from the cache, or --revision
    with a local path, is refused in one line). None for anything else (a ditkit checkpoint)."""
    folder = resolve_pipeline(teacher, revision)
    if is_model_folder(folder):
        return folder
    if (folder / MODEL_INDEX).is_file():
        if not is_model_folder(folder / "transformer"):
            raise DitkitError(f"{teacher} is a pipeline folder without a transformer/ model folder ({folder}): "
                              "give a FLUX or SD3 pipeline, or its transformer folder")
        return folder / "transformer"
    return None
