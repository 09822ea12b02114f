"""CLEAR local attention inside diffusers transformers: FLUX, SD3 and PixArt.

    from .clear import apply_clear, remove_clear
    apply_clear(pipe.transformer, radius=16, down_factor=4)   # every self-attention becomes CLEAR
    remove_clear(pipe.transformer)                           # the stock processors are back

Each self-attention layer gets a `ClearAttnProcessor` (an nn.Module, so the pooling weights of
`down_factor` are parameters of the transformer and train and save with it). The processors
compute exactly what the stock ones do (projections, QK-norm, FLUX's RoPE, output projections)
except that image queries see image keys in a disc of radius r; text tokens are global (every
query sees them, text queries see everything). A call holding several images (FLUX Kontext: the
context image's tokens after the generated image's) takes the disc on the model's position plane,
across images (`ditkit.mixers.positions`), each image pooled on its own grid. The token grid comes
from each forward call's inputs (FLUX: `img_ids`; SD3 / PixArt: the latent's height and width over the patch size).

What is particular to each transformer class (how the grid is read, which layers are
self-attention) comes from its adapter (`ditkit.diffusers.adapters`). Sampling beyond the training
size is `ditkit.diffusers.size_options`. Distilling with a diffusers transformer as the teacher is
`ditkit.distill.diffusers_teacher`; patch-parallel sampling with these processors (`set_strip`) is
`ditkit.diffusers.patch_parallel`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import DitkitError
from ..mixers import MixerSpec
from ..mixers.base import Grid
from ..mixers.clear import (
    check_clear_options,
    initial_pool_weight,
    local_attention,
    pool_tokens,
    strip_local_attention,
)
from ..mixers.positions import ImageGrid, grids_positions, positions_local_attention
from ..mixers.strip import Strip
from .adapters import DiffusersAdapter, adapter_for, find_adapter
from .hooks import HookSet, install, installed, uninstall

CLEAR_SLOT = "_ditkit_clear"  # the transformer attribute holding what apply_clear installed
# The options of the `clear` mixer that apply inside a diffusers transformer (its qkv_bias does not:
# the transformer's own projections keep theirs).
CLEAR_KEYS = ("radius", "down_factor", "backend")


def clear_spec(options: MixerSpec | str | dict) -> MixerSpec:
    """CLEAR settings for a diffusers transformer as the `clear` mixer's spec, the one spelling of a
    mixer ditkit's configs and flags use: a `MixerSpec`, its text (`clear:radius=16,down_factor=4`, or
    `radius=16,down_factor=4` as `ditkit generate --clear` takes it) or a dict of options."""
    if isinstance(options, dict):
        spec = MixerSpec("clear", options)
    else:
        text = str(options).strip()
        spec = MixerSpec.parse(f"clear:{text}" if "=" in text.partition(":")[0] else text)
    if spec.name != "clear":
        raise DitkitError(f"diffusers transformers take CLEAR's local attention, not {spec.name}: "
                          "give clear:radius=... (e.g. clear:radius=16,down_factor=4)")
    unknown = sorted(set(spec.options) - set(CLEAR_KEYS))
    if unknown:
        raise DitkitError(f"unknown CLEAR option {', '.join(unknown)}: use {', '.join(CLEAR_KEYS)}")
    return spec


@dataclass
class ImageSegment:
    """One image's tokens in a sequence holding several (FLUX Kontext): sequence slice [start, stop)
    among the image tokens, and where it lies when they form a whole grid in row-major order."""

    start: int
    stop: int
    place: ImageGrid | None  # (top, left, rows, columns)

    @property
    def grid(self) -> Grid | None:
        return None if self.place is None else self.place[2:]


def image_segments(positions: Tensor, image_index: Tensor) -> list[ImageSegment]:
    """Split a sequence's image tokens into its images (runs of one image index); each one's place
    if its positions are a whole rectangle in row-major order (pooling and cached plans need that)."""
    changes = (torch.nonzero(image_index[1:] != image_index[:-1]).squeeze(1) + 1).tolist()
    bounds = [0, *changes, len(image_index)]
    segments = []
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        part = positions[start:stop].round().long().cpu()
        top, left = part.min(0).values.tolist()
        rows, columns = (part.max(0).values - part.min(0).values + 1).tolist()
        place = (top, left, rows, columns)
        whole = rows * columns == len(part) and torch.equal(part, grids_positions((place,)))
        segments.append(ImageSegment(start, stop, place if whole else None))
    return segments


@dataclass
class TokenLayout:
    """The image tokens of the forward call in progress; shared by one transformer's processors.
    Usually one grid in row-major order (`grid`); when the call holds more than one image (FLUX
    Kontext's context image), also every image token's position on the model's plane
    (`positions`) and the images (`segments`). Under patch-parallel sampling
    (`ditkit.diffusers.patch_parallel`) the call holds only `strip`'s rows of the grid. The strip is
    kept per thread, so strips simulated by threads in one process (tests) each see their own."""

    grid: Grid | None = None
    positions: Tensor | None = None
    segments: list[ImageSegment] = field(default_factory=list)
    strips: dict[int, Strip] = field(default_factory=dict)  # thread id -> its strip

    @property
    def strip(self) -> Strip | None:
        return self.strips.get(threading.get_ident())

    @strip.setter
    def strip(self, strip: Strip | None) -> None:
        if strip is None:
            self.strips.pop(threading.get_ident(), None)
        else:
            self.strips[threading.get_ident()] = strip

    def set_images(self, grid: Grid, images: tuple[Tensor, Tensor] | None) -> None:
        """This call's grid and, for several images, their positions and image indices."""
        self.grid = grid
        # Integer positions once per call, not in each layer (the ids come as floats).
        self.positions = None if images is None else images[0].round().long()
        self.segments = [] if images is None else image_segments(self.positions, images[1])

    def image_tokens(self) -> int:
        """Image tokens in this call's sequences: every image's, the strip's, or the whole grid's."""
        if self.positions is not None:
            return len(self.positions)
        strip = self.strip
        if strip is not None:
            start, stop = strip.rows
            return (stop - start) * self.grid[1]
        return self.grid[0] * self.grid[1]

    def grids(self) -> tuple[ImageGrid, ...] | None:
        """Every image's place when each is a whole grid (the positions backends then cache their work)."""
        places = tuple(segment.place for segment in self.segments)
        return places if places and None not in places else None

    def pooled(self, x: Tensor, num_global: int, weight: Tensor) -> Tensor:
        """Pooled tokens of every image of a several-image call, concatenated (each image pooled over
        its own grid, as one image is)."""
        parts = []
        for segment in self.segments:
            if segment.grid is None:
                raise DitkitError("CLEAR's down_factor pools whole image grids, but this call's image tokens "
                                  f"[{segment.start}, {segment.stop}) are not one: use down_factor=0")
            image = x[..., num_global + segment.start:num_global + segment.stop, :]
            parts.append(pool_tokens(image, segment.grid, 0, weight))
        return torch.cat(parts, dim=-2)


class ClearAttnProcessor(nn.Module):
    """CLEAR local attention for one diffusers attention layer."""

    def __init__(self, layout: TokenLayout, kind: str, radius: float, down_factor: int = 0, backend: str = "auto"):
        super().__init__()
        check_clear_options(radius, down_factor, backend)
        self.layout, self.kind = layout, kind
        self.radius, self.down_factor, self.backend = radius, down_factor, backend
        if down_factor:
            self.pool_weight = initial_pool_weight(down_factor)

    def set_strip(self, strip: Strip | None) -> None:
        """Capability hook of patch-parallel sampling: the calls that follow hold only `strip`'s image
        rows (None: the whole grid again). The layout is shared, so every processor of the
        transformer sees it; setting it on each is harmless."""
        self.layout.strip = strip

    def local(self, q: Tensor, k: Tensor, v: Tensor, num_global: int) -> Tensor:
        """(B, heads, G + H*W, d) with the G global (text) tokens first -> same shape (on a strip:
        G + the strip's tokens)."""
        grid, strip = self.layout.grid, self.layout.strip
        if grid is None or q.shape[-2] != num_global + self.layout.image_tokens():
            raise DitkitError("CLEAR processor got a sequence that does not match the transformer's token grid: "
                              "call the transformer itself (apply_clear hooks its forward to read the grid)")
        pool_weight = self.pool_weight if self.down_factor else None
        if self.layout.positions is not None:
            return self._several_images(q, k, v, num_global, strip, pool_weight)
        if strip is not None:
            return strip_local_attention(q, k, v, strip, self.radius, num_global, pool_weight, self.backend)
        extra_k = extra_v = None
        if pool_weight is not None:
            extra_k, extra_v = (pool_tokens(x, grid, num_global, pool_weight) for x in (k, v))
        return local_attention(q, k, v, grid, self.radius, num_global, extra_k, extra_v, self.backend)

    def _several_images(self, q: Tensor, k: Tensor, v: Tensor, num_global: int, strip: Strip | None,
                        pool_weight: Tensor | None) -> Tensor:
        """A query sees the keys of every image within its disc on the position plane
        (`positions_local_attention`) and the pooled tokens of every image."""
        if strip is not None:
            raise DitkitError("patch-parallel sampling cuts one image grid into strips, but this call holds "
                              "several images (a Kontext context): sample it in one process")
        extra_k = extra_v = None
        if pool_weight is not None:
            extra_k, extra_v = (self.layout.pooled(x, num_global, pool_weight) for x in (k, v))
        return positions_local_attention(q, k, v, self.layout.positions, self.radius, num_global, extra_k, extra_v,
                                         self.backend, self.layout.grids())

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

    def _flux(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        """FLUX double-stream (text in `encoder_hidden_states`) and single-stream ([text | image]) blocks."""
        from diffusers.models.embeddings import apply_rotary_emb  # diffusers: imported when used

        if getattr(attn, "fused_projections", False):
            raise DitkitError("the CLEAR processor needs unfused projections: call unfuse_qkv_projections() first")
        q, k, v = qkv_projections(attn, hidden_states, encoder_hidden_states)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        num_global = q.shape[1] - self.layout.image_tokens() if self.layout.grid else 0
        out = self._attend(q, k, v, num_global)
        if encoder_hidden_states is None:
            return out
        num_text = encoder_hidden_states.shape[1]
        text, image = out[:, :num_text], out[:, num_text:]
        return attn.to_out[1](attn.to_out[0](image.contiguous())), attn.to_add_out(text.contiguous())

    def _joint(self, attn, hidden_states, encoder_hidden_states):
        """SD3 joint attention. Stock order is [image | text]; CLEAR wants the global text first."""
        num_text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
        out = self._attend(*qkv_projections(attn, hidden_states, encoder_hidden_states), num_text)
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
        out = self._attend(*qkv_projections(attn, hidden_states), 0)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, num_global: int) -> Tensor:
        """CLEAR attention of (B, S, heads, d) projections -> (B, S, heads * d)."""
        out = self.local(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), num_global)
        return out.transpose(1, 2).flatten(2).to(q.dtype)


def _stream_qkv(x: Tensor, heads: int, projections, norms) -> tuple[Tensor, Tensor, Tensor]:
    """One token stream's q, k, v as (B, S, heads, d), with QK-norm where the layer has it."""
    q, k, v = (proj(x).unflatten(-1, (heads, -1)) for proj in projections)
    norm_q, norm_k = norms
    return (q if norm_q is None else norm_q(q)), (k if norm_k is None else norm_k(k)), v


def qkv_projections(attn, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None):
    """q, k, v (B, S, heads, d) of the image stream, QK-normed, with the context (text) stream's
    tokens in front when there is one: CLEAR takes the global tokens first (as diffusers'
    `_get_qkv_projections` followed by FLUX's concatenation)."""
    image = _stream_qkv(hidden_states, attn.heads, (attn.to_q, attn.to_k, attn.to_v), (attn.norm_q, attn.norm_k))
    if encoder_hidden_states is None:
        return image
    context = _stream_qkv(encoder_hidden_states, attn.heads, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                          (attn.norm_added_q, attn.norm_added_k))
    return tuple(torch.cat([c, i], dim=1) for c, i in zip(context, image, strict=True))


def self_attention_layers(transformer: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(path, attention module, kind) of every self-attention layer (the ones `apply_clear` switches);
    none in a transformer ditkit has no adapter for."""
    adapter = find_adapter(transformer)
    return adapter.self_attention_layers(transformer) if adapter is not None else []


def apply_clear(transformer: nn.Module, radius: float | MixerSpec | str, down_factor: int = 0,
                backend: str = "auto", adapter: DiffusersAdapter | None = None) -> list[str]:
    """Switch every self-attention of a supported transformer (FLUX, SD3, PixArt: `ADAPTERS`) to
    CLEAR local attention: `apply_clear(t, 16, down_factor=4)`, or with a spec in place of the radius,
    `apply_clear(t, "clear:radius=16,down_factor=4")` (`clear_spec`; options it leaves out take the
    mixer's defaults). Returns the names of the switched layers. `remove_clear` undoes it. `adapter`
    serves a module built of a supported transformer's blocks (a pipeline's ControlNet) with that
    transformer's adapter."""
    if isinstance(radius, MixerSpec | str):
        spec = clear_spec(radius)
        radius, down_factor, backend = (spec.option(key) for key in CLEAR_KEYS)
    adapter = adapter or adapter_for(transformer, "apply_clear")
    check_clear_options(radius, down_factor, backend)  # refused before anything changes
    remove_clear(transformer)
    layout = TokenLayout()
    layers = adapter.self_attention_layers(transformer)
    hooks = HookSet(state=[path for path, _, _ in layers])  # the switched layers, for the distiller
    for _, attn, kind in layers:
        processor = ClearAttnProcessor(layout, kind, radius, down_factor, backend)
        ref = next(attn.parameters())
        hooks.set_processor(attn, processor.to(device=ref.device, dtype=ref.dtype))

    def record_grid(module, args, kwargs):
        layout.set_images(adapter.grid(module, args, kwargs), adapter.image_positions(module, args, kwargs))

    hooks.pre_hook(transformer, record_grid, with_kwargs=True)
    install(transformer, CLEAR_SLOT, hooks)
    return hooks.state


def remove_clear(transformer: nn.Module) -> None:
    """Give every layer switched by `apply_clear` its stock processor back."""
    uninstall(transformer, CLEAR_SLOT)


def clear_is_on(transformer: nn.Module) -> bool:
    return installed(transformer, CLEAR_SLOT) is not None


def clear_layers(transformer: nn.Module) -> list[str]:
    """The layers `apply_clear` switched ([] when CLEAR is off)."""
    hooks = installed(transformer, CLEAR_SLOT)
    return [] if hooks is None else hooks.state


STUDENT_PARAMETERS = ("to_q.", "to_k.", "to_v.", "to_out.0.", "processor.pool_weight")


def student_parameters(transformer: nn.Module) -> dict[str, nn.Parameter]:
    """What a CLEAR student trains and saves (by name within the transformer): the image-stream
    q/k/v/out projections of every switched layer, and its pooling weights. The rest stays the
    teacher's, so a student checkpoint loads over a stock transformer (`pipelines.load_student`)."""
    return {f"{layer}.{name}": p for layer in clear_layers(transformer)
            for name, p in transformer.get_submodule(layer).named_parameters() if name.startswith(STUDENT_PARAMETERS)}


def attention_taps(transformer: nn.Module) -> list[tuple[nn.Module, str]]:
    """Where each self-attention layer's raw output (before its output projection) can be read:
    the input of `to_out[0]`, or the output of the layer itself when it has none (FLUX single blocks)."""
    taps = []
    for _, attn, _ in self_attention_layers(transformer):
        to_out = getattr(attn, "to_out", None)
        taps.append((to_out[0], "input") if to_out is not None else (attn, "output"))
    return taps
