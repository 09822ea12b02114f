"""Which teacher a `DistillConfig` names: a ditkit checkpoint (`DitkitTeacher`) or a diffusers
transformer folder (`DiffusersTeacher`)."""

from __future__ import annotations

import torch

from ..diffusers.folders import is_model_folder
from ..errors import DitkitError
from .diffusers_teacher import DiffusersTeacher
from .teacher import DitkitTeacher, Teacher


def load_teacher(cfg, device: str | torch.device = "cpu") -> Teacher:
    """The teacher a `DistillConfig` names: a ditkit checkpoint or a diffusers transformer folder,
    with the config's resolution and sampling steps where it sets them. Under sharding=fsdp it is
    built on the meta device, its weights left for the `Distiller` to load into the shards."""
    empty = cfg.sharding == "fsdp"

    if not cfg.teacher:
        raise DitkitError("no teacher: give --teacher PATH (a ditkit checkpoint or a diffusers transformer folder) "
                          "or teacher: in the config")
    if is_model_folder(cfg.teacher):  # a diffusers transformer folder
        return DiffusersTeacher(cfg.teacher, device=device, resolution=cfg.resolution,
                                steps=cfg.teacher_steps or 28, prompt_embeds=cfg.prompt_embeds, seed=cfg.seed,
                                empty=empty)
    if cfg.prompt_embeds:
        raise DitkitError("prompt_embeds is for diffusers teachers; a ditkit teacher uses its class labels")
    teacher = DitkitTeacher(cfg.teacher, device=device, empty=empty)
    teacher.resolution = cfg.resolution or teacher.resolution
    teacher.steps = cfg.teacher_steps or teacher.steps
    return teacher
