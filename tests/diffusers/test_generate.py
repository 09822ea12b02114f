"""`ditkit generate` over tiny random diffusers pipelines (`tiny_diffusers`), built and saved in the
test (offline)."""

import numpy as np
import pytest
import torch
from PIL import Image

from ditkit.cli.main import main
from ditkit.errors import DitkitError
from tiny_diffusers import flux_pipeline, pixart_pipeline, sd3_pipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Pipeline folders saved with save_pretrained, and a prompt embeddings file for the FLUX one
    without text encoders."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("pipelines")
    torch.manual_seed(0)
    for name, make in [("flux", lambda: flux_pipeline(True)), ("flux_bare", lambda: flux_pipeline(False)),
                       ("sd3", sd3_pipeline), ("pixart", pixart_pipeline)]:
        make().save_pretrained(root / name)
    save_file({"prompt_embeds": torch.randn(1, 6, 32), "pooled_prompt_embeds": torch.randn(1, 32)},
              root / "embeds.safetensors")
    return root


def generate(folders, out, *options, pipeline="flux_bare", size=(32, 32)):
    """Run `ditkit generate` (2 steps, fp32) and return the (first) image as an int array and its text chunks."""
    prompt = ["--prompt-embeds", str(folders / "embeds.safetensors")] if pipeline == "flux_bare" else []
    assert main(["generate", "--pipeline", str(folders / pipeline), "--height", str(size[0]), "--width",
                 str(size[1]), "--steps", "2", "--dtype", "fp32", "--device", "cpu", "--no-progress", "--out",
                 str(out), *prompt, *options]) == 0
    image = Image.open(out if out.exists() else out.with_name(f"{out.stem}-0.png"))  # --num > 1: numbered
    return np.asarray(image).astype(int), dict(image.text)


def test_flux_from_embeddings_clear_covering_the_grid_is_the_stock_image(folders, tmp_path):
    stock, text = generate(folders, tmp_path / "stock.png")
    clear, clear_text = generate(folders, tmp_path / "clear.png", "--clear", "radius=100,backend=reference")
    assert stock.shape == (32, 32, 3) and np.abs(stock - clear).max() <= 1  # equal up to rounding to 8 bits
    assert text["seed"] == "0" and text["steps"] == "2" and text["guidance"] == "3.5" and text["size"] == "32x32"
    assert text["prompt"] == "prompt embeddings #0" and "clear" not in text
    assert clear_text["clear"] == "radius=100,backend=reference" and "seed: 0" in clear_text["parameters"]
    local, _ = generate(folders, tmp_path / "local.png", "--clear", "radius=1")
    assert np.abs(stock - local).max() > 1  # a small window really changes the picture
    seeded, _ = generate(folders, tmp_path / "seeded.png", "--seed", "1")
    assert np.abs(stock - seeded).max() > 1


@pytest.mark.parametrize("pipeline", ["flux", "sd3", "pixart"])
def test_prompt_through_tiny_text_encoders(folders, tmp_path, pipeline):
    """--prompt runs each pipeline's own text encoders; CLEAR covering the grid keeps the picture."""
    stock, text = generate(folders, tmp_path / "stock.png", "--prompt", "a red cat", "--num", "2",
                           pipeline=pipeline, size=(32, 48))
    clear, _ = generate(folders, tmp_path / "clear.png", "--prompt", "a red cat", "--clear", "radius=100",
                        pipeline=pipeline, size=(32, 48))
    assert stock.shape == (32, 48, 3) and text["prompt"] == "a red cat"
    assert np.abs(stock - clear).max() <= 1
    second = Image.open(tmp_path / "stock-1.png")
    assert second.text["seed"] == "1" and np.abs(np.asarray(second).astype(int) - stock).max() > 1


def distil_student(folders, out):
    """A 2-step `ditkit distill` of the tiny FLUX transformer (teacher: the pipeline's transformer folder)."""
    assert main(["distill", "--teacher", str(folders / "flux_bare" / "transformer"), "--radius", "1",
                 "--resolution", "32", "--teacher-steps", "2", "--num-samples", "2", "--steps", "2",
                 "--batch-size", "2", "--eval-num", "1", "--lr", "1e-2", "--out", str(out), "--no-progress"]) == 0
    return out


def test_flux_student_loads_and_changes_the_picture(folders, tmp_path):
    from ditkit.diffusers.pipelines import Attention, load_pipeline

    student = distil_student(folders, tmp_path / "student")
    untuned, _ = generate(folders, tmp_path / "untuned.png", "--clear", "radius=1")
    tuned, text = generate(folders, tmp_path / "tuned.png", "--student", str(student))
    assert text["student"] == str(student) and text["clear"] == "radius=1.0,down_factor=0"
    assert np.abs(tuned - untuned).max() > 0
    chained, _ = generate(folders, tmp_path / "chained.png", "--student", str(student), "--upscale-from", "16",
                          "--strength", "1")
    assert np.array_equal(chained, tuned)  # the chain loads the student after the stock base
    pipe = load_pipeline(folders / "flux_bare", device="cpu")
    before = pipe.transformer.transformer_blocks[0].attn.to_q.weight.clone()
    Attention(student=student).apply(pipe.transformer)
    assert not torch.equal(pipe.transformer.transformer_blocks[0].attn.to_q.weight, before)
    assert hasattr(pipe.transformer, "_ditkit_clear")


def stock_base_upsampled(folders, size, base_size) -> np.ndarray:
    """What the chain at strength 0 must return, with diffusers alone: the stock FLUX pipeline's latents
    at the base size, upsampled bicubically, decoded."""
    from safetensors.torch import load_file

    from diffusers import FluxPipeline

    pipe = FluxPipeline.from_pretrained(folders / "flux_bare", text_encoder=None, tokenizer=None,
                                        text_encoder_2=None, tokenizer_2=None)
    with torch.no_grad():
        packed = pipe(**load_file(folders / "embeds.safetensors"), height=base_size, width=base_size,
                      num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="latent").images
        base = pipe._unpack_latents(packed, base_size, base_size, pipe.vae_scale_factor)
        latents = torch.nn.functional.interpolate(base, size=(size[0] // 2, size[1] // 2), mode="bicubic")
        pixels = pipe.vae.decode(latents / 0.5 + 0.1).sample  # the tiny VAE's scaling and shift factors
    return np.asarray(pipe.image_processor.postprocess(pixels)[0]).astype(int)


def test_chain_strength_one_is_plain_generation_and_zero_the_upsampled_base(folders, tmp_path):
    size, chain = (48, 32), ("--upscale-from", "16")
    plain, _ = generate(folders, tmp_path / "plain.png", "--clear", "radius=1", size=size)
    full, text = generate(folders, tmp_path / "s1.png", "--clear", "radius=1", *chain, "--strength", "1", size=size)
    assert np.array_equal(full, plain) and text["upscale"] == "from 16x16 at strength 1.0"
    kept, _ = generate(folders, tmp_path / "s0.png", "--clear", "radius=1", *chain, "--strength", "0", size=size)
    assert np.array_equal(kept, stock_base_upsampled(folders, size, 16))
    halfway, _ = generate(folders, tmp_path / "s5.png", "--clear", "radius=1", *chain, "--strength", "0.5", size=size)
    assert np.abs(halfway - plain).max() > 1 and np.abs(halfway - kept).max() > 1


def test_sd3_chain_at_strength_one_is_plain_generation(folders, tmp_path):
    args = ("--prompt", "a cat", "--clear", "radius=1")
    plain, _ = generate(folders, tmp_path / "plain.png", *args, pipeline="sd3")
    full, _ = generate(folders, tmp_path / "s1.png", *args, "--upscale-from", "16", "--strength", "1",
                       pipeline="sd3")
    assert np.array_equal(full, plain)


def refusal(capsys, *argv) -> str:
    assert main(["generate", "--height", "32", "--width", "32", "--device", "cpu", "--dtype", "fp32",
                 "--no-progress", *argv]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # after diffusers' loading bars, if any
    assert error.startswith("ditkit: error:")
    return error


def test_bad_input_is_refused_in_one_line(folders, tmp_path, capsys):
    from ditkit.checkpoint import save_weights
    from ditkit.record import DataSettings, DiffusersModel, DiffusionSettings, RunRecord

    bare = ["--pipeline", str(folders / "flux_bare")]
    embeds = ["--prompt-embeds", str(folders / "embeds.safetensors")]
    assert "not a diffusers pipeline folder" in refusal(capsys, "--pipeline", str(tmp_path), "--prompt", "a")
    assert "has no text_encoder, text_encoder_2: pass --prompt-embeds" in refusal(capsys, *bare, "--prompt", "a")
    assert "use multiples of 4" in refusal(capsys, *bare, *embeds, "--height", "30")
    assert "use multiples of 4" in refusal(capsys, *bare, *embeds, "--upscale-from", "18")
    assert "no img2img pipeline for PixArt" in refusal(capsys, "--pipeline", str(folders / "pixart"), "--prompt",
                                                       "a", "--upscale-from", "16")
    assert "CLEAR needs a radius" in refusal(capsys, *bare, *embeds, "--clear", "down_factor=2")
    # the clear mixer's spec, checked before the pipeline is read (this folder is no pipeline)
    for bad, message in [("radius=abc", "option radius must be float"), ("radius=0", "radius"),
                         ("qkv_bias=true,radius=2", "unknown CLEAR option qkv_bias"),
                         ("full", "not full: give clear:radius=")]:
        assert message in refusal(capsys, "--pipeline", str(tmp_path), "--prompt", "a", "--clear", bad)

    def student(name, shape, model="FluxTransformer2DModel"):
        record = RunRecord(DiffusersModel(model, "teacher"), DiffusionSettings(), DataSettings(resolution=32),
                           distill={"radius": 1, "down_factor": 0})
        key = "transformer.transformer_blocks.0.attn.to_q.weight"
        return str(save_weights(tmp_path / name, {key: torch.zeros(shape)}, record))

    assert "student of a SD3Transformer2DModel" in refusal(
        capsys, *bare, *embeds, "--student", student("sd3", (32, 32), "SD3Transformer2DModel"))
    assert "does not fit this transformer" in refusal(capsys, *bare, *embeds, "--student", student("wide", (64, 32)))
    with pytest.raises(DitkitError, match="strength must be between 0 and 1"):
        from ditkit.diffusers.pipelines import UpscaleChain

        UpscaleChain(16, 16, 1.5)


def test_clear_pipeline_builds_no_n_by_n_tensor(folders):
    """64 x 64 image tokens (256 px): an N x N boolean mask would be 16 MiB, fp32 scores 32 MiB a head.
    With CLEAR the pipeline's denoising (latent output: the tiny VAE's own mid-block attention is
    not the transformer's) creates nothing quadratic."""
    from ditkit.diffusers.pipelines import Attention, load_pipeline, read_prompt_embeddings
    from ditkit.metrics.memory import largest_tensor

    pipe = load_pipeline(folders / "flux_bare", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    embeddings = read_prompt_embeddings(folders / "embeds.safetensors", pipe)
    tokens = 64 * 64

    def largest_with(backend):
        Attention(clear={"radius": 4, "backend": backend}).apply(pipe.transformer)
        with torch.no_grad():
            return largest_tensor(lambda: pipe(**embeddings, height=256, width=256, num_inference_steps=1,
                                               output_type="latent"))

    assert largest_with("reference") >= tokens * tokens  # the tracker sees the reference backend's mask...
    assert largest_with("auto") < tokens * tokens / 4  # ...and nothing quadratic on the default path
