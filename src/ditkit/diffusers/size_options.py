"""Sampling a diffusers transformer beyond its training size, with or without CLEAR; off by default.

    set_size_options(pipe.transformer, attention_scale=True, positions="ntk")  # FLUX at 4096 px
    remove_size_options(pipe.transformer)

scales every self-attention's queries by sqrt(log N / log N_train) and rescales the positions as
the transformer's adapter does it (FLUX: its rotary image axes, `adapters.flux.flux_rotary`; SD3:
interpolates its cropped sin-cos positions, `adapters.sd3.sd3_interpolated_pos_embed`), as
`ditkit.models.extrapolation` does for DiT.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import DitkitError
from ..mixers.base import Extrapolation, Grid
from ..models.extrapolation import POSITION_SCALINGS
from .adapters import DiffusersAdapter, adapter_for
from .hooks import HookSet, install, uninstall

SIZE_SLOT = "_ditkit_size_options"  # the transformer attribute holding what set_size_options installed


@dataclass
class SizeOptions:
    """One transformer's size options and the `Extrapolation` of the forward call in progress."""

    train_grid: Grid
    attention_scale: bool
    positions: str
    current: Extrapolation | None = None
    grid: Grid | None = None


def _query_modules(attn: nn.Module) -> list[nn.Module]:
    """The modules whose outputs are the final (QK-normed) queries of a layer, per token stream.
    Scaling them equals scaling q before the softmax: RoPE after them is a rotation (linear)."""
    streams = [(attn.norm_q, attn.to_q)]
    if getattr(attn, "add_q_proj", None) is not None:
        streams.append((getattr(attn, "norm_added_q", None), attn.add_q_proj))
    return [norm if norm is not None else projection for norm, projection in streams]


def set_size_options(transformer: nn.Module, *, train_grid: Grid | None = None, attention_scale: bool = False,
                     positions: str = "none") -> None:
    """Sample a supported transformer (FLUX, SD3, PixArt) beyond its training size, with or without
    `apply_clear`.

    train_grid: the image-token grid (rows, columns) the model was trained at; tokens are pixels / 16
      for all three (VAE /8, then 2x2 patches or packing). Default: the adapter's `default_train_grid`
      (SD3 / PixArt: sample_size / patch_size; FLUX.1: 64 x 64, i.e. 1024 px).
    attention_scale: proportional attention scale: every self-attention layer's queries times
      sqrt(log N / log N_train), N the image tokens of the call (below 1 below the training size).
    positions: "none"; "ntk" or "interpolate" (FLUX's rotary image axes, see `flux_rotary`); for SD3
      "interpolate" only (`sd3_interpolated_pos_embed`, also lifts SD3's pos_embed_max_size limit);
      PixArt already interpolates its positions (refused).

    Both off (the default) removes the options: the transformer is stock again, bit for bit. At the
    training size nothing changes either. `remove_size_options` undoes this."""
    adapter = adapter_for(transformer, "set_size_options")
    if positions not in POSITION_SCALINGS:
        raise DitkitError(f"unknown position scaling {positions!r}: choose one of {', '.join(POSITION_SCALINGS)}")
    adapter.check_positions(positions)
    remove_size_options(transformer)
    if not attention_scale and positions == "none":
        return
    train_grid = tuple(train_grid or adapter.default_train_grid(transformer))
    if len(train_grid) != 2 or min(train_grid) < 1:
        raise DitkitError(f"train_grid must be (rows, columns) of image tokens (pixels / 16), got {train_grid}")
    install(transformer, SIZE_SLOT, _size_hooks(adapter, transformer, SizeOptions(train_grid, attention_scale,
                                                                                   positions)))


def _size_hooks(adapter: DiffusersAdapter, transformer: nn.Module, options: SizeOptions) -> HookSet:
    layers = [attn for _, attn, _ in adapter.self_attention_layers(transformer)]
    hooks = HookSet(options)
    hooks.pre_hook(transformer, _size_recorder(adapter, options, layers), with_kwargs=True)
    if options.attention_scale:
        for module in (module for attn in layers for module in _query_modules(attn)):
            hooks.post_hook(module, _query_scaler(options))
    if options.positions != "none":
        adapter.install_positions(transformer, options, hooks)
    return hooks


def remove_size_options(transformer: nn.Module) -> None:
    """Undo `set_size_options`: the stock position embedding and attention scale are back."""
    uninstall(transformer, SIZE_SLOT)


def _size_recorder(adapter: DiffusersAdapter, options: SizeOptions, layers: list[nn.Module]):
    def record(module, args, kwargs):
        if any(getattr(attn, "fused_projections", False) for attn in layers):
            raise DitkitError("size options need unfused projections: call unfuse_qkv_projections() first")
        grid = adapter.grid(module, args, kwargs)
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
