"""CLEAR local attention inside diffusers transformers: FLUX, SD3 and PixArt.

    from ditkit.integrations.diffusers import apply_clear, remove_clear
    apply_clear(pipe.transformer, radius=16, down_factor=4)   # every self-attention becomes CLEAR
    remove_clear(pipe.transformer)                           # the stock processors are back

Each self-attention layer gets a `ClearAttnProcessor` (an nn.Module, so the pooling weights of
`down_factor` are parameters of the transformer and train and save with it). The processors
compute exactly what the stock ones do (projections, QK-norm, FLUX's RoPE, output projections)
except that image queries see image keys in a disc of radius r; text tokens are global (every
query sees them, text queries see everything). The token grid comes from each forward call's
inputs (FLUX: `img_ids`; SD3 / PixArt: the latent's height and width over the patch size).

`DiffusersTeacher` lets `ditkit distill` take a diffusers transformer folder as the teacher.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..distill.teacher import Teacher
from ..errors import DitkitError
from ..mixers.base import Grid
from ..mixers.clear import check_clear_options, initial_pool_weight, local_attention, pool_tokens

SUPPORTED = ("FluxTransformer2DModel", "SD3Transformer2DModel", "PixArtTransformer2DModel")


@dataclass
class TokenLayout:
    """The image-token grid of the forward call in progress; shared by one transformer's processors."""

    grid: Grid | None = None


def _kind(attn: nn.Module) -> str | None:
    """How an attention module mixes tokens: FLUX joint/single, SD3 joint, plain self; None = cross."""
    if type(attn).__name__ == "FluxAttention":
        return "flux"
    if getattr(attn, "is_cross_attention", False):
        return None
    return "joint" if getattr(attn, "add_q_proj", None) is not None else "self"


class ClearAttnProcessor(nn.Module):
    """CLEAR local attention for one diffusers attention layer."""

    def __init__(self, layout: TokenLayout, kind: str, radius: float, down_factor: int = 0, backend: str = "auto"):
        super().__init__()
        check_clear_options(radius, down_factor, backend)
        self.layout, self.kind = layout, kind
        self.radius, self.down_factor, self.backend = radius, down_factor, backend
        if down_factor:
            self.pool_weight = initial_pool_weight(down_factor)

    def local(self, q: Tensor, k: Tensor, v: Tensor, num_global: int) -> Tensor:
        """(B, heads, G + H*W, d) with the G global (text) tokens first -> same shape."""
        grid = self.layout.grid
        if grid is None or q.shape[-2] != num_global + grid[0] * grid[1]:
            raise DitkitError("CLEAR processor got a sequence that does not match the transformer's token grid: "
                              "call the transformer itself (apply_clear hooks its forward to read the grid)")
        extra_k = extra_v = None
        if self.down_factor:
            extra_k = pool_tokens(k, grid, num_global, self.pool_weight)
            extra_v = pool_tokens(v, grid, num_global, self.pool_weight)
        return local_attention(q, k, v, grid, self.radius, num_global, extra_k, extra_v, self.backend)

    def forward(self, attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                attention_mask: Tensor | None = None, image_rotary_emb=None, **kwargs):
        if attention_mask is not None:
            raise DitkitError("the CLEAR processor does not take attention masks: pass none (text padding "
                              "tokens are attended like any global token)")
        if self.kind == "flux":
            return self._flux(attn, hidden_states, encoder_hidden_states, image_rotary_emb)
        if self.kind == "joint":
            return self._joint(attn, hidden_states, encoder_hidden_states)
        return self._self(attn, hidden_states)

    def _heads(self, x: Tensor, heads: int) -> Tensor:
        return x.unflatten(-1, (heads, -1)).transpose(1, 2)  # (B, S, D) -> (B, heads, S, d)

    def _flux(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        """FLUX double-stream (text in `encoder_hidden_states`) and single-stream ([text | image]) blocks."""
        from diffusers.models.embeddings import apply_rotary_emb

        if getattr(attn, "fused_projections", False):
            raise DitkitError("the CLEAR processor needs unfused projections: call unfuse_qkv_projections() first")
        q = attn.norm_q(attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)))
        k = attn.norm_k(attn.to_k(hidden_states).unflatten(-1, (attn.heads, -1)))
        v = attn.to_v(hidden_states).unflatten(-1, (attn.heads, -1))
        num_text = 0
        if encoder_hidden_states is not None:
            num_text = encoder_hidden_states.shape[1]
            eq = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1)))
            ek = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1)))
            ev = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (attn.heads, -1))
            q, k, v = torch.cat([eq, q], dim=1), torch.cat([ek, k], dim=1), torch.cat([ev, v], dim=1)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        grid = self.layout.grid
        num_global = q.shape[1] - grid[0] * grid[1] if grid else 0
        out = self.local(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), num_global)
        out = out.transpose(1, 2).flatten(2).to(q.dtype)
        if encoder_hidden_states is None:
            return out
        text, image = out[:, :num_text], out[:, num_text:]
        return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(text.contiguous())

    def _joint(self, attn, hidden_states, encoder_hidden_states):
        """SD3 joint attention. Stock order is [image | text]; CLEAR wants the global text first."""
        heads = attn.heads
        q, k, v = (self._heads(f(hidden_states), heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        num_text = 0
        if encoder_hidden_states is not None:
            num_text = encoder_hidden_states.shape[1]
            eq, ek, ev = (self._heads(f(encoder_hidden_states), heads)
                          for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
            if attn.norm_added_q is not None:
                eq = attn.norm_added_q(eq)
            if attn.norm_added_k is not None:
                ek = attn.norm_added_k(ek)
            q, k, v = torch.cat([eq, q], dim=2), torch.cat([ek, k], dim=2), torch.cat([ev, v], dim=2)
        out = self.local(q, k, v, num_text).transpose(1, 2).flatten(2).to(q.dtype)
        text, image = out[:, :num_text], out[:, num_text:]
        image = attn.to_out[1](attn.to_out[0](image))
        if encoder_hidden_states is None:
            return image
        if not attn.context_pre_only:
            text = attn.to_add_out(text)
        return image, text

    def _self(self, attn, hidden_states):
        """Plain self-attention over image tokens (PixArt's attn1, SD3.5's second attention)."""
        if hidden_states.ndim != 3 or attn.spatial_norm is not None or attn.group_norm is not None:
            raise DitkitError("the CLEAR processor supports token-sequence self-attention only "
                              "(no 4-D inputs, spatial or group norm)")
        residual = hidden_states
        q, k, v = (self._heads(f(hidden_states), attn.heads) for f in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            q = attn.norm_q(q)
        if attn.norm_k is not None:
            k = attn.norm_k(k)
        out = self.local(q, k, v, 0).transpose(1, 2).flatten(2).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _grid_from_inputs(transformer: nn.Module, args: tuple, kwargs: dict) -> Grid:
    """The image-token grid of one transformer call, read from its inputs."""
    if type(transformer).__name__ == "FluxTransformer2DModel":
        ids = kwargs.get("img_ids", args[4] if len(args) > 4 else None)
        if ids is None:
            raise DitkitError("FLUX with CLEAR needs img_ids (the image token positions) in every call")
        ids = ids.reshape(-1, ids.shape[-1])
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1
    x = kwargs.get("hidden_states", args[0] if args else None)
    p = transformer.config.patch_size
    return x.shape[-2] // p, x.shape[-1] // p


def _attention_layers(transformer: nn.Module) -> list[tuple[str, nn.Module, str]]:
    return [(name, m, kind) for name, m in transformer.named_modules()
            if hasattr(m, "set_processor") and (kind := _kind(m)) is not None]


def apply_clear(transformer: nn.Module, radius: float, down_factor: int = 0, backend: str = "auto") -> list[str]:
    """Switch every self-attention of a FLUX / SD3 / PixArt transformer to CLEAR local attention.
    Returns the names of the switched layers. `remove_clear` undoes it."""
    name = type(transformer).__name__
    if name not in SUPPORTED:
        raise DitkitError(f"apply_clear supports {', '.join(SUPPORTED)}, not {name}")
    if hasattr(transformer, "_ditkit_clear"):
        remove_clear(transformer)
    layout = TokenLayout()
    layers = _attention_layers(transformer)
    originals = {}
    for path, attn, kind in layers:
        originals[path] = attn.processor
        processor = ClearAttnProcessor(layout, kind, radius, down_factor, backend)
        ref = next(attn.parameters())
        attn.set_processor(processor.to(device=ref.device, dtype=ref.dtype))

    def record_grid(module, args, kwargs):
        layout.grid = _grid_from_inputs(module, args, kwargs)

    hook = transformer.register_forward_pre_hook(record_grid, with_kwargs=True)
    transformer._ditkit_clear = (originals, hook)
    return [path for path, _, _ in layers]


def remove_clear(transformer: nn.Module) -> None:
    """Give every layer switched by `apply_clear` its stock processor back."""
    if not hasattr(transformer, "_ditkit_clear"):
        return
    originals, hook = transformer._ditkit_clear
    for path, processor in originals.items():
        transformer.get_submodule(path).set_processor(processor)
    hook.remove()
    del transformer._ditkit_clear


def attention_taps(transformer: nn.Module) -> list[tuple[nn.Module, str]]:
    """Where each self-attention layer's raw output (before its output projection) can be read:
    the input of `to_out[0]`, or the output of the layer itself when it has none (FLUX single blocks)."""
    taps = []
    for _, attn, _ in _attention_layers(transformer):
        to_out = getattr(attn, "to_out", None)
        taps.append((to_out[0], "input") if to_out is not None else (attn, "output"))
    return taps


# -- distillation with a diffusers teacher ---------------------------------------------------------

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
                 steps: int = 28, prompt_embeds: str | None = None, num_prompts: int = 16, seed: int = 0):
        import diffusers

        self.path = str(path)
        class_name = json.loads((Path(path) / "config.json").read_text())["_class_name"]
        if class_name not in FLOW_MODELS:
            raise DitkitError(f"distilling a {class_name} is not supported: ditkit distils the flow-matching "
                              f"transformers {', '.join(FLOW_MODELS)} (apply_clear works on {', '.join(SUPPORTED)})")
        transformer = getattr(diffusers, class_name).from_pretrained(path).to(device).eval()
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

    def student_record(self, student: nn.Module, distill: dict) -> dict:
        return {"model": {"diffusers": self.class_name, "path": self.path},
                "diffusion": {"objective": "flow", "sampler": "euler", "sample_steps": self.steps, "cfg_scale": 1.0},
                "data": {"resolution": self.resolution, "prompt_embeds": self.prompts_file}, "distill": distill}

    def student_state(self, student: nn.Module) -> dict[str, Tensor]:
        return {name: p for name, p in self.trainable_parameters(student).items()}

    def describe(self) -> dict:
        return {"kind": "diffusers", "class": self.class_name, "path": self.path}
