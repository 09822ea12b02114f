"""CLEAR processors in tiny random diffusers transformers (built offline, no downloads)."""

import pytest
import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

from ditkit.errors import DitkitError
from ditkit.integrations.diffusers import apply_clear, attention_taps, remove_clear
from ditkit.mixers.clear import _reference_mask

GRID, TEXT = (6, 5), 7  # 6x5 image tokens (not square, not a tile multiple), 7 text tokens


def flux_ids(grid):
    ys, xs = torch.meshgrid(torch.arange(grid[0]).float(), torch.arange(grid[1]).float(), indexing="ij")
    return torch.stack([torch.zeros_like(ys), ys, xs], -1).reshape(-1, 3)


def tiny_flux():
    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=[4, 6, 6])
    inputs = dict(hidden_states=torch.randn(2, GRID[0] * GRID[1], 4), encoder_hidden_states=torch.randn(2, TEXT, 32),
                  pooled_projections=torch.randn(2, 32), timestep=torch.tensor([0.5, 0.2]), img_ids=flux_ids(GRID),
                  txt_ids=torch.zeros(TEXT, 3))
    return model, inputs, "text_first"


def tiny_sd3():
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=32)
    inputs = dict(hidden_states=torch.randn(2, 4, 2 * GRID[0], 2 * GRID[1]),
                  encoder_hidden_states=torch.randn(2, TEXT, 32), pooled_projections=torch.randn(2, 16),
                  timestep=torch.tensor([500, 200]))
    return model, inputs, "image_first"


def tiny_pixart():
    model = PixArtTransformer2DModel(sample_size=8, num_layers=2, attention_head_dim=8, num_attention_heads=2,
                                     patch_size=2, in_channels=4, out_channels=8, cross_attention_dim=16,
                                     caption_channels=32, norm_type="ada_norm_single")
    inputs = dict(hidden_states=torch.randn(2, 4, 2 * GRID[0], 2 * GRID[1]),
                  encoder_hidden_states=torch.randn(2, TEXT, 32), timestep=torch.tensor([500, 200]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return model, inputs, "image_only"


MODELS = [tiny_flux, tiny_sd3, tiny_pixart]


def run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def stock_with_disc_mask(model, inputs, layout, radius):
    """The stock processors, with the CLEAR mask handed to every self-attention SDPA call: an
    independent way to compute what the CLEAR processors must give."""
    num_text = 0 if layout == "image_only" else TEXT
    mask = _reference_mask(GRID, float(radius), num_text, 0, torch.device("cpu"))
    if layout == "image_first":  # SD3 orders [image | text]
        N = GRID[0] * GRID[1]
        order = torch.cat([torch.arange(num_text, num_text + N), torch.arange(num_text)])
        mask = mask[order][:, order]
    stock_sdpa = F.scaled_dot_product_attention

    def masked(query, key, value, attn_mask=None, **kwargs):
        if query.shape[-2] == key.shape[-2] == mask.shape[0]:  # self-attention (not PixArt's cross-attention)
            assert attn_mask is None
            attn_mask = mask
        return stock_sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    torch.nn.functional.scaled_dot_product_attention = masked
    try:
        return run(model, inputs)
    finally:
        torch.nn.functional.scaled_dot_product_attention = stock_sdpa


@pytest.mark.parametrize("make", MODELS, ids=["flux", "sd3", "pixart"])
def test_radius_covering_the_grid_equals_the_stock_processor(make):
    torch.manual_seed(0)
    model, inputs, _ = make()
    stock = run(model.eval(), inputs)
    switched = apply_clear(model, radius=100)
    assert len(switched) == 2
    torch.testing.assert_close(run(model, inputs), stock, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", MODELS, ids=["flux", "sd3", "pixart"])
@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_small_radius_equals_stock_attention_with_the_disc_mask(make, backend):
    torch.manual_seed(0)
    model, inputs, layout = make()
    model.eval()
    stock = run(model, inputs)
    expected = stock_with_disc_mask(model, inputs, layout, radius=2)
    apply_clear(model, radius=2, backend=backend)
    out = run(model, inputs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - stock).abs().max() > 1e-3  # the window really is local
    remove_clear(model)
    torch.testing.assert_close(run(model, inputs), stock, atol=0, rtol=0)


def test_pooled_tokens_are_trainable_parameters_of_the_transformer():
    torch.manual_seed(0)
    model, inputs, _ = tiny_flux()
    inputs["hidden_states"] = torch.randn(2, 16, 4)
    inputs["img_ids"] = flux_ids((4, 4))
    apply_clear(model, radius=2, down_factor=2)
    names = [n for n, _ in model.named_parameters() if n.endswith("pool_weight")]
    assert names == ["transformer_blocks.0.attn.processor.pool_weight",
                     "single_transformer_blocks.0.attn.processor.pool_weight"]
    model.zero_grad()
    model(**inputs, return_dict=False)[0].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.endswith("pool_weight"))
    inputs["hidden_states"], inputs["img_ids"] = torch.randn(2, 15, 4), flux_ids((5, 3))
    with pytest.raises(DitkitError, match="divisible by 2"):
        run(model, inputs)
    remove_clear(model)
    assert not [n for n, _ in model.named_parameters() if n.endswith("pool_weight")]


def test_attention_taps_see_each_layer_once():
    torch.manual_seed(0)
    model, inputs, _ = tiny_flux()
    taps = attention_taps(model)
    assert [mode for _, mode in taps] == ["input", "output"]  # double block: to_out input; single: attn output


def test_unsupported_models_and_masks_fail_clearly():
    with pytest.raises(DitkitError, match="apply_clear supports"):
        apply_clear(torch.nn.Linear(2, 2), radius=4)
    with pytest.raises(DitkitError, match="radius must be at least 1"):
        apply_clear(tiny_flux()[0], radius=0)


@pytest.mark.parametrize("make", [tiny_flux, tiny_sd3], ids=["flux", "sd3"])
def test_distill_with_a_diffusers_teacher_folder(make, tmp_path, capsys):
    """`ditkit distill` takes a diffusers transformer folder as the teacher; the student trains only the
    image-stream projections and its checkpoint holds only those."""
    import json

    from safetensors import safe_open

    from ditkit.cli.main import main
    from ditkit.train.checkpoint import find_checkpoint

    torch.manual_seed(0)
    model, _, _ = make()
    model.save_pretrained(tmp_path / "flux")
    out = tmp_path / "student"
    assert main(["distill", "--teacher", str(tmp_path / "flux"), "--radius", "2", "--resolution", "64",
                 "--teacher-steps", "2", "--num-samples", "4", "--steps", "2", "--batch-size", "2", "--eval-num", "2",
                 "--lr", "1e-3", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "agreement.json").read_text())
    assert set(report["student"]) == {"64", "128"} and report["untuned"]["64"]["psnr"] < 100
    with safe_open(str(find_checkpoint(out / "checkpoints") / "model.safetensors"), "pt") as f:
        saved = sorted(f.keys())
    if make is tiny_sd3:
        assert saved == sorted(f"transformer.transformer_blocks.{i}.attn.{proj}.{kind}" for i in range(2)
                               for proj in ("to_q", "to_k", "to_v", "to_out.0") for kind in ("weight", "bias"))
        return
    assert saved == sorted(f"transformer.{layer}.{proj}.{kind}"
                           for layer in ("transformer_blocks.0.attn", "single_transformer_blocks.0.attn")
                           for proj in ("to_q", "to_k", "to_v", "to_out.0") for kind in ("weight", "bias")
                           if not (layer.startswith("single") and proj == "to_out.0"))
    assert main(["distill", "--teacher", str(tmp_path / "flux"), "--radius", "2", "--resolution", "60",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "use multiples of 16" in capsys.readouterr().err
