"""Prompt embeddings for diffusers transformers: what a pipeline's `encode_prompt` returns, saved
with safetensors, or random ones (distillation trials, memory planning)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import DitkitError


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
