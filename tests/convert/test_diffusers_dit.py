"""diffusers' DiT in and out: conversion equals diffusers' forward, export round-trips, and sampling a
converted DiTPipeline folder gives DiTPipeline's images. Tiny random models, built offline."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from ditkit.checkpoint import load_checkpoint, save_weights
from ditkit.convert.diffusers_dit import export_diffusers
from ditkit.convert.pretrained import ConvertOptions, build_converted, convert_pretrained, load_pretrained
from ditkit.diffusion.pipeline import generate
from ditkit.errors import DitkitError
from ditkit.models import config_from_dict, config_to_dict, model_config
from ditkit.record import DataSettings, DiffusionSettings, RunRecord
from helpers import run_cli, tiny_backbone

SAMPLE_SIZE = 8  # latent side: a 4x4 token grid with patch 2


def tiny_transformer(learn_sigma=True, seed=0, tied=True):
    """A random DiTTransformer2DModel, every weight non-zero; with `tied`, every block holds block 0's
    embedder, as checkpoints converted from the official DiT do. 1000 classes: DiTPipeline's null is 1000."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  out_channels=8 if learn_sigma else 4, num_layers=2, sample_size=SAMPLE_SIZE,
                                  patch_size=2, num_embeds_ada_norm=1000)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        if tied:
            for block in model.transformer_blocks[1:]:
                block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model.eval()


def tiny_vae():
    torch.manual_seed(1)
    return AutoencoderKL(block_out_channels=(8, 8), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4).eval()


@pytest.fixture(scope="module")
def pipeline_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dit-pipeline")
    scheduler = DDIMScheduler(beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False)
    DiTPipeline(transformer=tiny_transformer(), vae=tiny_vae(), scheduler=scheduler).save_pretrained(folder)
    return folder


def forward_both(transformer, model, side, seed=0):
    torch.manual_seed(seed)
    null = model.y_embedder.num_classes
    x, t, y = torch.randn(2, 4, side, side), torch.tensor([999, 17]), torch.tensor([3, null])
    with torch.no_grad():
        return transformer(x, timestep=t, class_labels=y).sample, model(x, t.float(), y)


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_converted_model_equals_diffusers_at_two_resolutions(tmp_path, learn_sigma):
    transformer = tiny_transformer(learn_sigma)
    transformer.save_pretrained(tmp_path)
    converted = convert_pretrained(tmp_path)
    model = build_converted(converted)
    cfg = converted.record.model
    assert (cfg.learn_sigma, cfg.timestep_freq_shift, cfg.mlp_norm_eps, cfg.pos_embed_base_grid) == \
        (learn_sigma, 1, 1e-5, 4)
    assert converted.record.resolution == SAMPLE_SIZE * 8 and converted.record.vae is None  # no VAE: SD's 8 assumed
    for side in (SAMPLE_SIZE, 12):  # the trained 4x4 grid and 6x6, where diffusers rescales positions
        theirs, ours = forward_both(transformer, model, side)
        assert ours.shape == theirs.shape
        assert (ours - theirs).abs().max() < 1e-5


def test_a_hub_style_transformer2dmodel_config_converts_alike(tmp_path):
    """The hub's DiT folders name their class Transformer2DModel, whose defaults differ (attention_bias
    False, norm_type layer_norm): the keys they write decide, the ones they leave out take those defaults."""
    transformer = tiny_transformer()
    transformer.save_pretrained(tmp_path)
    reference = convert_pretrained(tmp_path).record.model
    edit_json(tmp_path / "config.json", _class_name="Transformer2DModel", cross_attention_dim=None)
    assert convert_pretrained(tmp_path).record.model == reference
    config = json.loads((tmp_path / "config.json").read_text())
    del config["attention_bias"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    refused(tmp_path, "sets attention_bias = False; ditkit's DiT computes True only")


def test_the_official_conventions_differ_from_diffusers(tmp_path):
    """Without the three convention fields the same weights compute something else: they matter."""
    transformer = tiny_transformer()
    transformer.save_pretrained(tmp_path)
    converted = convert_pretrained(tmp_path)
    for field, official in [("timestep_freq_shift", 0), ("mlp_norm_eps", 1e-6), ("pos_embed_base_grid", None)]:
        setattr(converted.record.model, field, official)
        model = build_converted(converted)
        theirs, ours = forward_both(transformer, model, 12)
        assert (ours - theirs).abs().max() > 1e-6, field


def test_the_convention_fields_reproduce_diffusers_tables_exactly():
    from diffusers.models.embeddings import get_2d_sincos_pos_embed, get_timestep_embedding

    from ditkit.models.layers import sincos_pos_embed_2d, timestep_embedding

    t = torch.tensor([0.0, 17.0, 999.0])
    assert torch.equal(timestep_embedding(t, 256, freq_shift=1),
                       get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1))
    for side in (4, 6, 7):  # the trained 4x4 grid, and grids whose positions i * 4 / side round in float32
        theirs = get_2d_sincos_pos_embed(32, (side, side), base_size=4).float()
        assert torch.equal(sincos_pos_embed_2d(32, (side, side), base_grid=4), theirs)


def test_records_from_before_the_convention_fields_load_with_the_official_values():
    record = config_to_dict(model_config("DiT-Nano/4"))
    for field in ("timestep_freq_shift", "mlp_norm_eps", "pos_embed_base_grid"):
        del record[field]
    cfg = config_from_dict(record)
    assert (cfg.timestep_freq_shift, cfg.mlp_norm_eps, cfg.pos_embed_base_grid) == (0, 1e-6, None)


def test_pipeline_folder_record_and_export_round_trip(tmp_path, capsys, pipeline_folder):
    code, out, err = run_cli(capsys, "convert", str(pipeline_folder), "--out", str(tmp_path / "ckpt"))
    assert code == 0 and "dit (diffusers-dit), 16 px, 1000 classes" in out, err
    model, record = load_checkpoint(tmp_path / "ckpt")
    d = record.diffusion
    assert (d.objective, d.scheduler["_class_name"], d.step_like_dit_pipeline, d.cfg_scale) == \
        ("ddpm", "DDIMScheduler", True, 4.0)
    assert d.timestep_spacing == d.scheduler["timestep_spacing"]  # the pipeline's own spacing, kept
    assert record.vae == str((pipeline_folder / "vae").resolve()) and record.resolution == SAMPLE_SIZE * 2
    exported = tmp_path / "exported"
    code, _, err = run_cli(capsys, "export", str(tmp_path / "ckpt"), "--to", "diffusers", str(exported))
    assert code == 0, err
    again = convert_pretrained(exported)
    assert again.record.model == record.model and again.record.diffusion == record.diffusion
    assert again.state.keys() == model.state_dict().keys()
    assert all(torch.equal(again.state[k], v) for k, v in model.state_dict().items())
    loaded = DiTTransformer2DModel.from_pretrained(exported / "transformer")
    theirs, ours = forward_both(loaded, model, SAMPLE_SIZE)
    assert (ours - theirs).abs().max() < 1e-5


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, DDPMScheduler])
def test_sampling_a_converted_pipeline_gives_ditpipelines_images(tmp_path, capsys, pipeline_folder,
                                                                 scheduler_class):
    """DDIM (deterministic) and DDPM (its step noise drawn for the doubled batch, from the global generator
    that torch.manual_seed returns)."""
    folder = pipeline_folder
    if scheduler_class is DDPMScheduler:
        folder = tmp_path / "ddpm-pipeline"
        pipe = DiTPipeline.from_pretrained(pipeline_folder)
        pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        pipe.save_pretrained(folder)
    labels, seed, steps = [3, 7, 999], 5, 4
    pipe = DiTPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(class_labels=labels, guidance_scale=4.0, num_inference_steps=steps,
                  generator=torch.manual_seed(seed), output_type="np").images
    model, record = load_pretrained(folder)
    ours = generate(model, record, num=3, labels=torch.tensor(labels), steps=steps, cfg_scale=4.0, seed=seed,
                    progress=False)
    ours = (ours.permute(0, 2, 3, 1).numpy() + 1) / 2
    assert np.abs(ours - theirs).max() < 1e-4


def test_ditkit_sample_on_a_converted_pipeline_writes_ditpipelines_image(tmp_path, capsys, pipeline_folder):
    pipe = DiTPipeline.from_pretrained(pipeline_folder)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(class_labels=[7], guidance_scale=4.0, num_inference_steps=3, generator=torch.manual_seed(2),
                  output_type="np").images[0]
    assert run_cli(capsys, "convert", str(pipeline_folder), "--out", str(tmp_path / "ckpt"))[0] == 0
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(tmp_path / "ckpt"), "-n", "1", "--labels", "7",
                           "--steps", "3", "--cfg", "4", "--seed", "2", "--out", str(tmp_path / "x.png"))
    assert code == 0, err
    side = SAMPLE_SIZE * 2
    ours = np.asarray(Image.open(tmp_path / "x.png"))[2:2 + side, 2:2 + side].astype(int)  # the grid's 2 px pad
    assert np.abs(ours - np.round(theirs * 255)).max() <= 1  # PNG: 8 bits


# -- one-line refusals ---------------------------------------------------------------------------------------
def saved_transformer(folder, **changes):
    tiny_transformer(**changes).save_pretrained(folder)
    return folder


def edit_json(file, **changes):
    file.write_text(json.dumps({**json.loads(file.read_text()), **changes}))


def refused(path, match, **options):
    with pytest.raises(DitkitError, match=match) as error:
        build_converted(convert_pretrained(path, ConvertOptions(**options)))
    assert "\n" not in str(error.value)


def test_a_folder_without_config_json_is_refused(tmp_path):
    (saved_transformer(tmp_path) / "config.json").unlink()
    refused(tmp_path, "no config.json in .*save_pretrained")


def test_a_config_of_another_class_is_refused(tmp_path):
    edit_json(saved_transformer(tmp_path) / "config.json", _class_name="UNet2DModel")
    refused(tmp_path, "describes a UNet2DModel, not a DiTTransformer2DModel")


def test_settings_ditkit_does_not_compute_are_refused(tmp_path):
    edit_json(saved_transformer(tmp_path) / "config.json", norm_elementwise_affine=True)
    refused(tmp_path, "sets norm_elementwise_affine = True; ditkit's DiT computes False only")


def test_truncated_weights_are_refused(tmp_path):
    weights = saved_transformer(tmp_path) / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    refused(tmp_path, "diffusion_pytorch_model.safetensors is damaged or truncated")


def test_pickled_weights_are_refused(tmp_path):
    tiny_transformer().save_pretrained(tmp_path, safe_serialization=False)
    refused(tmp_path, "holds diffusion_pytorch_model.bin, a pickle ditkit does not read")


def test_per_block_embedders_that_differ_are_refused(tmp_path):
    saved_transformer(tmp_path, tied=False)
    refused(tmp_path, "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.weight differs from block 0's")


def test_a_scheduler_ditkit_cannot_express_is_refused(tmp_path, pipeline_folder):
    shutil.copytree(pipeline_folder, tmp_path / "p")
    edit_json(tmp_path / "p" / "scheduler" / "scheduler_config.json", beta_schedule="scaled_linear")
    refused(tmp_path / "p", "sets beta_schedule = 'scaled_linear'; ditkit's DDPM objective is DiT's schedule")


def test_contradicting_options_are_refused(tmp_path):
    refused(saved_transformer(tmp_path), "--num-heads 3 contradicts", num_heads=3)
    refused(tmp_path, "--resolution 256 contradicts", resolution=256)


def ditkit_checkpoint(folder, vae, **overrides):
    """A ditkit DiT checkpoint with diffusers' conventions, 4 latent channels and `vae`."""
    model = tiny_backbone("dit", randomize=0.05, **{"in_channels": 4, "vae_scale": 2, "timestep_freq_shift": 1,
                                                    **overrides})
    record = RunRecord(model=model.config, diffusion=DiffusionSettings(objective="ddpm"),
                       data=DataSettings(resolution=16, vae=str(vae), class_names=list("abcde")))
    return save_weights(folder, model.state_dict(), record), model


def test_a_ditkit_trained_dit_exports_and_samples_in_ditpipeline(tmp_path, pipeline_folder):
    ckpt, model = ditkit_checkpoint(tmp_path / "ckpt", pipeline_folder / "vae")
    export_diffusers(ckpt, tmp_path / "out")
    pipe = DiTPipeline.from_pretrained(tmp_path / "out")
    assert type(pipe.scheduler).__name__ == "DDIMScheduler" and pipe.labels["c"] == 2
    theirs, ours = forward_both(pipe.transformer, model, 8)
    assert (ours - theirs).abs().max() < 1e-5
    pipe.set_progress_bar_config(disable=True)
    assert pipe(class_labels=[2], guidance_scale=1.0, num_inference_steps=2, output_type="np").images.shape == \
        (1, 16, 16, 3)


@pytest.mark.parametrize("overrides,message", [
    (dict(mixer="clear", mixer_options={"radius": 2}), "diffusers' DiT has no clear attention"),
    (dict(timestep_freq_shift=0), "diffusers' DiT embeds timesteps .*-i/127.*timestep_freq_shift=1"),
    (dict(class_dropout_prob=0.0), "diffusers' DiT has a null-class row .* without class dropout"),
])
def test_export_refuses_what_diffusers_dit_cannot_express(tmp_path, pipeline_folder, overrides, message):
    ckpt, _ = ditkit_checkpoint(tmp_path / "ckpt", pipeline_folder / "vae", **overrides)
    with pytest.raises(DitkitError, match=f"cannot export to diffusers: {message}") as error:
        export_diffusers(ckpt, tmp_path / "out")
    assert "\n" not in str(error.value)


def test_an_official_timestep_dit_exports_on_request_with_the_difference_reported(tmp_path, pipeline_folder, capsys):
    """The hub's DiT folders are the official weights under diffusers' timestep frequencies: allowed when
    asked, and the export says by how much the outputs moved (equal to running ditkit with shift 1)."""
    ckpt, model = ditkit_checkpoint(tmp_path / "ckpt", pipeline_folder / "vae", timestep_freq_shift=0)
    code, out, _ = run_cli(capsys, "export", str(ckpt), str(tmp_path / "out"), "--approximate-timesteps")
    assert code == 0 and "approximation: diffusers' timestep frequencies move the outputs by" in out
    moved = json.loads((tmp_path / "out" / "export_report.json").read_text())["timestep_approximation"]
    assert 0 < moved["mean_abs"] <= moved["max_abs"]
    pipe = DiTPipeline.from_pretrained(tmp_path / "out")
    shifted = tiny_backbone("dit", **{"in_channels": 4, "vae_scale": 2, "timestep_freq_shift": 1})
    shifted.load_state_dict(model.state_dict())
    theirs, ours = forward_both(pipe.transformer, shifted, 8)
    assert (ours - theirs).abs().max() < 1e-5


def official_respacing(num_train: int, steps: int) -> list[int]:
    """DiT's space_timesteps(num_train, [steps]) for one section, from its definition: indices
    round(k * (num_train - 1) / (steps - 1)) for k < steps (one step: 0)."""
    stride = (num_train - 1) / (steps - 1) if steps > 1 else 1
    return sorted({round(k * stride) for k in range(steps)}, reverse=True)


@pytest.mark.parametrize("spacing,expected", [("official", "linspace"), ("leading", "leading"),
                                              ("trailing", "trailing")])
def test_an_export_keeps_the_run_s_timesteps(tmp_path, pipeline_folder, spacing, expected):
    model = tiny_backbone("dit", randomize=0.05, in_channels=4, vae_scale=2, timestep_freq_shift=1)
    record = RunRecord(model=model.config, diffusion=DiffusionSettings(objective="ddpm", timestep_spacing=spacing),
                       data=DataSettings(resolution=16, vae=str(pipeline_folder / "vae"), class_names=list("abcde")))
    ckpt = save_weights(tmp_path / "spaced", model.state_dict(), record)
    export_diffusers(ckpt, tmp_path / "out")
    scheduler = DiTPipeline.from_pretrained(tmp_path / "out").scheduler
    assert scheduler.config.timestep_spacing == expected
    if spacing == "official":  # the official respacing's timesteps, at any step count
        for steps in (7, 25, 250):
            scheduler.set_timesteps(steps)
            assert scheduler.timesteps.tolist() == official_respacing(1000, steps)
