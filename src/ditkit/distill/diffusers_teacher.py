"""A diffusers FLUX or SD3 transformer as the distillation teacher (`ditkit distill --teacher FOLDER`).

The transformer becomes a ditkit denoiser `model(x, t, cond)` over latents, conditioned on a table
of prompt embeddings; the student is the same transformer with CLEAR processors (`apply_clear`).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import Tensor, nn

from ..diffusers.adapters import ADAPTERS, DiffusersAdapter, find_adapter
from ..diffusers.clear import apply_clear, attention_taps, student_parameters
from ..diffusers.folders import CONFIG, diffusers_weight_files, model_class_name
from ..diffusers.prompts import load_prompt_embeds
from ..diffusion.objectives import FlowMatchingObjective
from ..distributed.sharded_load import empty_model
from ..errors import DitkitError
from ..files import read_json
from ..record import DataSettings, DiffusersModel, DiffusionSettings, RunRecord
from .teacher import Teacher


def flow_models() -> list[str]:
    """The transformer classes `ditkit distill` takes as teachers: the flow-matching ones (FLUX, SD3)."""
    return [name for name, adapter in ADAPTERS.items() if adapter.flow]


def flow_adapter(class_name: str | None) -> DiffusersAdapter:
    """The adapter of a flow-matching transformer class, or a one-line refusal."""
    adapter = find_adapter(class_name or "")
    if adapter is None or not adapter.flow:
        raise DitkitError(f"distilling a {class_name} is not supported: ditkit distils the flow-matching "
                          f"transformers {', '.join(flow_models())} (apply_clear works on {', '.join(ADAPTERS)})")
    return adapter


class FlowDenoiser(nn.Module):
    """A FLUX / SD3 transformer as a ditkit denoiser `model(x, t, cond)`: x is the latent
    (B, C, h, w), t in [0, 1000] (1000 = noise), cond indexes a table of prompt embeddings.
    How the transformer is called (FLUX's packing and position ids) is its adapter's `denoise`."""

    def __init__(self, transformer: nn.Module, prompt_embeds: Tensor, pooled_embeds: Tensor, guidance: float = 3.5):
        super().__init__()
        self.transformer = transformer
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        self.register_buffer("pooled_embeds", pooled_embeds, persistent=False)
        self.adapter = flow_adapter(type(transformer).__name__)
        self.guidance = guidance

    @property
    def latent_channels(self) -> int:
        return self.adapter.latent_channels(self.transformer)

    @property
    def token_patch(self) -> int:
        """Latent pixels per token side (FLUX packs 2x2 latent patches into tokens)."""
        return self.adapter.token_patch(self.transformer)

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        dtype = next(self.transformer.parameters()).dtype
        text, pooled = self.prompt_embeds[cond].to(dtype), self.pooled_embeds[cond].to(dtype)
        return self.adapter.denoise(self.transformer, x, t, text, pooled, self.guidance)


def refuse_conditioned_inputs(config_file: Path) -> None:
    """A transformer whose input carries image conditions besides the latent (FLUX Fill, Canny,
    Depth: in_channels > out_channels) cannot draw its own samples from noise alone."""
    config = read_json(config_file, "diffusers config")
    inputs, outputs = config.get("in_channels"), config.get("out_channels")
    if outputs not in (None, inputs):
        raise DitkitError(f"{config_file.parent} takes image conditions in its input ({inputs} channels for a "
                          f"{outputs}-channel latent: a Fill or Control model): distill from the text-to-image "
                          "transformer it was made from (e.g. FLUX.1-dev) instead")


class DiffusersTeacher(Teacher):
    """A FLUX or SD3 transformer folder (diffusers format) as the distillation teacher.

    Conditions are prompt embeddings (`prompt_embeds`: a file, or random ones for trials); a `vae`
    folder next to the transformer (a pipeline folder's layout) decodes the report images,
    otherwise they show the latents. The student saves only its trained weights."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", resolution: int | None = None,
                 steps: int = 28, prompt_embeds: str | None = None, num_prompts: int = 16, seed: int = 0,
                 empty: bool = False):
        """`empty`: build the transformer from its config.json on the meta device and leave its
        weights in the folder's safetensors (`pending_weights`) for a sharded distillation."""
        self.path = str(path)
        class_name = model_class_name(Path(path) / CONFIG)
        model_class = flow_adapter(class_name).model_class()
        refuse_conditioned_inputs(Path(path) / CONFIG)
        if empty:
            transformer = empty_model(lambda: model_class.from_config(model_class.load_config(path))).eval()
            self.pending_weights = diffusers_weight_files(path, prefix="transformer.")  # FlowDenoiser's name
        else:
            transformer = model_class.from_pretrained(path).to(device).eval()
        self.prompts_file = prompt_embeds
        text, pooled = load_prompt_embeds(prompt_embeds, transformer, num_prompts, seed)
        self.model = FlowDenoiser(transformer, text.to(device), pooled.to(device)).requires_grad_(False)
        self.objective = FlowMatchingObjective()
        self.sampler, self.steps, self.cfg_scale, self.null_condition = "euler", steps, 1.0, None
        self.vae = self._load_vae(Path(path).parent / "vae", device)
        self.vae_scale = 2 ** (len(self.vae.config.block_out_channels) - 1) if self.vae is not None else 8
        self.resolution = resolution or 64 * self.vae_scale
        self.num_prompts = text.shape[0]
        self.class_name = class_name

    @staticmethod
    def _load_vae(folder: Path, device):
        if not (folder / "config.json").is_file():
            return None
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(folder).to(device).eval()

    def draw_conditions(self, num: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, self.num_prompts, (num,), generator=generator)

    def input_shape(self, height: int, width: int) -> tuple[int, int, int]:
        multiple = self.vae_scale * self.model.token_patch
        if height % multiple or width % multiple:
            raise DitkitError(f"resolution {height}x{width} does not fit this {self.class_name}: use multiples "
                              f"of {multiple}")
        return self.model.latent_channels, height // self.vae_scale, width // self.vae_scale

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        _, h, w = self.input_shape(height, width)
        return h // self.model.token_patch, w // self.model.token_patch

    @torch.no_grad()
    def decode(self, x: Tensor) -> Tensor:
        if self.vae is None:
            return x.clamp(-1, 1)
        config = self.vae.config
        x = x / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        return self.vae.decode(x.to(next(self.vae.parameters()).dtype)).sample.float().clamp(-1, 1)

    def make_student(self, radius: float, down_factor: int, backend: str) -> nn.Module:
        student = copy.deepcopy(self.model)
        apply_clear(student.transformer, radius, down_factor, backend)
        return student

    def trainable_parameters(self, student: nn.Module) -> dict[str, nn.Parameter]:
        """CLEAR's choice: image-stream q/k/v/out projections of every switched layer, and pooling weights."""
        return {f"transformer.{name}": p for name, p in student_parameters(student.transformer).items()}

    def attention_taps(self, model: nn.Module) -> list[tuple[nn.Module, str]]:
        return attention_taps(model.transformer)

    def student_record(self, student: nn.Module, distill: dict) -> RunRecord:
        return RunRecord(model=DiffusersModel(self.class_name, self.path),
                         diffusion=DiffusionSettings(objective="flow", sampler="euler", sample_steps=self.steps,
                                                     cfg_scale=1.0),
                         data=DataSettings(resolution=self.resolution, prompt_embeds=self.prompts_file),
                         distill=distill)

    def student_state(self, student: nn.Module) -> dict[str, Tensor]:
        return {name: p for name, p in self.trainable_parameters(student).items()}

    def describe(self) -> dict:
        return {"kind": "diffusers", "class": self.class_name, "path": self.path}
