"""Official U-DiT checkpoints (github YuchuanTian/U-DiT, NeurIPS 2024) -> ditkit.

Files. The official train.py / train_accelerate.py `torch.save` a dict {"model", "ema", "opt",
"args"} (args an argparse.Namespace); the released weights are a bare state dict (the official
`find_model` takes "ema" when present). Both are read with `torch.load(weights_only=True)`,
allowing argparse.Namespace and nothing else; the EMA weights are preferred.

Official layout (udit_models.py, class U_DiT; C = hidden_size, stages at C, 2C, 4C, 2C, 2C):

    x_embedder.proj.*                      -> x_embedder.*             (3x3 conv stem)
    t_embedder_{1,2,3}.mlp.{0,2}.*         -> conditions.{0,1,2}.t_embedder.mlp.{0,2}.*
    y_embedder_{1,2,3}.embedding_table.*   -> conditions.{0,1,2}.y_embedder.embedding_table.*
    encoder_level_1 / encoder_level_2 / latent / decoder_level_2 / decoder_level_1
                                           -> stages.0 / 1 / 2 / 3 / 4
      inside block N, for pair p = 1, 2 (ditkit pairs.{p-1}):
      attnp.logit_scale (heads, 1, 1)      -> mixer.logit_scale
      attnp.downsampler.layer.*            -> mixer.dwconv.*           (depthwise 5x5, shortcut)
      attnp.to_qkv.*                       -> mixer.qkv.*
      attnp.to_out.* (a 1x1 conv)          -> mixer.proj.* (a linear: the weight loses its 1x1)
      mlpp.{project_in,dwconv,project_out}.* -> ffn.* (same names)
      adaLN_modulationp.1.*                -> adaLN_modulation.1.*
    down1_2 / down2_3 .body.0.weight       -> down.0 / down.1 .weight
    up3_2 / up2_1 .body.0.weight           -> up.0 / up.1 .weight
    reduce_chan_level2 / reduce_chan_level1 -> reduce.0 / reduce.1
    output.*                               -> output.*
    final_layer.adaLN_modulation.1.*       -> final_modulation.1.*
    final_layer.out_proj.*                 -> final_conv.*

The FFN. Its training form (official `rep=1`) has two stacked 1x1 convs in and out and a 5x5 +
3x3 + 1x1 depthwise sum plus identity. The official `eval()` folds them into plain attributes,
not into the state dict, so an eval-mode checkpoint has the same keys; but it folds *in place*
into `dwconv.0.weight` (its fold aliases that parameter), so a state dict saved after `eval()`
holds an already folded 5x5 next to the 3x3 and 1x1 it includes. Nothing in the tensors tells
the two apart, and the official code itself folds such a file a second time when it samples:
ditkit reads it the same way (training form), so it computes what the official sampler does.
The single-conv layout (`mlpp.project_in.weight`, `mlpp.dwconv.weight`, `mlpp.project_out.weight`:
official `rep=0`, or folded weights exported into it) is converted exactly: in = [identity; W_in]
pair, out = [W_out; identity] pair (needs mlp_ratio >= 2, as the released configs have), 5x5 = the
folded kernel, 3x3 = 0 and the 1x1 depthwise = -1, which cancels the identity branch. ditkit's
eval fold then rebuilds the very same tensors (no rounding), so eval outputs are bit-identical.

Inferred from the tensors: width (stem), input channels, depth per stage (block indices), heads
(the per-head logit_scale; the v1 attention without it is refused), mlp_ratio (FFN hidden width /
stage width), the attention's depthwise kernel, learned sigma (output channels = 2 x input),
classes and class dropout (the label table's extra null row; args.num_classes == rows means no
null row). Not in the tensors, taken from the released configs: 2x2 downsampled attention,
down_shortcut=1, RoPE2D. The record is the official diffusion (DiT's `diffusion/`: linear betas
over 1000 steps, epsilon with learned-range variance) with sample_ddp.py's defaults (250 DDPM
steps over the official respacing, timestep_spacing "official", cfg 1.5 on the first 3 channels, as
`forward_with_cfg` does); SD VAE latents (x 0.18215, `--vae`); the resolution from `--resolution`, else
args.image_size, else 256.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from torch import Tensor

from ..errors import DitkitError
from ..models import build_model
from ..models.udit import UDiTConfig
from ..record import DataSettings, DiffusionSettings, RunRecord
from .pretrained import Converted, ConvertOptions, read_torch_file, register_converter

FORMAT = "official-udit"
STAGES = ("encoder_level_1", "encoder_level_2", "latent", "decoder_level_2", "decoder_level_1")
STAGE_WIDTHS = (1, 2, 4, 2, 2)  # x hidden_size
SIGNATURE = ("x_embedder.proj.weight", "y_embedder_1.embedding_table.weight", "final_layer.out_proj.weight")
SAMPLING = dict(objective="ddpm", sampler="ddpm", sample_steps=250, cfg_scale=1.5,  # sample_ddp.py defaults
                timestep_spacing="official")
GUIDED_CHANNELS = 3  # U_DiT.forward_with_cfg guides eps[:, :3]
DEFAULT_RESOLUTION = 256

# (official, ditkit) module prefixes outside the blocks, and inside a block.
TOP_NAMES = (("x_embedder.proj", "x_embedder"),
             *((f"{kind}_embedder_{k}", f"conditions.{k - 1}.{kind}_embedder") for k in (1, 2, 3) for kind in "ty"),
             *((stage, f"stages.{i}") for i, stage in enumerate(STAGES)),
             ("down1_2.body.0", "down.0"), ("down2_3.body.0", "down.1"),
             ("up3_2.body.0", "up.0"), ("up2_1.body.0", "up.1"),
             ("reduce_chan_level2", "reduce.0"), ("reduce_chan_level1", "reduce.1"), ("output", "output"),
             ("final_layer.adaLN_modulation", "final_modulation"), ("final_layer.out_proj", "final_conv"))
BLOCK_NAMES = tuple(pair for p in (1, 2) for pair in (
    (f"attn{p}.logit_scale", f"pairs.{p - 1}.mixer.logit_scale"),
    (f"attn{p}.downsampler.layer", f"pairs.{p - 1}.mixer.dwconv"),
    (f"attn{p}.to_qkv", f"pairs.{p - 1}.mixer.qkv"),
    (f"attn{p}.to_out", f"pairs.{p - 1}.mixer.proj"),
    (f"mlp{p}", f"pairs.{p - 1}.ffn"),
    (f"adaLN_modulation{p}", f"pairs.{p - 1}.adaLN_modulation")))
FOLDED_FFN = re.compile(r"^(?P<ffn>.+\.mlp[12])\.project_in\.weight$")


# -- reading ---------------------------------------------------------------------------------------
def unpack(obj: object, path: Path) -> tuple[dict[str, Tensor], dict, dict]:
    """(weights, args, origin details) of a bare state dict or a train.py checkpoint (EMA first)."""
    found = _weights_in(obj)
    if found is None:
        raise DitkitError(f"{path} holds a {type(obj).__name__}, neither a U-DiT state dict nor a train.py "
                          "checkpoint (a dict with model/ema/opt/args)")
    return found


def _weights_in(obj: object) -> tuple[dict[str, Tensor], dict, dict] | None:
    if isinstance(obj, dict) and any(isinstance(obj.get(name), dict) for name in ("ema", "model")):
        which = "ema" if isinstance(obj.get("ema"), dict) else "model"
        args = obj.get("args")
        args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else {}
        unused = sorted(str(name) for name in obj if name not in (which, "args"))
        return obj[which], args, {"weights": which, "unused": unused}
    if isinstance(obj, dict) and obj and all(isinstance(v, Tensor) for v in obj.values()):
        return obj, {}, {"weights": "state dict"}
    return None


def missing_signature(state: dict[str, Tensor]) -> list[str]:
    """The keys every official U-DiT has that `state` lacks (empty: it is one)."""
    missing = [key for key in SIGNATURE if key not in state]
    if not any(key.startswith(STAGES) for key in state):
        missing.append(f"{'/'.join(STAGES)}.*")
    return missing


def accepts(path: Path) -> bool:
    """A torch file holding an official U-DiT. An unreadable or unsafe file is an error already."""
    if not (path.is_file() and path.suffix in (".pt", ".pth", ".bin", ".ckpt")):
        return False
    found = _weights_in(read_torch_file(path))
    if found is None:
        return False  # a torch file of something else: another converter may read it
    state = found[0]
    return not missing_signature(state)


# -- names -----------------------------------------------------------------------------------------
def _rename_prefix(key: str, names: tuple[tuple[str, str], ...]) -> str | None:
    for old, new in names:
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return None


def _translate(key: str, top: tuple, block: tuple, stage_prefixes: tuple[str, ...]) -> str | None:
    """Rename `key` by the top-level table, then inside a block by the block table."""
    renamed = _rename_prefix(key, top)
    stage = next((prefix for prefix in stage_prefixes if renamed and renamed.startswith(prefix + ".")), None)
    if renamed is None or stage is None:
        return renamed
    index, _, rest = renamed[len(stage) + 1:].partition(".")
    inner = _rename_prefix(rest, block) if index.isdigit() else None
    return None if inner is None else f"{stage}.{index}.{inner}"


def ditkit_key(official: str) -> str | None:
    """The ditkit name of an official U-DiT key; None for a key the official layout does not have."""
    return _translate(official, TOP_NAMES, BLOCK_NAMES, tuple(f"stages.{i}" for i in range(5)))


def official_key(ditkit: str) -> str | None:
    """The official name of a ditkit U-DiT key (for messages in the names the user's file has)."""
    return _translate(ditkit, _swapped(TOP_NAMES), _swapped(BLOCK_NAMES), STAGES)


def _swapped(names: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple((new, old) for old, new in names)


# -- the config ------------------------------------------------------------------------------------
def infer_config(state: dict[str, Tensor], args: dict, options: ConvertOptions) -> UDiTConfig:
    """The ditkit U-DiT config the tensors fix (see the module docstring for what comes from where)."""
    stem = state["x_embedder.proj.weight"]  # (C, in_channels, 3, 3)
    width, in_channels = stem.shape[0], stem.shape[1]
    out_channels = state["final_layer.out_proj.weight"].shape[0]
    if out_channels not in (in_channels, 2 * in_channels):
        raise DitkitError(f"final_layer.out_proj has {out_channels} output channels for {in_channels} input "
                          "channels: an official U-DiT has the same number (fixed sigma) or twice (learned sigma)")
    num_classes, dropout = _classes(state["y_embedder_1.embedding_table.weight"].shape[0], args)
    kernel = _attention_kernel(state)
    return UDiTConfig(in_channels=in_channels, num_classes=num_classes, class_dropout_prob=dropout,
                      learn_sigma=out_channels == 2 * in_channels, mixer="downsampled",
                      mixer_options={} if kernel == 5 else {"kernel_size": kernel}, hidden_size=width,
                      num_heads=_heads(state, options), depths=_depths(state), mlp_ratio=_mlp_ratio(state, width))


def _depths(state: dict[str, Tensor]) -> tuple[int, ...]:
    def depth(stage: str) -> int:
        indices = [key.split(".")[1] for key in state if key.startswith(stage + ".")]
        return 1 + max((int(index) for index in indices if index.isdigit()), default=-1)

    return tuple(depth(stage) for stage in STAGES)


def _heads(state: dict[str, Tensor], options: ConvertOptions) -> int:
    scale = next((v for k, v in state.items() if k.endswith((".attn1.logit_scale", ".attn2.logit_scale"))), None)
    if scale is None:
        raise DitkitError("this U-DiT has no attention logit_scale: it uses the v1 (dot-product) attention, "
                          "ditkit's U-DiT has the released v2 (cosine) attention only")
    if options.num_heads is not None and options.num_heads != scale.shape[0]:
        raise DitkitError(f"--num-heads {options.num_heads} contradicts the checkpoint: its logit_scale has "
                          f"{scale.shape[0]} heads; leave --num-heads out")
    return scale.shape[0]


def _mlp_ratio(state: dict[str, Tensor], width: int) -> float:
    """FFN hidden width / its stage's width, from the first FFN (training or single-conv form)."""
    for key, value in state.items():
        found = re.match(r"^(\w+)\.\d+\.mlp[12]\.project_in(\.1)?\.weight$", key)
        if found and found.group(1) in STAGES:
            return value.shape[0] / (width * STAGE_WIDTHS[STAGES.index(found.group(1))])
    if any(re.search(r"\.mlp[12]\.fc1\.", key) for key in state):
        raise DitkitError("this U-DiT uses the 'basic' FFN (mlp.fc1/fc2, official ffn_type='basic'); "
                          "ditkit's U-DiT has the released re-parameterised FFN (ffn_type='rep') only")
    return 2.0  # no FFN at all (no blocks): the released ratio


def _attention_kernel(state: dict[str, Tensor]) -> int:
    kernel = next((v.shape[-1] for k, v in state.items() if k.endswith(".downsampler.layer.weight")), 5)
    if kernel % 2 == 0:
        raise DitkitError(f"the attention's depthwise conv has an even kernel ({kernel}): ditkit pads it "
                          "symmetrically, so only odd kernels (the released dwconv5) convert exactly")
    return kernel


def _classes(rows: int, args: dict) -> tuple[int, float]:
    """(classes, class dropout) from the label table: the official LabelEmbedder adds one null row
    when class dropout > 0 (0.1 in every released config)."""
    if args.get("num_classes") == rows:
        return rows, 0.0
    return rows - 1, 0.1


# -- the weights -----------------------------------------------------------------------------------
def unfold_ffns(state: dict[str, Tensor]) -> tuple[dict[str, Tensor], int]:
    """Official names, with every single-conv (folded) FFN rewritten in the training form exactly;
    and how many there were."""
    state = dict(state)
    folded = [m.group("ffn") for key in list(state) if (m := FOLDED_FFN.match(key))]
    for ffn in folded:
        clash = [key for key in state if key.startswith((f"{ffn}.project_in.0.", f"{ffn}.dwconv.0."))]
        if clash:
            raise DitkitError(f"{ffn} holds both the folded FFN ({ffn}.project_in.weight) and the training form "
                              f"({clash[0]}): keep one of them")
        parts = {name: state.pop(f"{ffn}.{name}", None)
                 for name in ("project_in.weight", "project_in.bias", "dwconv.weight", "dwconv.bias",
                              "project_out.weight", "project_out.bias")}
        absent = [f"{ffn}.{name}" for name, value in parts.items() if value is None]
        if absent:
            raise DitkitError(f"missing keys {', '.join(absent)}: the folded FFN {ffn} is incomplete")
        state.update({f"{ffn}.{name}": value for name, value in training_form(ffn, **{
            name.replace(".", "_"): value for name, value in parts.items()}).items()})
    return state, len(folded)


def training_form(ffn: str, project_in_weight: Tensor, project_in_bias: Tensor, dwconv_weight: Tensor,
                  dwconv_bias: Tensor, project_out_weight: Tensor, project_out_bias: Tensor) -> dict[str, Tensor]:
    """The training form of a folded FFN (1x1 in, GELU, depthwise 5x5, 1x1 out) computing the same
    function. Each stacked pair goes through hidden/2 channels: an identity on one side and the
    folded matrix (zero-padded) on the other. The 1x1 depthwise branch is -1 so that it cancels the
    identity branch; folding this back gives the input tensors exactly (x*1 + 0s, -1 + 1 = 0)."""
    hidden, dim = project_in_weight.shape[:2]
    half = hidden // 2
    if hidden % 2 or half < dim:
        raise DitkitError(f"the folded FFN {ffn} widens {dim} channels to {hidden}: ditkit's training form passes "
                          f"its 1x1 pairs through hidden/2 = {hidden / 2:g} channels, which must be at least {dim} "
                          "to hold it exactly (mlp_ratio >= 2); convert a checkpoint saved in training form")
    w_in, w_out, dtype = project_in_weight.flatten(1), project_out_weight.flatten(1), project_in_weight.dtype
    in_second = torch.zeros(hidden, half, dtype=dtype)
    in_second[:, :dim] = w_in
    out_first, out_first_bias = torch.zeros(half, hidden, dtype=dtype), torch.zeros(half, dtype=dtype)
    out_first[:dim], out_first_bias[:dim] = w_out, project_out_bias
    conv = lambda w: w[:, :, None, None].contiguous()  # noqa: E731  (1x1 conv weights)
    zeros = lambda *shape: torch.zeros(shape, dtype=dtype)  # noqa: E731
    return {
        "project_in.0.weight": conv(torch.eye(half, dim, dtype=dtype)), "project_in.0.bias": zeros(half),
        "project_in.1.weight": conv(in_second), "project_in.1.bias": project_in_bias,
        "dwconv.0.weight": dwconv_weight, "dwconv.0.bias": dwconv_bias,
        "dwconv.1.weight": zeros(hidden, 1, 3, 3), "dwconv.1.bias": zeros(hidden),
        "dwconv.2.weight": torch.full((hidden, 1, 1, 1), -1.0, dtype=dtype), "dwconv.2.bias": zeros(hidden),
        "project_out.0.weight": conv(out_first), "project_out.0.bias": out_first_bias,
        "project_out.1.weight": conv(torch.eye(dim, half, dtype=dtype)), "project_out.1.bias": zeros(dim),
    }


def renamed_state(state: dict[str, Tensor], config: UDiTConfig) -> dict[str, Tensor]:
    """The official tensors under ditkit's names, checked key by key against the config's model:
    every unknown, missing or misshapen key is named (in the official names)."""
    with torch.device("meta"):  # shapes only: no memory for the weights of a large model
        expected = {key: value.shape for key, value in build_model(config).state_dict().items()}
    converted, unknown = {}, []
    for key, value in state.items():
        name = ditkit_key(key)
        if name not in expected:
            unknown.append(key)
            continue
        if name.endswith("mixer.proj.weight") and value.dim() == 4 and value.shape[2:] == (1, 1):
            value = value.flatten(1)  # the official 1x1 conv is ditkit's linear
        converted[name] = value
    missing = [official_key(key) or key for key in expected if key not in converted]
    misshapen = [f"{official_key(key)} {tuple(value.shape)} (expected {tuple(expected[key])})"
                 for key, value in converted.items() if value.shape != expected[key]]
    problems = (("unknown keys", unknown, "a U-DiT variant ditkit does not have, or another model"),
                ("missing keys", missing, "an incomplete file: download it again or save the whole state dict"),
                ("keys of the wrong shape", misshapen, "a U-DiT variant ditkit does not have"))
    for problem, keys, why in problems:
        if keys:
            raise DitkitError(f"{problem} for the inferred U-DiT (width {config.hidden_size}, depths "
                              f"{list(config.depths)}): {_listed(keys)}; {why}")
    return converted


def _listed(keys: list[str], most: int = 8) -> str:
    more = f" and {len(keys) - most} more" if len(keys) > most else ""
    return ", ".join(keys[:most]) + more


# -- the record ------------------------------------------------------------------------------------
def resolution(options: ConvertOptions, args: dict) -> int:
    return options.resolution or args.get("image_size") or DEFAULT_RESOLUTION


@register_converter(FORMAT, accepts)
def convert(path: Path, options: ConvertOptions) -> Converted:
    state, args, details = unpack(read_torch_file(path), path)
    missing = missing_signature(state)
    if missing:
        raise DitkitError(f"{path} is not an official U-DiT: it has no {', '.join(missing)} (its keys begin "
                          f"{_listed(list(state), 4)}); convert it with the converter of its own format")
    state, folded = unfold_ffns(state)
    config = infer_config(state, args, options)
    diffusion = DiffusionSettings(learn_sigma=config.learn_sigma,
                                  guidance_channels=min(GUIDED_CHANNELS, config.in_channels), **SAMPLING)
    data = DataSettings(resolution=resolution(options, args), source="imagenet" if config.num_classes == 1000 else None)
    origin = {"format": FORMAT, "path": str(Path(path).resolve()), **details,
              **({"folded_ffns": folded} if folded else {})}
    record = RunRecord(model=config, diffusion=diffusion, data=data, origin=origin)
    return Converted(renamed_state(state, config), record)
