"""What distillation needs from a teacher, whatever library the teacher comes from.

A `Teacher` wraps a frozen full-attention denoiser `model(x_t, t, cond)` (cond: a LongTensor of
class labels or prompt indices, or None) with its training objective and sampling settings, and
knows how to make a local-attention student from it, which of the student's parameters train,
and where its attention outputs are. `DitkitTeacher` serves ditkit checkpoints; the diffusers
teacher lives in `diffusers_teacher.py`.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import find_checkpoint, load_checkpoint, read_record, weights_file
from ..data.latents import decode, load_vae
from ..diffusion.objectives import build_objective
from ..diffusion.pipeline import input_size
from ..distributed.sharded_load import WeightFiles, empty_model, single_weight_file
from ..mixers import TokenMixer, swap_mixers
from ..models import build_model
from ..record import RunRecord


class Teacher:
    """Interface; see `DitkitTeacher` for the meaning of each member."""

    model: nn.Module
    objective: object
    resolution: int
    sampler: str | None
    steps: int
    cfg_scale: float
    guidance_channels: int | None = None  # classifier-free guidance on the first N channels only (None: all)
    null_condition: int | None
    # The files the model's weights still have to be read from (it was built on the meta device,
    # for sharding=fsdp: `Distiller` loads them shard by shard); None: the model holds its weights.
    pending_weights: WeightFiles | None = None

    def draw_conditions(self, num: int, generator: torch.Generator) -> Tensor | None:
        raise NotImplementedError

    def drop_conditions(self, cond: Tensor | None, generator: torch.Generator) -> Tensor | None:
        return cond

    def input_shape(self, height: int, width: int) -> tuple[int, int, int]:
        raise NotImplementedError

    def decode(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        """The image-token grid the attention layers see at height x width pixels."""
        raise NotImplementedError

    def make_student(self, radius: float, down_factor: int, backend: str) -> nn.Module:
        raise NotImplementedError

    def trainable_parameters(self, student: nn.Module) -> dict[str, nn.Parameter]:
        raise NotImplementedError

    def attention_taps(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        """Where each attention layer's raw output (before the output projection) can be read:
        (module, "input") or (module, "output"); see `losses.AttentionTaps`."""
        raise NotImplementedError

    def student_record(self, student: nn.Module, distill: dict) -> RunRecord:
        raise NotImplementedError

    def student_state(self, student: nn.Module) -> dict[str, Tensor]:
        """What a student checkpoint stores (loaded back with strict=False over a fresh student)."""
        raise NotImplementedError

    def describe(self) -> dict:
        raise NotImplementedError


class DitkitTeacher(Teacher):
    """A ditkit checkpoint (DiT, or any backbone whose attention mixers hold `qkv`/`proj`)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", ema: bool = True, empty: bool = False):
        """`empty`: build the model on the meta device and leave its weights in the file
        (`pending_weights`) for a sharded distillation to load shard by shard."""
        self.path = str(path)
        if empty:
            self.model, self.record, self.pending_weights = self._empty_model(path, ema)
        else:
            self.model, self.record = load_checkpoint(path, ema=ema, device=device)
        self.model.requires_grad_(False)
        self.objective = build_objective(self.record.diffusion)
        d = self.record.diffusion
        self.resolution = self.record.resolution
        self.sampler, self.steps, self.cfg_scale = d.sampler, d.sample_steps, d.cfg_scale
        self.guidance_channels = d.guidance_channels
        embedder = getattr(self.model, "y_embedder", None)
        self.num_classes = embedder.num_classes if embedder is not None else 0
        self.null_condition = embedder.null_label if embedder is not None else None
        self._vae = None

    @staticmethod
    def _empty_model(path: str | Path, ema: bool) -> tuple[nn.Module, RunRecord, WeightFiles]:
        """The model of the file `load_checkpoint` would read (EMA or raw weights), built from its
        record with meta parameters, and that file."""
        found = find_checkpoint(path)
        file = weights_file(found, ema) if found.is_dir() else found
        record = read_record(file)
        files = single_weight_file(file, fix="use another checkpoint of the run")
        return empty_model(lambda: build_model(record.model)).eval(), record, files

    def draw_conditions(self, num: int, generator: torch.Generator) -> Tensor | None:
        if not self.num_classes:
            return None
        return torch.randint(0, self.num_classes, (num,), generator=generator)

    def drop_conditions(self, cond: Tensor | None, generator: torch.Generator) -> Tensor | None:
        """Class dropout as in training, so the student also learns the unconditional branch of CFG."""
        if cond is None:
            return None
        return self.model.y_embedder.drop_labels(cond, generator)

    def input_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.model.config.in_channels, *input_size(self.model, height, width))

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        return self.model.token_grid(*input_size(self.model, height, width))

    def decode(self, x: Tensor) -> Tensor:
        vae_path = self.record.vae
        if not vae_path:
            return x.clamp(-1, 1)
        self._vae = self._vae or load_vae(vae_path, x.device)
        return decode(self._vae, x)

    def make_student(self, radius: float, down_factor: int, backend: str) -> nn.Module:
        student = copy.deepcopy(self.model)
        options = {"radius": radius, "down_factor": down_factor, "backend": backend}
        swap_mixers(student, "clear", **options)
        student.config.mixer, student.config.mixer_options = "clear", options
        return student

    def trainable_parameters(self, student: nn.Module) -> dict[str, nn.Parameter]:
        """The attention projections (qkv, proj) and pooling weights: every parameter of a mixer."""
        return {f"{path}.{name}": p for path, module in student.named_modules() if isinstance(module, TokenMixer)
                for name, p in module.named_parameters()}

    def attention_taps(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        return [(m.proj, "input") for m in model.modules() if isinstance(m, TokenMixer) and hasattr(m, "proj")]

    def student_record(self, student: nn.Module, distill: dict) -> RunRecord:
        """The checkpoint record of the student: the teacher's, with the clear mixer and how it was made."""
        return dataclasses.replace(self.record, model=student.config, distill=distill)

    def student_state(self, student: nn.Module) -> dict[str, Tensor]:
        """All weights: the student checkpoint is standalone (`ditkit sample --ckpt` runs it)."""
        return student.state_dict()

    def describe(self) -> dict:
        return {"kind": "ditkit", "path": self.path}
