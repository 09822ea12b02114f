"""CLEAR's released FLUX weights (github.com/Huage001/CLEAR) in ditkit, and ditkit students written in
their layout. The files are built here from the official key names (the notebook's filters: `.attn.to_q.`,
`.attn.to_k.`, `.attn.to_v.`, `.attn.to_out.`, `spatial_weight`) over tiny random FLUX transformers; the
official processors are written here from their definitions in attention_processor.py (dense mask + SDPA
in place of flex_attention), independently of ditkit's."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from ditkit.checkpoint import save_weights
from ditkit.cli.main import main
from ditkit.diffusers.clear import apply_clear, student_parameters
from ditkit.diffusers.official_clear import official_window
from ditkit.diffusers.pipelines import Attention, load_student
from ditkit.errors import DitkitError
from ditkit.record import DataSettings, DiffusersModel, DiffusionSettings, RunRecord
from tiny_diffusers import flux_ids, flux_pipeline, run

GRID, TEXT = (12, 8), 7  # image tokens divisible by 4 (pooling); a window of 8 cuts this grid
NOTEBOOK_FILTERS = (".attn.to_q.", ".attn.to_k.", ".attn.to_v.", ".attn.to_out.", "spatial_weight")


def tiny_flux(num_layers=1, head_dim=16, seed=0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=num_layers, num_single_layers=1,
                                  attention_head_dim=head_dim, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 6, 6] if head_dim == 16 else [2, 2, 4])


def inputs(grid=GRID):
    generator = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(2, grid[0] * grid[1], 4, generator=generator),
                encoder_hidden_states=torch.randn(2, TEXT, 32, generator=generator),
                pooled_projections=torch.randn(2, 32, generator=generator), timestep=torch.tensor([0.5, 0.2]),
                img_ids=flux_ids(grid), txt_ids=torch.zeros(TEXT, 3))


def official_file(path, transformer, down_factor, seed=2):
    """Random weights saved as the authors' distill.py saves them: the transformer's parameters whose
    names pass the notebook's filters (processors holding `spatial_weight` when pooling)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {name: 0.3 * torch.randn(p.shape, generator=generator) for name, p in transformer.named_parameters()
               if any(f in name for f in NOTEBOOK_FILTERS[:4])}
    for layer in transformer.attn_processors:  # "transformer_blocks.0.attn.processor"
        if down_factor:
            f = down_factor
            weight = 1 / f**2 + 0.05 * torch.randn(f * f, generator=generator)
            tensors[f"{layer}.spatial_weight"] = weight.reshape(1, 1, 1, f, 1, f, 1)
    save_file(tensors, str(path))
    return path


class OfficialProcessor(nn.Module):
    """LocalFlexAttnProcessor (down_factor 1) and LocalDownsampleFlexAttnProcessor as attention_processor.py
    defines them: projections, QK-norm, text first, rotary, keys and values pooled over f x f blocks with
    `spatial_weight` after the text, and the mask of init_local_[downsample_]mask_flex."""

    def __init__(self, grid, text, window_size, down_factor):
        super().__init__()
        self.grid, self.text, self.window_size, self.down_factor = grid, text, window_size, down_factor
        if down_factor > 1:
            self.spatial_weight = nn.Parameter(torch.ones(1, 1, 1, down_factor, 1, down_factor, 1) / down_factor**2)

    def mask(self, num_keys):
        (height, width), text, f = self.grid, self.text, self.down_factor
        q, kv = torch.arange(text + height * width)[:, None], torch.arange(num_keys)[None]
        near = ((q - text) // width - (kv - text) // width) ** 2 + ((q - text) % width - (kv - text) % width) ** 2 \
            < self.window_size**2
        if f == 1:
            return (q < text) | (kv < text) | near
        image_end = text + height * width
        return ((q < text) & (kv < image_end)) | ((q >= text) & ((kv < text) | (kv >= image_end) | near))

    def pool(self, x):
        (height, width), f = self.grid, self.down_factor
        blocks = x[:, :, self.text:].unflatten(2, (height // f, f, width // f, f))
        return (blocks * self.spatial_weight).sum(dim=(3, 5)).flatten(2, 3)

    def forward(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb

        batch = hidden_states.shape[0]

        def split(x):
            return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        q, k = attn.norm_q(q), attn.norm_k(k)
        if encoder_hidden_states is not None:
            e = encoder_hidden_states
            eq, ek, ev = split(attn.add_q_proj(e)), split(attn.add_k_proj(e)), split(attn.add_v_proj(e))
            q = torch.cat([attn.norm_added_q(eq), q], dim=2)
            k = torch.cat([attn.norm_added_k(ek), k], dim=2)
            v = torch.cat([ev, v], dim=2)
        q, k = apply_rotary_emb(q, image_rotary_emb), apply_rotary_emb(k, image_rotary_emb)
        if self.down_factor > 1:
            k, v = torch.cat([k, self.pool(k)], dim=2), torch.cat([v, self.pool(v)], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(k.shape[2]),
                                             scale=1 / math.sqrt(q.shape[-1]))
        out = out.transpose(1, 2).reshape(batch, -1, out.shape[1] * out.shape[-1])
        if encoder_hidden_states is None:
            return out
        text, image = out[:, :encoder_hidden_states.shape[1]], out[:, encoder_hidden_states.shape[1]:]
        return attn.to_out[1](attn.to_out[0](image)), attn.to_add_out(text)


def as_the_notebook_loads(transformer, path, window_size, down_factor):
    """The notebook's steps: its processors on every attention layer, then load_state_dict(strict=False),
    every missing key that passes its filters reported."""
    transformer.set_attn_processor({name: OfficialProcessor(GRID, TEXT, window_size, down_factor or 1)
                                    for name in transformer.attn_processors})
    missing, unexpected = transformer.load_state_dict(load_file(str(path)), strict=False)
    assert unexpected == [] and [key for key in missing if any(f in key for f in NOTEBOOK_FILTERS)] == []
    return transformer


@pytest.mark.parametrize("down_factor", [0, 4])
def test_official_file_loads_as_the_official_processors_run_it(tmp_path, down_factor):
    base = tiny_flux()
    name = f"clear_local_8{f'_down_{down_factor}' if down_factor else ''}.safetensors"
    path = official_file(tmp_path / name, base, down_factor)

    loaded = copy.deepcopy(base)
    assert load_student(loaded, path) == {"radius": 8, "down_factor": down_factor}

    direct = copy.deepcopy(base)  # the same weights put into ditkit's processors by hand
    apply_clear(direct, 8, down_factor)
    with torch.no_grad():
        for key, value in load_file(str(path)).items():
            if key.endswith("spatial_weight"):
                direct.get_submodule(key.removesuffix(".spatial_weight")).pool_weight.copy_(value.flatten())
            else:
                direct.get_parameter(key).copy_(value)

    official = as_the_notebook_loads(copy.deepcopy(base), path, 8, down_factor)
    full = copy.deepcopy(base)  # the same weights with full attention
    full.load_state_dict({k: v for k, v in load_file(str(path)).items() if "spatial" not in k}, strict=False)

    x = inputs()
    out = run(loaded, x)
    torch.testing.assert_close(out, run(direct, x), atol=1e-5, rtol=0)
    torch.testing.assert_close(out, run(official, x), atol=1e-5, rtol=1e-5)
    assert (out - run(full, x)).abs().max() > 1e-3  # the window of 8 really cuts this grid


def test_window_is_the_radius_with_the_strict_comparison():
    """window_size w draws d^2 < w^2, as ditkit's disc of radius w; a radius between two windows has an
    official form only when it holds the same lattice offsets."""
    assert official_window(8) == 8 and official_window(8.0) == 8
    assert official_window(7.99) == 8  # no lattice offset has 63.84 <= d^2 < 64
    with pytest.raises(DitkitError, match="no official window"):
        official_window(8.5)  # (8, 0): d^2 = 64 < 72.25, outside the window of 8; (8, 3): 73, outside 8.5


def refused(transformer, path, **clear) -> str:
    """The one-line refusal of loading `path` (checked before any weight changes)."""
    before = {k: v.clone() for k, v in transformer.state_dict().items()}
    with pytest.raises(DitkitError) as error:
        Attention(clear=clear or None, student=path).apply(transformer)
    assert "\n" not in str(error.value)
    assert all(torch.equal(before[k], v) for k, v in transformer.state_dict().items())
    assert not hasattr(transformer, "_ditkit_clear")
    return str(error.value)


def test_files_that_do_not_fit_are_refused_in_one_line(tmp_path):
    from diffusers import SD3Transformer2DModel

    model = tiny_flux()
    deeper = official_file(tmp_path / "clear_local_8_down_4.safetensors", tiny_flux(num_layers=2), 4)
    assert "holds 2 double-stream + 1 single-stream attention layers, this transformer has 1 double-stream + " \
           "1 single-stream" in refused(model, deeper)
    (tmp_path / "narrow").mkdir()
    narrow = official_file(tmp_path / "narrow" / "clear_local_8.safetensors", tiny_flux(head_dim=8), 0)
    assert "does not fit this transformer (transformer_blocks.0.attn.to_q.weight: (32, 32) here, (16, 16)" \
           in refused(model, narrow)
    pooled = official_file(tmp_path / "clear_local_8_down_2.safetensors", model, 4)
    assert "the file name says down_factor=2, the shape of its pooling weights says 4" in refused(model, pooled)
    plain = official_file(tmp_path / "clear_local_8.safetensors", model, 0)
    assert "--clear says down_factor=4, the file name says 0" in refused(model, plain, radius=8, down_factor=4)
    assert "--clear says radius=4, the file name says 8" in refused(model, plain, radius=4)
    unnamed = official_file(tmp_path / "attn_weights.safetensors", model, 4)
    assert "its name does not say their window: pass --clear radius=W" in refused(model, unnamed)
    partial = load_file(str(pooled))
    partial.pop("single_transformer_blocks.0.attn.processor.spatial_weight")
    save_file(partial, str(tmp_path / "clear_local_8_down_4.safetensors"))
    assert "lacks single_transformer_blocks.0.attn.processor.spatial_weight" in refused(
        model, tmp_path / "clear_local_8_down_4.safetensors")
    sd3 = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                pooled_projection_dim=16, out_channels=4)
    assert "official weights for FLUX.1 (FluxTransformer2DModel)" in refused(sd3, plain)
    # an unnamed file takes its settings from --clear (the down factor also from the weights' shape)
    assert load_student(copy.deepcopy(model), unnamed, clear={"radius": 8}) == {"radius": 8, "down_factor": 4}


def ditkit_student(folder, transformer, radius, down_factor):
    """A FLUX student as `ditkit distill` saves one: CLEAR on, its student parameters (random here) under
    `transformer.`, with the distill settings in its record."""
    student = copy.deepcopy(transformer)
    apply_clear(student, radius, down_factor)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in student_parameters(student).values():
            p.add_(0.1 * torch.randn(p.shape, generator=generator))
    record = RunRecord(DiffusersModel("FluxTransformer2DModel", "teacher"), DiffusionSettings(),
                       DataSettings(resolution=32), distill={"radius": radius, "down_factor": down_factor})
    state = {f"transformer.{k}": v.detach() for k, v in student_parameters(student).items()}
    return save_weights(folder, state, record), state


def test_export_then_load_round_trips_bit_for_bit(tmp_path, capsys):
    base = tiny_flux()
    folder, state = ditkit_student(tmp_path / "student", base, 8, 4)
    out = tmp_path / "clear_local_8_down_4.safetensors"
    assert main(["export", str(folder), "--to", "clear-official", str(out)]) == 0
    assert sorted(load_file(str(out))) == sorted(k.removeprefix("transformer.").replace("pool_weight", "spatial_weight")
                                                 for k in state)
    as_the_notebook_loads(copy.deepcopy(base), out, 8, 4)  # the authors' loader takes it, nothing missing

    from_official, from_ditkit = copy.deepcopy(base), copy.deepcopy(base)
    load_student(from_official, out)
    load_student(from_ditkit, folder)
    loaded = from_official.state_dict()
    assert all(torch.equal(loaded[k.removeprefix("transformer.")], v) for k, v in state.items())
    assert torch.equal(run(from_official, inputs()), run(from_ditkit, inputs()))

    renamed = tmp_path / "mine.safetensors"  # ditkit's metadata carries the settings past a rename
    assert main(["export", str(folder), "--to", "clear-official", str(renamed)]) == 0
    assert load_student(copy.deepcopy(base), renamed) == {"radius": 8, "down_factor": 4}

    capsys.readouterr()
    wrong = tmp_path / "clear_local_16.safetensors"
    assert main(["export", str(folder), "--to", "clear-official", str(wrong)]) == 2
    assert "name the file clear_local_8_down_4.safetensors" in capsys.readouterr().err
    odd, _ = ditkit_student(tmp_path / "odd", base, 8.5, 0)
    assert main(["export", str(odd), "--to", "clear-official", str(tmp_path / "odd.safetensors")]) == 2
    assert "radius 8.5 is no official window" in capsys.readouterr().err
    assert not (tmp_path / "odd.safetensors").exists() and not wrong.exists()


def test_generate_with_an_official_file(tmp_path, capsys):
    """`ditkit generate --student clear_local_8_down_4.safetensors` over a tiny FLUX pipeline; a renamed
    copy with --clear radius=8 gives the same picture."""
    torch.manual_seed(0)
    pipe = flux_pipeline(False)
    pipe.save_pretrained(tmp_path / "flux")
    save_file({"prompt_embeds": torch.randn(1, 6, 32), "pooled_prompt_embeds": torch.randn(1, 32)},
              str(tmp_path / "embeds.safetensors"))
    named = official_file(tmp_path / "clear_local_8_down_4.safetensors", pipe.transformer, 4)
    unnamed = tmp_path / "weights.safetensors"
    unnamed.write_bytes(named.read_bytes())

    def generate(out, *options):
        assert main(["generate", "--pipeline", str(tmp_path / "flux"), "--prompt-embeds",
                     str(tmp_path / "embeds.safetensors"), "--height", "32", "--width", "32", "--steps", "2",
                     "--dtype", "fp32", "--device", "cpu", "--no-progress", "--out", str(out), *options]) == 0
        image = Image.open(out)
        return np.asarray(image).astype(int), dict(image.text)

    official, text = generate(tmp_path / "a.png", "--student", str(named))
    assert text["clear"] == "radius=8,down_factor=4" and text["student"] == str(named)
    again, text = generate(tmp_path / "b.png", "--student", str(unnamed), "--clear", "radius=8")
    assert np.array_equal(official, again) and text["clear"] == "radius=8,down_factor=4"
    stock, _ = generate(tmp_path / "c.png")
    assert np.abs(official - stock).max() > 1
    # settings that contradict the name are refused before the pipeline is read (this folder is none)
    assert main(["generate", "--pipeline", str(tmp_path), "--prompt", "a", "--height", "32", "--width", "32",
                 "--student", str(named), "--clear", "radius=4"]) == 2
    assert "--clear says radius=4, the file name says 8" in capsys.readouterr().err
