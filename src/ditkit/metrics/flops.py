"""Parameters and forward FLOPs of a model, counted with torch.utils.flop_counter.

FlopCounterMode counts a multiply-add as 2 FLOPs. Papers in this field (DiT, U-DiT, DiffuSSM)
report multiply-adds as "GFLOPs", so `model_cost` gives both. On CPU, FlopCounterMode has no
formula for the fused attention kernel and would silently skip attention; we register one.

FlopCounterMode does not count FFTs either (DiffuSSM's SSM convolutions). We count the usual
radix-2 estimate of real operations: 5 n log2(n) for a complex transform of length n and half of
that, 2.5 n log2(n), for a real-input or real-output one; like every count here they are FLOPs,
so they enter the multiply-add figure halved. Element-wise work (the spectral product, the complex
exponentials of the S4D kernel, activations) is not counted anywhere, as in the DiT convention.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from ..diffusion.pipeline import input_size
from ..mixers import TokenMixer
from ..models import build_model, model_config

_aten = torch.ops.aten


def _cpu_sdpa_forward(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query, key, value)


def _cpu_sdpa_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out, query, key, value)


def fft_flops(shape, dim, complex_transform: bool) -> int:
    """Real operations of FFTs along `dim` of a tensor of `shape`: 5 n log2 n per complex
    transform of length n, 2.5 n log2 n per real one."""
    n = math.prod(shape[d] for d in dim)
    transforms = math.prod(shape) // n if n else 0
    per_transform = 5 * n * math.log2(n) if n > 1 else 0
    return round(transforms * per_transform / (1 if complex_transform else 2))


def _fft_r2c(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
    return fft_flops(x_shape, dim, complex_transform=False)


def _fft_c2r(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
    return fft_flops(out_shape, dim, complex_transform=False)  # n is the real output's length


def _fft_c2c(x_shape, dim, *args, out_shape=None, **kwargs) -> int:
    return fft_flops(x_shape, dim, complex_transform=True)


# Fused attention kernels and FFTs that torch's own registry does not count.
EXTRA_FLOP_FORMULAS = {
    _aten._scaled_dot_product_flash_attention_for_cpu: _cpu_sdpa_forward,
    _aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_sdpa_backward,
    _aten._fft_r2c: _fft_r2c,
    _aten._fft_c2r: _fft_c2r,
    _aten._fft_c2c: _fft_c2c,
}


def count_flops(fn, *args, **kwargs) -> int:
    """FLOPs (a multiply-add = 2) of one call `fn(*args, **kwargs)`, attention and FFTs included."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FLOP_FORMULAS) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@dataclass
class ModelCost:
    params: int
    flops: int  # a multiply-add counts 2
    input_shape: tuple[int, ...]

    @property
    def macs(self) -> int:  # a multiply-add counts 1: the unit of the DiT paper's "GFLOPs"
        return self.flops // 2


@torch.no_grad()
def model_cost(model: nn.Module, height: int, width: int) -> ModelCost:
    """Parameters and forward FLOPs for one sample of size (in_channels, height, width)."""
    cfg = model.config
    device = next(model.parameters()).device
    x = torch.zeros(1, cfg.in_channels, height, width, device=device)
    t = torch.zeros(1, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device) if cfg.num_classes > 0 else None
    was_training = model.training
    model.eval()
    try:
        model(x, t, y)  # warm-up: one-time work such as folding re-parameterised layers is not counted
        flops = count_flops(model, x, t, y)
    finally:
        model.train(was_training)
    return ModelCost(count_parameters(model), flops, tuple(x.shape))


def config_cost(config, height: int, width: int) -> ModelCost:
    """Cost of a model config without allocating it: built and run on the meta device."""
    with torch.device("meta"):
        model = build_model(config)
    return model_cost(model, height, width)


def shapes_only_model(name: str, mixer: str | None = None, mixer_options: dict | None = None) -> nn.Module:
    """A named model on the meta device (counting needs shapes only: no memory, no init time)."""
    overrides = {"mixer": mixer} if mixer else {}
    if mixer_options:
        overrides["mixer_options"] = mixer_options
    with torch.device("meta"):
        return build_model(model_config(name, **overrides))


def describe_cost(model: nn.Module, label: str, height: int, width: int) -> str:
    """`ditkit info`'s lines: the model, its input at height x width pixels, parameters and forward FLOPs."""
    cfg = model.config
    h, w = input_size(model, height, width)
    cost = model_cost(model, h, w)
    space = f"{cfg.in_channels}x{h}x{w} " + (f"latent (VAE /{cfg.vae_scale})" if cfg.vae_scale > 1 else "pixels")
    options = f" {cfg.mixer_options}" if cfg.mixer_options else ""
    work = attention_line(model, h, w)
    return "\n".join([
        f"model       {label} ({cfg.backbone}, mixer {cfg.mixer}{options})",
        f"input       {height}x{width} px -> {space} -> {cfg.tokens(h, w)} tokens",
        f"parameters  {cost.params / 1e6:.2f}M ({cost.params:,})",
        f"forward     {cost.macs / 1e9:.2f} GFLOPs, counting one multiply-add as 1 FLOP (the DiT paper's unit);",
        f"            {cost.flops / 1e9:.2f} GFLOPs counting it as 2 (one sample, attention and FFTs included)",
        *([work] if work else [])])


def attention_line(model: nn.Module, h: int, w: int) -> str | None:
    """How much of full attention's (query, key) image pairs the first block's mixer scores, on the
    token grid of a model that has one (DiT); None where nothing is saved or there is no attention."""
    mixer = next((m for m in model.modules() if isinstance(m, TokenMixer)), None)
    if mixer is None or not hasattr(model, "token_grid"):
        return None
    grid = model.token_grid(h, w)
    work = mixer.attention_work(grid)
    if work is None or work >= 1:
        return None
    return (f"attention   {model.config.mixer} scores {100 * work:.1f}% of full attention's (query, key) pairs "
            f"on the {grid[0]}x{grid[1]} token grid ({100 * (1 - work):.1f}% saved)")
