"""Patch-parallel CLEAR in diffusers transformers (FLUX, SD3, PixArt): strips with text tokens in one
process (threads), and 2-process (gloo, torchrun) equality with one process, through the API and
`ditkit generate --parallel patch`."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distributed.test_patch import torchrun
from ditkit.cli.main import main
from ditkit.diffusers.clear import apply_clear
from ditkit.diffusers.patch_parallel import enable_patch_parallel, patch_parallel
from ditkit.errors import DitkitError
from ditkit.mixers.clear import local_attention, pool_tokens, strip_local_attention
from thread_strips import on_thread_strips
from tiny_diffusers import flux_pipeline, run, tiny_flux, tiny_pixart, tiny_sd3

HERE = Path(__file__).resolve().parent


def clear_on_thread_strips(q, k, v, grid, radius, num_global, parts, kv_exchange, pool_weight=None):
    """`strip_local_attention` on `parts` strips, one thread each; returns (global outputs of every
    strip, image outputs concatenated in image order)."""
    def run_strip(strip):
        mine = [torch.cat([x[..., :num_global, :], x[..., num_global:, :][..., strip.tokens, :]], dim=-2)
                for x in (q, k, v)]
        return strip_local_attention(*mine, strip, radius, num_global, pool_weight)

    outputs = on_thread_strips(grid, parts, kv_exchange, run_strip)
    return [out[..., :num_global, :] for out in outputs], torch.cat([out[..., num_global:, :] for out in outputs], -2)


@pytest.mark.parametrize("grid, radius, parts, down_factor", [
    ((8, 6), 2, 2, 0),   # halo 1: text queries merged from partial softmaxes
    ((8, 6), 3, 2, 2),   # pooled tokens as partial sums
    ((7, 5), 4, 3, 0),   # halo 3: the middle strip reads every row, the others do not (all still merge)
    ((5, 4), 5, 2, 0),   # strips shorter than the halo: every strip reads every row, no merge
])
@pytest.mark.parametrize("kv_exchange", ["halo", "allgather"])
def test_strips_with_text_tokens_equal_the_whole_grid(grid, radius, parts, down_factor, kv_exchange, one_thread):
    torch.manual_seed(0)
    num_text, tokens = 5, grid[0] * grid[1]
    q, k, v = (torch.randn(2, 2, num_text + tokens, 8) * 2 for _ in range(3))  # scores of size ~10: softmax peaked
    weight = torch.rand(down_factor**2) if down_factor else None
    extra = (pool_tokens(k, grid, num_text, weight), pool_tokens(v, grid, num_text, weight)) if weight is not None \
        else (None, None)
    whole = local_attention(q, k, v, grid, radius, num_text, *extra, backend="reference")
    texts, images = clear_on_thread_strips(q, k, v, grid, radius, num_text, parts, kv_exchange, weight)
    torch.testing.assert_close(images, whole[..., num_text:, :], atol=1e-5, rtol=1e-5)
    for text in texts:  # every strip holds the text tokens' outputs
        torch.testing.assert_close(text, whole[..., :num_text, :], atol=1e-5, rtol=1e-5)


def test_text_queries_scored_a_chunk_at_a_time_merge_to_the_same_outputs(monkeypatch, one_thread):
    """A scores budget of 1,200 bytes: the 5 text queries are scored 2 or 3 at a time (2 x 2 heads x
    24-29 keys x 4 bytes per query), with the same outputs as whole-grid attention."""
    from ditkit.mixers import clear

    monkeypatch.setattr(clear, "GLOBAL_SCORES_BUDGET", 3 * 4 * 2 * 2 * 25)
    chunks = []
    partial_attention = clear._partial_attention
    monkeypatch.setattr(clear, "_partial_attention", lambda q, *kv: chunks.append(q.shape[-2]) or
                        partial_attention(q, *kv))
    grid, num_text = (8, 6), 5
    q, k, v = (torch.randn(2, 2, num_text + 48, 8) * 2 for _ in range(3))
    whole = local_attention(q, k, v, grid, 2, num_text, backend="reference")
    texts, images = clear_on_thread_strips(q, k, v, grid, 2, num_text, 2, "halo")
    assert chunks and max(chunks) < num_text  # split into chunks on both strips
    torch.testing.assert_close(images, whole[..., num_text:, :], atol=1e-5, rtol=1e-5)
    for text in texts:
        torch.testing.assert_close(text, whole[..., :num_text, :], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make", [tiny_flux, tiny_sd3, tiny_pixart], ids=["flux", "sd3", "pixart"])
def test_one_process_is_one_strip_and_the_plain_clear_forward(make, one_thread):
    torch.manual_seed(0)
    model, inputs, _ = make()
    apply_clear(model.eval(), radius=2)
    plain = run(model, inputs)
    with patch_parallel(model):
        torch.testing.assert_close(run(model, inputs), plain, atol=1e-6, rtol=0)
    assert not hasattr(model, "_ditkit_patch")
    assert all(processor.layout.strip is None for processor in model.attn_processors.values()
               if hasattr(processor, "set_strip"))


def test_stock_processors_and_other_models_are_refused_with_the_fix():
    model, _, _ = tiny_flux()
    with pytest.raises(DitkitError, match="transformer_blocks.0.attn has a FluxAttnProcessor: switch CLEAR on"):
        enable_patch_parallel(model)
    apply_clear(model, radius=2)
    with pytest.raises(DitkitError, match="unknown kv_exchange 'ring'"):
        enable_patch_parallel(model, kv_exchange="ring")
    with pytest.raises(DitkitError, match="supports FluxTransformer2DModel"):
        enable_patch_parallel(torch.nn.Linear(2, 2))


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("diffusers-patch") / "results.json"
    torchrun(str(HERE / "diffusers_patch_worker.py"), str(out), timeout=240)
    return json.loads(out.read_text())


CASES = ["flux", "flux-pooled", "flux-strips-shorter-than-halo", "sd3", "sd3-interpolated-positions",
         "pixart", "pixart-pooled"]


@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one_process(two_process_results, case):
    result = two_process_results[case]
    assert result["max_diff"] < 1e-5 and result["scale"] > 0.1  # outputs of size ~1, equal within fp32 noise
    assert result["local_change"] > 1e-3  # the window really is local: CLEAR differs from stock attention


def test_the_halo_moves_fewer_bytes_than_an_all_gather(two_process_results):
    for case in ("flux", "flux-pooled", "sd3", "pixart"):
        assert 0 < two_process_results[case]["halo_bytes"] < two_process_results[case]["allgather_bytes"]
    shorter = two_process_results["flux-strips-shorter-than-halo"]  # the halo reaches every row: no saving
    assert shorter["halo_bytes"] == shorter["allgather_bytes"]


def cli_generate(tmp_path, name, *extra, parallel=False):
    """`ditkit generate` of the tiny FLUX pipeline with CLEAR, in this process or under torchrun."""
    args = ["generate", "--pipeline", str(tmp_path / "flux"), "--prompt-embeds", str(tmp_path / "embeds.safetensors"),
            "--height", "48", "--width", "32", "--steps", "2", "--dtype", "fp32", "--device", "cpu",
            "--no-progress", "--clear", "radius=2,down_factor=2", "--out", str(tmp_path / name), *extra]
    if parallel:
        result = torchrun("-m", "ditkit.cli.main", *args, "--parallel", "patch", timeout=240)
        assert result.stdout.count("wrote") == 1  # rank 0 only
    else:
        assert main(args) == 0
    return np.asarray(Image.open(tmp_path / name)).astype(int)


def test_cli_patch_parallel_writes_the_one_process_png(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    flux_pipeline(encoders=False).save_pretrained(tmp_path / "flux")
    save_file({"prompt_embeds": torch.randn(1, 6, 32), "pooled_prompt_embeds": torch.randn(1, 32)},
              tmp_path / "embeds.safetensors")
    chain = ("--upscale-from", "16x16", "--strength", "0.6")  # the img2img pass runs on strips too
    one, two = cli_generate(tmp_path, "one.png", *chain), cli_generate(tmp_path, "two.png", *chain, parallel=True)
    assert one.shape == two.shape == (48, 32, 3) and one.std() > 5
    assert np.abs(one - two).max() <= 1 and (one == two).mean() > 0.99  # 8-bit rounding of equal floats
    plain = cli_generate(tmp_path, "plain.png")  # without torchrun, --parallel patch is one strip: the same picture
    assert np.array_equal(cli_generate(tmp_path, "strip.png", "--parallel", "patch"), plain)


def test_cli_patch_parallel_needs_clear(tmp_path, capsys):
    assert main(["generate", "--pipeline", str(tmp_path), "--prompt", "a", "--height", "32", "--width", "32",
                 "--parallel", "patch"]) == 2
    assert "--parallel patch runs CLEAR's attention on strips: add --clear" in capsys.readouterr().err
