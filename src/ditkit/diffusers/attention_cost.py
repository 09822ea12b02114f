"""What CLEAR saves: the attention FLOPs of one transformer call, full attention against CLEAR.

    cost = attention_cost(pipe.transformer, grid=(256, 256), text_tokens=512, radius=8, down_factor=4)
    cost.fraction, cost.factor          # 0.080, 12.5 for FLUX.1-dev at 4096 px

Counted per switched layer (`clear.self_attention_layers`, the layers `apply_clear` switches) as
4 * width * (query, key) pairs, width = the layer's query width (heads x head size): scores and
the weighted sum of values are one multiply-add per pair and channel each (CLEAR's convention; a
multiply-add is 2 FLOPs). With G text tokens in the layer's sequence (FLUX, SD3 joint attention;
none in PixArt's self-attention) and N = H x W image tokens, full attention scores (G + N)^2 pairs.
CLEAR scores text queries against every token, image queries against the text, the image keys
inside their disc (`local_pairs`, borders cut) and, with a down factor f, the (H/f)(W/f) pooled
tokens. A pipeline's ControlNets count too (their attention runs over the same tokens each step:
CLEAR's cost when they get CLEAR, full attention's on both sides with `--no-clear-controlnet`).
A Kontext context image's tokens count as image tokens of their own grid, seen across
images through the disc (`local_pairs` between the two grids). The projections, norms and MLPs cost
the same both ways and are left out.

`benchmarks/clear_flops.py` writes this count for FLUX.1-dev's configuration (the table the docs
quote); `ditkit generate` prints `generate_line` for its request.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from ..errors import DitkitError
from ..mixers.base import Grid
from ..mixers.clear import local_pairs
from .adapters import find_adapter
from .clear import self_attention_layers
from .pipeline_family import context_images
from .pipelines import (
    Attention,
    Request,
    check_size,
    official_student_settings,
    read_student_header,
    size_multiple,
    transformer_adapter,
)

TEXT_KINDS = ("flux", "joint")  # layer kinds whose sequences hold the text tokens too


def layer_pairs(grid: Grid, text_tokens: int, radius: float | None = None, down_factor: int = 0,
                context: tuple[Grid, ...] = ()) -> int:
    """(query, key) pairs one attention layer scores: full attention when `radius` is None. `context`:
    the grids of images whose tokens follow the generated image's on the same position plane (FLUX
    Kontext's context image), seen through the disc across images."""
    images = (grid, *context)
    image = sum(rows * columns for rows, columns in images)
    if radius is None:
        return (text_tokens + image) ** 2
    pooled = sum((rows // down_factor) * (columns // down_factor) for rows, columns in images) if down_factor else 0
    local = sum(local_pairs(queries, radius, keys) for queries in images for keys in images)
    return text_tokens * (text_tokens + image) + image * text_tokens + local + image * pooled


@dataclass(frozen=True)
class AttentionCost:
    """Attention FLOPs of one transformer call (one sample): full attention and CLEAR."""

    full: int
    clear: int

    @property
    def fraction(self) -> float:
        """CLEAR's share of full attention's FLOPs."""
        return self.clear / self.full

    @property
    def factor(self) -> float:
        """How many times fewer FLOPs CLEAR spends."""
        return self.full / self.clear


def attention_cost(transformer: nn.Module, grid: Grid, text_tokens: int, radius: float,
                   down_factor: int = 0, context: tuple[Grid, ...] = (), controlnets: tuple[nn.Module, ...] = (),
                   clear_controlnets: bool = True) -> AttentionCost:
    """Full vs CLEAR attention FLOPs of one call of `transformer` (a meta-device build counts the
    same) on an image-token `grid` with `text_tokens` prompt tokens (and `context` images' grids).
    `controlnets` run beside it over the same tokens (served by its adapter): with CLEAR when
    `clear_controlnets`, else at full attention's cost on both sides of the count."""
    layers = self_attention_layers(transformer)
    if not layers:
        raise DitkitError(f"{type(transformer).__name__} has no attention layer CLEAR switches: count a FLUX, SD3 "
                          "or PixArt transformer")
    adapter = find_adapter(transformer)
    switched = [(attn, kind, True) for _, attn, kind in layers]
    for net in controlnets:
        switched += [(attn, kind, clear_controlnets) for _, attn, kind in adapter.self_attention_layers(net)]
    full = clear = 0
    for attn, kind, local in switched:
        text = text_tokens if kind in TEXT_KINDS else 0
        per_pair = 4 * attn.inner_dim
        full_pairs = layer_pairs(grid, text, context=context)
        full += per_pair * full_pairs
        clear += per_pair * (layer_pairs(grid, text, radius, down_factor, context) if local else full_pairs)
    return AttentionCost(full, clear)


def describe(cost: AttentionCost, radius: float, down_factor: int, height: int, width: int,
             call: str = "transformer call") -> str:
    """One line: `attention: CLEAR radius 8, down factor 4 at 4096x4096: 8.0% of full attention's FLOPs
    (12.5x fewer; 244 of 3055 TFLOPs per transformer call)`."""
    down = f", down factor {down_factor}" if down_factor else ""
    return (f"attention: CLEAR radius {radius:g}{down} at {height}x{width}: {100 * cost.fraction:.1f}% of full "
            f"attention's FLOPs ({cost.factor:.1f}x fewer; {tera(cost.clear)} of {tera(cost.full)} TFLOPs per "
            f"{call})")


def tera(flops: int) -> str:
    """TFLOPs with three significant digits at least (tiny test models count far below one)."""
    value = flops / 1e12
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def clear_settings(attention: Attention | None) -> tuple[float, int] | None:
    """(radius, down factor) of an `Attention` (--clear, a `ditkit distill` student's record or an official
    file's name), or None when attention stays stock. Reads a student's header only."""
    if attention is None or (attention.student is None and attention.clear is None):
        return None
    if attention.student is not None:
        settings = (official_student_settings(attention.student, attention.options())
                    or read_student_header(attention.student)[0].distill)
        return settings["radius"], settings.get("down_factor", 0)
    if "radius" not in attention.options():  # backend only: refused by Attention.check, nothing to count
        return None
    return attention.clear.option("radius"), attention.clear.option("down_factor")


def generate_line(pipe, request: Request, attention: Attention | None) -> str | None:
    """What `ditkit generate` prints for a request: CLEAR's attention FLOPs at the request's size against
    full attention's (`describe`); None for stock attention. Text tokens: the prompt embeddings' own
    length, else the pipeline's (FLUX: 512 T5 tokens)."""
    settings = clear_settings(attention)
    if settings is None:
        return None
    check_size(pipe, request.height, request.width)
    multiple = size_multiple(pipe)
    grid = (request.height // multiple, request.width // multiple)
    if request.embeddings is not None:
        text_tokens = request.embeddings["prompt_embeds"].shape[1]
    else:
        text_tokens = transformer_adapter(pipe).prompt_tokens
    contexts = context_images(type(pipe), request.inputs or {}).values()
    context = tuple((image.size[1] // multiple, image.size[0] // multiple) for image in contexts)
    controlnet = getattr(pipe, "controlnet", None)
    nets = tuple(getattr(controlnet, "nets", None) or ([controlnet] if controlnet is not None else []))
    cost = attention_cost(pipe.transformer, grid, text_tokens, *settings, context, nets, attention.controlnet)
    call = "transformer call" if not nets else \
        f"call of the transformer and its ControlNet{'s' if len(nets) > 1 else ''}" + \
        ("" if attention.controlnet else " (the ControlNet's attention kept full)")
    return describe(cost, *settings, request.height, request.width, call)
