"""facebookresearch/DiT checkpoints (`DiT-XL-2-256x256.pt`, `DiT-XL-2-512x512.pt`, train.py's) -> ditkit.

The official files are `torch.save`d dicts: the released ones hold the EMA weights as a bare state
dict; train.py's hold {"model", "ema", "opt", "args"} (args an argparse.Namespace), and the EMA
weights are the ones to sample (as the official `find_model` does). Official key names, from
`models.py` (timm's PatchEmbed, Attention and Mlp inside):

    x_embedder.proj.{weight,bias}      -> x_embedder.{weight,bias}       (the patch conv)
    pos_embed (1, N, D), fixed sin-cos -> dropped after checking it equals ditkit's own table
    blocks.N.attn.{qkv,proj}.*         -> blocks.N.mixer.{qkv,proj}.*    (the token mixer)
    everything else (t_embedder, y_embedder, blocks.N.mlp, blocks.N.adaLN_modulation, final_layer)
    keeps its name.

Inferred from the tensors: depth, width, patch, input channels, MLP ratio, learned sigma (output
channels), classes and class dropout (the label table's extra null row), the input size (the
position table's N); the heads from the published config of that width (`--num-heads` otherwise).
The diffusion record is DiT's: linear betas over 1000 steps, epsilon prediction with learned range
variance (fixed-large variance for a model without learned sigma), sampled by 250 DDPM steps over the
official respacing (timestep_spacing "official": `space_timesteps`, no noise at t = 0) with guidance
4.0 on the first 3 latent channels, as the official sample.py does; latents of an SD VAE (x 0.18215: `--vae`).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from torch import Tensor

from ..errors import DitkitError
from ..models import model_config
from ..models.layers import sincos_pos_embed_2d
from ..record import DataSettings, DiffusionSettings, RunRecord
from .pretrained import Converted, ConvertOptions, read_torch_file, register_converter

FORMAT = "facebookresearch-dit"
HEADS_BY_WIDTH = {1152: 16, 1024: 16, 768: 12, 384: 6, 192: 3, 128: 4}  # the named DiT configs
RENAMES = (("x_embedder.proj.", "x_embedder."), (".attn.", ".mixer."))
SAMPLING = dict(objective="ddpm", sampler="ddpm", sample_steps=250, cfg_scale=4.0, guidance_channels=3,
                timestep_spacing="official")


def official_state(obj: object, path: Path) -> tuple[dict[str, Tensor], str, dict]:
    """(state dict, which weights, train.py's args) of a bare state dict or a training checkpoint."""
    if isinstance(obj, dict) and "model" in obj and isinstance(obj.get("model"), dict):
        args = vars(obj["args"]) if isinstance(obj.get("args"), argparse.Namespace) else {}
        which = "ema" if isinstance(obj.get("ema"), dict) else "model"
        return obj[which], which, args
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj, "state dict", {}
    raise DitkitError(f"{path} is neither a DiT state dict nor a train.py checkpoint (model/ema/opt/args)")


def looks_official(state: dict[str, Tensor]) -> bool:
    return "x_embedder.proj.weight" in state and "final_layer.linear.weight" in state


def accepts(path: Path) -> bool:
    return path.is_file() and path.suffix in (".pt", ".pth", ".bin", ".ckpt") and _is_official_file(path)


def _is_official_file(path: Path) -> bool:
    """Whether a torch file holds an official DiT. An unreadable or unsafe file is an error here
    already: no other format could read it either."""
    obj = read_torch_file(path)
    try:
        state, _, _ = official_state(obj, path)
    except DitkitError:
        return False
    return looks_official(state)


def infer_config(state: dict[str, Tensor], options: ConvertOptions):
    """The DiT config the tensors fix (heads: the published width's, or options.num_heads)."""
    patch_weight = state["x_embedder.proj.weight"]  # (D, C, p, p)
    width, in_channels, patch = patch_weight.shape[0], patch_weight.shape[1], patch_weight.shape[2]
    depth = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("blocks."))
    heads = options.num_heads or HEADS_BY_WIDTH.get(width)
    if heads is None:
        raise DitkitError(f"no published DiT has width {width}, so its attention heads are unknown: "
                          "give --num-heads")
    out_channels = state["final_layer.linear.weight"].shape[0] // patch**2
    table = state.get("y_embedder.embedding_table.weight")
    num_classes, dropout = _classes(table)
    return model_config("DiT-XL/2", depth=depth, hidden_size=width, num_heads=heads, patch_size=patch,
                        in_channels=in_channels, learn_sigma=out_channels == 2 * in_channels,
                        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / width,
                        num_classes=num_classes, class_dropout_prob=dropout, vae_scale=8)


def _classes(table: Tensor | None) -> tuple[int, float]:
    """(classes, class dropout): the official table has a null row exactly when dropout > 0 (0.1)."""
    if table is None:
        return 0, 0.0
    return table.shape[0] - 1, 0.1


def input_size(state: dict[str, Tensor], patch: int, path: Path) -> int:
    """The latent side the position table was made for (square, as every official model)."""
    tokens = state["pos_embed"].shape[1]
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise DitkitError(f"{path}: pos_embed has {tokens} positions, not a square grid: not an official DiT")
    return side * patch


def check_positions(state: dict[str, Tensor], width: int, side: int, path: Path) -> None:
    """The official table is the fixed sin-cos one ditkit computes; anything else (a learned table)
    would be lost by dropping it."""
    ours = sincos_pos_embed_2d(width, (side, side))
    difference = (state["pos_embed"][0].float() - ours).abs().max().item()
    if difference > 1e-5:
        raise DitkitError(f"{path}: pos_embed differs from DiT's fixed sin-cos table (max {difference:.2g}): "
                          "a learned position table cannot be converted")


def official_key(key: str) -> str:
    """ditkit's name -> the official one."""
    for old, new in RENAMES:
        key = key.replace(new, old)
    return key


def renamed(state: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {}
    for key, tensor in state.items():
        if key == "pos_embed":
            continue
        for old, new in RENAMES:
            key = key.replace(old, new)
        out[key] = tensor
    return out


@register_converter(FORMAT, accepts)
def convert(path: Path, options: ConvertOptions) -> Converted:
    state, which, args = official_state(read_torch_file(path), path)
    if not looks_official(state):
        raise DitkitError(f"{path} is not a facebookresearch DiT state dict (no x_embedder.proj / final_layer)")
    config = infer_config(state, options)
    side = input_size(state, config.patch_size, path) if "pos_embed" in state else None
    if side is not None:
        check_positions(state, config.hidden_size, side // config.patch_size, path)
    resolution = options.resolution or args.get("image_size") or (side * 8 if side else 256)
    record = RunRecord(model=config, diffusion=DiffusionSettings(learn_sigma=config.learn_sigma, **SAMPLING),
                       data=DataSettings(resolution=resolution, source="imagenet" if config.num_classes == 1000
                                         else None),
                       origin={"format": FORMAT, "path": str(Path(path).resolve()), "weights": which})
    return Converted(state=renamed(state), record=record, source_key=official_key)
