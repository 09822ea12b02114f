"""CLEAR local attention inside diffusers transformers: FLUX, SD3 and PixArt.

    from .clear import apply_clear, remove_clear
    apply_clear(pipe.transformer, radius=16, down_factor=4)   # every self-attention becomes CLEAR
    remove_clear(pipe.transformer)                           # the stock processors are back

Each self-attention layer gets a `ClearAttnProcessor` (an nn.Module, so the pooling weights of
`down_factor` are parameters of the transformer and train and save with it). The processors
compute exactly what the stock ones do (projections, QK-norm, FLUX's RoPE, output projections)
except that image queries see image keys in a disc of radius r; text tokens are global (every
query sees them, text queries see everything). The token grid comes from each forward call's
inputs (FLUX: `img_ids`; SD3 / PixArt: the latent's height and width over the patch size).

Beyond the training size (with or without CLEAR), off by default:

    set_size_options(pipe.transformer, attention_scale=True, positions="ntk")  # FLUX at 4096 px
    remove_size_options(pipe.transformer)

scales every self-attention's queries by sqrt(log N / log N_train) and rescales FLUX's rotary image
axes (SD3: interpolates its cropped sin-cos positions), as `ditkit.models.extrapolation` does for DiT.

Distilling with a diffusers transformer as the teacher is `ditkit.distill.diffusers_teacher`;
patch-parallel sampling with these processors (`set_strip`) is `ditkit.diffusers.patch_parallel`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..errors import DitkitError
from ..mixers.base import Extrapolation, Grid
from ..mixers.clear import (
    check_clear_options,
    initial_pool_weight,
    local_attention,
    pool_tokens,
    strip_local_attention,
)
from ..mixers.strip import Strip
from ..models.extrapolation import POSITION_SCALINGS

SUPPORTED = ("FluxTransformer2DModel", "SD3Transformer2DModel", "PixArtTransformer2DModel")


@dataclass
class TokenLayout:
    """The image-token grid of the forward call in progress; shared by one transformer's processors.
    Under patch-parallel sampling (`ditkit.diffusers.patch_parallel`) the call holds only `strip`'s
    rows of that grid."""

    grid: Grid | None = None
    strip: Strip | None = None

    def image_tokens(self) -> int:
        """Image tokens in this call's sequences: the strip's, or the whole grid's."""
        if self.strip is not None:
            start, stop = self.strip.rows
            return (stop - start) * self.grid[1]
        return self.grid[0] * self.grid[1]


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
        if strip is not None:
            return strip_local_attention(q, k, v, strip, self.radius, num_global, pool_weight, self.backend)
        extra_k = extra_v = None
        if pool_weight is not None:
            extra_k, extra_v = (pool_tokens(x, grid, num_global, pool_weight) for x in (k, v))
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


def grid_from_inputs(transformer: nn.Module, args: tuple, kwargs: dict) -> Grid:
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


def self_attention_layers(transformer: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(path, attention module, kind) of every self-attention layer (the ones `apply_clear` switches)."""
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
    layers = self_attention_layers(transformer)
    originals = {}
    for path, attn, kind in layers:
        originals[path] = attn.processor
        processor = ClearAttnProcessor(layout, kind, radius, down_factor, backend)
        ref = next(attn.parameters())
        attn.set_processor(processor.to(device=ref.device, dtype=ref.dtype))

    def record_grid(module, args, kwargs):
        layout.grid = grid_from_inputs(module, args, kwargs)

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
    for _, attn, _ in self_attention_layers(transformer):
        to_out = getattr(attn, "to_out", None)
        taps.append((to_out[0], "input") if to_out is not None else (attn, "output"))
    return taps


# --- Beyond the training size: proportional attention scale and position scaling ---------------

FLUX_TRAIN_GRID = (64, 64)  # FLUX.1 at 1024 px: FluxPipeline.default_sample_size 128 latent px, 2x2 packing


@dataclass
class SizeOptions:
    """One transformer's size options and the `Extrapolation` of the forward call in progress."""

    train_grid: Grid
    attention_scale: bool
    positions: str
    current: Extrapolation | None = None
    grid: Grid | None = None


def default_train_grid(transformer: nn.Module) -> Grid:
    """The token grid a transformer was trained at: SD3 / PixArt's `sample_size / patch_size`
    (their PatchEmbed's base size), FLUX.1's 64 x 64 (1024 px; FLUX has no size in its config)."""
    if type(transformer).__name__ == "FluxTransformer2DModel":
        return FLUX_TRAIN_GRID
    side = transformer.config.sample_size // transformer.config.patch_size
    return side, side


def _query_modules(attn: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are the final (QK-normed) queries of a layer, per token stream.
    Scaling them equals scaling q before the softmax: RoPE after them is a rotation (linear)."""
    streams = [(attn.norm_q, attn.to_q)]
    if getattr(attn, "add_q_proj", None) is not None:
        streams.append((getattr(attn, "norm_added_q", None), attn.add_q_proj))
    return [norm if norm is not None else projection for norm, projection in streams]


def flux_rotary(ids: Tensor, theta: float, axes_dim, extrapolation: Extrapolation | None):
    """FluxPosEmbed's (cos, sin) for position ids (S, 3), with FLUX's image axes (1: rows,
    2: columns, as FluxPipeline._prepare_latent_image_ids writes them) rescaled where they grew
    (s > 1) as `rope_2d_angles` does for DiT:
      "ntk"          theta * s^(d/(d-2)) for an axis of d channels (d/2 frequencies): the fastest
                     frequency is unchanged, the slowest is divided by s;
      "interpolate"  positions divided by s.
    Axis 0 (text / reference index) is never rescaled. Without an extrapolation this is FluxPosEmbed."""
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    stretch = {}  # axis -> s, only for the image axes
    if extrapolation is not None and extrapolation.positions != "none":
        stretch = {1: max(1.0, extrapolation.stretch[0]), 2: max(1.0, extrapolation.stretch[1])}
    freqs_dtype = torch.float32 if ids.device.type in ("mps", "npu") else torch.float64  # as FluxPosEmbed
    pos, cos_out, sin_out = ids.float(), [], []
    for axis, dim in enumerate(axes_dim):
        s, axis_theta, axis_pos = stretch.get(axis, 1.0), theta, pos[:, axis]
        if s > 1 and extrapolation.positions == "interpolate":
            axis_pos = axis_pos / s
        elif s > 1 and dim > 2:
            axis_theta = theta * s ** (dim / (dim - 2))
        cos, sin = get_1d_rotary_pos_embed(dim, axis_pos, theta=axis_theta, repeat_interleave_real=True,
                                           use_real=True, freqs_dtype=freqs_dtype)
        cos_out.append(cos)
        sin_out.append(sin)
    return torch.cat(cos_out, dim=-1).to(ids.device), torch.cat(sin_out, dim=-1).to(ids.device)


def sd3_interpolated_pos_embed(patch_embed: nn.Module, grid: Grid, train_grid: Grid) -> Tensor:
    """SD3's position embedding (1, H*W, D) with positions interpolated into the training crop.

    SD3's PatchEmbed holds a sin-cos table over M = pos_embed_max_size positions per axis and takes
    the centred n x n crop (rows (M - n) // 2 + i); a grid larger than M fails in stock diffusers.
    Here an axis that grew by s = n / n_train reads position (M - n_train) // 2 + i / s instead:
    the n tokens span the crop the model was trained on, at fractional table positions."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid

    M, dim = patch_embed.pos_embed_max_size, patch_embed.pos_embed.shape[-1]
    table_step = patch_embed.base_size / M / patch_embed.interpolation_scale  # as get_2d_sincos_pos_embed

    def axis_positions(n: int, n_train: int) -> Tensor:
        index = torch.arange(n, dtype=torch.float64)
        start = (M - n) // 2
        if n > n_train:
            index, start = index * n_train / n, (M - n_train) // 2
        return (start + index) * table_step

    ys, xs = axis_positions(grid[0], train_grid[0]), axis_positions(grid[1], train_grid[1])
    columns, rows = torch.meshgrid(xs, ys, indexing="xy")  # diffusers' order: the first half encodes x
    embed = get_2d_sincos_pos_embed_from_grid(dim, torch.stack([columns, rows]).reshape(2, 1, -1))
    return embed.float().unsqueeze(0).to(patch_embed.pos_embed.device)


def _check_positions(transformer: nn.Module, positions: str) -> None:
    name = type(transformer).__name__
    if positions == "none" or name == "FluxTransformer2DModel":
        return
    if name == "PixArtTransformer2DModel":
        raise DitkitError("PixArt already interpolates its sin-cos positions to the trained range at every size "
                          "(PatchEmbed's base_size and interpolation_scale): use positions='none'")
    if positions == "ntk":
        raise DitkitError("SD3's sin-cos positions are a centred crop of a fixed table, so NTK frequency scaling "
                          "moves even the trained centre: use positions='interpolate' or 'none'")


def set_size_options(transformer: nn.Module, *, train_grid: Grid | None = None, attention_scale: bool = False,
                     positions: str = "none") -> None:
    """Sample a FLUX / SD3 / PixArt transformer beyond its training size, with or without `apply_clear`.

    train_grid: the image-token grid (rows, columns) the model was trained at; tokens are pixels / 16
      for all three (VAE /8, then 2x2 patches or packing). Default `default_train_grid`.
    attention_scale: proportional attention scale: every self-attention layer's queries times
      sqrt(log N / log N_train), N the image tokens of the call (below 1 below the training size).
    positions: "none"; "ntk" or "interpolate" (FLUX's rotary image axes, see `flux_rotary`); for SD3
      "interpolate" only (`sd3_interpolated_pos_embed`, also lifts SD3's pos_embed_max_size limit);
      PixArt already interpolates its positions (refused).

    Both off (the default) removes the options: the transformer is stock again, bit for bit. At the
    training size nothing changes either. `remove_size_options` undoes this."""
    name = type(transformer).__name__
    if name not in SUPPORTED:
        raise DitkitError(f"set_size_options supports {', '.join(SUPPORTED)}, not {name}")
    if positions not in POSITION_SCALINGS:
        raise DitkitError(f"unknown position scaling {positions!r}: choose one of {', '.join(POSITION_SCALINGS)}")
    _check_positions(transformer, positions)
    remove_size_options(transformer)
    if not attention_scale and positions == "none":
        return
    train_grid = tuple(train_grid or default_train_grid(transformer))
    if len(train_grid) != 2 or min(train_grid) < 1:
        raise DitkitError(f"train_grid must be (rows, columns) of image tokens (pixels / 16), got {train_grid}")
    options = SizeOptions(train_grid, attention_scale, positions)
    layers = [attn for _, attn, _ in self_attention_layers(transformer)]
    hooks = [transformer.register_forward_pre_hook(_size_recorder(options, layers), with_kwargs=True)]
    if attention_scale:
        hooks += [module.register_forward_hook(_query_scaler(options)) for attn in layers
                  for module in _query_modules(attn)]
    if positions != "none" and name == "FluxTransformer2DModel":
        hooks.append(transformer.pos_embed.register_forward_hook(_flux_rotary_hook(options)))
    if positions == "interpolate" and name == "SD3Transformer2DModel":
        patch_embed = transformer.pos_embed
        patch_embed.cropped_pos_embed = lambda height, width: _sd3_crop(patch_embed, options, height, width)
    transformer._ditkit_size_options = (options, hooks)


def remove_size_options(transformer: nn.Module) -> None:
    """Undo `set_size_options`: the stock position embedding and attention scale are back."""
    if not hasattr(transformer, "_ditkit_size_options"):
        return
    _, hooks = transformer._ditkit_size_options
    for hook in hooks:
        hook.remove()
    transformer.pos_embed.__dict__.pop("cropped_pos_embed", None)  # SD3: the class's own method again
    del transformer._ditkit_size_options


def _size_recorder(options: SizeOptions, layers: list[nn.Module]):
    def record(module, args, kwargs):
        if any(getattr(attn, "fused_projections", False) for attn in layers):
            raise DitkitError("size options need unfused projections: call unfuse_qkv_projections() first")
        grid = grid_from_inputs(module, args, kwargs)
        stretch = (grid[0] / options.train_grid[0], grid[1] / options.train_grid[1])
        options.grid = grid
        options.current = Extrapolation(stretch=stretch, attention_scale=options.attention_scale,
                                        positions=options.positions)
    return record


def _query_scaler(options: SizeOptions):
    def scale(module, args, output):
        if options.current is None:  # called outside a transformer forward: no grid to scale for
            return None
        factor = options.current.query_scale(options.grid)
        return None if factor == 1.0 else output * factor
    return scale


def _flux_rotary_hook(options: SizeOptions):
    def rescale(module, args, output):
        if options.current is None or max(options.current.stretch) <= 1:  # nothing grew: FluxPosEmbed's own
            return None
        return flux_rotary(args[0], module.theta, module.axes_dim, options.current)
    return rescale


def _sd3_crop(patch_embed: nn.Module, options: SizeOptions, height: int, width: int) -> Tensor:
    """PatchEmbed.cropped_pos_embed (latent height, width) with interpolated positions where the grid grew."""
    p = patch_embed.patch_size
    grid = (height // p, width // p)
    if grid[0] <= options.train_grid[0] and grid[1] <= options.train_grid[1]:
        return type(patch_embed).cropped_pos_embed(patch_embed, height, width)
    return sd3_interpolated_pos_embed(patch_embed, grid, options.train_grid)
