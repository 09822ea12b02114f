"""`ditkit generate`: images from a diffusers pipeline folder (FLUX, SD3, PixArt), stock or with CLEAR;
with CLEAR also patch-parallel under torchrun (`--parallel patch`)."""

from __future__ import annotations

from argparse import BooleanOptionalAction
from dataclasses import replace
from pathlib import Path

from ..diffusers import pipeline_family as family_lib
from ..diffusers import pipelines as lib
from ..diffusers.attention_cost import generate_line
from ..diffusers.folders import resolve_pipeline
from ..diffusers.lora import check_loras, load_loras, lora_settings
from ..distributed.launch import sampling_session
from ..errors import DitkitError
from .args import COMMANDS, SharedFlags, check_not_an_input, check_output_file, parse_size


def add_parser(sub, shared: SharedFlags) -> None:
    generate = sub.add_parser("generate", help=COMMANDS["generate"],
                              parents=[shared.seed, shared.device, shared.progress])
    generate.add_argument("--pipeline", required=True, help="diffusers pipeline folder (holds model_index.json), or "
                          "a hub repository ORG/NAME in the local Hugging Face cache (HF_HOME; never downloaded)")
    generate.add_argument("--revision", help="with --pipeline ORG/NAME: the cached branch, tag or commit "
                          "(default main)")
    generate.add_argument("--prompt", help="the text prompt")
    generate.add_argument("--prompt-embeds", metavar="FILE", help="safetensors of encode_prompt outputs "
                          "(prompt_embeds, pooled_prompt_embeds for FLUX/SD3), for folders without text encoders")
    generate.add_argument("--height", type=int, required=True, help="image height in pixels")
    generate.add_argument("--width", type=int, required=True, help="image width in pixels")
    generate.add_argument("--out", default="image.png", help="output PNG (out-0.png, out-1.png, ... for several)")
    generate.add_argument("--num", type=int, default=1, help="images per prompt (seeds count up from --seed)")
    generate.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's)")
    generate.add_argument("--guidance", type=float, help="guidance scale (default: the pipeline's)")
    generate.add_argument("--clear", metavar="OPTIONS", help="training-free CLEAR local attention: the clear "
                          "mixer's options, e.g. radius=16,down_factor=4,backend=auto (or clear:radius=16,...); "
                          "with an official --student file whose name does not say them: its radius and down_factor")
    generate.add_argument("--student", metavar="CKPT", help="a `ditkit distill` student of this pipeline's "
                          "transformer (brings its own CLEAR settings), or CLEAR's official FLUX.1-dev weights "
                          "(clear_local_8_down_4.safetensors: radius and down factor read from the name)")
    generate.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]", help="a LoRA "
                          "(.safetensors: diffusers' layout or one diffusers converts; repeatable), scaled by SCALE "
                          "(default 1); with --student its deltas apply on top of the student's weights")
    generate.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"], help="weights' dtype")
    generate.add_argument("--cpu-offload", action="store_true", help="keep each component on the CPU until it "
                          "runs (diffusers' enable_model_cpu_offload)")
    generate.add_argument("--vae-tiling", action="store_true", help="decode in tiles (large images)")
    generate.add_argument("--upscale-from", metavar="SIZE", help="high-resolution chain: the stock pipeline makes "
                          "the base at SIZE (e.g. 1024 or 1024x768), CLEAR denoises it upsampled from --strength")
    generate.add_argument("--strength", type=float, help="upscale chain: noise level of the upsampled base "
                          "(0 = kept as is, 1 = plain generation at the full size; default 0.7); img2img and "
                          "inpainting: the share of the steps run from --image (default: the pipeline's)")
    generate.add_argument("--parallel", choices=("none", "patch"), default="none",
                          help="patch: under torchrun, each process computes one horizontal strip of the image "
                               "tokens with CLEAR (needs --clear or --student; exact: same images as one process)")
    add_image_options(generate)
    generate.set_defaults(func=run)


def add_image_options(generate) -> None:
    """The inputs of the pipeline family's image pipelines (img2img, inpainting, Fill, Control,
    ControlNet, Kontext): which a pipeline takes is read from its call (`pipeline_family`)."""
    generate.add_argument("--image", metavar="FILE", help="img2img / inpainting / Fill: the start image (the "
                          "request's size); Kontext: the context image (any size)")
    generate.add_argument("--mask", metavar="FILE", help="inpainting / Fill: white = repaint, black = keep (the "
                          "image's size; binarized at half grey by the pipeline, as diffusers does)")
    generate.add_argument("--control-image", metavar="FILE", action="append", help="Control (Canny / Depth) and "
                          "ControlNet pipelines: the control picture (the request's size; repeat it with --controlnet "
                          "for several ControlNets, one each, in order)")
    generate.add_argument("--control-mask", metavar="FILE", help="SD3 ControlNet inpainting: white = repaint in "
                          "the control image (the request's size)")
    generate.add_argument("--reference", metavar="FILE", help="Kontext inpainting: the reference image, a context "
                          "whose tokens join the sequence (any size)")
    generate.add_argument("--controlnet", metavar="PATH", action="append", help="ControlNet pipelines: a diffusers "
                          "ControlNet model folder, or ORG/NAME in the local Hugging Face cache (default: the pipeline "
                          "folder's own); repeatable: several ControlNets add their residuals (diffusers' "
                          "Multi*ControlNetModel), each with its --control-image")
    generate.add_argument("--control-scale", type=float, action="append", help="ControlNet pipelines: the "
                          "residuals' weight (controlnet_conditioning_scale; default: the pipeline's); one for every "
                          "ControlNet, or repeated: one per --controlnet")
    generate.add_argument("--clear-controlnet", action=BooleanOptionalAction, default=None,
                          help="with --clear / --student: the ControlNet's own attention becomes CLEAR too "
                               "(default: yes; it would stay quadratic in the image tokens otherwise)")


def run(args) -> None:
    if args.strength is not None and not (args.upscale_from or args.image):
        raise DitkitError("--strength belongs to the upscale chain or to an image pipeline: give --upscale-from "
                          "SIZE or --image FILE too")
    if args.parallel == "patch" and not (args.clear or args.student):
        raise DitkitError("--parallel patch runs CLEAR's attention on strips: add --clear radius=... or --student "
                          "(a radius covering the image equals full attention)")
    request, chain = checked_request(args)  # every option and the output before anything loads
    with sampling_session(args.parallel, args.device) as session:  # --parallel patch: one strip per process
        images, settings = generate_images(args, request, chain, session.device, session.mode == "patch",
                                           session.is_main)
        if not session.is_main:  # every process holds the same images; one writes them
            return
    paths = lib.save_images(images, args.out, settings)
    print(f"wrote {', '.join(map(str, paths))} ({args.height}x{args.width})")


def checked_request(args) -> tuple[lib.Request, lib.UpscaleChain | None]:
    """The request and the upscale chain of the command line, refused in one line when an option
    is out of range; the output location checked too."""
    if Path(args.out).suffix.lower() != ".png":
        raise DitkitError(f"--out {args.out}: generate writes PNG files (its settings ride in PNG text chunks): "
                          "give a name ending in .png")
    check_output_file(args.out, image=True)
    check_not_an_input(args.out, {"--image": args.image, "--mask": args.mask, "--control-image": args.control_image,
                                  "--control-mask": args.control_mask, "--reference": args.reference,
                                  "--prompt-embeds": args.prompt_embeds, "--student": args.student,
                                  "--lora": args.lora})
    request = lib.Request(height=args.height, width=args.width, prompt=args.prompt, steps=args.steps,
                          guidance=args.guidance, seed=args.seed, num=args.num)
    chain = None
    if args.upscale_from:
        base_height, base_width = parse_size(args.upscale_from)
        chain = lib.UpscaleChain(base_height, base_width, 0.7 if args.strength is None else args.strength)
        chain.check_target(args.height, args.width)
    return replace(request, inputs=checked_image_inputs(args, chain is not None)), chain


def image_inputs(args, chain: bool) -> family_lib.ImageInputs:
    """The image options of the command line (the chain's --strength is the chain's, not the call's)."""
    return family_lib.ImageInputs(args.image, args.mask, tuple(args.control_image or ()), args.control_mask,
                                  args.reference, None if chain else args.strength, tuple(args.control_scale or ()),
                                  tuple(args.controlnet or ()), args.clear_controlnet)


def checked_image_inputs(args, chain: bool) -> dict:
    """The pipeline call's image arguments (images read with PIL, sizes checked), refused in one line
    when the folder's pipeline does not take them or needs others: the folder's model_index.json and
    the image files are read, no weight."""
    lib.Attention(args.clear, args.student)  # a bad --clear is refused before the folder is read
    inputs = image_inputs(args, chain)
    folder = resolve_pipeline(args.pipeline, args.revision)
    family = family_lib.pipeline_family(folder)
    family_lib.check_family_inputs(family, folder, inputs, args.parallel == "patch", chain)
    return inputs.read(args.height, args.width, family.context_image)


def generate_images(args, request: lib.Request, chain: lib.UpscaleChain | None, device: str, patch: bool,
                    progress: bool) -> tuple[list, list[dict]]:
    """The images of the command line, and their PNG settings."""
    attention = lib.Attention(args.clear, args.student, args.clear_controlnet is not False)  # refused before loading
    loras = check_loras(args.pipeline, args.revision, args.lora)  # each LoRA against the transformer's config
    pipe = lib.load_pipeline(args.pipeline, args.dtype, device, args.cpu_offload, args.vae_tiling,
                             progress=progress and not args.no_progress, revision=args.revision,
                             components=controlnet_component(args))
    load_loras(pipe, loras)
    if args.prompt_embeds:
        request = replace(request, embeddings=lib.read_prompt_embeddings(args.prompt_embeds, pipe))
    if progress and (saving := generate_line(pipe, request, attention)):  # CLEAR's FLOPs against full attention
        print(saving)
    if chain is not None:
        images = lib.generate_upscaled(pipe, request, chain, attention, progress and not args.no_progress, patch)
        chained = {"upscale": f"from {chain.base_height}x{chain.base_width} at strength {chain.strength}"}
    else:
        images = lib.generate(pipe, request, attention, progress and not args.no_progress, patch)
        chained = {}
    return images, lib.image_settings(pipe, request, {**attention.settings(), **chained, **input_settings(args, pipe),
                                                      **lora_settings(loras)})


def controlnet_component(args) -> dict:
    """{"controlnet": the --controlnet model(s)} for the pipeline's loading, or nothing."""
    if not args.controlnet:
        return {}
    dtype = {lib.dtype_keyword(): lib.DTYPES[args.dtype]}
    return {"controlnet": family_lib.load_controlnets(tuple(args.controlnet), **dtype)}


def joined(values: list | None) -> str | None:
    """A repeatable option's values for the PNG's settings ("a.png, b.png"), None when not given."""
    return ", ".join(map(str, values)) if values else None


def input_settings(args, pipe) -> dict[str, str]:
    """The image inputs for the PNG's settings (files by name)."""
    values = {"image": args.image, "mask": args.mask, "control image": joined(args.control_image),
              "control mask": args.control_mask, "reference": args.reference, "controlnet": joined(args.controlnet),
              "control scale": joined(args.control_scale)}
    if getattr(pipe, "controlnet", None) is not None:
        values["clear controlnet"] = "no" if args.clear_controlnet is False or not (args.clear or args.student) \
            else "yes"
    if args.image and args.strength is not None and not args.upscale_from:
        values["strength"] = args.strength
    return {key: str(value) for key, value in values.items() if value is not None}
