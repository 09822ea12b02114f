"""LoRA with CLEAR students (`ditkit.diffusers.lora`, `ditkit generate --lora FILE[:SCALE]`). The LoRAs are
tiny random ones built here with peft and saved by diffusers' own `save_lora_weights` (its FLUX layout,
`transformer.<module>.lora_A.weight`, alpha in the metadata); the student is a file in CLEAR's official
layout over the tiny FLUX pipeline's transformer."""

import copy
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ditkit.checkpoint import save_weights
from ditkit.diffusers import pipelines
from ditkit.diffusers.clear import apply_clear, student_parameters
from ditkit.diffusers.lora import check_loras, lora_settings, parse_lora
from ditkit.diffusers.pipelines import Attention
from ditkit.errors import DitkitError
from ditkit.record import DataSettings, DiffusersModel, DiffusionSettings, RunRecord
from helpers import run_cli
from tiny_diffusers import flux_ids, flux_pipeline, sd3_pipeline

RANK, ALPHA, SCALE = 2, 6.0, 0.7
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "proj_out"]  # student layers and others
GRID, TEXT = (4, 6), 5  # divisible by the down factor 2


def random_lora(transformer, path, seed=3):
    """A random LoRA over `transformer` saved as diffusers saves FLUX LoRAs; returns {module: (A, B)}."""
    from peft import LoraConfig, get_peft_model_state_dict

    from diffusers import FluxPipeline

    model = copy.deepcopy(transformer)
    config = LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS)
    model.add_adapter(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".lora_" in name:  # peft starts B at zero: a delta of zero would test nothing
                parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    state = get_peft_model_state_dict(model)
    FluxPipeline.save_lora_weights(path.parent, transformer_lora_layers=state, weight_name=path.name,
                                   transformer_lora_adapter_metadata=config.to_dict())
    factors = {}
    for key, value in state.items():
        module, factor = key.rsplit(".lora_", 1)
        factors.setdefault(module, {})[factor[0]] = value
    return {module: (pair["A"], pair["B"]) for module, pair in factors.items()}


def official_student(transformer, path, seed=2):
    """Random student weights in CLEAR's official layout (attention projections, pooling weights f=2)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: 0.3 * torch.randn(p.shape, generator=generator) for name, p in transformer.named_parameters()
               if any(f".attn.{part}." in name for part in ("to_q", "to_k", "to_v", "to_out"))}
    for layer in transformer.attn_processors:
        tensors[f"{layer}.spatial_weight"] = (0.25 + 0.05 * torch.randn(4, generator=generator)).reshape(
            1, 1, 1, 2, 1, 2, 1)
    save_file(tensors, str(path))
    return tensors


def inputs(transformer):
    generator = torch.Generator().manual_seed(1)
    config = transformer.config
    return dict(hidden_states=torch.randn(1, GRID[0] * GRID[1], config.in_channels, generator=generator),
                encoder_hidden_states=torch.randn(1, TEXT, config.joint_attention_dim, generator=generator),
                pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=generator),
                timestep=torch.tensor([0.5]), guidance=torch.tensor([3.5]), img_ids=flux_ids(GRID),
                txt_ids=torch.zeros(TEXT, 3))


def output(transformer):
    with torch.no_grad():
        return transformer(**inputs(transformer), return_dict=False)[0]


@pytest.fixture
def flux(tmp_path):
    torch.manual_seed(0)
    pipe = flux_pipeline(False)
    stock = copy.deepcopy(pipe.transformer)
    factors = random_lora(stock, tmp_path / "style.safetensors")
    student = official_student(stock, tmp_path / "clear_local_2_down_2.safetensors")
    return pipe, stock, factors, student, tmp_path


def ditkit_student(stock, folder):
    """A student as `ditkit distill` saves one (CLEAR r=2, f=2; its trained parameters random here);
    returns its tensors under the transformer's names."""
    student = copy.deepcopy(stock)
    apply_clear(student, 2, 2)
    generator = torch.Generator().manual_seed(4)
    state = {name: p.detach() + 0.1 * torch.randn(p.shape, generator=generator)
             for name, p in student_parameters(student).items()}
    record = RunRecord(DiffusersModel("FluxTransformer2DModel", "teacher"), DiffusionSettings(),
                       DataSettings(resolution=32), distill={"radius": 2, "down_factor": 2})
    save_weights(folder, {f"transformer.{name}": value for name, value in state.items()}, record)
    return state


def official_as_ditkit(tensors):
    return {key.replace("processor.spatial_weight", "processor.pool_weight"): value.reshape(-1)
            if key.endswith("spatial_weight") else value for key, value in tensors.items()}


def merged_by_hand(stock, student_state, factors):
    """CLEAR r=2, f=2, the student's weights (none: CLEAR's initial ones), then W + scale * (alpha / rank)
    * B @ A in every LoRA layer."""
    merged = copy.deepcopy(stock)
    apply_clear(merged, 2, 2, "reference")
    assert not merged.load_state_dict(student_state, strict=False).unexpected_keys
    with torch.no_grad():
        for module, (a, b) in factors.items():
            merged.get_submodule(module).weight += SCALE * ALPHA / RANK * b @ a
    return merged


@pytest.mark.parametrize("student, lora_first", [("official", True), ("official", False), ("ditkit", True),
                                                 ("ditkit", False), ("none", True)],
                         ids=["official-lora-first", "official-student-first", "ditkit-lora-first",
                              "ditkit-student-first", "clear-without-student"])
def test_lora_over_a_student_equals_the_weights_merged_by_hand(flux, student, lora_first):
    pipe, stock, factors, official, root = flux
    if student == "official":
        attention, state = (Attention(clear="backend=reference", student=root / "clear_local_2_down_2.safetensors"),
                            official_as_ditkit(official))
    elif student == "ditkit":
        state = ditkit_student(stock, root / "student")
        attention = Attention(clear="backend=reference", student=root / "student")
    else:
        attention, state = Attention(clear="radius=2,down_factor=2,backend=reference"), {}

    def load_lora():
        pipe.load_lora_weights(str(root / "style.safetensors"), adapter_name="lora_0")
        pipe.set_adapters(["lora_0"], adapter_weights=[SCALE])

    for step in ([load_lora, lambda: attention.apply(pipe.transformer)] if lora_first
                 else [lambda: attention.apply(pipe.transformer), load_lora]):
        step()
    expected = output(merged_by_hand(stock, state, factors))
    assert torch.allclose(output(pipe.transformer), expected, atol=1e-5, rtol=0)
    without_lora = copy.deepcopy(stock)
    attention.apply(without_lora)
    assert (output(without_lora) - expected).abs().max() > 1e-3  # the LoRA really changes the output


def test_generate_with_a_lora_and_a_student_records_both(flux, capsys):
    pipe, _, _, _, root = flux
    pipe.save_pretrained(root / "pipe")
    save_file({"prompt_embeds": torch.randn(1, 6, 32), "pooled_prompt_embeds": torch.randn(1, 32)},
              str(root / "embeds.safetensors"))

    def generate(out, *options):
        code, _, err = run_cli(capsys, "generate", "--pipeline", str(root / "pipe"), "--prompt-embeds",
                               str(root / "embeds.safetensors"), "--height", "32", "--width", "32", "--steps", "1",
                               "--dtype", "fp32", "--device", "cpu", "--no-progress", "--out", str(root / out),
                               "--student", str(root / "clear_local_2_down_2.safetensors"), *options)
        assert code == 0, err
        image = Image.open(root / out)
        return np.asarray(image).astype(int), image.text

    plain, _ = generate("plain.png")
    styled, text = generate("styled.png", "--lora", f"{root / 'style.safetensors'}:0.7", "--lora",
                            str(root / "style.safetensors"))
    assert text["lora"] == "style.safetensors:0.7, style.safetensors:1" and "lora: style" in text["parameters"]
    assert np.abs(plain - styled).max() > 1
    chained, text = generate("chain.png", "--lora", str(root / "style.safetensors"), "--upscale-from", "16",
                             "--strength", "1")  # the base: stock + LoRA; then the student loads under the LoRA
    assert text["lora"] == "style.safetensors:1" and text["upscale"].startswith("from 16x16")
    single, _ = generate("single.png", "--lora", str(root / "style.safetensors"))
    assert np.abs(chained - single).max() <= 1  # strength 1: plain generation at the full size


@pytest.mark.parametrize("text, expected", [("a.safetensors:abc", "the scale 'abc' is not a number"),
                                            ("a.safetensors:nan", "the scale must be a finite number"),
                                            ("missing.safetensors:0.5", "no such file"),
                                            ("a.bin", "from .safetensors files only")])
def test_scale_and_file_errors_are_one_line(tmp_path, monkeypatch, text, expected):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.safetensors").write_bytes(b"")
    (tmp_path / "a.bin").write_bytes(b"")
    with pytest.raises(DitkitError, match=expected) as error:
        parse_lora(text)
    assert "\n" not in str(error.value)
    assert parse_lora("a.safetensors").scale == 1 and parse_lora("a.safetensors:-0.5").scale == -0.5


def sd3_lora(path):
    """An SD3 LoRA in diffusers' layout: the same module names as FLUX's double blocks, other widths."""
    from peft import LoraConfig, get_peft_model_state_dict

    from diffusers import StableDiffusion3Pipeline

    model = sd3_pipeline().transformer
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["to_q", "to_k"]))
    StableDiffusion3Pipeline.save_lora_weights(path.parent, transformer_lora_layers=get_peft_model_state_dict(model),
                                               weight_name=path.name)


def kohya_lora(path, width=32):
    """A LoRA in kohya's FLUX layout (one double block's image output projection), which diffusers
    converts on loading."""
    block = "lora_unet_double_blocks_0_img_attn_proj"
    save_file({f"{block}.lora_down.weight": torch.randn(RANK, width),
               f"{block}.lora_up.weight": torch.randn(width, RANK), f"{block}.alpha": torch.tensor(ALPHA)}, str(path))


def kohya_lora_of_another_width(path):
    kohya_lora(path, width=16)


def unknown_modules(path):
    save_file({"transformer.not_a_block.lora_A.weight": torch.zeros(2, 8),
               "transformer.not_a_block.lora_B.weight": torch.zeros(8, 2)}, str(path))


def not_a_lora(path):
    save_file({"some.weight": torch.zeros(2, 2)}, str(path))


@pytest.mark.parametrize("make, expected", [
    (sd3_lora, "is a LoRA for another model: transformer_blocks.0.attn.to_k maps 32 -> 32 features in this "
               "FluxTransformer2DModel, 16 -> 16 in the LoRA"),
    (unknown_modules, "is a LoRA for another model: it changes not_a_block, which this pipeline's "
                      "FluxTransformer2DModel does not have"),
    (kohya_lora_of_another_width, "is a LoRA for another model: transformer_blocks.0.attn.to_out.0 maps 32 -> 32"),
    (not_a_lora, "holds no LoRA weights for a transformer")],
    ids=["sd3-on-flux", "no-such-module", "kohya-of-another-width", "not-a-lora"])
def test_a_lora_for_another_model_is_one_line_before_any_weight_loads(tmp_path, capsys, monkeypatch, make, expected):
    torch.manual_seed(0)
    flux_pipeline(False).save_pretrained(tmp_path / "pipe")
    make(tmp_path / "other.safetensors")
    monkeypatch.setattr(pipelines, "load_pipeline", lambda *args, **kwargs: pytest.fail("loaded before the check"))
    code, _, err = run_cli(capsys, "generate", "--pipeline", str(tmp_path / "pipe"), "--prompt", "a cat",
                           "--height", "32", "--width", "32", "--out", str(tmp_path / "x.png"), "--lora",
                           str(tmp_path / "other.safetensors"))
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and expected in lines[0], err


def test_a_pipeline_without_a_lora_loader_is_one_line(tmp_path, capsys):
    (tmp_path / "pixart").mkdir()
    index = {"_class_name": "PixArtAlphaPipeline", "transformer": ["diffusers", "PixArtTransformer2DModel"]}
    (tmp_path / "pixart" / "model_index.json").write_text(json.dumps(index))
    save_file({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, str(tmp_path / "l.safetensors"))
    code, _, err = run_cli(capsys, "generate", "--pipeline", str(tmp_path / "pixart"), "--prompt", "a cat",
                           "--height", "32", "--width", "32", "--out", str(tmp_path / "x.png"), "--lora",
                           str(tmp_path / "l.safetensors"))
    assert code == 2 and "PixArtAlphaPipeline cannot load LoRA weights" in err and err.count("\n") == 1


def test_a_lora_in_kohyas_layout_is_checked_after_diffusers_converts_it(tmp_path):
    torch.manual_seed(0)
    flux_pipeline(False).save_pretrained(tmp_path / "pipe")
    kohya_lora(tmp_path / "kohya.safetensors")
    [lora] = check_loras(tmp_path / "pipe", None, [f"{tmp_path / 'kohya.safetensors'}:0.5"])
    assert lora.scale == 0.5 and lora_settings([lora]) == {"lora": "kohya.safetensors:0.5"}
