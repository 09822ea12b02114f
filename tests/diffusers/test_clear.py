"""CLEAR processors and size options in tiny random diffusers transformers (built offline, no downloads)."""

import math

import pytest
import torch
import torch.nn.functional as F

from ditkit.diffusers.adapters.flux import flux_rotary
from ditkit.diffusers.adapters.sd3 import sd3_interpolated_pos_embed
from ditkit.diffusers.clear import apply_clear, attention_taps, remove_clear
from ditkit.diffusers.size_options import remove_size_options, set_size_options
from ditkit.errors import DitkitError
from ditkit.metrics.memory import largest_tensor
from ditkit.mixers.base import Extrapolation
from ditkit.mixers.clear import _reference_mask
from ditkit.mixers.positions import positions_local_attention
from tiny_diffusers import GRID, TEXT, flux_ids, run, tiny_flux, tiny_pixart, tiny_sd3

MODELS = [tiny_flux, tiny_sd3, tiny_pixart]


def stock_with_disc_mask(model, inputs, layout, radius):
    """The stock processors, with the CLEAR mask handed to every self-attention SDPA call: an
    independent way to compute what the CLEAR processors must give."""
    num_text = 0 if layout == "image_only" else TEXT
    mask = _reference_mask(GRID, float(radius), num_text, 0, torch.device("cpu"))
    if layout == "image_first":  # SD3 orders [image | text]
        N = GRID[0] * GRID[1]
        order = torch.cat([torch.arange(num_text, num_text + N), torch.arange(num_text)])
        mask = mask[order][:, order]

    def masked(stock_sdpa, query, key, value, attn_mask=None, **kwargs):
        if query.shape[-2] == key.shape[-2] == mask.shape[0]:  # self-attention (not PixArt's cross-attention)
            assert attn_mask is None
            attn_mask = mask
        return stock_sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    return run_with_sdpa(model, inputs, masked)


def run_with_sdpa(model, inputs, wrapper):
    """Run the stock processors with every SDPA call going through wrapper(stock_sdpa, q, k, v, ...)."""
    stock_sdpa = F.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = lambda *args, **kwargs: wrapper(stock_sdpa, *args, **kwargs)
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

    from ditkit.checkpoint import find_checkpoint
    from ditkit.cli.main import main

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


# --- size options: proportional attention scale and position scaling -------------------------------

POSITIONS = {"flux": "ntk", "sd3": "interpolate", "pixart": "none"}  # the richest scaling each one takes


@pytest.mark.parametrize("make", MODELS, ids=["flux", "sd3", "pixart"])
def test_size_options_off_or_at_the_training_size_change_nothing(make):
    torch.manual_seed(0)
    model, inputs, _ = make()
    model.eval()
    stock = run(model, inputs)
    set_size_options(model)  # both off: nothing is installed
    torch.testing.assert_close(run(model, inputs), stock, atol=0, rtol=0)
    kind = make.__name__.removeprefix("tiny_")
    set_size_options(model, train_grid=GRID, attention_scale=True, positions=POSITIONS[kind])
    torch.testing.assert_close(run(model, inputs), stock, atol=0, rtol=0)
    set_size_options(model, train_grid=(3, 3), attention_scale=True, positions=POSITIONS[kind])
    assert (run(model, inputs) - stock).abs().max() > 1e-4
    remove_size_options(model)
    torch.testing.assert_close(run(model, inputs), stock, atol=0, rtol=0)


def stock_with_scaled_queries(model, inputs, factor):
    """The stock processors with every self-attention's queries multiplied inside SDPA: the reference."""

    def scaled(stock_sdpa, query, key, value, *args, **kwargs):
        if query.shape[-2] == key.shape[-2]:  # self-attention, not PixArt's cross-attention to the text
            query = query * factor
        return stock_sdpa(query, key, value, *args, **kwargs)

    return run_with_sdpa(model, inputs, scaled)


@pytest.mark.parametrize("make", MODELS, ids=["flux", "sd3", "pixart"])
@pytest.mark.parametrize("clear", [False, True], ids=["stock", "clear"])
def test_attention_scale_equals_scaled_queries(make, clear):
    torch.manual_seed(0)
    model, inputs, _ = make()
    model.eval()
    factor = math.sqrt(math.log(GRID[0] * GRID[1]) / math.log(9))  # trained at 3 x 3 tokens
    expected = stock_with_scaled_queries(model, inputs, factor)
    if clear:
        apply_clear(model, radius=100)
    set_size_options(model, train_grid=(3, 3), attention_scale=True)
    torch.testing.assert_close(run(model, inputs), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("positions", ["ntk", "interpolate"])
def test_flux_rotary_angles_follow_the_formula(positions):
    """Angles of axis a (d channels, frequencies theta^(-2j/d)): ntk theta * s^(d/(d-2)); interpolate pos / s."""
    torch.manual_seed(0)
    model, inputs, _ = tiny_flux()
    seen = []
    set_size_options(model, train_grid=(3, 2), positions=positions)  # rows grew 2x, columns 2.5x
    model.pos_embed.register_forward_hook(lambda module, args, out: seen.append(out))
    run(model, inputs)
    ids = torch.cat([inputs["txt_ids"], inputs["img_ids"]]).double()
    angles = []
    for axis, (dim, s) in enumerate(zip([4, 6, 6], [1.0, 2.0, 2.5], strict=True)):
        theta = 10000.0 * s ** (dim / (dim - 2)) if positions == "ntk" else 10000.0
        pos = ids[:, axis] / (s if positions == "interpolate" else 1.0)
        angles.append(pos[:, None] * theta ** (-torch.arange(0, dim, 2).double() / dim))
    angles = torch.cat(angles, dim=1).repeat_interleave(2, dim=1)
    cos, sin = seen[0]
    torch.testing.assert_close(cos.double(), angles.cos(), atol=1e-6, rtol=0)
    torch.testing.assert_close(sin.double(), angles.sin(), atol=1e-6, rtol=0)
    stock_cos, stock_sin = flux_rotary(ids.float(), 10000, [4, 6, 6], None)  # no extrapolation: FluxPosEmbed's
    plain = model.pos_embed.__class__.forward(model.pos_embed, ids.float())
    assert stock_cos.equal(plain[0]) and stock_sin.equal(plain[1])


def test_sd3_interpolated_positions_are_the_trained_crop_at_half_steps():
    model, _, _ = tiny_sd3()
    patch_embed = model.pos_embed  # M = 32 positions per axis
    table = patch_embed.pos_embed.reshape(32, 32, -1)
    embed = sd3_interpolated_pos_embed(patch_embed, (12, 5), train_grid=(6, 5)).reshape(12, 5, -1)
    top, left = (32 - 6) // 2, (32 - 5) // 2  # rows read the 6-row trained crop at half steps; columns as stock
    torch.testing.assert_close(embed[::2], table[top:top + 6, left:left + 5], atol=1e-6, rtol=0)
    midpoints = embed[1::2]
    assert not torch.isclose(midpoints, table[top:top + 6, left:left + 5], atol=1e-3).all()


def test_sd3_interpolation_samples_beyond_pos_embed_max_size():
    torch.manual_seed(0)
    model, inputs, _ = tiny_sd3()
    inputs["hidden_states"] = torch.randn(1, 4, 68, 40)  # 34 token rows > pos_embed_max_size 32
    for key in ("encoder_hidden_states", "pooled_projections", "timestep"):
        inputs[key] = inputs[key][:1]
    with pytest.raises(ValueError, match="pos_embed_max_size"):
        run(model, inputs)
    set_size_options(model, positions="interpolate")  # trained at sample_size 16 / patch 2 = 8 x 8 tokens
    assert torch.isfinite(run(model, inputs)).all()


def test_size_options_refusals_name_the_fix():
    with pytest.raises(DitkitError, match="already interpolates"):
        set_size_options(tiny_pixart()[0], positions="interpolate")
    with pytest.raises(DitkitError, match="use positions='interpolate'"):
        set_size_options(tiny_sd3()[0], positions="ntk")
    with pytest.raises(DitkitError, match="unknown position scaling"):
        set_size_options(tiny_flux()[0], positions="yarn")
    with pytest.raises(DitkitError, match="train_grid must be"):
        set_size_options(tiny_flux()[0], train_grid=(0, 64), attention_scale=True)
    with pytest.raises(DitkitError, match="set_size_options supports"):
        set_size_options(torch.nn.Linear(2, 2), attention_scale=True)


def test_extrapolation_query_scale_is_the_one_used():
    assert Extrapolation(stretch=(2.0, 3.0), attention_scale=True).query_scale(GRID) == pytest.approx(
        math.sqrt(math.log(30) / math.log(5)))


def test_clear_flux_step_builds_no_n_by_n_tensor():
    """64 x 64 image tokens + 7 text: one (N x N) boolean mask is 16 MiB, fp32 scores 64 MiB per head. The
    tiled backend (CLEAR's default for long CPU sequences), with the size options on, stays linear in N."""
    torch.manual_seed(0)
    model, inputs, _ = tiny_flux()
    grid, N = (64, 64), 64 * 64 + TEXT
    inputs.update(hidden_states=torch.randn(1, 64 * 64, 4), img_ids=flux_ids(grid),
                  encoder_hidden_states=inputs["encoder_hidden_states"][:1],
                  pooled_projections=inputs["pooled_projections"][:1], timestep=inputs["timestep"][:1])
    set_size_options(model, train_grid=(32, 32), attention_scale=True, positions="ntk")
    apply_clear(model, radius=4, backend="reference")
    dense = largest_tensor(lambda: run(model, inputs))
    apply_clear(model, radius=4)
    largest = largest_tensor(lambda: run(model, inputs))
    assert dense >= N * N  # the tracker sees the reference backend's mask...
    assert largest <= N * 160 * 4 < N * N / 4  # ...and nothing quadratic on the default path


def test_a_clear_spec_installs_the_same_processors_as_keywords():
    """apply_clear takes the `clear` mixer's spec (the spelling of configs and flags) in place of the radius."""
    from ditkit.diffusers.clear import clear_spec
    from ditkit.mixers import MixerSpec

    torch.manual_seed(0)
    model, inputs, _ = tiny_flux()
    apply_clear(model, radius=2, backend="reference")  # the 6x5 grid takes no down_factor
    keywords = run(model, inputs)
    apply_clear(model, radius=3)
    assert not torch.equal(run(model, inputs), keywords)  # the radius reaches the processors
    for spec in ("clear:radius=2,backend=reference", "radius=2,backend=reference",
                 MixerSpec("clear", {"radius": 2, "backend": "reference"})):
        apply_clear(model, spec)
        assert torch.equal(run(model, inputs), keywords)
    assert clear_spec({"radius": 3}) == MixerSpec.parse("clear:radius=3")
    for bad, message in [("ssm", "not ssm"), ("clear:qkv_bias=true", "unknown CLEAR option qkv_bias"),
                         ("radius=-1", "radius"), ("clear:radius=2,tile=3", "has no option tile")]:
        with pytest.raises(DitkitError, match=message):
            apply_clear(model, bad)


def kontext_inputs(context=(4, 7)):
    """A tiny FLUX call with a FluxKontextPipeline-style context image: its tokens after the grid's,
    position ids (1, row, column) on the same plane."""
    torch.manual_seed(0)
    model, inputs, _ = tiny_flux()
    context_ids = flux_ids(context)
    context_ids[:, 0] = 1
    tokens = GRID[0] * GRID[1] + context[0] * context[1]
    inputs.update(hidden_states=torch.randn(2, tokens, 4), img_ids=torch.cat([flux_ids(GRID), context_ids]))
    return model.eval(), inputs


@pytest.mark.parametrize("backend", ["reference", "tiled"])
def test_kontext_context_tokens_take_the_disc_on_the_position_plane(backend):
    """CLEAR with a context image equals the stock processors given the disc mask over the
    positions of both images (a query at (y, x) sees both images' tokens near (y, x))."""
    model, inputs = kontext_inputs()
    positions = inputs["img_ids"][:, 1:]
    near = torch.cdist(positions, positions).square() < 2.0**2
    mask = torch.ones(TEXT + len(positions), TEXT + len(positions), dtype=torch.bool)
    mask[TEXT:, TEXT:] = near

    def masked(stock_sdpa, query, key, value, attn_mask=None, **kwargs):
        return stock_sdpa(query, key, value, attn_mask=mask, **kwargs)

    stock, expected = run(model, inputs), run_with_sdpa(model, inputs, masked)
    apply_clear(model, radius=2, backend=backend)
    out = run(model, inputs)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert (out - stock).abs().max() > 1e-3
    apply_clear(model, radius=100, backend=backend)
    torch.testing.assert_close(run(model, inputs), stock, atol=1e-5, rtol=1e-5)


def test_kontext_pools_each_image_on_its_own_grid(monkeypatch):
    """With down_factor every image query also sees each image's pooled tokens (the generated
    image's blocks, then the context's); a context whose ids are no whole grid is refused in one line."""
    from ditkit.diffusers import clear as clear_module
    from ditkit.mixers.clear import pool_tokens

    model, inputs = kontext_inputs(context=(2, 6))
    inputs["hidden_states"] = torch.randn(2, 16 + 12, 4)
    inputs["img_ids"] = torch.cat([flux_ids((4, 4)), inputs["img_ids"][-12:]])
    seen = []

    def spy(q, k, v, positions, radius, num_global, extra_k, extra_v, backend, grids):
        generated, context = k[..., TEXT:TEXT + 16, :], k[..., TEXT + 16:, :]
        weight = model.transformer_blocks[0].attn.processor.pool_weight
        expected = torch.cat([pool_tokens(generated, (4, 4), 0, weight), pool_tokens(context, (2, 6), 0, weight)], -2)
        seen.append(torch.equal(extra_k, expected))
        seen.append(grids == ((0, 0, 4, 4), (0, 0, 2, 6)))  # both images' places: the plans are cached
        return positions_local_attention(q, k, v, positions, radius, num_global, extra_k, extra_v, backend, grids)

    apply_clear(model, radius=2, down_factor=2)
    monkeypatch.setattr(clear_module, "positions_local_attention", spy)
    model(**inputs, return_dict=False)[0].square().mean().backward()
    assert seen == [True] * 4  # both blocks
    assert all(p.grad.abs().sum() > 0 for n, p in model.named_parameters() if n.endswith("pool_weight"))
    inputs["img_ids"][16:] = inputs["img_ids"][16:].flip(0)  # the context's tokens in another order
    with pytest.raises(DitkitError, match=r"tokens \[16, 28\) are not one: use down_factor=0"):
        run(model, inputs)
