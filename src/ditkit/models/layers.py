"""Building blocks shared by the backbones: embeddings, conditioning, MLP, adaLN modulation and
DiT's adaLN-Zero init."""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import lru_cache

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import DitkitError
from ..mixers.base import Extrapolation, Grid
from .registry import BackboneConfig


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN: per-sample shift and scale of normalised tokens (B, N, D) by (B, D) vectors."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _positions(size: int, base_grid: int | None) -> np.ndarray:
    """Token positions 0..size-1 along one axis; with `base_grid`, scaled by base_grid / size as
    diffusers' PatchEmbed does (in float32, as it does, so the tables agree to the last bit)."""
    if base_grid is None:
        return np.arange(size, dtype=np.float64)
    return (torch.arange(size, dtype=torch.float32) / (size / base_grid)).double().numpy()


@lru_cache(maxsize=64)
def _sincos_2d(dim: int, height: int, width: int, base: tuple[float, float],
               stretch: tuple[float, float], base_grid: int | None = None) -> np.ndarray:
    if dim % 4:
        raise ValueError(f"2D sin-cos position embedding needs a width divisible by 4, got {dim}")
    ys, xs = np.meshgrid(_positions(height, base_grid), _positions(width, base_grid), indexing="ij")

    def embed_1d(pos: np.ndarray, base: float) -> np.ndarray:
        omega = 1.0 / base ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
        angles = pos.reshape(-1, 1) * omega[None]
        return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

    # DiT's layout: first half of the channels encodes the column, second half the row.
    return np.concatenate([embed_1d(xs / stretch[1], base[1]), embed_1d(ys / stretch[0], base[0])],
                          axis=1).astype(np.float32)


def sincos_pos_embed_2d(dim: int, grid: tuple[int, int], extrapolation: Extrapolation | None = None,
                        base_grid: int | None = None) -> Tensor:
    """Fixed 2D sin-cos position embedding for a (H, W) token grid, row-major: (H*W, dim).

    Computed for any grid size, so a model runs at resolutions it was not trained at. Beyond the
    training grid, `extrapolation.positions` maps the new positions into the range the model saw,
    per axis with s = grid / training grid (only where s > 1):
      "interpolate"  positions divided by s (position interpolation): every frequency slowed down;
      "ntk"          base 10000 * s^(k/(k-1)) for k frequencies (NTK-aware): the fastest frequency is
                     unchanged (local detail as trained), the slowest divided by s (global layout).

    With `base_grid` (diffusers' convention, see DiTConfig.pos_embed_base_grid) the positions along
    an axis of n tokens are i * base_grid / n at every size, smaller grids included: the table always
    spans the trained range, so there is nothing for `extrapolation.positions` to do (refused).
    """
    if base_grid is not None:
        if extrapolation is not None and extrapolation.positions != "none":
            raise DitkitError("this model scales its positions to its trained grid at every size "
                              "(pos_embed_base_grid, diffusers' convention): use --position-scaling none")
        return torch.from_numpy(_sincos_2d(dim, grid[0], grid[1], (10000.0, 10000.0), (1.0, 1.0), base_grid))
    base, stretch, k = [10000.0, 10000.0], [1.0, 1.0], dim // 4
    if extrapolation is not None and extrapolation.positions != "none":
        stretch = [max(1.0, s) for s in extrapolation.stretch]
        if extrapolation.positions == "ntk":
            base = [10000.0 * s ** (k / (k - 1)) if k > 1 else 10000.0 for s in stretch]
            stretch = [1.0, 1.0]
    return torch.from_numpy(_sincos_2d(dim, grid[0], grid[1], tuple(base), tuple(stretch)))


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0, freq_shift: int = 0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim), [cos | sin].

    Frequencies max_period^(-i / (half - freq_shift)) for i < half = dim // 2: the official DiT
    uses freq_shift 0, diffusers' DiT 1 (its `downscale_freq_shift`)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
                      / (half - freq_shift))
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1) if dim % 2 else emb


class TimestepEmbedder(nn.Module):
    """Timesteps -> vectors: sinusoidal features followed by a two-layer MLP with SiLU."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.frequency_size = frequency_size
        self.freq_shift = freq_shift  # see timestep_embedding
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))

    def forward(self, t: Tensor) -> Tensor:
        freq = timestep_embedding(t, self.frequency_size, freq_shift=self.freq_shift)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))

    def initialize_weights(self) -> None:
        """DiT's N(0, 0.02) MLP weights (the biases are the dense layers' zeros)."""
        nn.init.normal_(self.mlp[0].weight, std=0.02)
        nn.init.normal_(self.mlp[2].weight, std=0.02)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors. Index `num_classes` is the "null" label used for
    classifier-free guidance; training replaces labels by it with `dropout_prob`."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)

    @classmethod
    def for_config(cls, config: BackboneConfig, hidden_size: int) -> LabelEmbedder | None:
        """The label embedder a backbone config asks for; None for an unconditional model (0 classes)."""
        return cls(config.num_classes, hidden_size, config.class_dropout_prob) if config.num_classes > 0 else None

    @property
    def null_label(self) -> int | None:
        """The label used for the unconditional branch of guidance; None without class dropout."""
        return self.num_classes if self.dropout_prob > 0 else None

    def drop_labels(self, labels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Replace labels by the null label with probability `dropout_prob` (training only)."""
        if self.dropout_prob <= 0:
            return labels
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)

    def initialize_weights(self) -> None:
        """DiT's N(0, 0.02) table."""
        nn.init.normal_(self.embedding_table.weight, std=0.02)


class Conditioning:
    """Mixin for a module that holds a `t_embedder` and a `y_embedder` (None when unconditional):
    `condition` sums their embeddings into the vector the adaLN layers modulate with."""

    t_embedder: TimestepEmbedder
    y_embedder: LabelEmbedder | None

    def condition(self, t: Tensor, y: Tensor | None) -> Tensor:
        """(B,) timesteps and (B,) labels -> (B, hidden) condition; labels are ignored when unconditional."""
        c = self.t_embedder(t)
        if self.y_embedder is None:
            return c
        if y is None:
            raise DitkitError("this model is class-conditional: pass class labels")
        return c + self.y_embedder(y)


class ConditionedBlocks(nn.ModuleList):
    """Blocks that each map (tokens, condition, grid) to tokens, run in order: an nn.Sequential for
    adaLN blocks, with the state-dict keys of a ModuleList ("blocks.0.mlp...")."""

    def forward(self, x: Tensor, c: Tensor, grid: Grid) -> Tensor:
        for block in self:
            x = block(x, c, grid)
        return x


class Mlp(nn.Module):
    """Two linear layers with tanh-approximated GELU, as in DiT (timm's Mlp)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class FinalLayer(nn.Module):
    """adaLN (shift, scale), then a linear map from each token to its `out_features` outputs
    (patch x patch x channels for DiT, M cells x channels for DiffuSSM)."""

    def __init__(self, hidden_size: int, out_features: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_features)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def adaln_zero_init(model: nn.Module, *, embedders: Iterable[nn.Module | None], outputs: Iterable[nn.Module],
                    dense: Iterable[nn.Module] | None = None) -> None:
    """DiT's init: xavier-uniform dense layers with zero biases, N(0, 0.02) embedders, then zeros
    in the last layer of every `adaLN_modulation` and in the `outputs`, so that each block starts as
    the identity and the model predicts zero ("adaLN-Zero").

    `dense` defaults to every Linear and Conv2d of `model` in module order. Random draws happen in
    the order given (dense layers, then `embedders`), so a seed always gives the same weights."""
    if dense is None:
        dense = [m for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]
    for layer in dense:
        nn.init.xavier_uniform_(layer.weight.view(layer.weight.shape[0], -1))  # convs as (out, in * k * k)
        if layer.bias is not None:
            nn.init.zeros_(layer.bias)
    for embedder in embedders:
        if embedder is not None:
            embedder.initialize_weights()
    modulations = [m.adaLN_modulation[-1] for m in model.modules() if hasattr(m, "adaLN_modulation")]
    for layer in [*modulations, *outputs]:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
