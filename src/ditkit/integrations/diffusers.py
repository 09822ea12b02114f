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

Distilling with a diffusers transformer as the teacher is `ditkit.distill.diffusers_teacher`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

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

    def _flux(self, attn, hidden_states, encoder_hidden_states, image_rotary_emb):
        """FLUX double-stream (text in `encoder_hidden_states`) and single-stream ([text | image]) blocks."""
        from diffusers.models.embeddings import apply_rotary_emb

        if getattr(attn, "fused_projections", False):
            raise DitkitError("the CLEAR processor needs unfused projections: call unfuse_qkv_projections() first")
        q, k, v = qkv_projections(attn, hidden_states, encoder_hidden_states)
        if image_rotary_emb is not None:
            q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
            k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
        grid = self.layout.grid
        num_global = q.shape[1] - grid[0] * grid[1] if grid else 0
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
