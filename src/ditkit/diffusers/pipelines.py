"""Generate with a diffusers pipeline folder (FLUX, SD3, PixArt-alpha/sigma), stock or with CLEAR: any
pipeline holding their transformers (img2img, inpainting, Fill, Control, ControlNet, Kontext; see
`pipeline_family`), its image inputs in `Request.inputs`.

    pipe = load_pipeline("FLUX.1-dev", dtype="bf16", device="cuda")
    request = Request(height=4096, width=4096, prompt="a cat")
    images = generate(pipe, request, Attention(clear="radius=16,down_factor=4"))  # training-free CLEAR
    images = generate(pipe, request, Attention(student="runs/flux-student"))  # a `ditkit distill` student
    images = generate(pipe, request, Attention(student="clear_local_8_down_4.safetensors"))  # CLEAR's release

`load_pipeline` also takes a hub repository id (`black-forest-labs/FLUX.1-dev`) found in the local Hugging
Face cache (`folders.resolve_pipeline`; nothing is downloaded). CLEAR's released weights are read by
`official_clear`.

The high-resolution chain (`generate_upscaled`) is CLEAR's way to its 8K pictures: the stock
pipeline (full attention) makes a base at a size it was trained for, the base is upsampled and the
pipeline's img2img counterpart, with CLEAR, denoises it at the full size from a strength S (SDEdit).
The base is upsampled in latent space: the img2img pipelines take latents as their `image`, so the
base needs no VAE decode and the full-size image no VAE encode (at 4K-8K the encoder's 128-channel
activations at full resolution outweigh the transformer's), no decode-encode round trip blurs it,
and no draw from the seed's generator is spent on the encoder's sampling, so S=1 gives exactly the
picture of plain generation at the full size with the same seed.
PixArt has no img2img pipeline in diffusers; its chain is refused rather than re-implemented.

`patch=True` runs the CLEAR transformer patch-parallel: under torchrun each process computes one
strip of image rows (`ditkit.diffusers.patch_parallel`) and every process gets the same images.
In the chain only the full-size pass is split; the base (stock attention, at a trained size) is
computed whole by every process.

Each image is its own pipeline call with its own generator (seed + index), so an image does not
depend on how many are made with it.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import META_KEY, read_header, read_weights
from ..errors import DitkitError
from ..files import atomic_path
from ..mixers import MixerSpec
from ..mixers.clear import check_clear_options
from ..record import DiffusersModel, RunRecord
from .adapters import DiffusersAdapter, adapter_for
from .clear import CLEAR_KEYS, apply_clear, clear_is_on, clear_layers, clear_spec
from .folders import resolve_pipeline
from .lora import base_layer_state, base_parameters
from .official_clear import check_official, is_official_layout, official_settings, read_official
from .patch_parallel import patch_parallel
from .pipeline_family import context_images, fixed_call_arguments, pipeline_family
from .prompts import load_prompt_embeds

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
EMBEDDING_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds",
                  "prompt_attention_mask", "negative_prompt_attention_mask")
# Components a pipeline runs without (prompt embeddings stand in for the text encoders).
OPTIONAL_COMPONENTS = ("text_encoder", "tokenizer", "image_encoder", "feature_extractor")


# -- loading ------------------------------------------------------------------------------------------
def pipeline_class(folder: str | Path) -> tuple[str, dict]:
    """The pipeline class named by a folder's model_index.json, and the index itself: any pipeline
    holding a supported transformer (`pipeline_family`)."""
    family = pipeline_family(folder)
    return family.name, family.index


def absent_components(folder: Path, index: dict) -> dict[str, None]:
    """Components the index lists as null or whose folder is missing (e.g. text encoders left out of a
    copy used with prompt embeddings): diffusers needs them passed as None explicitly."""
    return {name: None for name, entry in index.items() if name.startswith(OPTIONAL_COMPONENTS)
            and isinstance(entry, list) and (entry[0] is None or not (folder / name).is_dir())}


def load_pipeline(folder: str | Path, dtype: str = "fp32", device: str | None = None, cpu_offload: bool = False,
                  vae_tiling: bool = False, progress: bool = True, revision: str | None = None,
                  components: dict | None = None):
    """A FLUX / SD3 / PixArt pipeline from a local folder, or from the local Hugging Face cache when
    `folder` is a hub repository `ORG/NAME` (at `revision`; `folders.resolve_pipeline`, never a download).
    Any pipeline class holding their transformers loads (img2img, inpainting, Fill, Control,
    ControlNet, Kontext: `pipeline_family`); `components` replaces some (e.g. {"controlnet": model}).
    `cpu_offload` keeps each component on the CPU until it runs (diffusers' `enable_model_cpu_offload`);
    `vae_tiling` decodes large images in tiles; `progress` False hides diffusers' loading bars too."""
    import diffusers

    if importlib.util.find_spec("transformers") is None:
        raise DitkitError("diffusers' FLUX / SD3 / PixArt pipelines need transformers: pip install 'ditkit[pipelines]'")
    if dtype not in DTYPES:
        raise DitkitError(f"unknown dtype {dtype!r}: use {', '.join(DTYPES)}")
    folder = resolve_pipeline(folder, revision)
    name, index = pipeline_class(folder)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if cpu_offload and torch.device(device).type == "cpu":
        raise DitkitError("--cpu-offload moves components to an accelerator in turn: use it with --device cuda")
    try:
        with loading_bars(progress):
            pipe = getattr(diffusers, name).from_pretrained(folder, **{dtype_keyword(): DTYPES[dtype]},
                                                           **{**absent_components(folder, index),
                                                              **(components or {})})
    except (OSError, ValueError) as error:  # a component folder missing or damaged
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DitkitError(f"cannot load the pipeline in {folder} ({reason}): check its component folders") from error
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)
    if vae_tiling:
        pipe.vae.enable_tiling()
    return pipe


@contextmanager
def loading_bars(shown: bool) -> Iterator[None]:
    """diffusers' component-loading bars shown or hidden for the block (a global switch: restored)."""
    from diffusers.utils import logging as diffusers_logging

    hidden_before = not diffusers_logging.is_progress_bar_enabled()
    if shown:
        yield
        return
    diffusers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if not hidden_before:
            diffusers_logging.enable_progress_bar()


def dtype_keyword() -> str:
    """from_pretrained's dtype argument: `dtype` in newer diffusers (which warn on `torch_dtype`)."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
    except ImportError:
        return "torch_dtype"
    return "dtype"


def transformer_adapter(pipe) -> DiffusersAdapter:
    """The adapter of the pipeline's transformer: what decides packing, encoders and the chain."""
    return adapter_for(pipe.transformer, "ditkit generate")


def size_multiple(pipe) -> int:
    """Image sides must be multiples of this: the VAE's downsampling times the transformer's patch
    (FLUX packs 2x2 latent pixels into a token)."""
    return pipe.vae_scale_factor * transformer_adapter(pipe).token_patch(pipe.transformer)


def check_size(pipe, height: int, width: int) -> None:
    multiple = size_multiple(pipe)
    if height % multiple or width % multiple:
        raise DitkitError(f"size {height}x{width} does not fit this {type(pipe).__name__}: use multiples of "
                          f"{multiple} (the VAE's factor times the patch size)")


# -- attention: CLEAR, students -----------------------------------------------------------------------
def read_student_header(ckpt: str | Path):
    """A student's run record and tensor shapes, from the file's header (no weights loaded)."""
    file, metadata, shapes = read_header(ckpt)
    if META_KEY not in metadata:
        raise DitkitError(f"{file} is not a ditkit checkpoint (no model config in its metadata): give a "
                          "student from ditkit distill, or one of CLEAR's official files (clear_local_*.safetensors)")
    record = RunRecord.from_json(metadata[META_KEY], source=str(file))
    if not isinstance(record.model, DiffusersModel):
        raise DitkitError(f"{ckpt} is a ditkit model, not a diffusers student: sample it with ditkit sample")
    if "radius" not in (record.distill or {}):
        raise DitkitError(f"{ckpt} has no CLEAR settings in its record: use a checkpoint of ditkit distill")
    return record, shapes


def official_header(ckpt: str | Path):
    """(file, metadata, shapes) when `ckpt` holds CLEAR's official weights (`official_clear`), else None."""
    file, metadata, shapes = read_header(ckpt)
    return (file, metadata, shapes) if META_KEY not in metadata and is_official_layout(shapes) else None


def official_student_settings(ckpt: str | Path, clear: dict | None = None) -> dict | None:
    """Radius and down factor of an official file (its name, its metadata, `clear`: the --clear options),
    checked; None when `ckpt` is a ditkit student. Reads the header only."""
    header = official_header(ckpt)
    if header is None:
        return None
    settings = official_settings(*header, clear)
    check_clear_options(settings["radius"], settings["down_factor"], (clear or {}).get("backend", "auto"))
    return settings


def check_student(transformer: nn.Module, ckpt: str | Path, clear: dict | None = None) -> dict:
    """A student's CLEAR settings, once it fits `transformer`: a `ditkit distill` student's distill
    settings (its transformer class and tensor shapes checked), or the radius and down factor of
    CLEAR's official weights (`clear`, the --clear options, gives them when the file name does not; every
    key checked against the transformer)."""
    settings = official_student_settings(ckpt, clear)
    if settings is not None:
        file, _, shapes = official_header(ckpt)
        check_official(transformer, file, shapes, settings["down_factor"])
        return settings
    record, shapes = read_student_header(ckpt)
    name = type(transformer).__name__
    if record.model.diffusers != name:
        raise DitkitError(f"{ckpt} is a student of a {record.model.diffusers} ({record.model.path}), this "
                          f"pipeline's transformer is a {name}: use the student's own pipeline")
    own = {key: tuple(p.shape) for key, p in base_parameters(transformer).items()}  # LoRA-wrapped: base names
    for key, shape in shapes.items():
        name = key.removeprefix("transformer.")
        if ".processor." not in name and own.get(name) != shape:  # pooling weights exist once CLEAR is on
            raise DitkitError(f"{ckpt} does not fit this transformer ({name}: {own.get(name, 'absent')} here, "
                              f"{shape} in the student): use its teacher's pipeline ({record.model.path})")
    return record.distill


def student_tensors(ckpt: str | Path) -> dict[str, Tensor]:
    """A student's weights under the transformer's names (official files' pooling weights renamed)."""
    header = official_header(ckpt)
    if header is not None:
        return read_official(header[0])
    tensors, _ = read_weights(read_header(ckpt)[0])  # refuses inf or NaN (black images, not a failure)
    return {key.removeprefix("transformer."): value for key, value in tensors.items()}


def load_student(transformer: nn.Module, ckpt: str | Path, backend: str = "auto", clear: dict | None = None) -> dict:
    """Put a student into a pipeline's transformer: CLEAR with the student's radius and down_factor, then
    its trained weights (image-stream projections, pooling weights). A `ditkit distill` student brings its
    settings; CLEAR's official files (`clear_local_8_down_4.safetensors`) take them from their name or
    from `clear` ({"radius": 8, "down_factor": 4}). Returns the settings."""
    settings = check_student(transformer, ckpt, clear)
    state = base_layer_state(transformer, student_tensors(ckpt))  # under a LoRA: into its base layers
    apply_clear(transformer, settings["radius"], settings.get("down_factor", 0), backend)
    unexpected = transformer.load_state_dict(state, strict=False).unexpected_keys  # the rest stays the teacher's
    if unexpected:
        raise DitkitError(f"{ckpt} has weights this transformer lacks ({unexpected[0]}): use its teacher's pipeline")
    return settings


@dataclass(frozen=True)
class Attention:
    """How the transformer attends: stock (nothing set), training-free CLEAR (`clear`: the `clear`
    mixer's spec, its text `radius=16,down_factor=4` or a dict: `clear_spec`, parsed and validated when
    made) or a `student`: a `ditkit distill` student (its own radius and down_factor; `clear` may name
    the backend only) or CLEAR's official weights (their name says radius and down factor, or `clear`
    does; when both do they must agree). `controlnet`: a pipeline's ControlNet gets CLEAR too
    (`apply_to_pipeline`; see `clear_controlnet`)."""

    clear: MixerSpec | str | dict | None = None
    student: str | Path | None = None
    controlnet: bool = True

    def __post_init__(self):
        if self.clear is not None:
            object.__setattr__(self, "clear", clear_spec(self.clear))
        if self.student is not None and Path(self.student).is_file():
            official_student_settings(self.student, self.options())  # an official file's settings, checked now

    def options(self) -> dict:
        return dict(self.clear.options) if self.clear is not None else {}

    def check(self, transformer: nn.Module) -> None:
        """Refuse bad options or a student that does not fit, before anything runs."""
        clear = self.options()
        if self.student is not None:
            if set(clear) - {"backend"} and official_student_settings(self.student, clear) is None:
                raise DitkitError("a student brings its own radius and down_factor: give --clear backend=... only")
            check_student(transformer, self.student, clear)
        elif self.clear is not None and "radius" not in clear:
            raise DitkitError("CLEAR needs a radius: e.g. --clear radius=16,down_factor=4")

    def apply(self, transformer: nn.Module) -> None:
        self.check(transformer)
        if self.student is not None:
            load_student(transformer, self.student, self.options().get("backend", "auto"), self.options())
        elif self.clear is not None:
            apply_clear(transformer, self.clear)

    def apply_to_pipeline(self, pipe) -> None:
        """`apply` to the pipeline's transformer, and CLEAR to its ControlNet when it has one and
        `controlnet` is on."""
        switch_controlnet = self.controlnet and getattr(pipe, "controlnet", None) is not None and self.is_on()
        options = self.clear_options(pipe.transformer) if switch_controlnet else None  # read before loading
        self.apply(pipe.transformer)
        if switch_controlnet:
            clear_controlnet(pipe, options)

    def is_on(self) -> bool:
        return self.clear is not None or self.student is not None

    def clear_options(self, transformer: nn.Module) -> dict:
        """radius, down_factor and backend of the CLEAR this attention installs (a student's own)."""
        options = self.options()
        if self.student is not None:
            options = {**check_student(transformer, self.student, options), **options}
        return {key: clear_spec({k: options[k] for k in CLEAR_KEYS if k in options}).option(key)
                for key in CLEAR_KEYS}

    def settings(self) -> dict[str, str]:
        """The image metadata of these settings (a student's radius and down_factor from its record, or
        an official file's from its name or --clear)."""
        clear = self.options()
        if self.student is None:
            return {"clear": clear_text(clear)} if clear else {}
        official = official_student_settings(self.student, clear)
        distill = official if official is not None else read_student_header(self.student)[0].distill
        return {"student": str(self.student), "clear": clear_text({**distill, **clear})}


def clear_text(options: dict) -> str:
    return ",".join(f"{key}={options[key]}" for key in CLEAR_KEYS if key in options)


def clear_controlnet(pipe, options: dict) -> None:
    """Training-free CLEAR (`options`: radius, down_factor, backend) on the pipeline's ControlNet.

    A FLUX or SD3 ControlNet is a copy of some of its transformer's blocks run over the same image
    tokens, so left stock its full attention stays quadratic in the tokens and, at 4K, can cost more
    than the CLEAR transformer it feeds: ditkit switches it too by default (a student's trained weights
    are the transformer's; the ControlNet gets the student's radius and down factor, training-free).
    `Attention(controlnet=False)` (`--no-clear-controlnet`) keeps its full attention: its residuals
    are then the stock ones, at the stock cost. The ControlNet's blocks are served by the
    transformer's adapter (the same attention modules and token layout)."""
    multi = getattr(pipe.controlnet, "nets", None)  # diffusers' Multi*ControlNetModel holds a list
    for net in multi if multi is not None else [pipe.controlnet]:
        apply_clear(net, options["radius"], options["down_factor"], options["backend"], transformer_adapter(pipe))


# -- what to generate ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Request:
    """What to generate. `prompt` or `embeddings` (the tensors of a pipeline's `encode_prompt`, a batch
    of P prompts: P x num images). Unset steps and guidance are the pipeline's own defaults."""

    height: int
    width: int
    prompt: str | None = None
    embeddings: dict[str, Tensor] | None = None
    steps: int | None = None
    guidance: float | None = None
    seed: int = 0
    num: int = 1
    inputs: dict | None = None  # image arguments of the pipeline's call (image, mask_image, control_image, ...)

    def __post_init__(self):
        for name in ("height", "width", "num"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DitkitError(f"{name} must be a whole number of at least 1, got {value!r}")
        if self.steps is not None and (isinstance(self.steps, bool) or self.steps < 1):
            raise DitkitError(f"steps must be at least 1 (or unset for the pipeline's default), got {self.steps!r}")
        if self.guidance is not None and not (math.isfinite(self.guidance) and self.guidance >= 0):
            raise DitkitError(f"guidance must be a finite number >= 0 (or unset for the pipeline's default), got "
                              f"{self.guidance!r}")

    @property
    def num_prompts(self) -> int:
        return 1 if self.embeddings is None else self.embeddings["prompt_embeds"].shape[0]

    def resolved(self, pipe) -> Request:
        """Steps and guidance filled from the pipeline call's defaults (they differ per pipeline)."""
        defaults = inspect.signature(type(pipe).__call__).parameters
        steps = self.steps or defaults["num_inference_steps"].default
        guidance = defaults["guidance_scale"].default if self.guidance is None else self.guidance
        return replace(self, steps=steps, guidance=guidance)


def read_prompt_embeddings(path: str | Path, pipe) -> dict[str, Tensor]:
    """A safetensors file of `encode_prompt` outputs: `prompt_embeds` (P, T, D), for FLUX / SD3
    `pooled_prompt_embeds` (P, D'); optional negatives and (PixArt) attention masks."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise DitkitError(f"prompt embeddings file {path} does not exist: save the pipeline's encode_prompt "
                          "outputs there with safetensors")
    try:
        tensors = load_file(str(path))
    except Exception as error:  # safetensors reports a damaged file with its own errors
        raise DitkitError(f"prompt embeddings file {path} is not a readable safetensors file ({error}): save the "
                          "pipeline's encode_prompt outputs there again") from error
    check_prompt_widths(path, tensors, transformer_adapter(pipe).prompt_widths(pipe.transformer))
    if not transformer_adapter(pipe).pooled_prompts:
        if "prompt_embeds" not in tensors:
            raise DitkitError(f"{path} lacks prompt_embeds: save the outputs of the pipeline's encode_prompt")
        for prefix in ("", "negative_"):  # PixArt wants a mask with given embeddings; all tokens count
            if f"{prefix}prompt_embeds" in tensors:
                tensors.setdefault(f"{prefix}prompt_attention_mask",
                                   torch.ones(tensors[f"{prefix}prompt_embeds"].shape[:2], dtype=torch.long))
    else:
        text, pooled = load_prompt_embeds(str(path), pipe.transformer, 1, 0)
        tensors.update(prompt_embeds=text, pooled_prompt_embeds=pooled)
    return {key: tensors[key] for key in EMBEDDING_KEYS if key in tensors}


def check_prompt_widths(path: str | Path, tensors: dict[str, Tensor], widths: dict[str, int]) -> None:
    """Each embeddings tensor the transformer reads has its width (the last dimension) and its rank:
    (P, T, D) for token embeddings, (P, D') for pooled ones."""
    for key, width in widths.items():
        if key not in tensors:
            continue
        rank = 2 if "pooled" in key else 3
        shape = tuple(tensors[key].shape)
        if len(shape) != rank or shape[-1] != width:
            raise DitkitError(f"{path}: {key} has shape {shape}, this pipeline's transformer reads width {width} "
                              f"({rank} dimensions): save the embeddings of this pipeline's own encode_prompt")


def check_request(pipe, request: Request) -> None:
    """One-line refusals for what the pipeline would fail on deep inside."""
    check_size(pipe, request.height, request.width)
    if (request.prompt is None) == (request.embeddings is None):
        raise DitkitError("give a prompt or prompt embeddings (--prompt or --prompt-embeds), one of the two")
    adapter = transformer_adapter(pipe)
    missing = [name for name in adapter.needed_encoders if getattr(pipe, name, None) is None]
    if not missing:
        return
    if request.prompt is not None:
        raise DitkitError(f"this pipeline folder has no {', '.join(missing)}: pass --prompt-embeds FILE (the "
                          "outputs of encode_prompt) instead of --prompt")
    guided = adapter.guidance_needs_negatives and request.resolved(pipe).guidance > 1  # SD3 / PixArt encode ""
    if guided and "negative_prompt_embeds" not in request.embeddings:
        raise DitkitError(f"guidance needs negative prompt embeddings and this pipeline has no {missing[0]}: "
                          "add negative_prompt_embeds to the embeddings file, or use --guidance 1")


def call_arguments(pipe, request: Request, prompt_index: int) -> dict:
    """Pipeline call arguments common to every pass: the prompt (or its embeddings), steps, guidance."""
    if request.embeddings is None:
        arguments = {"prompt": request.prompt}
    else:
        dtype, device = pipe.transformer.dtype, pipe._execution_device
        arguments = {key: value[prompt_index:prompt_index + 1].to(device, dtype if value.is_floating_point()
                                                                  else value.dtype)
                     for key, value in request.embeddings.items()}
    arguments.update(num_inference_steps=request.steps, guidance_scale=request.guidance)
    arguments.update(transformer_adapter(pipe).pipeline_arguments())  # PixArt: no resolution binning
    parameters = inspect.signature(type(pipe).__call__).parameters
    arguments.update(fixed_call_arguments(parameters, request.height, request.width))  # Kontext's output size
    arguments.update(request.inputs or {})
    return arguments


def image_jobs(request: Request) -> list[tuple[int, int]]:
    """(prompt index, seed) of every image: num images per prompt, seeds counting up from the seed."""
    return [(k // request.num, request.seed + k) for k in range(request.num_prompts * request.num)]


def seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)  # CPU noise: the same pictures on every device


@contextmanager
def global_seed(seed: int, device: torch.device) -> Iterator[None]:
    """The global random generators (the CPU's and `device`'s) seeded for one pipeline call, and
    restored after it: some pipelines draw from them rather than from the call's generator
    (diffusers' SD3 ControlNet samples the control image's latents with `latent_dist.sample()`),
    which would make their pictures differ from run to run."""
    device = torch.device(device)
    accelerator = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=accelerator):
        torch.manual_seed(seed)
        yield


def set_progress(pipe, progress: bool, label: str) -> None:
    pipe.set_progress_bar_config(disable=not progress, desc=label, leave=False)


def on_strips(transformer: nn.Module, patch: bool):
    """Patch-parallel execution of the (CLEAR) transformer for a with-block, when `patch`."""
    return patch_parallel(transformer) if patch else nullcontext()


def check_patch(pipe, patch: bool) -> None:
    """Patch-parallel strips cut the transformer's image grid; a ControlNet's residuals cover every
    token of it (`pipeline_family.check_family_inputs` says the same from the folder, before loading)."""
    if patch and getattr(pipe, "controlnet", None) is not None:
        raise DitkitError(f"--parallel patch cuts the image grid into strips, and in a {type(pipe).__name__} the "
                          "ControlNet's residuals cover every token: run it in one process")


def check_context_images(pipe, request: Request) -> None:
    """CLEAR's down_factor pools each image on its own token grid, a Kontext context image's too (it
    joins the sequence at its own size): refused in one line, before sampling, when one does not divide."""
    layers = clear_layers(pipe.transformer)
    down = getattr(pipe.transformer.get_submodule(layers[0]).processor, "down_factor", 0) if layers else 0
    multiple = size_multiple(pipe)
    for option, image in context_images(type(pipe), request.inputs or {}).items():
        if down and ((image.size[1] // multiple) % down or (image.size[0] // multiple) % down):
            raise DitkitError(f"{option} is {image.size[1]}x{image.size[0]} px, a context image whose token grid "
                              f"CLEAR's down_factor {down} does not divide: resize it to multiples of "
                              f"{down * multiple} px, or use CLEAR without a down factor")


@torch.no_grad()
def generate(pipe, request: Request, attention: Attention | None = None, progress: bool = True,
             patch: bool = False) -> list:
    """PIL images at the request's size, one pipeline call (and progress bar) per image; `attention`
    switches the transformer first (it stays switched); `patch` runs it patch-parallel."""
    check_request(pipe, request)
    check_patch(pipe, patch)
    if attention is not None:
        attention.apply_to_pipeline(pipe)
    check_context_images(pipe, request)
    request = request.resolved(pipe)
    jobs = image_jobs(request)
    images = []
    with on_strips(pipe.transformer, patch):
        for number, (prompt_index, seed) in enumerate(jobs, 1):
            set_progress(pipe, progress, f"image {number}/{len(jobs)}")
            with global_seed(seed, pipe._execution_device):
                images += pipe(**call_arguments(pipe, request, prompt_index), height=request.height,
                               width=request.width, generator=seeded(seed)).images
    return images


# -- the high-resolution chain ------------------------------------------------------------------------
@dataclass(frozen=True)
class UpscaleChain:
    """Base size (stock pipeline, full attention) and the strength of the full-size img2img pass:
    0 returns the upsampled base, 1 is plain generation at the full size."""

    base_height: int
    base_width: int
    strength: float

    def __post_init__(self):
        if not 0 <= self.strength <= 1:
            raise DitkitError(f"strength must be between 0 and 1, got {self.strength}")
        if self.base_height < 1 or self.base_width < 1:
            raise DitkitError(f"the base size must be positive, got {self.base_height}x{self.base_width}")

    def check_target(self, height: int, width: int) -> None:
        """The base is the smaller image (as `ditkit sample` asks; its aspect may differ: the base
        latents are resized to the target's)."""
        if self.base_height > height or self.base_width > width:
            raise DitkitError(f"--upscale-from {self.base_height}x{self.base_width} is larger than the target "
                              f"{height}x{width}: the base image must be the smaller one")


def base_latents(pipe, request: Request, chain: UpscaleChain, prompt_index: int, seed: int) -> Tensor:
    """The stock pipeline's latents (B, C, h, w), as the VAE sees them scaled, at the base size."""
    latents = pipe(**call_arguments(pipe, request, prompt_index), height=chain.base_height,
                   width=chain.base_width, generator=seeded(seed), output_type="latent").images
    return transformer_adapter(pipe).unpack_latents(pipe, latents, chain.base_height, chain.base_width)


def upsample_latents(latents: Tensor, height: int, width: int, vae_scale_factor: int) -> Tensor:
    size = (height // vae_scale_factor, width // vae_scale_factor)
    return F.interpolate(latents.float(), size=size, mode="bicubic", align_corners=False).to(latents.dtype)


def decode_latents(pipe, latents: Tensor) -> list:
    """PIL images of scaled latents (B, C, h, w), as the pipelines decode theirs."""
    config = pipe.vae.config
    latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
    image = pipe.vae.decode(latents.to(pipe.vae.device, pipe.vae.dtype), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type="pil")


def img2img_pipeline(pipe):
    """The img2img counterpart built from the loaded components (nothing reloaded)."""
    from diffusers import AutoPipelineForImage2Image

    adapter = transformer_adapter(pipe)
    if not adapter.img2img:
        raise DitkitError(f"diffusers has no img2img pipeline for {adapter.label}, so ditkit has no upscale chain "
                          f"for it: generate {adapter.label} directly at the full size")
    img2img = AutoPipelineForImage2Image.from_pipe(pipe)
    if getattr(pipe, "_offload_device", None) is not None:  # offload hooks are set per pipeline
        img2img.enable_model_cpu_offload(device=pipe._offload_device)
    return img2img


@torch.no_grad()
def generate_upscaled(pipe, request: Request, chain: UpscaleChain, attention: Attention | None = None,
                      progress: bool = True, patch: bool = False) -> list:
    """The chain: every base with the stock transformer, then `attention` switched on (CLEAR or a
    student), then each base upsampled in latent space and denoised at the request's size from
    `chain.strength` with the same seed (patch-parallel with `patch`). `pipe.transformer` must
    still be stock."""
    check_request(pipe, request)
    chain.check_target(request.height, request.width)
    check_size(pipe, chain.base_height, chain.base_width)
    if clear_is_on(pipe.transformer):
        raise DitkitError("the chain's base needs the stock transformer: pass CLEAR or the student as "
                          "`attention`, not applied beforehand")
    if attention is not None:
        attention.check(pipe.transformer)  # refused now, not after the base pass
    img2img = img2img_pipeline(pipe)
    request = request.resolved(pipe)
    jobs = image_jobs(request)
    bases = []
    for number, (prompt_index, seed) in enumerate(jobs, 1):
        set_progress(pipe, progress, f"base {number}/{len(jobs)}")
        bases.append(base_latents(pipe, request, chain, prompt_index, seed))
    if attention is not None:
        attention.apply(pipe.transformer)
    images = []
    with on_strips(pipe.transformer, patch):
        for number, ((prompt_index, seed), base) in enumerate(zip(jobs, bases, strict=True), 1):
            init = upsample_latents(base, request.height, request.width, pipe.vae_scale_factor)
            if chain.strength == 0:  # no step to run: img2img refuses it, the upsampled base is the answer
                images += decode_latents(pipe, init)
                continue
            set_progress(img2img, progress, f"image {number}/{len(jobs)}")
            images += img2img(**call_arguments(pipe, request, prompt_index), image=init, strength=chain.strength,
                              height=request.height, width=request.width, generator=seeded(seed)).images
    return images


# -- saving -------------------------------------------------------------------------------------------
def image_settings(pipe, request: Request, extra: dict | None = None) -> list[dict[str, str]]:
    """The PNG text chunks of each image: its prompt, seed, steps, guidance, size, and `extra`
    (CLEAR options, student, chain), with an A1111-style `parameters` line that front-ends show."""
    request = request.resolved(pipe)
    settings = []
    for prompt_index, seed in image_jobs(request):
        prompt = request.prompt if request.prompt is not None else f"prompt embeddings #{prompt_index}"
        values = {"prompt": prompt, "seed": str(seed), "steps": str(request.steps),
                  "guidance": str(request.guidance), "size": f"{request.height}x{request.width}",
                  **{key: str(value) for key, value in (extra or {}).items()}}
        details = ", ".join(f"{key}: {value}" for key, value in values.items() if key != "prompt")
        settings.append({**values, "parameters": f"{prompt}\n{details}"})
    return settings


def save_images(images: list, out: str | Path, settings: list[dict[str, str]]) -> list[Path]:
    """Write PNGs with their settings as text chunks: `out` for one image, out-0.png, out-1.png... for more."""
    from PIL.PngImagePlugin import PngInfo

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    paths = [out] if len(images) == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix or '.png'}")
                                            for k in range(len(images))]
    for image, path, values in zip(images, paths, settings, strict=True):
        info = PngInfo()
        for key, value in values.items():
            info.add_itxt(key, value)
        with atomic_path(path) as tmp:  # a killed or full-disk write never leaves half a PNG
            image.save(tmp, format="PNG", pnginfo=info)
    return paths
