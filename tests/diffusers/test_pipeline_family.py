"""`ditkit generate` over the FLUX / SD3 pipeline family (`ditkit.diffusers.pipeline_family`): img2img,
inpainting, Fill, Control, ControlNet and Kontext, each a tiny random pipeline saved in the test
(offline; FLUX without text encoders, from prompt embeddings). For each: stock equals CLEAR with a
radius covering the grid, radius 2 changes the picture, a student loads; bad input is one line
before any weight loads."""

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_contract import check_strips_equal_the_whole
from ditkit.checkpoint import save_weights
from ditkit.cli.main import main
from ditkit.diffusers import pipeline_family as family_lib
from ditkit.diffusers import pipelines
from ditkit.diffusers.adapters import find_adapter
from ditkit.diffusers.clear import apply_clear, clear_is_on
from ditkit.errors import DitkitError
from ditkit.record import DataSettings, DiffusersModel, DiffusionSettings, RunRecord
from tiny_diffusers import (
    FLUX_SIZES,
    fake_hub_cache,
    flux_controlnet,
    flux_ids,
    flux_pipeline,
    sd3_controlnet,
    sd3_pipeline,
)

SIZE = 32  # 32 px: 8x8 tokens for the tiny FLUX (VAE /2, 2x2 packing) and SD3 (VAE /2, patch 2)
COVERING = "radius=100"

# name -> (pipeline factory, image options of its call)
CASES = {
    "flux_img2img": (lambda: flux_pipeline(False, "FluxImg2ImgPipeline"), ("image", "--strength", "0.8")),
    "flux_inpaint": (lambda: flux_pipeline(False, "FluxInpaintPipeline"), ("image", "mask", "--strength", "0.9")),
    "flux_fill": (lambda: flux_pipeline(False, "FluxFillPipeline", in_channels=48), ("image", "mask")),
    "flux_control": (lambda: flux_pipeline(False, "FluxControlPipeline", in_channels=32), ("control",)),
    "flux_controlnet": (lambda: flux_pipeline(False, "FluxControlNetPipeline"),
                        ("control", "--controlnet", "flux_cn", "--control-scale", "0.8")),
    "sd3_img2img": (lambda: sd3_pipeline("StableDiffusion3Img2ImgPipeline"), ("image", "--strength", "0.8")),
    "sd3_inpaint": (lambda: sd3_pipeline("StableDiffusion3InpaintPipeline", latent_channels=16),
                    ("image", "mask", "--strength", "0.9")),
    "sd3_controlnet": (lambda: sd3_pipeline("StableDiffusion3ControlNetPipeline", controlnet=True), ("control",)),
    "sd3_controlnet_inpaint": (lambda: sd3_pipeline("StableDiffusion3ControlNetInpaintingPipeline", controlnet=True,
                                                    latent_channels=16), ("control", "control_mask")),
    "flux_kontext_inpaint": (lambda: flux_pipeline(False, "FluxKontextInpaintPipeline"),
                             ("image", "mask", "reference", "--strength", "0.9")),
}
FILES = {"image": "--image", "mask": "--mask", "control": "--control-image", "control_mask": "--control-mask",
         "reference": "--reference"}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """Every tiny pipeline folder (the FLUX ControlNet pipeline without its ControlNet, which is its
    own folder, flux_cn, for --controlnet), Kontext, prompt embeddings and the input images."""
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("family")
    torch.manual_seed(0)
    for name, (make, _) in CASES.items():
        make().save_pretrained(root / name)
    flux_pipeline(False, "FluxKontextPipeline").save_pretrained(root / "flux_kontext")
    flux_controlnet().save_pretrained(root / "flux_cn")
    sd3_controlnet().save_pretrained(root / "sd3_cn")
    save_file({"prompt_embeds": torch.randn(1, 6, 32), "pooled_prompt_embeds": torch.randn(1, 32)},
              root / "embeds.safetensors")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / "image.png")
    Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(root / "control.png")
    Image.fromarray(np.where(np.arange(SIZE)[:, None] < SIZE // 2, 255, 0).repeat(SIZE, 1).astype(np.uint8)).save(
        root / "mask.png")  # repaint the top half
    shutil.copy(root / "mask.png", root / "control_mask.png")
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(root / "small_mask.png")
    Image.fromarray(rng.integers(0, 256, (24, 16, 3), dtype=np.uint8)).save(root / "context.png")
    shutil.copy(root / "context.png", root / "reference.png")  # Kontext inpainting's reference: any size
    return root


def case_options(root, name, images=True):
    """The command line of a case: its pipeline, the prompt (embeddings for FLUX) and (`images`) its image options."""
    options = ["--pipeline", str(root / name)]
    options += ["--prompt-embeds", str(root / "embeds.safetensors")] if name.startswith("flux") else ["--prompt", "a"]
    for option in CASES[name][1] if images else ():
        if option in FILES:
            options += [FILES[option], str(root / f"{option}.png")]
        else:
            options.append(str(root / option) if option == "flux_cn" else option)
    return options


def generate(root, out, *options):
    """`ditkit generate` (2 steps, fp32, 32 px) -> the image as an int array and its text chunks."""
    assert main(["generate", "--height", str(SIZE), "--width", str(SIZE), "--steps", "2", "--dtype", "fp32",
                 "--device", "cpu", "--no-progress", "--out", str(out), *options]) == 0
    image = Image.open(out)
    return np.asarray(image).astype(int), dict(image.text)


def changed(a, b) -> bool:
    """The pictures differ by more than rounding to 8 bits does (it moves a value by at most 1, in a
    handful of pixels); the tiny SD3's pictures move little with its attention, by 1 in many pixels."""
    return np.abs(a - b).max() > 1 or (a != b).mean() > 0.02


def student_file(folder, transformer_class: str, width: int):
    """A ditkit student (radius 1) whose first block's query projection differs from the teacher's."""
    record = RunRecord(DiffusersModel(transformer_class, "teacher"), DiffusionSettings(), DataSettings(resolution=32),
                       distill={"radius": 1, "down_factor": 0})
    key = "transformer.transformer_blocks.0.attn.to_q.weight"
    return str(save_weights(folder / f"student-{transformer_class}", {key: torch.randn(width, width)}, record))


@pytest.mark.parametrize("name", list(CASES))
def test_stock_equals_covering_clear_and_a_small_window_or_a_student_changes_it(root, tmp_path, name):
    options = case_options(root, name)
    stock, text = generate(root, tmp_path / "stock.png", *options)
    covering, _ = generate(root, tmp_path / "covering.png", *options, "--clear", COVERING)
    assert stock.shape == (SIZE, SIZE, 3) and stock.std() > 1
    assert np.abs(stock - covering).max() <= 1  # equal up to rounding to 8 bits
    local, local_text = generate(root, tmp_path / "local.png", *options, "--clear", "radius=2")
    assert changed(stock, local)
    assert text["image" if "image" in CASES[name][1] else "control image"].endswith(".png")
    flux = name.startswith("flux")
    student = student_file(tmp_path, "FluxTransformer2DModel" if flux else "SD3Transformer2DModel", 32 if flux else 16)
    untuned, _ = generate(root, tmp_path / "untuned.png", *options, "--clear", "radius=1")
    tuned, tuned_text = generate(root, tmp_path / "tuned.png", *options, "--student", student)
    assert tuned_text["student"] == student and changed(tuned, untuned)


@pytest.mark.parametrize("name", ["flux_controlnet", "sd3_controlnet"])
def test_the_controlnet_gets_clear_unless_told_not_to(root, tmp_path, name, capsys):
    """With a covering radius both choices are the stock picture; with radius 2 the ControlNet's own
    CLEAR changes its residuals, so the two choices differ."""
    options = case_options(root, name)
    stock, _ = generate(root, tmp_path / "stock.png", *options)
    kept, text = generate(root, tmp_path / "kept.png", *options, "--clear", COVERING, "--no-clear-controlnet")
    assert np.abs(stock - kept).max() <= 1 and text["clear controlnet"] == "no"
    capsys.readouterr()
    both, text = generate(root, tmp_path / "both.png", *options, "--clear", "radius=2")
    assert "TFLOPs per call of the transformer and its ControlNet)" in capsys.readouterr().out
    alone, _ = generate(root, tmp_path / "alone.png", *options, "--clear", "radius=2", "--no-clear-controlnet")
    assert "(the ControlNet's attention kept full)" in capsys.readouterr().out
    assert text["clear controlnet"] == "yes" and changed(both, alone)


@pytest.mark.parametrize("name", ["flux_controlnet", "sd3_controlnet"])
def test_two_controlnets(root, tmp_path, name):
    """Two ControlNets run as diffusers' Multi*ControlNetModel, each with its image and scale: the
    second's scale changes the picture; CLEAR reaches both (a covering radius is the stock picture,
    radius 2 changes it). (Residual sums are not compared across scales: the pipeline draws each
    control image's latents from the VAE's distribution, and the tiny VAE's is wide.)"""
    net, control = str(root / ("flux_cn" if name == "flux_controlnet" else "sd3_cn")), str(root / "control.png")
    options = [*case_options(root, name, images=False), "--controlnet", net, "--controlnet", net,
               "--control-image", control, "--control-image", control]

    def two(out, first, second, *extra):
        return generate(root, tmp_path / out, *options, "--control-scale", first, "--control-scale", second, *extra)

    stock, text = two("stock.png", "0.5", "0.5")
    assert text["controlnet"] == f"{net}, {net}" and text["control scale"] == "0.5, 0.5"
    assert changed(stock, two("less.png", "0.5", "0")[0])
    assert np.abs(stock - two("covering.png", "0.5", "0.5", "--clear", COVERING)[0]).max() <= 1
    assert changed(stock, two("local.png", "0.5", "0.5", "--clear", "radius=2")[0])
    pipe = pipelines.load_pipeline(root / name, device="cpu",
                                   components={"controlnet": family_lib.load_controlnets((net, net))})
    pipelines.Attention(clear="radius=2").apply_to_pipeline(pipe)
    assert len(pipe.controlnet.nets) == 2 and all(clear_is_on(each) for each in pipe.controlnet.nets)


def test_attention_switches_the_controlnet_with_a_students_radius(root, tmp_path):
    pipe = pipelines.load_pipeline(root / "flux_controlnet", device="cpu",
                                   components={"controlnet": flux_controlnet()})
    student = student_file(tmp_path, "FluxTransformer2DModel", 32)
    pipelines.Attention(student=student).apply_to_pipeline(pipe)
    assert clear_is_on(pipe.transformer) and clear_is_on(pipe.controlnet)
    layers = find_adapter("FluxTransformer2DModel").self_attention_layers(pipe.controlnet)
    assert layers and {attn.processor.radius for _, attn, _ in layers} == {1}  # the student's radius
    stock = pipelines.load_pipeline(root / "sd3_controlnet", device="cpu")
    pipelines.Attention(clear="radius=2", controlnet=False).apply_to_pipeline(stock)
    assert clear_is_on(stock.transformer) and not clear_is_on(stock.controlnet)
    request = pipelines.Request(SIZE, SIZE, prompt="a", inputs={"control_image": Image.open(root / "control.png")})
    with pytest.raises(DitkitError, match="ControlNet's residuals cover every token"):
        pipelines.generate(stock, request, progress=False, patch=True)


def test_kontext_with_clear_and_a_student(root, tmp_path, capsys):
    """The context changes the picture; CLEAR covering both images is the stock picture, radius 2
    changes it (the FLOPs line counts the context's 6x4 tokens), a student loads."""
    from ditkit.diffusers.attention_cost import attention_cost, describe

    options = ["--pipeline", str(root / "flux_kontext"), "--prompt-embeds", str(root / "embeds.safetensors"),
               "--image", str(root / "context.png")]
    stock, text = generate(root, tmp_path / "stock.png", *options)
    plain, _ = generate(root, tmp_path / "plain.png", *options[:4])  # without a context image: text to image
    assert stock.shape == (SIZE, SIZE, 3) and changed(stock, plain) and text["image"].endswith("context.png")
    covering, _ = generate(root, tmp_path / "covering.png", *options, "--clear", COVERING)
    assert np.abs(stock - covering).max() <= 1
    capsys.readouterr()
    local, _ = generate(root, tmp_path / "local.png", *options, "--clear", "radius=2")
    assert changed(stock, local)
    pipe = pipelines.load_pipeline(root / "flux_kontext", device="cpu")
    cost = attention_cost(pipe.transformer, (8, 8), 6, 2, 0, context=((6, 4),))  # 24x16 px context, 6 text tokens
    assert describe(cost, 2, 0, SIZE, SIZE) in capsys.readouterr().out
    untuned, _ = generate(root, tmp_path / "untuned.png", *options, "--clear", "radius=1")
    tuned, tuned_text = generate(root, tmp_path / "tuned.png", *options, "--student",
                                 student_file(tmp_path, "FluxTransformer2DModel", 32))
    assert tuned_text["student"].endswith("student-FluxTransformer2DModel") and changed(tuned, untuned)
    pipe = pipelines.load_pipeline(root / "flux_kontext", device="cpu")  # the 24x16 px context: 6x4 tokens
    request = pipelines.Request(SIZE, SIZE, embeddings=pipelines.read_prompt_embeddings(root / "embeds.safetensors",
                                                                                        pipe), steps=1,
                                inputs={"image": Image.open(root / "context.png")})
    with pytest.raises(DitkitError, match="resize it to multiples of 16 px"):
        pipelines.generate(pipe, request, pipelines.Attention(clear="radius=2,down_factor=4"), progress=False)


def refusal(capsys, *argv) -> str:
    assert main(["generate", "--height", str(SIZE), "--width", str(SIZE), "--device", "cpu", "--dtype", "fp32",
                 "--no-progress", *argv]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error[-1].startswith("ditkit: error:")
    return error[-1]


@pytest.fixture(scope="module")
def weightless(root, tmp_path_factory):
    """Each case's folder with its model_index.json and empty component folders: any weight loading
    would fail, so a refusal from here was given before anything loaded."""
    folders = tmp_path_factory.mktemp("weightless")
    for name in [*CASES, "flux_kontext"]:
        (folders / name).mkdir()
        shutil.copy(root / name / "model_index.json", folders / name)
        for component in (root / name).iterdir():
            if component.is_dir():
                (folders / name / component.name).mkdir()
    return folders


def test_bad_input_is_one_line_before_any_weight_loads(root, weightless, tmp_path, capsys):
    def bad(name, *options):
        embeds = ["--prompt-embeds", str(root / "embeds.safetensors")] if name.startswith("flux") else ["--prompt", "a"]
        return refusal(capsys, "--pipeline", str(weightless / name), *embeds, *options)

    image, mask, control = (str(root / f"{name}.png") for name in ("image", "mask", "control"))
    small_mask, context = str(root / "small_mask.png"), str(root / "context.png")
    assert "give a mask of the image's size" in bad("flux_fill", "--image", image, "--mask", small_mask)
    assert "FluxControlPipeline needs --control-image FILE" in bad("flux_control")
    assert "needs --control-image FILE" in bad("sd3_controlnet")
    assert "needs --control-mask FILE" in bad("sd3_controlnet_inpaint", "--control-image", control)
    assert "give it with --control-image too" in bad("sd3_controlnet_inpaint", "--control-mask", mask)
    assert "takes no --control-mask" in bad("sd3_controlnet", "--control-image", control, "--control-mask", mask)
    assert "takes no --reference" in bad("flux_inpaint", "--image", image, "--mask", mask, "--reference", context)
    assert "context image's tokens are not rows" in bad("flux_kontext_inpaint", "--image", image, "--mask", mask,
                                                        "--clear", "radius=2", "--parallel", "patch")
    assert "holds no ControlNet: give --controlnet PATH" in bad("flux_controlnet", "--control-image", control)
    assert "needs --mask FILE" in bad("flux_inpaint", "--image", image)
    assert "FluxImg2ImgPipeline takes no --mask" in bad("flux_img2img", "--image", image, "--mask", mask)
    assert "takes no --control-image" in bad("flux_img2img", "--image", image, "--control-image", control)
    assert "is 24x16, the request is 32x32" in bad("flux_img2img", "--image", context)
    assert "not a readable image" in bad("flux_img2img", "--image", str(root / "embeds.safetensors"))
    assert "--strength must be in (0, 1]" in bad("flux_img2img", "--image", image, "--strength", "1.5")
    assert "context image's tokens are not rows" in bad("flux_kontext", "--image", context, "--clear", "radius=2",
                                                        "--parallel", "patch")
    assert "run it in one process" in bad("sd3_controlnet", "--control-image", control, "--clear", "radius=2",
                                          "--parallel", "patch")
    assert "takes images already" in bad("flux_fill", "--image", image, "--mask", mask, "--upscale-from", "16")
    assert "give one --controlnet PATH per --control-image" in bad("sd3_controlnet", "--control-image", control,
                                                                  "--control-image", control)
    assert "take 2 --control-image files" in bad("flux_controlnet", "--controlnet", "a", "--controlnet", "b",
                                                 "--control-image", control)
    assert "give one for all, or one per --controlnet" in bad("sd3_controlnet", "--control-image", control,
                                                              "--control-scale", "1", "--control-scale", "2")
    assert "--controlnet /nonexistent does not exist" in bad("flux_controlnet", "--controlnet", "/nonexistent",
                                                             "--control-image", control)
    assert "would replace the --image input" in bad("flux_img2img", "--image", image, "--out", image)
    assert "would replace the --control-image input" in bad("sd3_controlnet", "--control-image", control,
                                                            "--out", control)
    assert "takes one --control-image" in bad("flux_control", "--control-image", control, "--control-image", control)
    assert "holds no ControlNet: drop --controlnet" in bad("flux_img2img", "--image", image, "--controlnet", "x")
    assert "not a diffusers ControlNet folder" in bad("flux_controlnet", "--control-image", control, "--controlnet",
                                                      str(root / "flux_img2img"))
    # a pipeline whose transformer ditkit has no adapter for (diffusers' AuraFlow), and one without a transformer
    for transformer, held in [(["diffusers", "AuraFlowTransformer2DModel"], "with a AuraFlowTransformer2DModel"),
                              (None, "with no transformer")]:
        folder = tmp_path / held.replace(" ", "_")
        folder.mkdir()
        index = {"_class_name": "AuraFlowPipeline", "transformer": transformer}
        (folder / "model_index.json").write_text(json.dumps(index))
        assert f"holds a AuraFlowPipeline {held}: ditkit generate runs the pipelines of FluxTransformer2DModel" in \
            refusal(capsys, "--pipeline", str(folder), "--prompt", "a")


def fill_flux(grid):
    """A tiny FLUX transformer as FluxFill holds it: 48 input channels (the latents, the masked
    image's latents and the mask, concatenated per token)."""
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=48, out_channels=16, **FLUX_SIZES)
    tokens = grid[0] * grid[1]
    inputs = dict(hidden_states=torch.randn(2, tokens, 48), encoder_hidden_states=torch.randn(2, 7, 32),
                  pooled_projections=torch.randn(2, 32), timestep=torch.tensor([0.5, 0.2]), img_ids=flux_ids(grid),
                  txt_ids=torch.zeros(7, 3), guidance=torch.tensor([3.5, 3.5]))
    return model, inputs, "text_first"


def test_fill_and_control_transformers_run_on_strips(one_thread):
    """Fill's and Control's inputs are concatenated per token, so patch-parallel strips (cut before
    the token embedding) equal the whole grid as for text to image."""
    check_strips_equal_the_whole(fill_flux, (8, 8), 2, "halo", 0)


def test_sd3_controlnet_is_served_by_the_transformers_adapter():
    controlnet = sd3_controlnet()
    assert find_adapter(controlnet) is None  # not a transformer of its own...
    layers = apply_clear(controlnet, 2, adapter=find_adapter("SD3Transformer2DModel"))
    assert layers and clear_is_on(controlnet)  # ...but its blocks take the SD3 adapter's CLEAR


def test_controlnet_from_the_hugging_face_cache(root, tmp_path, monkeypatch):
    """--controlnet ORG/NAME resolves from a fake cache in HF_HOME (offline), as --pipeline does: the
    same picture as the ControlNet's folder."""
    fake_hub_cache(tmp_path, monkeypatch, "org/tiny-controlnet",
                   lambda folder: shutil.copytree(root / "flux_cn", folder))
    options = case_options(root, "flux_controlnet")
    folder, _ = generate(root, tmp_path / "folder.png", *options)
    options[options.index(str(root / "flux_cn"))] = "org/tiny-controlnet"
    cached, text = generate(root, tmp_path / "cached.png", *options)
    assert np.array_equal(folder, cached) and text["controlnet"] == "org/tiny-controlnet"


@pytest.mark.parametrize("name", ["flux_img2img", "flux_fill"])
def test_image_pipelines_on_patch_parallel_strips_equal_one_process(root, name):
    """Whole pipeline calls (VAE-encoded start image, Fill's mask channels, the scheduler's steps) on
    two patch-parallel strips, one thread each sharing the CLEAR transformer: each strip's picture is
    the one-process picture."""
    import copy
    import threading

    from ditkit.diffusers.patch_parallel import patch_parallel
    from thread_strips import on_thread_strips

    pipe = pipelines.load_pipeline(root / name, device="cpu")
    inputs = {"image": Image.open(root / "image.png").convert("RGB")}
    if name == "flux_fill":
        inputs["mask_image"] = Image.open(root / "mask.png").convert("L")
    else:
        inputs["strength"] = 0.8
    request = pipelines.Request(SIZE, SIZE, embeddings=pipelines.read_prompt_embeddings(root / "embeds.safetensors",
                                                                                        pipe), steps=2, inputs=inputs)
    whole = np.asarray(pipelines.generate(pipe, request, pipelines.Attention(clear="radius=2"), progress=False)[0])
    stock = np.asarray(pipelines.generate(pipelines.load_pipeline(root / name, device="cpu"), request,
                                          progress=False)[0])
    assert changed(whole.astype(int), stock.astype(int))  # the window is local: strips must exchange rows
    mine = threading.local()

    def run_strip(strip):
        mine.strip = strip
        own = copy.copy(pipe)  # the transformer is shared; each thread steps its own scheduler
        own.scheduler = copy.deepcopy(pipe.scheduler)
        return torch.from_numpy(np.asarray(pipelines.generate(own, request, progress=False)[0]).copy())

    calls = []

    def strip_of(grid, exchange):
        calls.append(grid)
        return mine.strip

    with patch_parallel(pipe.transformer, "halo", strip_of=strip_of):
        outputs = on_thread_strips((SIZE // 4, SIZE // 4), 2, "halo", run_strip)
    assert calls == [(SIZE // 4, SIZE // 4)] * 4  # each strip's transformer ran on its strip at both steps
    for out in outputs:
        assert np.abs(out.numpy().astype(int) - whole.astype(int)).max() <= 1
