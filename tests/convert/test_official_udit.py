"""Official U-DiT checkpoints (github YuchuanTian/U-DiT) -> ditkit, offline with tiny models.

The official files are made here from ditkit models by `to_official`, the inverse of the
converter's mapping written independently; `test_official_layout_is_the_code_s` pins it to the
key names and shapes read from the official udit_models.py, so the round trip cannot pass by
construction alone.
"""

import argparse
import re

import pytest
import torch

from ditkit.convert import official_udit
from ditkit.convert.pretrained import ConvertOptions, convert_pretrained, load_pretrained
from ditkit.errors import DitkitError
from ditkit.models import build_model, model_config
from helpers import run_cli

STAGE_NAMES = ("encoder_level_1", "encoder_level_2", "latent", "decoder_level_2", "decoder_level_1")


def official_pair_layout(p: int, dim: int, heads: int, hidden: int) -> dict[str, tuple]:
    """Pair p of a U_DiTBlock at width `dim` (udit_models.py: DownSample_Attn with bias=True and
    dwconv5 downsampler, FeedForward with rep=1, adaLN_modulation{p} = SiLU + Linear)."""
    return {
        f"attn{p}.logit_scale": (heads, 1, 1),
        f"attn{p}.to_qkv.weight": (3 * dim, dim), f"attn{p}.to_qkv.bias": (3 * dim,),
        f"attn{p}.to_out.weight": (dim, dim, 1, 1), f"attn{p}.to_out.bias": (dim,),
        f"attn{p}.downsampler.layer.weight": (dim, 1, 5, 5), f"attn{p}.downsampler.layer.bias": (dim,),
        f"mlp{p}.project_in.0.weight": (hidden // 2, dim, 1, 1), f"mlp{p}.project_in.0.bias": (hidden // 2,),
        f"mlp{p}.project_in.1.weight": (hidden, hidden // 2, 1, 1), f"mlp{p}.project_in.1.bias": (hidden,),
        f"mlp{p}.dwconv.0.weight": (hidden, 1, 5, 5), f"mlp{p}.dwconv.0.bias": (hidden,),
        f"mlp{p}.dwconv.1.weight": (hidden, 1, 3, 3), f"mlp{p}.dwconv.1.bias": (hidden,),
        f"mlp{p}.dwconv.2.weight": (hidden, 1, 1, 1), f"mlp{p}.dwconv.2.bias": (hidden,),
        f"mlp{p}.project_out.0.weight": (hidden // 2, hidden, 1, 1), f"mlp{p}.project_out.0.bias": (hidden // 2,),
        f"mlp{p}.project_out.1.weight": (dim, hidden // 2, 1, 1), f"mlp{p}.project_out.1.bias": (dim,),
        f"adaLN_modulation{p}.1.weight": (6 * dim, dim), f"adaLN_modulation{p}.1.bias": (6 * dim,),
    }


def official_top_layout(C: int, in_channels: int, rows: int, out_channels: int) -> dict[str, tuple]:
    """Everything of U_DiT outside the blocks (udit_models.py)."""
    layout = {"x_embedder.proj.weight": (C, in_channels, 3, 3), "x_embedder.proj.bias": (C,)}
    for k, width in ((1, C), (2, 2 * C), (3, 4 * C)):
        layout |= {f"t_embedder_{k}.mlp.0.weight": (width, 256), f"t_embedder_{k}.mlp.0.bias": (width,),
                   f"t_embedder_{k}.mlp.2.weight": (width, width), f"t_embedder_{k}.mlp.2.bias": (width,),
                   f"y_embedder_{k}.embedding_table.weight": (rows, width)}
    return layout | {
        "down1_2.body.0.weight": (C // 2, C, 3, 3), "down2_3.body.0.weight": (C, 2 * C, 3, 3),
        "up3_2.body.0.weight": (8 * C, 4 * C, 3, 3), "up2_1.body.0.weight": (4 * C, 2 * C, 3, 3),
        "reduce_chan_level2.weight": (2 * C, 4 * C, 1, 1), "reduce_chan_level2.bias": (2 * C,),
        "reduce_chan_level1.weight": (2 * C, 2 * C, 1, 1), "reduce_chan_level1.bias": (2 * C,),
        "output.weight": (2 * C, 2 * C, 3, 3), "output.bias": (2 * C,),
        "final_layer.adaLN_modulation.1.weight": (4 * C, 2 * C), "final_layer.adaLN_modulation.1.bias": (4 * C,),
        "final_layer.out_proj.weight": (out_channels, 2 * C, 3, 3), "final_layer.out_proj.bias": (out_channels,),
    }


TO_OFFICIAL = (  # ditkit -> official, applied in order
    (r"^x_embedder\.", "x_embedder.proj."),
    (r"^conditions\.(\d)\.([ty])_embedder\.", lambda m: f"{m[2]}_embedder_{int(m[1]) + 1}."),
    (r"^stages\.(\d)\.", lambda m: STAGE_NAMES[int(m[1])] + "."),
    (r"\.pairs\.(\d)\.mixer\.(qkv|proj|dwconv|logit_scale)",
     lambda m: f".attn{int(m[1]) + 1}." + {"qkv": "to_qkv", "proj": "to_out", "dwconv": "downsampler.layer",
                                           "logit_scale": "logit_scale"}[m[2]]),
    (r"\.pairs\.(\d)\.ffn\.", lambda m: f".mlp{int(m[1]) + 1}."),
    (r"\.pairs\.(\d)\.adaLN_modulation\.", lambda m: f".adaLN_modulation{int(m[1]) + 1}."),
    (r"^down\.(\d)\.", lambda m: ("down1_2", "down2_3")[int(m[1])] + ".body.0."),
    (r"^up\.(\d)\.", lambda m: ("up3_2", "up2_1")[int(m[1])] + ".body.0."),
    (r"^reduce\.(\d)\.", lambda m: ("reduce_chan_level2", "reduce_chan_level1")[int(m[1])] + "."),
    (r"^final_modulation\.", "final_layer.adaLN_modulation."),
    (r"^final_conv\.", "final_layer.out_proj."),
)


def to_official(state: dict) -> dict:
    """A ditkit U-DiT state dict in the official layout (to_out is a 1x1 conv there)."""
    official = {}
    for key, value in state.items():
        for pattern, replacement in TO_OFFICIAL:
            key = re.sub(pattern, replacement, key)
        official[key] = value[:, :, None, None] if key.endswith(".to_out.weight") else value.clone()
    return official


def folded_official(model) -> dict:
    """The official layout with every FFN in the single-conv (folded) form: official rep=0 keys."""
    state = to_official(model.state_dict())
    for name, module in model.named_modules():
        if name.endswith(".ffn"):
            prefix = to_official({f"{name}.x": torch.zeros(1)}).popitem()[0][:-2]
            for key in [k for k in state if k.startswith(prefix + ".")]:
                del state[key]
            parts = ("project_in.weight", "project_in.bias", "dwconv.weight", "dwconv.bias", "project_out.weight",
                     "project_out.bias")
            state |= {f"{prefix}.{part}": t.clone() for part, t in zip(parts, module.folded(), strict=True)}
    return state


def source_model(**overrides):
    """U-DiT-Nano with 10 classes, random weights everywhere (zero init broken)."""
    model = build_model(model_config("U-DiT-Nano", hidden_size=16, num_classes=10, **overrides))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def outputs(model, train: bool = False):
    torch.manual_seed(1)
    x, t, y = torch.randn(2, model.config.in_channels, 16, 16), torch.tensor([3.0, 800.0]), torch.tensor([1, 9])
    with torch.no_grad():
        return model.train(train)(x, t, y)


def one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def test_official_layout_is_the_code_s():
    model = source_model()
    official = {k: tuple(v.shape) for k, v in to_official(model.state_dict()).items()}
    dim, hidden = 16, 32
    block = {f"encoder_level_1.0.{k}": v for p in (1, 2) for k, v in official_pair_layout(p, dim, 2, hidden).items()}
    assert {k: v for k, v in official.items() if k.startswith("encoder_level_1.0.")} == block
    top = official_top_layout(16, 4, 11, 8)
    assert {k: v for k, v in official.items() if not k.startswith(STAGE_NAMES)} == top
    depths = (1, 1, 2, 1, 1)
    expected = dict(top)
    for stage, width, depth in zip(STAGE_NAMES, (16, 32, 64, 32, 32), depths, strict=True):
        for n in range(depth):
            for p in (1, 2):
                expected |= {f"{stage}.{n}.{k}": v for k, v in official_pair_layout(p, width, 2, 2 * width).items()}
    assert official == expected
    assert all(official_udit.ditkit_key(k) is not None and official_udit.official_key(official_udit.ditkit_key(k)) == k
               for k in official)


def test_bare_state_dict_converts_exactly(tmp_path):
    source = source_model()
    torch.save(to_official(source.state_dict()), tmp_path / "U-DiT-Nano.pt")
    model, record = load_pretrained(tmp_path / "U-DiT-Nano.pt")
    assert record.model == source.config
    d = record.diffusion
    assert (d.objective, d.learn_sigma, d.sampler, d.sample_steps, d.cfg_scale, d.guidance_channels) == \
        ("ddpm", True, "ddpm", 250, 1.5, 3)
    assert d.timestep_spacing == "official"  # the official DiT sampler, as sample_ddp.py
    assert record.resolution == 256 and record.data.source is None
    assert record.origin == {"format": "official-udit", "path": str((tmp_path / "U-DiT-Nano.pt").resolve()),
                             "weights": "state dict"}
    assert torch.equal(outputs(model), outputs(source))
    assert torch.equal(outputs(model, train=True), outputs(source, train=True))


def test_training_checkpoint_prefers_ema_and_reads_its_args(tmp_path):
    ema, raw = source_model(learn_sigma=False), source_model(learn_sigma=False)
    checkpoint = {"model": to_official(raw.state_dict()), "ema": to_official(ema.state_dict()),
                  "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
                  "args": argparse.Namespace(image_size=512, num_classes=11, model="U-DiT-custom")}
    torch.save(checkpoint, tmp_path / "0400000.pt")
    model, record = load_pretrained(tmp_path / "0400000.pt")
    assert torch.equal(outputs(model), outputs(ema))
    assert record.origin["weights"] == "ema" and record.origin["unused"] == ["model", "opt"]
    assert record.resolution == 512 and not record.model.learn_sigma and not record.diffusion.learn_sigma
    # args.num_classes equal to the table's rows: no null row, so no class dropout
    assert (record.model.num_classes, record.model.class_dropout_prob) == (11, 0.0)
    _, record = load_pretrained(tmp_path / "0400000.pt", resolution=128)
    assert record.resolution == 128

    torch.save({"model": checkpoint["model"], "args": checkpoint["args"]}, tmp_path / "no-ema.pt")
    model, record = load_pretrained(tmp_path / "no-ema.pt")
    assert record.origin["weights"] == "model" and torch.equal(outputs(model), outputs(raw))


@pytest.mark.parametrize("name", ["U-DiT-S", "U-DiT-B"])
def test_config_of_published_widths_is_inferred(name):
    depths = (1, 2, 1, 1, 1)  # depth-reduced; the widths, heads and FFN of the published config
    with torch.device("meta"):
        config = model_config(name, depths=depths)
        shapes = {k: v.shape for k, v in build_model(config).state_dict().items()}
    state = to_official({k: torch.zeros(()).expand(shape) for k, shape in shapes.items()})  # no memory
    inferred = official_udit.infer_config(state, {}, ConvertOptions())
    assert inferred == config and inferred.num_heads == {"U-DiT-S": 4, "U-DiT-B": 8}[name]
    assert official_udit.renamed_state(state, inferred).keys() == shapes.keys()


def test_folded_ffn_converts_exactly(tmp_path):
    source = source_model()
    torch.save(folded_official(source), tmp_path / "folded.pt")
    model, record = load_pretrained(tmp_path / "folded.pt")
    assert record.model == source.config and record.origin["folded_ffns"] == 2 * sum(source.config.depths)
    assert torch.equal(outputs(model), outputs(source))  # the fold gives back the very same tensors
    torch.testing.assert_close(outputs(model, train=True), outputs(source, train=True), atol=1e-5, rtol=1e-5)
    for (name, ours), theirs in zip(model.named_modules(), source.modules(), strict=True):
        if name.endswith(".ffn"):
            assert all(torch.equal(a, b) for a, b in zip(ours.folded(), theirs.folded(), strict=True))


def test_folded_ffn_narrower_than_the_training_form_is_refused(tmp_path):
    torch.save(folded_official(source_model(mlp_ratio=1.5)), tmp_path / "narrow.pt")
    with pytest.raises(DitkitError, match=r"FFN encoder_level_1\.0\.mlp1 widens 16 channels to 24.*mlp_ratio >= 2") \
            as error:
        load_pretrained(tmp_path / "narrow.pt")
    one_line(error)


class Config:  # a pickled class other than argparse.Namespace
    image_size = 256


def test_pickled_classes_are_refused(tmp_path):
    torch.save({"ema": to_official(source_model().state_dict()), "args": Config()}, tmp_path / "unsafe.pt")
    with pytest.raises(DitkitError, match="pickles the Python class .*Config, which ditkit does not run") as error:
        convert_pretrained(tmp_path / "unsafe.pt")
    one_line(error)


def test_truncated_file_is_one_line(tmp_path):
    torch.save(to_official(source_model().state_dict()), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DitkitError, match="is not a readable torch checkpoint .*truncated") as error:
        convert_pretrained(tmp_path / "cut.pt")
    one_line(error)


def test_another_architecture_is_refused_naming_what_does_not_match(tmp_path):
    dit = {"x_embedder.proj.weight": torch.zeros(32, 4, 2, 2), "pos_embed": torch.zeros(1, 64, 32),
           "blocks.0.attn.qkv.weight": torch.zeros(96, 32), "final_layer.linear.weight": torch.zeros(32, 32)}
    torch.save(dit, tmp_path / "DiT.pt")
    assert not official_udit.accepts(tmp_path / "DiT.pt")
    with pytest.raises(DitkitError, match=r"is not an official U-DiT: it has no y_embedder_1\.embedding_table\.weight, "
                                          r"final_layer\.out_proj\.weight, encoder_level_1/.*\.\* \(its keys begin "
                                          r"x_embedder\.proj\.weight, pos_embed") as error:
        official_udit.convert(tmp_path / "DiT.pt", ConvertOptions())
    one_line(error)
    torch.save({"ema": {"w": torch.zeros(1)}, "steps": 3}, tmp_path / "other.pt")
    with pytest.raises(DitkitError, match="in no format ditkit converts"):
        convert_pretrained(tmp_path / "other.pt")


def test_missing_unknown_and_misshapen_keys_are_named(tmp_path):
    state = to_official(source_model().state_dict())

    def refused(changed: dict, pattern: str):
        torch.save(changed, tmp_path / "changed.pt")
        with pytest.raises(DitkitError, match=pattern) as error:
            convert_pretrained(tmp_path / "changed.pt")
        one_line(error)

    refused({k: v for k, v in state.items() if k != "latent.1.mlp2.dwconv.1.weight"},
            r"missing keys for the inferred U-DiT \(width 16, depths \[1, 1, 2, 1, 1\]\): "
            r"latent\.1\.mlp2\.dwconv\.1\.weight; an incomplete file")
    refused(state | {"encoder_level_1.0.attn1.rel_bias": torch.zeros(3), "extra": torch.zeros(1)},
            r"unknown keys .*: encoder_level_1\.0\.attn1\.rel_bias, extra;")
    refused(state | {"output.weight": torch.zeros(32, 32, 1, 1)},
            r"keys of the wrong shape .*: output\.weight \(32, 32, 1, 1\) \(expected \(32, 32, 3, 3\)\)")
    refused({k: v for k, v in state.items() if not k.endswith("logit_scale")}, "v1 \\(dot-product\\) attention")
    refused(state | {"final_layer.out_proj.weight": torch.zeros(5, 32, 3, 3)}, "5 output channels for 4 input")


def test_convert_then_sample_through_the_cli(tmp_path, capsys):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL(block_out_channels=(4, 4), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=2,
                        layers_per_block=1, sample_size=8)
    vae.save_pretrained(tmp_path / "vae")
    torch.save({"ema": to_official(source_model().state_dict()), "args": argparse.Namespace(image_size=32)},
               tmp_path / "0050000.pt")
    code, out, _ = run_cli(capsys, "convert", str(tmp_path / "0050000.pt"), "--out", str(tmp_path / "converted"),
                           "--vae", str(tmp_path / "vae"))
    assert code == 0 and "udit (official-udit), 32 px, 10 classes, sampling ddpm (ddpm) x 250, cfg 1.5" in out
    code, out, _ = run_cli(capsys, "sample", "--ckpt", str(tmp_path / "converted"), "--num", "1", "--steps", "2",
                           "--resolution", "32", "--out", str(tmp_path / "grid.png"))
    assert code == 0 and (tmp_path / "grid.png").is_file(), out
