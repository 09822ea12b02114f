"""The attention-FLOPs count `ditkit generate` prints (`ditkit.diffusers.attention_cost`): against a
hand count on a tiny grid, against the mask CLEAR's processors use, and full attention against torch's
FlopCounterMode."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ditkit.diffusers.attention_cost import attention_cost, clear_settings, describe, layer_pairs
from ditkit.diffusers.pipelines import Attention
from ditkit.mixers.clear import _reference_mask
from tiny_diffusers import tiny_flux, tiny_pixart

TEXT = 7


def hand_pairs(grid, text, radius, pooled):
    """Every (query, key) pair CLEAR scores, one by one: text queries see every key, image queries the
    text, the image keys strictly inside their disc and the pooled tokens."""
    rows, columns = grid
    image = [(y, x) for y in range(rows) for x in range(columns)]
    local = sum(1 for qy, qx in image for ky, kx in image if (qy - ky) ** 2 + (qx - kx) ** 2 < radius ** 2)
    return text * (text + len(image)) + len(image) * text + local + len(image) * pooled


@pytest.mark.parametrize("grid, radius, down_factor", [((6, 5), 2, 0), ((4, 6), 2.5, 2), ((6, 4), 100, 0)])
def test_pairs_of_one_layer_match_a_hand_count_and_the_processors_mask(grid, radius, down_factor):
    pooled = (grid[0] // down_factor) * (grid[1] // down_factor) if down_factor else 0
    expected = hand_pairs(grid, TEXT, radius, pooled)
    assert layer_pairs(grid, TEXT, radius, down_factor) == expected
    mask = _reference_mask(grid, radius, TEXT, pooled, torch.device("cpu"))
    assert int(mask.sum()) == expected  # what the reference processor really scores
    assert layer_pairs(grid, TEXT) == (TEXT + grid[0] * grid[1]) ** 2


@pytest.mark.parametrize("context, radius, down_factor", [((4, 7), 2, 0), ((2, 6), 2.5, 2), ((8, 3), 100, 0)])
def test_a_kontext_context_counts_its_tokens_and_the_pairs_across_images(context, radius, down_factor):
    """Pairs against the positions processors' own mask: both images from (0, 0) on one plane."""
    from ditkit.mixers.positions import reference_positions_attention

    grid = (6, 4)
    ys = [torch.arange(rows).repeat_interleave(columns) for rows, columns in (grid, context)]
    xs = [torch.arange(columns).repeat(rows) for rows, columns in (grid, context)]
    positions = torch.stack([torch.cat(ys), torch.cat(xs)], 1)
    pooled = sum((r // down_factor) * (c // down_factor) for r, c in (grid, context)) if down_factor else 0
    tokens = TEXT + len(positions)
    seen = {}

    def count(q, k, v, attn_mask=None):
        seen["pairs"] = int(attn_mask.sum())
        return q

    original = torch.nn.functional.scaled_dot_product_attention
    torch.nn.functional.scaled_dot_product_attention = count
    try:
        q = torch.zeros(1, 1, tokens, 2)
        extra = torch.zeros(1, 1, pooled, 2) if pooled else None
        reference_positions_attention(q, q, q, positions, radius, TEXT, extra, extra)
    finally:
        torch.nn.functional.scaled_dot_product_attention = original
    assert layer_pairs(grid, TEXT, radius, down_factor, (context,)) == seen["pairs"]
    assert layer_pairs(grid, TEXT, context=(context,)) == tokens ** 2


def test_flux_cost_counts_every_layer_and_full_attention_agrees_with_flop_counter():
    grid = (6, 4)
    with torch.device("meta"):  # no weights: the count reads the layers' widths only
        model, inputs, _ = tiny_flux(grid)
    cost = attention_cost(model, grid, TEXT, radius=2, down_factor=2)
    width = 2 * 16  # heads x head size of tiny_flux; one double- and one single-stream layer
    assert cost.full == 2 * 4 * width * (TEXT + 24) ** 2
    assert cost.clear == 2 * 4 * width * hand_pairs(grid, TEXT, 2, 6)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(**inputs, return_dict=False)  # on meta, SDPA's math form: its two bmm are the attention
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert by_op["aten.bmm"] == inputs["hidden_states"].shape[0] * cost.full  # per sample: a batch of two


def test_controlnets_count_with_clear_or_at_full_cost():
    """A ControlNet's layers (one double- and one single-stream here, width 32 like the transformer's)
    add their pairs: CLEAR's when they get CLEAR, full attention's on both sides when kept full."""
    from tiny_diffusers import flux_controlnet

    grid = (6, 4)
    model, net = tiny_flux(grid)[0], flux_controlnet()
    alone = attention_cost(model, grid, TEXT, radius=2)
    both = attention_cost(model, grid, TEXT, radius=2, controlnets=(net, net))
    assert both.full == 3 * alone.full and both.clear == 3 * alone.clear
    kept = attention_cost(model, grid, TEXT, radius=2, controlnets=(net,), clear_controlnets=False)
    assert kept.full == 2 * alone.full and kept.clear == alone.clear + alone.full


def test_self_attention_layers_have_no_text_tokens():
    """PixArt's CLEAR layers attend over image tokens only (the prompt comes in through cross-attention)."""
    grid = (4, 4)
    model, _, _ = tiny_pixart(grid)
    cost = attention_cost(model, grid, TEXT, radius=2)
    assert cost.full == 2 * 4 * 16 * 16 ** 2  # two layers of width 16, 16 image tokens, no text
    assert cost.clear == 2 * 4 * 16 * hand_pairs(grid, 0, 2, 0)


def test_the_line_generate_prints():
    cost = attention_cost(tiny_flux((8, 8))[0], (8, 8), TEXT, radius=2, down_factor=4)
    line = describe(cost, 2, 4, 128, 128)
    assert line.startswith("attention: CLEAR radius 2, down factor 4 at 128x128: ")
    assert f"{100 * cost.fraction:.1f}% of full attention's FLOPs ({cost.full / cost.clear:.1f}x fewer;" in line
    assert "\n" not in line and "down factor" not in describe(cost, 2, 0, 128, 128)


def test_generate_prints_the_saving_of_its_clear_settings(tmp_path, capsys):
    from safetensors.torch import save_file

    from ditkit.cli.main import main
    from tiny_diffusers import flux_pipeline

    torch.manual_seed(0)
    pipe = flux_pipeline(False)
    pipe.save_pretrained(tmp_path / "flux")
    save_file({"prompt_embeds": torch.randn(1, 6, 32), "pooled_prompt_embeds": torch.randn(1, 32)},
              str(tmp_path / "embeds.safetensors"))

    def printed(*options):
        assert main(["generate", "--pipeline", str(tmp_path / "flux"), "--prompt-embeds",
                     str(tmp_path / "embeds.safetensors"), "--height", "32", "--width", "48", "--steps", "1",
                     "--dtype", "fp32", "--device", "cpu", "--no-progress", "--out", str(tmp_path / "x.png"),
                     *options]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("attention:")]

    multiple = pipe.vae_scale_factor * 2  # FLUX packs 2 x 2 latent pixels into one token
    grid = (32 // multiple, 48 // multiple)
    cost = attention_cost(pipe.transformer, grid, 6, radius=2, down_factor=0)  # 6 tokens in the embeddings file
    assert printed("--clear", "radius=2") == [describe(cost, 2, 0, 32, 48)]
    assert printed() == []  # stock attention: nothing to compare
    assert clear_settings(Attention(clear="backend=reference")) is None  # no radius: refused later, not counted
    assert clear_settings(Attention(clear="radius=4,down_factor=2")) == (4, 2)


def test_the_docs_quote_what_generate_prints_for_flux_dev(monkeypatch):
    """The table the docs include is what the count gives for FLUX.1-dev's configuration today, and every
    printed line the diffusers page shows is in it."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    import clear_flops

    results = (root / "benchmarks" / "results" / "clear-attention-flops.md").read_text()
    for row in clear_flops.rows([4096]):  # FLUX.1-dev on the meta device
        assert f"| {row['line']} |" in results
    quoted = [line for line in (root / "docs" / "diffusers.md").read_text().splitlines()
              if line.startswith("attention: CLEAR")]
    assert quoted and all(f"| {line} |" in results for line in quoted)
