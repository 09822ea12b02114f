"""A diffusers FLUX or SD3 transformer as the distillation teacher (`ditkit distill --teacher FOLDER`).

The transformer becomes a ditkit denoiser `model(x, t, cond)` over latents, conditioned on a table
of prompt embeddings; the student is the same transformer with CLEAR processors (`apply_clear`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
from torch import Tensor, nn

from ..diffusers.clear import SUPPORTED, apply_clear, attention_taps
from ..distributed.sharded_load import diffusers_weight_files, empty_model
from ..errors import DitkitError
from ..record import DataSettings, DiffusersModel, DiffusionSettings, RunRecord
from .teacher import Teacher

FLOW_MODELS = ("FluxTransformer2DModel", "SD3Transformer2DModel")


class FlowDenoiser(nn.Module):
    """A FLUX / SD3 transformer as a ditkit denoiser `model(x, t, cond)`: x is the latent
    (B, C, h, w), t in [0, 1000] (1000 = noise), cond indexes a table of prompt embeddings."""

    def __init__(self, transformer: nn.Module, prompt_embeds: Tensor, pooled_embeds: Tensor, guidance: float = 3.5):
        super().__init__()
        self.transformer = transformer
        self.register_buffer("prompt_embeds", prompt_embeds, persistent=False)
        self.register_buffer("pooled_embeds", pooled_embeds, persistent=False)
        self.is_flux = type(transformer).__name__ == "FluxTransformer2DModel"
        self.guidance = guidance

    @property
    def latent_channels(self) -> int:
        channels = self.transformer.config.in_channels
        return channels // 4 if self.is_flux else channels  # FLUX packs 2x2 latent patches into tokens

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        dtype = next(self.transformer.parameters()).dtype
        text, pooled = self.prompt_embeds[cond].to(dtype), self.pooled_embeds[cond].to(dtype)
        if not self.is_flux:
            return self.transformer(hidden_states=x.to(dtype), encoder_hidden_states=text, pooled_projections=pooled,
                                    timestep=t, return_dict=False)[0]
        B, C, h, w = x.shape
        tokens = x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w // 4, C * 4)
        ys, xs = torch.meshgrid(torch.arange(h // 2, device=x.device), torch.arange(w // 2, device=x.device),
                                indexing="ij")
        img_ids = torch.stack([torch.zeros_like(ys), ys, xs], -1).reshape(-1, 3).to(dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((B,), self.guidance, device=x.device, dtype=dtype)
        out = self.transformer(hidden_states=tokens.to(dtype), encoder_hidden_states=text, pooled_projections=pooled,
                               timestep=t / 1000, img_ids=img_ids, txt_ids=torch.zeros(text.shape[1], 3).to(img_ids),
                               guidance=guidance, return_dict=False)[0]
        return out.view(B, h // 2, w // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)


def load_prompt_embeds(path: str | None, transformer: nn.Module, num_prompts: int, seed: int) -> tuple[Tensor, Tensor]:
    """Prompt embeddings: a safetensors file with `prompt_embeds` (P, T, D) and `pooled_prompt_embeds`
    (P, D') as a diffusers pipeline's `encode_prompt` returns them, or (no file) random ones."""
    if path:
        from safetensors.torch import load_file

        tensors = load_file(path)
        missing = {"prompt_embeds", "pooled_prompt_embeds"} - set(tensors)
        if missing:
            raise DitkitError(f"{path} lacks {', '.join(sorted(missing))}: save the outputs of the pipeline's "
                              "encode_prompt under those names")
        return tensors["prompt_embeds"].float(), tensors["pooled_prompt_embeds"].float()
    config = transformer.config
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(num_prompts, 8, config.joint_attention_dim, generator=generator),
            torch.randn(num_prompts, config.pooled_projection_dim, generator=generator))


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
        import diffusers

        self.path = str(path)
        class_name = json.loads((Path(path) / "config.json").read_text())["_class_name"]
        if class_name not in FLOW_MODELS:
            raise DitkitError(f"distilling a {class_name} is not supported: ditkit distils the flow-matching "
                              f"transformers {', '.join(FLOW_MODELS)} (apply_clear works on {', '.join(SUPPORTED)})")
        model_class = getattr(diffusers, class_name)
        if empty:
            transformer = empty_model(lambda: model_class.from_config(model_class.load_config(path))).eval()
            self.pending_weights = diffusers_weight_files(path, prefix="transformer.")  # FlowDenoiser's name
        else:
            transformer = model_class.from_pretrained(path).to(device).eval()
        self.prompts_file = prompt_embeds
        text, pooled = load_prompt_embeds(prompt_embeds, transformer, num_prompts, seed)
        self.model = FlowDenoiser(transformer, text.to(device), pooled.to(device)).requires_grad_(False)
        from ..diffusion.objectives import FlowMatchingObjective

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
        multiple = self.vae_scale * (2 if self.model.is_flux else self.model.transformer.config.patch_size)
        if height % multiple or width % multiple:
            raise DitkitError(f"resolution {height}x{width} does not fit this {self.class_name}: use multiples "
                              f"of {multiple}")
        return self.model.latent_channels, height // self.vae_scale, width // self.vae_scale

    def token_grid(self, height: int, width: int) -> tuple[int, int]:
        _, h, w = self.input_shape(height, width)
        patch = 2 if self.model.is_flux else self.model.transformer.config.patch_size
        return h // patch, w // patch

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
        names = ("to_q.", "to_k.", "to_v.", "to_out.0.", "processor.pool_weight")
        switched = student.transformer._ditkit_clear[0]
        return {f"transformer.{layer}.{name}": p for layer in switched
                for name, p in student.transformer.get_submodule(layer).named_parameters()
                if name.startswith(names)}

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
