"""Exact patch-parallel sampling of diffusers transformers (FLUX, SD3, PixArt) with CLEAR.

    apply_clear(pipe.transformer, radius=16, down_factor=4)
    with patch_parallel(pipe.transformer):   # under torchrun: each process runs one strip of image rows
        images = pipe(prompt, height=4096, width=4096).images

Hooks rather than a wrapper, so the pipeline still calls its own `transformer(...)` with the
whole latents, and every process holds the whole model:

  transformer (pre)  reads the whole token grid from the call's inputs, cuts it into strips
                     (`strip_bounds`) and hands this process's strip to every self-attention
                     processor through its `set_strip` capability hook (CLEAR's processors have it;
                     stock processors do not, and are refused with the fix).
  image embedding    FLUX: the packed tokens entering `x_embedder` and the position ids entering
                     `pos_embed` are cut to the strip's rows (the text ids kept), so the rotary
                     positions are the strip's own rows of the whole image. SD3 / PixArt: their
                     PatchEmbed embeds the whole latent with the whole grid's positions (SD3's
                     interpolated ones from `set_size_options` included) and its output is cut to
                     the strip: the positions are exactly those of one process.
  proj_out (post)    the strips' outputs all-gathered: every process returns the whole output and
                     takes the identical scheduler step.

Between these, everything but self-attention works token by token (AdaLN, norms, MLPs, the caption
and context projections, PixArt's cross-attention to the text, SD3's context_pre_only last block,
FLUX's single-stream [text | image] blocks), and the pooled text embedding is whole on every process.
Self-attention runs on the strip in `clear.strip_local_attention`: image keys and values of the
halo rows come point to point from the neighbours, pooled tokens are partial sums all-reduced, and
text tokens are whole on every process; their queries see every image token, so each process
attends them to its own rows and the partial softmaxes are merged by their log-sum-exps
(`clear.global_attention_of_strips`): text x heads x (d + 2) values per layer instead of the
image's keys and values. `kv_exchange="allgather"` gathers every row instead (the baseline).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..distributed.comm import ProcessStrip, world
from ..distributed.strips import strip_bounds
from ..errors import DitkitError
from ..mixers.strip import KV_EXCHANGES
from .clear import SUPPORTED, grid_from_inputs, self_attention_layers


@dataclass
class PatchState:
    """One transformer's patch-parallel settings and the strip of the call in progress."""

    kv_exchange: str
    strip: ProcessStrip | None = None

    def current(self) -> ProcessStrip:
        if self.strip is None:
            raise DitkitError("a patch-parallel transformer's submodule ran outside a transformer call: "
                              "call the transformer itself")
        return self.strip


def strip_processors(transformer: nn.Module) -> list:
    """The self-attention processors, each able to run on a strip (`set_strip`), or a one-line refusal."""
    processors = []
    for path, attn, _ in self_attention_layers(transformer):
        if not callable(getattr(attn.processor, "set_strip", None)):
            raise DitkitError(f"patch-parallel sampling needs attention processors that run on strips, and {path} "
                              f"has a {type(attn.processor).__name__}: switch CLEAR on first (apply_clear, or "
                              "--clear radius=...; a radius covering the image equals full attention)")
        processors.append(attn.processor)
    return processors


def enable_patch_parallel(transformer: nn.Module, kv_exchange: str = "halo") -> None:
    """Run every call of `transformer` on this process's strip of image rows (see the module doc);
    without a process group, on one strip holding every row. `disable_patch_parallel` undoes it."""
    name = type(transformer).__name__
    if name not in SUPPORTED:
        raise DitkitError(f"patch-parallel sampling supports {', '.join(SUPPORTED)}, not {name}")
    if kv_exchange not in KV_EXCHANGES:
        raise DitkitError(f"unknown kv_exchange {kv_exchange!r}: choose one of {', '.join(KV_EXCHANGES)}")
    strip_processors(transformer)  # refused now, not at the first step
    disable_patch_parallel(transformer)
    state = PatchState(kv_exchange)
    hooks = [transformer.register_forward_pre_hook(_call_starter(state), with_kwargs=True),
             transformer.register_forward_hook(_call_ender(state), always_call=True),
             transformer.proj_out.register_forward_hook(_output_gatherer(state))]
    if name == "FluxTransformer2DModel":
        hooks += [transformer.x_embedder.register_forward_pre_hook(_token_cutter(state)),
                  transformer.pos_embed.register_forward_pre_hook(_position_cutter(state))]
    else:
        hooks.append(transformer.pos_embed.register_forward_hook(_embedding_cutter(state)))
    transformer._ditkit_patch = (state, hooks)


def disable_patch_parallel(transformer: nn.Module) -> None:
    """Undo `enable_patch_parallel`: whole-grid calls again."""
    if not hasattr(transformer, "_ditkit_patch"):
        return
    _, hooks = transformer._ditkit_patch
    for hook in hooks:
        hook.remove()
    forget_strip(transformer)
    del transformer._ditkit_patch


def forget_strip(transformer: nn.Module) -> None:
    """Every strip-capable processor back on the whole grid (others, e.g. swapped in since, are left alone)."""
    for _, attn, _ in self_attention_layers(transformer):
        if callable(getattr(attn.processor, "set_strip", None)):
            attn.processor.set_strip(None)


@contextmanager
def patch_parallel(transformer: nn.Module, kv_exchange: str = "halo"):
    """`enable_patch_parallel` for the length of a with-block."""
    enable_patch_parallel(transformer, kv_exchange)
    try:
        yield
    finally:
        disable_patch_parallel(transformer)


def _call_starter(state: PatchState):
    def start(module, args, kwargs):
        grid = grid_from_inputs(module, args, kwargs)
        rank, size = world()
        state.strip = ProcessStrip(grid, strip_bounds(grid[0], size), rank, state.kv_exchange)
        for processor in strip_processors(module):  # looked up per call: CLEAR may have been reapplied
            processor.set_strip(state.strip)
    return start


def _call_ender(state: PatchState):
    def end(module, args, output):  # also after a failed call (always_call)
        state.strip = None
        forget_strip(module)
    return end


def _token_cutter(state: PatchState):
    """FLUX: the packed image tokens (B, H*W, C) cut to the strip before `x_embedder` (per token)."""
    def cut(module, args):
        return (args[0][:, state.current().tokens], *args[1:])
    return cut


def _position_cutter(state: PatchState):
    """FLUX: position ids [text | image] (S, 3) cut to the text and the strip's image rows."""
    def cut(module, args):
        strip, ids = state.current(), args[0]
        num_text = ids.shape[0] - strip.grid[0] * strip.grid[1]
        return (torch.cat([ids[:num_text], ids[num_text:][strip.tokens]]), *args[1:])
    return cut


def _embedding_cutter(state: PatchState):
    """SD3 / PixArt: PatchEmbed's whole-grid tokens (B, H*W, D), positions added, cut to the strip."""
    def cut(module, args, output: Tensor) -> Tensor:
        return output[:, state.current().tokens]
    return cut


def _output_gatherer(state: PatchState):
    """Every strip's `proj_out` tokens, in image order: the whole output on every process."""
    def gather(module, args, output: Tensor) -> Tensor:
        return state.current().gather(output, dim=1)
    return gather
