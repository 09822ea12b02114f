"""FLUX.1 (`FluxTransformer2DModel`): packed 2x2 latent tokens, rotary positions from `img_ids`,
double-stream blocks (text in `encoder_hidden_states`) and single-stream blocks ([text | image])."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ...errors import DitkitError
from ...mixers.base import Extrapolation, Grid
from .base import DiffusersAdapter, register_adapter

FLUX_TRAIN_GRID = (64, 64)  # FLUX.1 at 1024 px: FluxPipeline.default_sample_size 128 latent px, 2x2 packing


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


def image_ids(rows: int, columns: int, device: torch.device) -> Tensor:
    """Position ids (rows * columns, 3) of the image tokens, as FluxPipeline writes them."""
    ys, xs = torch.meshgrid(torch.arange(rows, device=device), torch.arange(columns, device=device), indexing="ij")
    return torch.stack([torch.zeros_like(ys), ys, xs], -1).reshape(-1, 3)


class FluxAdapter(DiffusersAdapter):
    class_name, label, layout = "FluxTransformer2DModel", "FLUX", "text_first"
    needed_encoders = ("text_encoder", "text_encoder_2")
    guidance_needs_negatives = False  # FLUX.1-dev's guidance is an input of the transformer
    flow = True
    prompt_tokens = 512  # T5's sequence length in FluxPipeline

    def token_patch(self, transformer: nn.Module) -> int:
        return 2  # FluxPipeline packs 2x2 latent pixels into a token (its config's patch_size is 1)

    def latent_channels(self, transformer: nn.Module) -> int:
        """The denoised latent's channels (packed 2x2, so / 4): read from the output, since Fill and
        Control transformers take their image conditions as extra input channels."""
        return (transformer.config.out_channels or transformer.config.in_channels) // 4

    def grid(self, transformer: nn.Module, args: tuple, kwargs: dict) -> Grid:
        """The generated image's grid: the tokens whose first id axis is 0 (a Kontext context image's
        tokens follow with 1 there: `image_positions`)."""
        ids = self._image_ids(args, kwargs)
        ids = ids[ids[:, 0] == 0]
        return int(ids[:, 1].max()) + 1, int(ids[:, 2].max()) + 1

    def image_positions(self, transformer: nn.Module, args: tuple, kwargs: dict):
        """(rows, columns) and image index (the first id axis) of every image token, when the call
        holds more than the generated image's grid (FluxKontextPipeline's context image)."""
        ids = self._image_ids(args, kwargs)
        if not bool((ids[:, 0] != 0).any()):
            return None
        return ids[:, 1:3], ids[:, 0]

    @staticmethod
    def _image_ids(args: tuple, kwargs: dict) -> Tensor:
        ids = kwargs.get("img_ids", args[4] if len(args) > 4 else None)
        if ids is None:
            raise DitkitError("FLUX with CLEAR needs img_ids (the image token positions) in every call")
        return ids.reshape(-1, ids.shape[-1])

    def default_train_grid(self, transformer: nn.Module) -> Grid:
        return FLUX_TRAIN_GRID  # FLUX has no size in its config

    def attention_kind(self, attn: nn.Module) -> str | None:
        """"flux" for both block types (FluxAttention: rotary, text first)."""
        return "flux" if type(attn).__name__ == "FluxAttention" else super().attention_kind(attn)

    def check_positions(self, positions: str) -> None:
        pass  # "ntk" and "interpolate" both rescale the rotary image axes (`flux_rotary`)

    def install_positions(self, transformer: nn.Module, options, hooks) -> None:
        def rescale(module, args, output):
            if options.current is None or max(options.current.stretch) <= 1:  # nothing grew: FluxPosEmbed's own
                return None
            return flux_rotary(args[0], module.theta, module.axes_dim, options.current)

        hooks.post_hook(transformer.pos_embed, rescale)

    def install_strip_cutters(self, transformer: nn.Module, state, hooks) -> None:
        """The packed image tokens (B, H*W, C) cut before `x_embedder` (per token), and the position
        ids [text | image] (S, 3) cut to the text and the strip's rows before `pos_embed`: the
        rotary positions are the strip's own rows of the whole image."""
        def cut_tokens(module, args):
            return (args[0][:, state.current().tokens], *args[1:])

        def cut_positions(module, args):
            strip, ids = state.current(), args[0]
            num_text = ids.shape[0] - strip.grid[0] * strip.grid[1]
            return (torch.cat([ids[:num_text], ids[num_text:][strip.tokens]]), *args[1:])

        hooks.pre_hook(transformer.x_embedder, cut_tokens)
        hooks.pre_hook(transformer.pos_embed, cut_positions)

    def unpack_latents(self, pipe, latents: Tensor, height: int, width: int) -> Tensor:
        return pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)  # packed 2x2-patch tokens

    def denoise(self, transformer: nn.Module, x: Tensor, t: Tensor, text: Tensor, pooled: Tensor,
                guidance: float) -> Tensor:
        """Latents packed into 2x2 tokens with their position ids, timestep in [0, 1], FLUX.1-dev's
        guidance input where the model has one; the output unpacked again."""
        dtype = text.dtype
        B, C, h, w = x.shape
        tokens = x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, h * w // 4, C * 4)
        img_ids = image_ids(h // 2, w // 2, x.device).to(dtype)
        scale = torch.full((B,), guidance, device=x.device, dtype=dtype) if transformer.config.guidance_embeds \
            else None
        out = transformer(hidden_states=tokens.to(dtype), encoder_hidden_states=text, pooled_projections=pooled,
                          timestep=t / 1000, img_ids=img_ids, txt_ids=torch.zeros(text.shape[1], 3).to(img_ids),
                          guidance=scale, return_dict=False)[0]
        return out.view(B, h // 2, w // 2, C, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(B, C, h, w)


register_adapter(FluxAdapter())
