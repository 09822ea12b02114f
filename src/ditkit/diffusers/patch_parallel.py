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
  image embedding    (the adapter's `install_strip_cutters`)
                     FLUX: the packed tokens entering `x_embedder` and the position ids entering
                     `pos_embed` are cut to the strip's rows (the text ids kept), so the rotary
                     positions are the strip's own rows of the whole image. SD3 / PixArt: their
                     PatchEmbed embeds the whole latent with the whole grid's positions (SD3's
                     interpolated ones from `set_size_options` included) and its output is cut to
                     the strip: the positions are exactly those of one process.
  proj_out (post)    (the adapter's `output_module`)
                     the strips' outputs all-gathered: every process returns the whole output and
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

In one process (no process group, or a group of one) the single strip is the whole grid: nothing
is cut, so the transformer runs exactly the plain CLEAR forward, bit for bit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import Tensor, nn

from ..distributed.comm import ProcessStrip, world
from ..distributed.strips import strip_bounds
from ..errors import DitkitError
from ..mixers.base import Grid
from ..mixers.strip import KV_EXCHANGES, Strip
from .adapters import DiffusersAdapter, adapter_for
from .clear import self_attention_layers
from .hooks import HookSet, install, uninstall

PATCH_SLOT = "_ditkit_patch"  # the transformer attribute holding what enable_patch_parallel installed


def process_strip(grid: Grid, kv_exchange: str) -> Strip:
    """This process's strip of `grid`, its collectives on torch.distributed."""
    rank, size = world()
    return ProcessStrip(grid, strip_bounds(grid[0], size), rank, kv_exchange)


@dataclass
class PatchState:
    """One transformer's patch-parallel settings and the strip of the call in progress (per
    thread: strips simulated by threads in one process run the same transformer at once)."""

    kv_exchange: str
    strip_of: Callable[[Grid, str], Strip] = process_strip  # the strip of a call's grid
    strips: dict[int, Strip] = field(default_factory=dict)  # thread id -> the strip of its call

    def start(self, grid: Grid) -> Strip:
        strip = self.strips[threading.get_ident()] = self.strip_of(grid, self.kv_exchange)
        return strip

    def end(self) -> None:
        self.strips.pop(threading.get_ident(), None)

    def current(self) -> Strip:
        strip = self.strips.get(threading.get_ident())
        if strip is None:
            raise DitkitError("a patch-parallel transformer's submodule ran outside a transformer call: "
                              "call the transformer itself")
        return strip


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


def enable_patch_parallel(transformer: nn.Module, kv_exchange: str = "halo",
                          strip_of: Callable[[Grid, str], Strip] | None = None) -> None:
    """Run every call of `transformer` on this process's strip of image rows (see the module doc);
    without a process group, on one strip holding every row: the plain forward, nothing installed.
    `strip_of(grid, kv_exchange)` gives the calling thread's strip instead (strips simulated in one
    process). `disable_patch_parallel` undoes it."""
    adapter = adapter_for(transformer, "patch-parallel sampling")
    if kv_exchange not in KV_EXCHANGES:
        raise DitkitError(f"unknown kv_exchange {kv_exchange!r}: choose one of {', '.join(KV_EXCHANGES)}")
    strip_processors(transformer)  # refused now, not at the first step
    disable_patch_parallel(transformer)
    hooks = HookSet(PatchState(kv_exchange, strip_of or process_strip))
    if strip_of is not None or world()[1] > 1:
        _install_strips(adapter, transformer, hooks)
    install(transformer, PATCH_SLOT, hooks)


def _install_strips(adapter: DiffusersAdapter, transformer: nn.Module, hooks: HookSet) -> None:
    state = hooks.state
    hooks.pre_hook(transformer, _call_starter(adapter, state), with_kwargs=True)
    hooks.post_hook(transformer, _call_ender(state), always_call=True)
    adapter.install_strip_cutters(transformer, state, hooks)
    hooks.post_hook(adapter.output_module(transformer), _output_gatherer(state))
    hooks.on_remove(lambda: forget_strip(transformer))


def disable_patch_parallel(transformer: nn.Module) -> None:
    """Undo `enable_patch_parallel`: whole-grid calls again."""
    uninstall(transformer, PATCH_SLOT)


def forget_strip(transformer: nn.Module) -> None:
    """Every strip-capable processor back on the whole grid (others, e.g. swapped in since, are left alone)."""
    for _, attn, _ in self_attention_layers(transformer):
        if callable(getattr(attn.processor, "set_strip", None)):
            attn.processor.set_strip(None)


@contextmanager
def patch_parallel(transformer: nn.Module, kv_exchange: str = "halo",
                   strip_of: Callable[[Grid, str], Strip] | None = None):
    """`enable_patch_parallel` for the length of a with-block."""
    enable_patch_parallel(transformer, kv_exchange, strip_of)
    try:
        yield
    finally:
        disable_patch_parallel(transformer)


def _call_starter(adapter: DiffusersAdapter, state: PatchState):
    def start(module, args, kwargs):
        strip = state.start(adapter.grid(module, args, kwargs))
        for processor in strip_processors(module):  # looked up per call: CLEAR may have been reapplied
            processor.set_strip(strip)
    return start


def _call_ender(state: PatchState):
    def end(module, args, output):  # also after a failed call (always_call)
        state.end()
        forget_strip(module)
    return end


def _output_gatherer(state: PatchState):
    """Every strip's output tokens, in image order: the whole output on every process."""
    def gather(module, args, output: Tensor) -> Tensor:
        return state.current().gather(output, dim=1)
    return gather
