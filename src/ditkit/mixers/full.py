"""`full`: global softmax attention over all tokens (the DiT baseline), O(N^2)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from .base import AttentionMixer, Grid
from .registry import register_mixer


@register_mixer("full")
class FullAttention(AttentionMixer):
    """Every query sees every key, through PyTorch's fused scaled_dot_product_attention."""

    def attend(self, q: Tensor, k: Tensor, v: Tensor, grid: Grid, num_global: int) -> Tensor:
        return F.scaled_dot_product_attention(q, k, v)
