"""What ditkit needs to know about one diffusers transformer class, behind one interface.

Every piece of ditkit that works inside a diffusers transformer (CLEAR's processors, the size
options, patch-parallel sampling, `ditkit generate`, distillation, memory planning) asks the
transformer's `DiffusersAdapter` instead of branching on its class name:

  grid               the image-token grid of a forward call, read from the call's inputs
  image_positions    where each image token lies, when a call holds more than one image (Kontext)
  layout             the token order of its self-attention ("text_first", "image_first", "image_only")
  attention_kind     how each attention module mixes tokens (which layers CLEAR switches)
  token_patch        latent pixels per token side (image sides are multiples of VAE factor x this)
  default_train_grid the grid it was trained at (the size options' reference)
  check_positions /  how its positions are rescaled beyond the training size
    install_positions
  install_strip_cutters / output_module   where patch-parallel sampling cuts a call to a strip
                     of image rows and gathers the strips' outputs again
  needed_encoders, ...                     what `ditkit generate` needs of its pipelines (which
                     pipelines hold it is read from their model_index.json: `pipeline_family`)
  flow, denoise, latent_channels           how `ditkit distill` drives it as a flow-matching teacher

Adapters are registered by transformer class name (`register_adapter`, refusing duplicates);
`adapter_for` finds one or refuses with the supported names. A new transformer is one adapter file
and one entry in `TINY` of tests/tiny_diffusers.py, which puts it under tests/diffusers/test_contract.py.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor, nn

from ...errors import DitkitError
from ...mixers.base import Grid

LAYOUTS = ("text_first", "image_first", "image_only")


class DiffusersAdapter(ABC):
    """One diffusers transformer class as ditkit sees it; subclass per class (see the module doc)."""

    class_name: str  # the transformer class it serves: the registry key
    label: str  # its short name in messages ("FLUX")
    layout: str  # self-attention token order: one of LAYOUTS
    needed_encoders: tuple[str, ...] = ()  # pipeline components a prompt cannot be encoded without
    guidance_needs_negatives = True  # classifier-free guidance encodes a negative prompt ("")
    pooled_prompts = True  # encode_prompt gives pooled embeddings too (else attention masks)
    img2img = True  # diffusers has an img2img pipeline for it (the upscale chain's second pass)
    flow = False  # a flow-matching model `ditkit distill` can take as its teacher (`denoise`)
    prompt_tokens = 0  # text tokens of its pipeline's prompt embeddings (flow models: what memory plans assume)
    text_width_key = "joint_attention_dim"  # the config key of the prompt embeddings' width
    pooled_width_key: str | None = "pooled_projection_dim"  # and of the pooled embeddings' (None: has none)

    # -- the model ------------------------------------------------------------------------------
    def model_class(self) -> type[nn.Module]:
        """The transformer class (diffusers' own, by name, unless an adapter says otherwise)."""
        import diffusers

        return getattr(diffusers, self.class_name)

    def prompt_widths(self, transformer: nn.Module) -> dict[str, int]:
        """The width each prompt embedding tensor must have: embeddings key -> features."""
        widths = {"prompt_embeds": transformer.config[self.text_width_key]}
        if self.pooled_width_key is not None:
            widths["pooled_prompt_embeds"] = transformer.config[self.pooled_width_key]
        return {**widths, **{f"negative_{key}": width for key, width in widths.items()}}

    def token_patch(self, transformer: nn.Module) -> int:
        """Latent pixels per token side."""
        return transformer.config.patch_size

    def latent_channels(self, transformer: nn.Module) -> int:
        """Channels of the latent (B, C, h, w) the transformer denoises."""
        return transformer.config.in_channels

    # -- tokens and layers ----------------------------------------------------------------------
    @abstractmethod
    def grid(self, transformer: nn.Module, args: tuple, kwargs: dict) -> Grid:
        """The image-token grid (rows, columns) of one forward call, read from its inputs."""

    def image_positions(self, transformer: nn.Module, args: tuple, kwargs: dict) -> tuple[Tensor, Tensor] | None:
        """When a call's image tokens are more than one grid in row-major order (FLUX Kontext's
        context image after the generated one): each token's (row, column) on the model's position
        plane (N, 2) and its image index (N,), images contiguous in the sequence. None otherwise."""
        return None

    @abstractmethod
    def default_train_grid(self, transformer: nn.Module) -> Grid:
        """The token grid the model was trained at."""

    def attention_kind(self, attn: nn.Module) -> str | None:
        """How an attention module mixes tokens: "joint" (image and context streams, as SD3),
        "self" (image tokens only); None for cross-attention, which CLEAR leaves alone."""
        if getattr(attn, "is_cross_attention", False):
            return None
        return "joint" if getattr(attn, "add_q_proj", None) is not None else "self"

    def self_attention_layers(self, transformer: nn.Module) -> list[tuple[str, nn.Module, str]]:
        """(path, attention module, kind) of every self-attention layer."""
        return [(name, m, kind) for name, m in transformer.named_modules()
                if hasattr(m, "set_processor") and (kind := self.attention_kind(m)) is not None]

    # -- beyond the training size ---------------------------------------------------------------
    def check_positions(self, positions: str) -> None:
        """Refuse, with the fix, a position scaling ("ntk", "interpolate") this model cannot take."""
        if positions != "none":
            raise DitkitError(f"{self.label}'s positions cannot be rescaled by ditkit: use positions='none'")

    def install_positions(self, transformer: nn.Module, options, hooks) -> None:  # noqa: B027 (optional)
        """Hooks (into `hooks`, a HookSet) rescaling positions by `options.current` (an Extrapolation);
        none by default (`check_positions` refuses every scaling)."""

    # -- patch-parallel sampling ----------------------------------------------------------------
    @abstractmethod
    def install_strip_cutters(self, transformer: nn.Module, state, hooks) -> None:
        """Hooks cutting each call's image tokens and positions to `state.current()`'s rows."""

    def output_module(self, transformer: nn.Module) -> nn.Module:
        """The last token-wise module: its output (B, tokens, D) is gathered from the strips."""
        return transformer.proj_out

    # -- pipelines ------------------------------------------------------------------------------
    def pipeline_arguments(self) -> dict:
        """Extra arguments of every pipeline call."""
        return {}

    def unpack_latents(self, pipe, latents: Tensor, height: int, width: int) -> Tensor:
        """A pipeline's output_type="latent" result as latents (B, C, h, w)."""
        return latents

    # -- distillation ---------------------------------------------------------------------------
    def denoise(self, transformer: nn.Module, x: Tensor, t: Tensor, text: Tensor, pooled: Tensor,
                guidance: float) -> Tensor:
        """The flow prediction for latents x (B, C, h, w) at t in [0, 1000] (1000 = noise)."""
        raise DitkitError(f"{self.label} is not a flow-matching transformer: distil one of "
                          f"{', '.join(name for name, a in ADAPTERS.items() if a.flow)}")


class PatchEmbedAdapter(DiffusersAdapter):
    """A transformer whose PatchEmbed (`pos_embed`) embeds the latent (B, C, h, w) with sin-cos
    positions: the grid is the latent's size over the patch, and a strip is cut from the embedded
    tokens (positions included, so each strip holds exactly the whole grid's positions)."""

    def grid(self, transformer: nn.Module, args: tuple, kwargs: dict) -> Grid:
        x = kwargs.get("hidden_states", args[0] if args else None)
        p = transformer.config.patch_size
        return x.shape[-2] // p, x.shape[-1] // p

    def default_train_grid(self, transformer: nn.Module) -> Grid:
        """`sample_size / patch_size`: the PatchEmbed's base size."""
        side = transformer.config.sample_size // transformer.config.patch_size
        return side, side

    def check_positions(self, positions: str) -> None:
        if positions != "none":
            raise DitkitError(f"{self.label} already interpolates its sin-cos positions to the trained range at "
                              "every size (PatchEmbed's base_size and interpolation_scale): use positions='none'")

    def install_strip_cutters(self, transformer: nn.Module, state, hooks) -> None:
        def cut(module, args, output: Tensor) -> Tensor:  # (B, H*W, D), positions added
            return output[:, state.current().tokens]

        hooks.post_hook(transformer.pos_embed, cut)


# -- the registry -----------------------------------------------------------------------------------
ADAPTERS: dict[str, DiffusersAdapter] = {}


def register_adapter(adapter: DiffusersAdapter) -> DiffusersAdapter:
    """Make ditkit's diffusers features work on `adapter.class_name`; one adapter per class."""
    if adapter.layout not in LAYOUTS:
        raise DitkitError(f"adapter {type(adapter).__name__} has layout {adapter.layout!r}: use one of "
                          f"{', '.join(LAYOUTS)}")
    if adapter.class_name in ADAPTERS:
        raise DitkitError(f"a diffusers adapter for {adapter.class_name} is registered already "
                          f"({type(ADAPTERS[adapter.class_name]).__name__}): unregister_adapter it first")
    ADAPTERS[adapter.class_name] = adapter
    return adapter


def unregister_adapter(class_name: str) -> None:
    """Forget the adapter of `class_name` (a test's scoped registration)."""
    ADAPTERS.pop(class_name, None)


def find_adapter(transformer: nn.Module | str) -> DiffusersAdapter | None:
    """The adapter of a transformer (or class name), or None when ditkit does not support it."""
    name = transformer if isinstance(transformer, str) else type(transformer).__name__
    return ADAPTERS.get(name)


def adapter_for(transformer: nn.Module | str, purpose: str) -> DiffusersAdapter:
    """The adapter of a transformer (or class name), or a one-line refusal naming the supported ones."""
    adapter = find_adapter(transformer)
    if adapter is None:
        name = transformer if isinstance(transformer, str) else type(transformer).__name__
        raise DitkitError(f"{purpose} supports {', '.join(ADAPTERS)}, not {name}")
    return adapter
