"""facebookresearch/DiT checkpoints -> ditkit: key names, inferred config, safe loading, one-line errors.

The official layout is written out here from models.py (timm's PatchEmbed, Attention and Mlp), not
derived from ditkit's own keys, so a wrong mapping cannot pass by construction."""

import argparse
import json
import pickle

import numpy as np
import pytest
import torch

from ditkit import DitkitError
from ditkit.convert.pretrained import ConvertOptions, convert_pretrained, load_pretrained
from ditkit.diffusion.pipeline import sample_inputs
from ditkit.models.layers import sincos_pos_embed_2d
from helpers import run_cli


def official_state(depth=2, width=384, patch=2, channels=4, classes=1000, learn_sigma=True, side=32, mlp=4.0):
    """A DiT state dict in the official layout and shapes, random weights (the positions: sin-cos)."""
    D, hidden, out = width, int(width * mlp), channels * (2 if learn_sigma else 1)
    shapes = {
        "x_embedder.proj.weight": (D, channels, patch, patch), "x_embedder.proj.bias": (D,),
        "t_embedder.mlp.0.weight": (D, 256), "t_embedder.mlp.0.bias": (D,),
        "t_embedder.mlp.2.weight": (D, D), "t_embedder.mlp.2.bias": (D,),
        "y_embedder.embedding_table.weight": (classes + 1, D),
        "final_layer.linear.weight": (patch * patch * out, D), "final_layer.linear.bias": (patch * patch * out,),
        "final_layer.adaLN_modulation.1.weight": (2 * D, D), "final_layer.adaLN_modulation.1.bias": (2 * D,),
    }
    for n in range(depth):
        shapes |= {f"blocks.{n}.attn.qkv.weight": (3 * D, D), f"blocks.{n}.attn.qkv.bias": (3 * D,),
                   f"blocks.{n}.attn.proj.weight": (D, D), f"blocks.{n}.attn.proj.bias": (D,),
                   f"blocks.{n}.mlp.fc1.weight": (hidden, D), f"blocks.{n}.mlp.fc1.bias": (hidden,),
                   f"blocks.{n}.mlp.fc2.weight": (D, hidden), f"blocks.{n}.mlp.fc2.bias": (D,),
                   f"blocks.{n}.adaLN_modulation.1.weight": (6 * D, D),
                   f"blocks.{n}.adaLN_modulation.1.bias": (6 * D,)}
    generator = torch.Generator().manual_seed(0)
    state = {key: torch.randn(shape, generator=generator) * 0.05 for key, shape in shapes.items()}
    state["pos_embed"] = sincos_pos_embed_2d(D, (side // patch, side // patch)).unsqueeze(0)
    return state


@pytest.mark.parametrize("name,width,patch,heads", [("S/2", 384, 2, 6), ("B/4", 768, 4, 12), ("XL/2", 1152, 2, 16)])
def test_config_is_inferred_from_the_tensors(tmp_path, name, width, patch, heads):
    path = tmp_path / "dit.pt"
    torch.save(official_state(depth=1, width=width, patch=patch), path)
    record = convert_pretrained(path).record
    cfg = record.model
    assert (cfg.depth, cfg.hidden_size, cfg.patch_size, cfg.num_heads) == (1, width, patch, heads)
    assert (cfg.in_channels, cfg.learn_sigma, cfg.num_classes, cfg.mlp_ratio) == (4, True, 1000, 4.0)
    assert record.resolution == 256 and record.origin["format"] == "facebookresearch-dit"
    d = record.diffusion
    assert (d.objective, d.sampler, d.sample_steps, d.cfg_scale, d.guidance_channels) == ("ddpm", "ddpm", 250, 4.0, 3)


def test_weights_land_under_ditkit_names_and_the_model_runs(tmp_path):
    source = official_state(depth=2, width=64, classes=10, side=16, learn_sigma=False)
    path = tmp_path / "dit.pt"
    torch.save(source, path)
    model, record = load_pretrained(path, num_heads=4)
    state = model.state_dict()
    assert torch.equal(state["x_embedder.weight"], source["x_embedder.proj.weight"])
    assert torch.equal(state["blocks.1.mixer.qkv.bias"], source["blocks.1.attn.qkv.bias"])
    assert torch.equal(state["blocks.0.mlp.fc2.weight"], source["blocks.0.mlp.fc2.weight"])
    assert "pos_embed" not in state and record.resolution == 128  # 16 latent cells x 8 pixels
    out = model(torch.randn(2, 4, 16, 16), torch.tensor([3.0, 700.0]), torch.tensor([1, 9]))
    assert out.shape == (2, 4, 16, 16) and out.abs().sum() > 0


def test_a_training_checkpoint_gives_its_ema_weights(tmp_path):
    ema, raw = official_state(depth=1, width=64, classes=10), official_state(depth=1, width=64, classes=10)
    raw = {k: v + 1 for k, v in raw.items()}
    path = tmp_path / "0050000.pt"
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []},
                "args": argparse.Namespace(image_size=512, model="DiT-S/2", num_classes=10)}, path)
    model, record = load_pretrained(path, num_heads=4)
    assert torch.equal(model.state_dict()["blocks.0.mixer.proj.weight"], ema["blocks.0.attn.proj.weight"])
    assert record.origin["weights"] == "ema" and record.resolution == 512  # train.py's args.image_size


class Payload:  # a class pickle would have to import and run
    def __reduce__(self):
        return (print, ("this must never run",))


@pytest.mark.parametrize("make,message", [
    (lambda p: torch.save({"model": official_state(depth=1), "trap": Payload()}, p), "pickles the Python class"),
    (lambda p: p.write_bytes(b"PK\x03\x04 truncated"), "not a readable torch checkpoint"),
    (lambda p: p.write_bytes(pickle.dumps({"model": Payload()}, protocol=4)), "is a plain Python pickle"),
    (lambda p: torch.save({"encoder.weight": torch.zeros(2)}, p), "in no format ditkit converts"),
    (lambda p: torch.save({**official_state(depth=1), "blocks.0.attn.q_bias": torch.zeros(384)}, p),
     "unknown keys blocks.0.attn.q_bias"),
    (lambda p: torch.save({k: v for k, v in official_state(depth=2).items() if k != "blocks.1.mlp.fc1.bias"}, p),
     "missing keys blocks.1.mlp.fc1.bias"),
    (lambda p: torch.save({**official_state(depth=1), "pos_embed": torch.randn(1, 256, 384)}, p),
     "differs from DiT's fixed sin-cos table"),
])
def test_bad_files_are_refused_in_one_line(tmp_path, capsys, make, message):
    path = tmp_path / "bad.pt"
    make(path)
    code, _, err = run_cli(capsys, "convert", str(path), "--out", str(tmp_path / "out"))
    assert code == 2 and message in err and err.count("\n") == 1
    assert "this must never run" not in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_a_width_of_no_published_config_asks_for_the_heads(tmp_path):
    torch.save(official_state(depth=1, width=96), tmp_path / "odd.pt")
    with pytest.raises(DitkitError, match="give --num-heads"):
        convert_pretrained(tmp_path / "odd.pt")
    assert convert_pretrained(tmp_path / "odd.pt", ConvertOptions(num_heads=3)).record.model.num_heads == 3


@pytest.fixture(scope="module")
def converted_tiny(tmp_path_factory):
    """A converted official-layout DiT with a tiny random SD-style VAE (2 pixels per latent cell)."""
    from diffusers import AutoencoderKL

    root = tmp_path_factory.mktemp("official")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=4,
                        norm_num_groups=4, layers_per_block=1, sample_size=16)
    vae.save_pretrained(root / "vae")
    torch.save(official_state(depth=2, width=64, classes=10, side=8), root / "DiT-tiny.pt")
    from ditkit.cli.main import main

    assert main(["convert", str(root / "DiT-tiny.pt"), "--out", str(root / "ckpt"), "--vae", str(root / "vae"),
                 "--num-heads", "4", "--resolution", "16"]) == 0
    return root


def test_a_converted_checkpoint_samples_and_counts_like_any_other(converted_tiny, tmp_path, capsys):
    ckpt = str(converted_tiny / "ckpt")
    code, out, _ = run_cli(capsys, "sample", "--ckpt", ckpt, "-n", "2", "--steps", "2",
                           "--out", str(tmp_path / "g.png"))
    assert code == 0 and "2 images, 16x16" in out
    code, out, _ = run_cli(capsys, "info", ckpt, "--mixer", "clear", "--mixer-opt", "radius=2")
    assert code == 0 and "mixer clear" in out and "16x16 px -> 4x8x8 latent (VAE /2) -> 16 tokens" in out


def test_ditkit_sample_takes_another_timestep_spacing(converted_tiny, tmp_path, capsys):
    ckpt = str(converted_tiny / "ckpt")
    images = {}
    for spacing in ("official", "trailing"):
        out = tmp_path / f"{spacing}.png"
        code, _, _ = run_cli(capsys, "sample", "--ckpt", ckpt, "-n", "1", "--steps", "3", "--timestep-spacing",
                             spacing, "--out", str(out))
        assert code == 0
        images[spacing] = out.read_bytes()
    assert images["official"] != images["trailing"]
    code, _, err = run_cli(capsys, "sample", "--ckpt", ckpt, "--timestep-spacing", "official", "--sampler", "ddim",
                           "--out", str(tmp_path / "g.png"))
    assert code == 2 and "timestep spacing official is DiT's DDPM sampler, not ddim" in err


def test_a_latent_checkpoint_without_a_vae_says_how_to_decode(tmp_path, capsys):
    torch.save(official_state(depth=1, width=64, classes=10, side=8), tmp_path / "dit.pt")
    code, _, _ = run_cli(capsys, "convert", str(tmp_path / "dit.pt"), "--out", str(tmp_path / "c"), "--num-heads", "4")
    assert code == 0
    code, _, err = run_cli(capsys, "sample", "--ckpt", str(tmp_path / "c"), "--steps", "1", "--out",
                           str(tmp_path / "g.png"))
    assert code == 2 and "names no VAE" in err and "--vae PATH" in err


def test_a_converted_dit_distils_into_clear_with_no_extra_step(converted_tiny, tmp_path, capsys):
    out = tmp_path / "student"
    code, stdout, _ = run_cli(capsys, "distill", "--teacher", str(converted_tiny / "ckpt"), "--radius", "2",
                              "--num-samples", "4", "--steps", "1", "--batch-size", "2", "--eval-num", "1",
                              "--eval-steps", "1", "--teacher-steps", "2", "--out", str(out), "--no-progress")
    assert code == 0 and "student PSNR" in stdout
    report = json.loads((out / "agreement.json").read_text())
    assert set(report["student"]) == {"16", "32"}


# -- sampling as the official sample.py does ---------------------------------------------------------
def official_respacing(steps: int) -> list[int]:
    """space_timesteps(1000, [steps]): one section, a fractional stride, positions rounded (ascending)."""
    stride = 999 / (steps - 1) if steps > 1 else 1
    return sorted({round(position) for position in np.cumsum([0.0] + [stride] * (steps - 1))})


def official_ddpm_loop(model, noise, labels, steps, cfg_scale, generator, learn_sigma):
    """p_sample_loop of the official SpacedDiffusion, written from its formulas: float64 tables read
    as float32, learned-range (or fixed-large) variance, forward_with_cfg guiding 3 channels, no noise at t=0."""
    kept = official_respacing(steps)
    train_alphas_cumprod = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    alphas_cumprod = train_alphas_cumprod[kept]
    previous = np.append(1.0, alphas_cumprod[:-1])
    betas = 1 - alphas_cumprod / previous
    posterior_variance = betas * (1 - previous) / (1 - alphas_cumprod)
    clipped_log = np.log(np.append(posterior_variance[1], posterior_variance[1:]))
    fixed_large_log = np.log(np.append(posterior_variance[1], betas[1:]))
    coef_x0 = betas * np.sqrt(previous) / (1 - alphas_cumprod)
    coef_xt = (1 - previous) * np.sqrt(1 - betas) / (1 - alphas_cumprod)

    def at(table, i):
        return torch.from_numpy(table)[i].float()

    x, C = noise, noise.shape[1]
    for i in reversed(range(len(kept))):
        t = torch.full((2 * len(x),), float(kept[i]))
        out = model(torch.cat([x, x]), t, torch.cat([labels, torch.full_like(labels, 10)]))
        cond, uncond = out.chunk(2)
        eps = torch.cat([uncond[:, :3] + cfg_scale * (cond[:, :3] - uncond[:, :3]), cond[:, 3:C]], dim=1)
        pred_x0 = at(np.sqrt(1 / alphas_cumprod), i) * x - at(np.sqrt(1 / alphas_cumprod - 1), i) * eps
        mean = at(coef_x0, i) * pred_x0 + at(coef_xt, i) * x
        if learn_sigma:
            frac = (cond[:, C:] + 1) / 2
            log_variance = frac * at(np.log(betas), i) + (1 - frac) * at(clipped_log, i)
        else:
            log_variance = at(fixed_large_log, i)
        x = mean if i == 0 else mean + torch.exp(0.5 * log_variance) * torch.randn(x.shape, generator=generator)
    return x


def relative_difference(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("steps,learn_sigma", [(25, True), (250, True), (25, False)])
def test_a_converted_dit_samples_as_the_official_sampler(tmp_path, steps, learn_sigma):
    torch.save(official_state(depth=1, width=32, classes=10, side=4, learn_sigma=learn_sigma), tmp_path / "dit.pt")
    model, record = load_pretrained(tmp_path / "dit.pt", num_heads=4)  # without learned sigma: issue 27 item 12
    assert record.diffusion.timestep_spacing == "official" and record.diffusion.learn_sigma == learn_sigma
    labels = torch.tensor([3, 8])
    sampling = record.sampling(num=2, steps=steps, labels=labels, seed=5)
    with torch.no_grad():
        ours = sample_inputs(model.eval(), record, sampling, progress=False)
        generator = torch.Generator().manual_seed(5)
        noise = torch.randn((2, 4, 4, 4), generator=generator)
        official = official_ddpm_loop(model, noise, labels, steps, 4.0, generator, learn_sigma)
        trailing = sample_inputs(model, record, record.sampling(sampling, timestep_spacing="trailing"),
                                 progress=False)
    assert relative_difference(ours, official) < 1e-5
    assert relative_difference(trailing, official) > 1e-4  # the spacing ditkit used before: not the official
