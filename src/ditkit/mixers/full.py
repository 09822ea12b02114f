"""`full`: global softmax attention over all tokens (the DiT baseline), O(N^2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import AttentionMixer, Grid
from .registry import register_mixer
from .strip import Strip


@register_mixer("full")
class FullAttention(AttentionMixer):
    """Every query sees every key, through PyTorch's fused scaled_dot_product_attention."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, grid: Grid, num_global: int) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)

    def attention_work(self, grid: Grid) -> float:
        return 1.0

    def forward_strip(self, x: Tensor, strip: Strip) -> Tensor:
        """Keys and values of every strip, queries of this one: since every query sees every key,
        no strip needs another's queries (nor the mixer input: projections are per token)."""
        q, k, v = self.split_heads(x, strip.grid)
        kv = strip.gather(torch.stack([k, v]), dim=-2)
        return self.merge_heads(self.attend(q, kv[0], kv[1], strip.grid, 0))
