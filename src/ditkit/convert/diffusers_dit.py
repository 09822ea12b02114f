"""diffusers' DiT in and out: `ditkit convert` of a DiTTransformer2DModel or DiTPipeline folder, and
`ditkit export CKPT --to diffusers OUT` (`export_diffusers`) of a ditkit DiT as a DiTPipeline folder.

What diffusers does differently from the official DiT (diffusers 0.42, file:line):

  timestep embedding   frequencies 10000^(-i/127), not 10000^(-i/128): `CombinedTimestepLabelEmbeddings`
                       builds `Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=1)`
                       (models/embeddings.py:1335; the shift divides by half - 1 at :60)
                       -> DiTConfig.timestep_freq_shift = 1
  block norms          the attention's LayerNorm inside `AdaLayerNormZero` keeps eps 1e-6
                       (normalization.py:149) but the MLP's `norm3` takes `norm_eps`, default 1e-5
                       (attention.py:930, BasicTransformerBlock.norm3 = LayerNorm(dim, norm_eps)); the
                       final `norm_out` keeps 1e-6 (dit_transformer_2d.py:142)
                       -> DiTConfig.mlp_norm_eps = norm_eps
  positions            at a grid of n tokens per side other than the trained one, `PatchEmbed`
                       recomputes the sin-cos table with positions i / (n / base_size) (embeddings.py:
                       180-189, base_size = sample_size // patch_size): every size spans the trained range
                       -> DiTConfig.pos_embed_base_grid = sample_size // patch_size
  adaLN                `AdaLayerNormZero` chunks shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp,
                       gate_mlp (normalization.py:168), the final layer shift, scale
                       (dit_transformer_2d.py:209): DiT's own orders, so the weights copy as they are.
  embedders            every block holds and runs its own timestep + label embedder (`norm1.emb`,
                       normalization.py:142,166), the final layer block 0's (dit_transformer_2d.py:208);
                       the official DiT has one, so checkpoints converted from it hold identical copies
                       (ditkit takes block 0's and refuses copies that differ).

Key mapping, diffusers -> ditkit (N: block index):

  pos_embed.proj.*                                              x_embedder.*
  transformer_blocks.0.norm1.emb.timestep_embedder.linear_{1,2}  t_embedder.mlp.{0,2}
  transformer_blocks.0.norm1.emb.class_embedder.embedding_table  y_embedder.embedding_table
  transformer_blocks.N.norm1.linear.*                           blocks.N.adaLN_modulation.1.*
  transformer_blocks.N.attn1.to_{q,k,v}.*                       blocks.N.mixer.qkv.* (concatenated)
  transformer_blocks.N.attn1.to_out.0.*                         blocks.N.mixer.proj.*
  transformer_blocks.N.ff.net.0.proj.*, ff.net.2.*              blocks.N.mlp.fc1.*, mlp.fc2.*
  proj_out_1.*, proj_out_2.*                                    final_layer.adaLN_modulation.1.*, final_layer.linear.*

Sampling like DiTPipeline (pipelines/dit/pipeline_dit.py): noise `randn_tensor` from the generator
(:166), guidance on all latent channels (:208) with the null class hard-coded as 1000 (:175), only
when guidance_scale > 1; the learned-variance channels dropped before `scheduler.step` (:217), which
steps the doubled batch (:223); latents / vae scaling_factor, decoded and clamped (:233-236). A
converted pipeline's record carries its scheduler config and `step_like_dit_pipeline`, so that
`ditkit sample` gives DiTPipeline's images (`ditkit.diffusion.sampling.sample`).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import json
import shutil
from pathlib import Path

import torch
from torch import Tensor

from ..checkpoint import load_checkpoint
from ..diffusers.folders import is_diffusers_folder
from ..diffusion.objectives import build_objective
from ..diffusion.sampling import make_scheduler, scheduler_from_config
from ..errors import DitkitError
from ..files import check_writable, refuse_non_empty_folder, staged_folder
from ..models.dit import DiTConfig
from ..models.layers import sincos_pos_embed_2d
from ..record import OFFICIAL_SPACING, DataSettings, DiffusionSettings, RunRecord
from .pretrained import Converted, ConvertOptions, register_converter

FORMAT = "diffusers-dit"
TRANSFORMER_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")  # the hub's DiT folders say the latter
WEIGHTS = "diffusion_pytorch_model.safetensors"
EMBEDDER_KEYS = {  # block 0's embedder (diffusers, under transformer_blocks.0.norm1.emb.) -> ditkit
    "timestep_embedder.linear_1.weight": "t_embedder.mlp.0.weight",
    "timestep_embedder.linear_1.bias": "t_embedder.mlp.0.bias",
    "timestep_embedder.linear_2.weight": "t_embedder.mlp.2.weight",
    "timestep_embedder.linear_2.bias": "t_embedder.mlp.2.bias",
    "class_embedder.embedding_table.weight": "y_embedder.embedding_table.weight",
}
BLOCK_KEYS = {  # per block, diffusers -> ditkit (q, k, v are fused separately)
    "norm1.linear": "adaLN_modulation.1",
    "attn1.to_out.0": "mixer.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
TOP_KEYS = {"pos_embed.proj": "x_embedder", "proj_out_1": "final_layer.adaLN_modulation.1",
            "proj_out_2": "final_layer.linear"}
DDPM_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


# -- reading a diffusers folder ----------------------------------------------------------------------------
def _read_json(file: Path) -> dict:
    try:
        values = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise DitkitError(f"{file} is not readable JSON ({error}): give an intact diffusers folder") from error
    if not isinstance(values, dict):
        raise DitkitError(f"{file} is not a diffusers config (a JSON object is expected)")
    return values


def _locate(path: Path) -> tuple[Path, Path | None]:
    """(the transformer folder, the DiTPipeline folder around it or None)."""
    if (path / "model_index.json").is_file():
        index = _read_json(path / "model_index.json")
        if index.get("_class_name") != "DiTPipeline":
            raise DitkitError(f"{path} is a diffusers {index.get('_class_name')}, not a DiTPipeline: give a DiT "
                              "pipeline folder or its transformer/ folder")
        return path / "transformer", path
    if path.name == "transformer" and (path.parent / "model_index.json").is_file():
        return _locate(path.parent)
    return path, None


def _transformer_config(folder: Path) -> dict:
    if not (folder / "config.json").is_file():
        raise DitkitError(f"no config.json in {folder}: a diffusers model folder holds config.json next to its "
                          "weights (as save_pretrained writes it)")
    config = _read_json(folder / "config.json")
    name = config.get("_class_name")
    if name not in TRANSFORMER_CLASSES:
        raise DitkitError(f"{folder / 'config.json'} describes a {name}, not a DiTTransformer2DModel: give a "
                          "diffusers DiT folder")
    config = {**_init_defaults(name), **config}  # keys a config leaves out take the class's defaults, as in diffusers
    _check_expressible(config, folder / "config.json")
    return config


def _init_defaults(class_name: str) -> dict:
    import diffusers

    parameters = inspect.signature(getattr(diffusers, class_name).__init__).parameters
    return {name: p.default for name, p in parameters.items() if p.default is not inspect.Parameter.empty}


def _check_expressible(config: dict, file: Path) -> None:
    """Refuse the settings of diffusers' transformer that ditkit's DiT does not compute."""
    interpolation = config.get("interpolation_scale") or max((config["sample_size"] or 0) // 64, 1)
    if config["_class_name"] == "DiTTransformer2DModel":
        interpolation = 1  # DiTTransformer2DModel never passes one to PatchEmbed
    required = [  # (the setting, its value, the only value ditkit's DiT computes)
        ("patch_size", config["patch_size"] is not None, True), ("norm_type", config["norm_type"], "ada_norm_zero"),
        ("activation_fn", config["activation_fn"], "gelu-approximate"),
        ("attention_bias", config["attention_bias"], True),
        ("norm_elementwise_affine", config["norm_elementwise_affine"], False),
        ("cross_attention_dim", config.get("cross_attention_dim"), None),
        ("caption_channels", config.get("caption_channels"), None),
        ("position interpolation_scale", interpolation, 1),
    ]
    for name, value, expected in required:
        if value != expected:
            raise DitkitError(f"{file} sets {name} = {value!r}; ditkit's DiT computes {expected!r} only: "
                              "this is no DiT that ditkit can convert")


def _read_tensors(folder: Path) -> dict[str, Tensor]:
    """The weights of a diffusers model folder: one safetensors file, or shards with their index."""
    from safetensors.torch import load_file

    index = folder / f"{WEIGHTS}.index.json"
    files = sorted(set(_read_json(index).get("weight_map", {}).values())) if index.is_file() else [WEIGHTS]
    if not (folder / files[0]).is_file():
        pickled = sorted(p.name for p in folder.glob("diffusion_pytorch_model*.bin"))
        hint = f"it holds {pickled[0]}, a pickle ditkit does not read" if pickled else "it holds no weights"
        raise DitkitError(f"no {WEIGHTS} in {folder} ({hint}): save the model with "
                          "save_pretrained(..., safe_serialization=True)")
    tensors = {}
    for name in files:
        try:
            tensors.update(load_file(str(folder / name)))
        except Exception as error:  # safetensors reports truncation and corruption with its own errors
            raise DitkitError(f"{folder / name} is damaged or truncated ({error}): download it again") from error
    return tensors


# -- diffusers keys -> ditkit keys -------------------------------------------------------------------------
def _take(tensors: dict[str, Tensor], key: str, source: Path) -> Tensor:
    if key not in tensors:
        raise DitkitError(f"{source} has no tensor {key}: the weights do not match their config.json")
    return tensors.pop(key)


def _take_embedder(tensors: dict[str, Tensor], depth: int, source: Path) -> dict[str, Tensor]:
    """Block 0's timestep + label embedder under ditkit's names, after checking that every other block holds
    the same copy: ditkit's DiT has one embedder for all blocks, as the official DiT."""
    state = {ours: _take(tensors, f"transformer_blocks.0.norm1.emb.{theirs}", source)
             for theirs, ours in EMBEDDER_KEYS.items()}
    for block in range(1, depth):
        for theirs, ours in EMBEDDER_KEYS.items():
            key = f"transformer_blocks.{block}.norm1.emb.{theirs}"
            if not torch.equal(_take(tensors, key, source), state[ours]):
                raise DitkitError(f"{source}: {key} differs from block 0's copy; ditkit's DiT has one timestep "
                                  "and label embedder for all blocks, as the official DiT: give a checkpoint whose "
                                  "per-block embedders are identical")
    return state


def _check_position_table(table: Tensor | None, config: dict, source: Path) -> None:
    """Some saves hold PatchEmbed's fixed sin-cos table (`pos_embed.pos_embed`); ditkit computes its own, so
    a stored one must be that table."""

    grid = config["sample_size"] // config["patch_size"]
    expected = sincos_pos_embed_2d(config["num_attention_heads"] * config["attention_head_dim"], (grid, grid))
    if table is not None and not (table.numel() == expected.numel()
                                  and torch.allclose(table.reshape(expected.shape).float(), expected, atol=1e-6)):
        raise DitkitError(f"{source}: pos_embed.pos_embed is not the 2D sin-cos table of a {grid}x{grid} grid that "
                          "ditkit's DiT computes: this is no plain DiT")


def diffusers_to_ditkit(tensors: dict[str, Tensor], config: dict, source: Path) -> dict[str, Tensor]:
    """ditkit DiT weights from a diffusers DiT state dict and its config; every key is used or named in
    an error."""
    tensors, depth = dict(tensors), config["num_layers"]
    _check_position_table(tensors.pop("pos_embed.pos_embed", None), config, source)
    state = _take_embedder(tensors, depth, source)
    for theirs, ours in TOP_KEYS.items():
        for kind in ("weight", "bias"):
            state[f"{ours}.{kind}"] = _take(tensors, f"{theirs}.{kind}", source)
    for block in range(depth):
        theirs, ours = f"transformer_blocks.{block}.", f"blocks.{block}."
        for kind in ("weight", "bias"):
            state[f"{ours}mixer.qkv.{kind}"] = torch.cat(
                [_take(tensors, f"{theirs}attn1.to_{x}.{kind}", source) for x in "qkv"])
            for their_name, our_name in BLOCK_KEYS.items():
                state[f"{ours}{our_name}.{kind}"] = _take(tensors, f"{theirs}{their_name}.{kind}", source)
    if tensors:
        raise DitkitError(f"{source} holds tensors ditkit's DiT has no place for ({len(tensors)}, first: "
                          f"{sorted(tensors)[0]}): this is no plain DiT")
    return state


def ditkit_to_diffusers(state: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """The inverse of `diffusers_to_ditkit`: a diffusers DiT state dict, the embedder copied into every block."""
    out = {}
    for theirs, ours in TOP_KEYS.items():
        for kind in ("weight", "bias"):
            out[f"{theirs}.{kind}"] = state[f"{ours}.{kind}"]
    for block in range(depth):
        theirs, ours = f"transformer_blocks.{block}.", f"blocks.{block}."
        for their_name, our_name in EMBEDDER_KEYS.items():
            out[f"{theirs}norm1.emb.{their_name}"] = state[our_name]
        for kind in ("weight", "bias"):
            for name, part in zip("qkv", state[f"{ours}mixer.qkv.{kind}"].chunk(3), strict=True):
                out[f"{theirs}attn1.to_{name}.{kind}"] = part
            for their_name, our_name in BLOCK_KEYS.items():
                out[f"{theirs}{their_name}.{kind}"] = state[f"{ours}{our_name}.{kind}"]
    return {key: value.detach().clone().contiguous() for key, value in out.items()}


# -- the record ----------------------------------------------------------------------------------------------
def _model_config(config: dict, vae_scale: int, options: ConvertOptions, source: Path) -> DiTConfig:
    in_channels = config["in_channels"]
    out_channels = config["out_channels"] or in_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise DitkitError(f"{source} has {out_channels} output channels for {in_channels} input channels: ditkit's "
                          "DiT predicts epsilon (same count) or epsilon and variance (twice as many)")
    heads, patch, sample_size = config["num_attention_heads"], config["patch_size"], config["sample_size"]
    if options.num_heads is not None and options.num_heads != heads:
        raise DitkitError(f"--num-heads {options.num_heads} contradicts {source} (num_attention_heads {heads}): "
                          "drop --num-heads, config.json fixes it")
    return DiTConfig(
        in_channels=in_channels, patch_size=patch, hidden_size=heads * config["attention_head_dim"],
        depth=config["num_layers"], num_heads=heads, mlp_ratio=4.0,
        num_classes=config["num_embeds_ada_norm"], class_dropout_prob=0.1,  # diffusers' fixed dropout
        learn_sigma=out_channels == 2 * in_channels, mixer="full", vae_scale=vae_scale,
        timestep_freq_shift=1, mlp_norm_eps=float(config["norm_eps"]),
        pos_embed_base_grid=sample_size // patch)


def _scheduler_config(pipeline: Path) -> dict:
    """The pipeline's scheduler config, which must be DiT's DDPM schedule (what ditkit's DDPM objective is)."""
    file = pipeline / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        raise DitkitError(f"no scheduler/scheduler_config.json in {pipeline}: a DiTPipeline folder holds one "
                          "(or convert its transformer/ folder alone)")
    config = _read_json(file)

    scheduler = scheduler_from_config(config).config  # with the class's defaults for keys the file leaves out
    for key, value in DDPM_SCHEDULE.items():
        if scheduler.get(key) != value:
            raise DitkitError(f"{file} sets {key} = {scheduler.get(key)!r}; ditkit's DDPM objective is DiT's "
                              f"schedule ({', '.join(f'{k} {v}' for k, v in DDPM_SCHEDULE.items())}) only")
    if scheduler.get("trained_betas") is not None or scheduler.get("prediction_type", "epsilon") != "epsilon":
        raise DitkitError(f"{file} uses trained betas or predicts {scheduler.get('prediction_type')}: ditkit's DDPM "
                          "objective has linear betas and predicts epsilon, as DiT")
    return config


def _vae_scale(vae: Path | None) -> int:
    """Pixels per latent cell of a VAE folder (from its config, without loading it); 8 (the SD VAE) without one."""
    if vae is None:
        return 8
    if not (vae / "config.json").is_file():
        raise DitkitError(f"no AutoencoderKL at {vae}: expected a local diffusers folder with config.json")
    return 2 ** (len(_read_json(vae / "config.json").get("block_out_channels", [64])) - 1)  # diffusers' default


def _class_names(pipeline: Path | None, num_classes: int) -> list[str]:
    """The first name of each class in the pipeline's id2label ("tench, Tinca tinca" -> "tench")."""
    id2label = _read_json(pipeline / "model_index.json").get("id2label") if pipeline else None
    if not isinstance(id2label, dict) or any(str(i) not in id2label for i in range(num_classes)):
        return []
    return [str(id2label[str(i)]).split(",")[0].strip() for i in range(num_classes)]


def _record(config: dict, source: Path, pipeline: Path | None, options: ConvertOptions) -> RunRecord:
    vae = Path(options.vae) if options.vae else pipeline / "vae" if pipeline and (pipeline / "vae").is_dir() else None
    model = _model_config(config, _vae_scale(vae), options, source)
    resolution = config["sample_size"] * model.vae_scale
    if options.resolution is not None and options.resolution != resolution:
        raise DitkitError(f"--resolution {options.resolution} contradicts {source} (sample_size "
                          f"{config['sample_size']} latents = {resolution} px): drop --resolution")
    diffusion = DiffusionSettings(  # DiTPipeline's call defaults: 50 steps, guidance 4 on every channel
        objective="ddpm", learn_sigma=model.learn_sigma, sample_steps=50, cfg_scale=4.0,
        scheduler=_scheduler_config(pipeline) if pipeline else None, step_like_dit_pipeline=pipeline is not None)
    data = DataSettings(resolution=resolution, vae=str(vae.resolve()) if vae else None,
                        class_names=_class_names(pipeline, model.num_classes))
    return RunRecord(model=model, diffusion=diffusion, data=data,
                     origin={"format": FORMAT, "path": str(source.resolve())})


@register_converter(FORMAT, is_diffusers_folder)
def convert(path: Path, options: ConvertOptions) -> Converted:
    """A diffusers DiT folder (or the DiTPipeline around it) -> ditkit weights and their run record."""
    folder, pipeline = _locate(path)
    config = _transformer_config(folder)
    tensors = _read_tensors(folder)
    state = diffusers_to_ditkit(tensors, config, folder / WEIGHTS)
    return Converted(state=state, record=_record(config, path, pipeline, options))


# -- export ---------------------------------------------------------------------------------------------------
def _check_exportable(record: RunRecord, approximate_timesteps: bool = False) -> DiTConfig:
    """The DiT config of a run DiTPipeline can load, or a one-line refusal naming why not."""
    cfg = record.model
    if getattr(cfg, "backbone", None) != "dit":
        raise DitkitError(f"diffusers' DiTTransformer2DModel is a DiT and this run is a "
                          f"{getattr(cfg, 'backbone', 'diffusers student')}: export a DiT")
    refusals = [
        (cfg.mixer != "full", f"diffusers' DiT has no {cfg.mixer} attention, only full attention: export a "
                              "full-attention DiT (e.g. the teacher), or load this one with --mixer full"),
        (cfg.mlp_ratio != 4.0, f"diffusers' DiT has an MLP ratio of 4, this model {cfg.mlp_ratio:g}"),
        (cfg.num_classes < 1, "diffusers' DiT is class-conditional and this model is unconditional"),
        (cfg.class_dropout_prob <= 0, "diffusers' DiT has a null-class row for guidance and this model was "
                                      "trained without class dropout, so it has none"),
        (cfg.timestep_freq_shift != 1 and not approximate_timesteps,
         "diffusers' DiT embeds timesteps with frequencies 10000^(-i/127) and this model was trained with "
         "10000^(-i/128) (the official DiT's): train with model.args.timestep_freq_shift=1, or export with "
         "--approximate-timesteps (as the hub's DiT folders were made) and read the difference it reports"),
        (record.diffusion.objective != "ddpm", "DiTPipeline samples the DDPM objective and this model was trained "
                                               "with flow matching"),
        (record.vae is None, "DiTPipeline decodes latents with a VAE and this run has none: convert or train it "
                             "with --vae"),
    ]
    for refused, why in refusals:
        if refused:
            raise DitkitError(f"cannot export to diffusers: {why}")
    trained_grid = record.resolution // cfg.vae_scale // cfg.patch_size
    if cfg.pos_embed_base_grid not in (None, trained_grid):
        raise DitkitError(f"cannot export to diffusers: diffusers' DiT scales positions to its sample_size grid "
                          f"({trained_grid} tokens) and this model to {cfg.pos_embed_base_grid}")
    return cfg


def transformer_config(cfg: DiTConfig, resolution: int) -> dict:
    """The config.json of the DiTTransformer2DModel that computes what `cfg` does at `resolution` pixels
    (positions off that size: diffusers always scales them to it, see DiTConfig.pos_embed_base_grid)."""
    import diffusers

    return {"_class_name": "DiTTransformer2DModel", "_diffusers_version": diffusers.__version__,
            "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.hidden_size // cfg.num_heads,
            "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "num_layers": cfg.depth,
            "dropout": 0.0, "norm_num_groups": 32, "attention_bias": True, "sample_size": resolution // cfg.vae_scale,
            "patch_size": cfg.patch_size, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": cfg.num_classes,
            "upcast_attention": False, "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
            "norm_eps": cfg.mlp_norm_eps}


def _write_scheduler(record: RunRecord, folder: Path) -> str:
    """scheduler/ of the export: the run's own diffusers scheduler config, else ditkit's DDIM sampler for its
    DDPM schedule (DiTPipeline steps on epsilon only, so not ditkit's learned-variance DDPM sampler).
    Returns the scheduler's class name."""
    if record.diffusion.scheduler is not None:
        _write_json(folder / "scheduler_config.json", record.diffusion.scheduler)
        return record.diffusion.scheduler["_class_name"]
    scheduler = make_scheduler(build_objective(record.diffusion), "ddim", diffusers_spacing(record.diffusion))
    scheduler.save_config(folder)
    return type(scheduler).__name__


def diffusers_spacing(diffusion: DiffusionSettings) -> str | None:
    """The run's timestep spacing as a diffusers scheduler takes it. The official respacing (DiT's
    `space_timesteps(T, [n])`: round(k (T - 1) / (n - 1)) for k < n) gives the timesteps diffusers calls
    "linspace" (round(linspace(0, T - 1, n))) at every step count; its sampler (the learned variance)
    is not DiTPipeline's, which steps on epsilon only."""
    return "linspace" if diffusion.timestep_spacing == OFFICIAL_SPACING else diffusion.timestep_spacing


def _write_json(file: Path, values: dict) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    file.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def export_diffusers(ckpt: str | Path, out: str | Path, ema: bool = True, approximate_timesteps: bool = False) -> Path:
    """Write a ditkit DiT checkpoint as a DiTPipeline folder `out`: transformer/ (config.json and
    diffusion_pytorch_model.safetensors), scheduler/, vae/ (a copy of the run's VAE) and model_index.json.
    `DiTPipeline.from_pretrained(out)` loads it; `ditkit convert out` gives the checkpoint back.

    DiTPipeline guides with class 1000 as the null label: a model with fewer classes samples there
    with guidance_scale 1 only (ditkit samples it with guidance: its null label is num_classes).

    `approximate_timesteps` exports a model trained with the official timestep frequencies anyway (diffusers'
    DiT has only its own): `export_report.json` then says how far the exported model's outputs are from
    the trained one's (`timestep_approximation`)."""
    out = Path(out)
    refuse_non_empty_folder(out, "the export")  # before the checkpoint is read
    check_writable(out, "export")
    model, record = load_checkpoint(ckpt, ema=ema)
    cfg = _check_exportable(record, approximate_timesteps)
    with staged_folder(out) as stage:  # all of it or nothing: a failed export leaves no half folder
        _write_folder(stage, model, record, cfg)
    return out


def _write_folder(out: Path, model, record: RunRecord, cfg) -> None:
    from safetensors.torch import save_file

    _write_json(out / "transformer" / "config.json", transformer_config(cfg, record.resolution))
    save_file(ditkit_to_diffusers(model.state_dict(), cfg.depth), out / "transformer" / WEIGHTS,
              metadata={"format": "pt"})
    scheduler = _write_scheduler(record, out / "scheduler")
    shutil.copytree(record.vae, out / "vae")
    index = {"_class_name": "DiTPipeline", "transformer": ["diffusers", "DiTTransformer2DModel"],
             "scheduler": ["diffusers", scheduler], "vae": ["diffusers", "AutoencoderKL"]}
    if record.data.class_names:
        index["id2label"] = {str(i): name for i, name in enumerate(record.data.class_names)}
    _write_json(out / "model_index.json", index)
    if cfg.timestep_freq_shift != 1:
        _write_json(out / "export_report.json", {"timestep_approximation": timestep_approximation(model, record)})


@torch.no_grad()
def timestep_approximation(model, record: RunRecord, num: int = 8) -> dict:
    """How much the outputs move when a model trained with the official timestep frequencies runs with
    diffusers' (shift 1): max and mean absolute difference over a probe batch (noise at the trained size,
    timesteps spread over the schedule, classes cycled), next to the outputs' standard deviation."""

    shifted = copy.deepcopy(model)
    shifted.config = dataclasses.replace(model.config, timestep_freq_shift=1)
    shifted.t_embedder.freq_shift = 1
    side = record.resolution // model.config.vae_scale
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(num, model.config.in_channels, side, side, generator=generator)
    t = torch.linspace(0, 999, num)
    y = torch.arange(num) % model.config.num_classes
    trained, exported = model(x, t, y), shifted(x, t, y)
    difference = (trained - exported).abs()
    return {"max_abs": difference.max().item(), "mean_abs": difference.mean().item(),
            "output_std": trained.std().item()}
