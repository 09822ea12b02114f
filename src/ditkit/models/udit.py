"""U-DiT: "U-DiTs: Downsample Tokens in U-Shaped Diffusion Transformers" (arXiv 2405.02730).

DiT blocks in a U-Net: encoder stages at widths C, 2C and a middle stage at 4C, the token grid
halved between them (3x3 conv to half the channels, then pixel-unshuffle), a decoder that
doubles it back (3x3 conv, pixel-shuffle) and concatenates the encoder skip. No patchify: one
token per latent cell. Every block holds two (mixer + FFN) pairs with adaLN-Zero; the mixer is
`downsampled` attention by default, any registered mixer otherwise. Conditioning per width
(C, 2C, 4C) from separate timestep and label embedders, as in the official code.

The FFN is re-parameterisable: in training form the 1x1 projections are two stacked 1x1s and the
depthwise part is 5x5 + 3x3 + 1x1 + identity; in eval mode they run folded into one conv each
(as the official code does), so parameter counts are of the training form and FLOPs of the folded one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import AT_LEAST_1, POSITIVE, ranged
from ..errors import DitkitError
from ..mixers import Grid, build_mixer
from ..mixers.base import map_to_tokens, tokens_to_map
from .layers import ConditionedBlocks, Conditioning, LabelEmbedder, TimestepEmbedder, adaln_zero_init, modulate
from .registry import BackboneConfig, register_backbone, register_model


@dataclass
class UDiTConfig(BackboneConfig):
    hidden_size: int = ranged(96, AT_LEAST_1)  # C: stage widths are C, 2C, 4C, 2C, 2C
    num_heads: int = ranged(4, AT_LEAST_1)
    depths: tuple[int, ...] = (2, 5, 8, 5, 2)  # encoder-1, encoder-2, middle, decoder-2, decoder-1
    mlp_ratio: float = ranged(2.0, POSITIVE)
    mixer: str = "downsampled"

    def __post_init__(self):
        super().__post_init__()
        self.depths = tuple(self.depths)  # YAML and JSON give lists
        if len(self.depths) != 5:
            raise DitkitError(f"U-DiT depths must list 5 stages (enc-1, enc-2, middle, dec-2, dec-1), "
                              f"got {self.depths}")
        whole = all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in self.depths)
        if not whole or sum(self.depths) < 1:
            raise DitkitError(f"config key model.args.depths must be 5 whole numbers of blocks, at least 0 each "
                              f"and 1 in all, got {list(self.depths)}")

    @property
    def grid_reduction(self) -> int:
        """The U halves the grid twice (tokens: one per input cell in the first stage)."""
        return 4


class RepFeedForward(nn.Module):
    """1x1 up (ratio `mlp_ratio`), GELU, depthwise 5x5, 1x1 down, in U-DiT's training form."""

    def __init__(self, dim: int, mlp_ratio: float):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.hidden = hidden
        self.project_in = nn.Sequential(nn.Conv2d(dim, hidden // 2, 1), nn.Conv2d(hidden // 2, hidden, 1))
        self.dwconv = nn.ModuleList(nn.Conv2d(hidden, hidden, k, padding=k // 2, groups=hidden) for k in (5, 3, 1))
        self.project_out = nn.Sequential(nn.Conv2d(hidden, hidden // 2, 1), nn.Conv2d(hidden // 2, dim, 1))
        self._folded: tuple[Tensor, ...] | None = None
        self._folded_from: tuple | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:  # inference runs the folded convs, refolded whenever the weights change
            w_in, b_in, w_dw, b_dw, w_out, b_out = self.folded()
            x = F.gelu(F.conv2d(x, w_in, b_in))
            return F.conv2d(F.conv2d(x, w_dw, b_dw, padding=2, groups=self.hidden), w_out, b_out)
        x = F.gelu(self.project_in(x))
        x = x + sum(conv(x) for conv in self.dwconv)
        return self.project_out(x)

    def folded(self) -> tuple[Tensor, ...]:
        """The training form folded into one conv per stage (same function, fewer FLOPs)."""
        state = tuple((p.data_ptr(), p._version, p.device, p.dtype) for p in self.parameters())
        if self._folded is None or state != self._folded_from:
            self._folded, self._folded_from = self._fold(), state
        return self._folded

    @torch.no_grad()
    def _fold(self) -> tuple[Tensor, ...]:

        def compose(pair: nn.Sequential) -> tuple[Tensor, Tensor]:
            w1, w2 = pair[0].weight.flatten(1), pair[1].weight.flatten(1)
            return (w2 @ w1)[:, :, None, None], w2 @ pair[0].bias + pair[1].bias

        w_in, b_in = compose(self.project_in)
        w_dw = self.dwconv[0].weight.clone()
        w_dw[:, :, 1:4, 1:4] += self.dwconv[1].weight
        w_dw[:, :, 2, 2] += self.dwconv[2].weight[:, :, 0, 0] + 1.0  # + the identity branch
        b_dw = sum(conv.bias for conv in self.dwconv)
        w_out, b_out = compose(self.project_out)
        return w_in, b_in, w_dw, b_dw, w_out, b_out


class UDiTBlock(nn.Module):
    """Two (token mixer, FFN) pairs, each with adaLN-Zero, on a (B, H*W, D) token sequence."""

    def __init__(self, dim: int, cfg: UDiTConfig):
        super().__init__()
        self.pairs = ConditionedBlocks(UDiTPair(dim, cfg) for _ in range(2))

    def forward(self, x: Tensor, c: Tensor, grid: Grid) -> Tensor:
        return self.pairs(x, c, grid)


class UDiTPair(nn.Module):
    def __init__(self, dim: int, cfg: UDiTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mixer = build_mixer(cfg.mixer, dim, cfg.num_heads, **cfg.mixer_options)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.ffn = RepFeedForward(dim, cfg.mlp_ratio)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x: Tensor, c: Tensor, grid: Grid) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.mixer(modulate(self.norm1(x), shift_msa, scale_msa), grid)
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)
        h = self.ffn(tokens_to_map(h, grid))
        return x + gate_mlp.unsqueeze(1) * map_to_tokens(h)


class Condition(Conditioning, nn.Module):
    """Timestep + label embedding at one width: `condition(t, y)`."""

    def __init__(self, dim: int, cfg: UDiTConfig):
        super().__init__()
        self.t_embedder = TimestepEmbedder(dim)
        self.y_embedder = LabelEmbedder.for_config(cfg, dim)


@register_backbone("udit", UDiTConfig)
class UDiT(nn.Module):
    def __init__(self, config: UDiTConfig):
        super().__init__()
        self.config = cfg = config
        C = cfg.hidden_size
        self.x_embedder = nn.Conv2d(cfg.in_channels, C, 3, padding=1)
        self.conditions = nn.ModuleList(Condition(C * m, cfg) for m in (1, 2, 4))
        widths = (C, 2 * C, 4 * C, 2 * C, 2 * C)
        self.stages = nn.ModuleList(ConditionedBlocks(UDiTBlock(w, cfg) for _ in range(n))
                                    for w, n in zip(widths, cfg.depths, strict=True))
        self.down = nn.ModuleList(nn.Conv2d(w, w // 2, 3, padding=1, bias=False) for w in (C, 2 * C))
        self.up = nn.ModuleList(nn.Conv2d(w, 2 * w, 3, padding=1, bias=False) for w in (4 * C, 2 * C))
        self.reduce = nn.ModuleList(nn.Conv2d(w_in, 2 * C, 1) for w_in in (4 * C, 2 * C))
        self.output = nn.Conv2d(2 * C, 2 * C, 3, padding=1)
        self.norm_final = nn.LayerNorm(2 * C, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(2 * C, 4 * C))
        self.final_conv = nn.Conv2d(2 * C, cfg.out_channels, 3, padding=1)
        self.initialize_weights()

    @property
    def y_embedder(self):  # the sampler asks the model for its null label
        return self.conditions[0].y_embedder

    def initialize_weights(self) -> None:
        """DiT's adaLN-Zero init (with convs as dense layers), plus a zero final modulation and conv."""
        embedders = [e for cond in self.conditions for e in (cond.t_embedder, cond.y_embedder)]
        adaln_zero_init(self, embedders=embedders, outputs=[self.final_modulation[-1], self.final_conv])

    def condition(self, t: Tensor, y: Tensor | None) -> tuple[Tensor, ...]:
        """The condition at each width: C, 2C, 4C."""
        return tuple(cond.condition(t, y) for cond in self.conditions)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        H, W = x.shape[-2:]
        multiple = self.config.downsample
        if H % multiple or W % multiple:
            raise DitkitError(f"U-DiT input {H}x{W} cannot be halved enough: height and width must be multiples "
                              f"of {multiple} (e.g. {multiple * max(1, H // multiple)})")
        c1, c2, c3 = self.condition(t, y)
        enc1 = self._stage(0, self.x_embedder(x), c1)
        enc2 = self._stage(1, F.pixel_unshuffle(self.down[0](enc1), 2), c2)
        mid = self._stage(2, F.pixel_unshuffle(self.down[1](enc2), 2), c3)
        dec2 = self.reduce[0](torch.cat([F.pixel_shuffle(self.up[0](mid), 2), enc2], dim=1))
        dec2 = self._stage(3, dec2, c2)
        dec1 = self.reduce[1](torch.cat([F.pixel_shuffle(self.up[1](dec2), 2), enc1], dim=1))
        dec1 = self._stage(4, dec1, c2)
        out = self.output(dec1)
        shift, scale = self.final_modulation(c2).chunk(2, dim=1)
        tokens = modulate(self.norm_final(map_to_tokens(out)), shift, scale)
        return self.final_conv(tokens_to_map(tokens, (H, W)))

    def _stage(self, index: int, feature_map: Tensor, c: Tensor) -> Tensor:
        grid = tuple(feature_map.shape[-2:])
        return tokens_to_map(self.stages[index](map_to_tokens(feature_map), c, grid), grid)


for _name, (_width, _heads) in {"U-DiT-S": (96, 4), "U-DiT-B": (192, 8), "U-DiT-L": (384, 16),
                                 "U-DiT-Nano": (32, 2)}.items():  # Nano: for CPU work, not in the paper
    register_model(_name, "udit", hidden_size=_width, num_heads=_heads,
                   **({"depths": (1, 1, 2, 1, 1)} if _name == "U-DiT-Nano" else {}))
