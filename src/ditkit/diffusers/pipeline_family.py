"""The FLUX / SD3 / PixArt pipeline family: which diffusers pipelines `ditkit generate` runs, and the
image inputs each one takes, all decided before any weight loads.

A pipeline folder is supported when the transformer it holds (model_index.json's "transformer"
entry, [library, class]) has an adapter (`ditkit.diffusers.adapters`): FluxPipeline, FluxImg2Img,
FluxInpaint, FluxFill, FluxControl (Canny / Depth: the control latents are concatenated to the
channels, the token grid is the image's), FluxControlNet, FluxKontext, the SD3 pipelines and
PixArt all qualify without a list of class names. What the pipeline's call takes is read from its
`__call__` signature (`image`, `mask_image`, `control_image`, `controlnet_conditioning_scale`,
`strength`), so the options a command line gives are checked against the class itself.

Two kinds of pipeline change the transformer's token sequence:
  Kontext (`image` without `strength`: the image is a context, not a start): diffusers appends the
    context image's tokens after the generated image's, with position ids whose first axis is 1.
    CLEAR (and a student) runs there with its disc taken on the position plane across both images
    (`ditkit.mixers.positions`); patch-parallel is refused (the strips cut the grid, not the context).
  ControlNet (its `__init__` holds a `controlnet`): the ControlNet's residuals are added to the
    whole token sequence of each block, so patch-parallel (one strip of rows per process) is refused.

Images are read with PIL (RGB; the mask as grayscale, binarized by the pipeline's own mask
processor at 0.5, as diffusers does). A start image or control image must have the requested size
and a mask the image's size: a mismatch is refused in one line (nothing is resized behind the
user's back); Kontext's context image may have any size.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..errors import DitkitError
from .adapters import ADAPTERS, DiffusersAdapter, find_adapter
from .folders import CONFIG, model_class_name, pipeline_index, resolve_pipeline

IMAGE_ARGUMENTS = ("image", "mask_image", "control_image", "control_mask", "image_reference")
# ditkit generate's option for each call argument it fills (for messages).
OPTIONS = {"image": "--image", "mask_image": "--mask", "control_image": "--control-image", "strength": "--strength",
           "controlnet_conditioning_scale": "--control-scale", "control_mask": "--control-mask",
           "image_reference": "--reference"}
GRAY = ("mask_image", "control_mask")  # read as grayscale
OPTIONAL = ("image_reference",)  # a call runs without them (Kontext inpainting's reference)


@dataclass(frozen=True)
class PipelineFamily:
    """One pipeline class as ditkit runs it: its transformer's adapter and what its call takes."""

    name: str  # the pipeline class (model_index.json's _class_name)
    index: dict  # model_index.json
    adapter: DiffusersAdapter  # of the transformer it holds
    takes: frozenset[str]  # the call arguments of OPTIONS it has
    controlnet: bool  # it holds a ControlNet (a `controlnet` component)
    context_image: bool  # its `image` is a context appended to the token sequence (Kontext)
    call_parameters: frozenset[str] = field(default_factory=frozenset)  # every argument of its __call__

    @property
    def text_to_image(self) -> bool:
        """Its call takes no image at all: the upscale chain's base and img2img form apply."""
        return not self.takes & set(IMAGE_ARGUMENTS)

    @property
    def adds_context_tokens(self) -> bool:
        """Its call appends a context image's tokens to the image tokens (Kontext's `image`, Kontext
        inpainting's `image_reference`)."""
        return self.context_image or "image_reference" in self.takes

    def needed(self) -> list[str]:
        """The image arguments a call cannot run without (Kontext's context image is optional)."""
        optional = {*OPTIONAL, "image"} if self.context_image else set(OPTIONAL)
        return [name for name in IMAGE_ARGUMENTS if name in self.takes and name not in optional]

    def has_own_controlnet(self, folder: Path) -> bool:
        """The pipeline folder holds a ControlNet component of its own."""
        entry = self.index.get("controlnet")
        return isinstance(entry, list) and entry[0] is not None and (folder / "controlnet").is_dir()


def pipeline_family(folder: str | Path) -> PipelineFamily:
    """The family entry of a pipeline folder (its model_index.json only: no weight is read), or a
    one-line refusal when its transformer has no adapter or diffusers lacks its class."""
    import diffusers

    index = pipeline_index(folder)
    name = index.get("_class_name")
    entry = index.get("transformer")
    transformer = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    adapter = find_adapter(transformer) if transformer else None
    if adapter is None:
        held = f"a {transformer}" if transformer else "no transformer"
        raise DitkitError(f"{folder} holds a {name} with {held}: ditkit generate runs the pipelines of "
                          f"{', '.join(ADAPTERS)} (give a FLUX, SD3 or PixArt pipeline folder)")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise DitkitError(f"{folder} holds a {name}, which diffusers {diffusers.__version__} does not have: "
                          "upgrade diffusers (pip install -U diffusers)")
    parameters = frozenset(inspect.signature(cls.__call__).parameters)
    takes = frozenset(parameters & set(OPTIONS))
    context = takes_context_image(cls)
    controlnet = "controlnet" in inspect.signature(cls.__init__).parameters
    return PipelineFamily(str(name), index, adapter, takes, controlnet, context, parameters)


def takes_context_image(pipeline_class: type) -> bool:
    """Its call's `image` is a context whose tokens join the sequence (Kontext), not a start image:
    it takes an image and no strength."""
    parameters = inspect.signature(pipeline_class.__call__).parameters
    return "image" in parameters and "strength" not in parameters


def context_images(pipeline_class: type, inputs: dict) -> dict[str, object]:
    """The images of a call's arguments whose tokens join the sequence after the generated image's, by
    option: Kontext's `--image`, Kontext inpainting's `--reference`."""
    found = {"--image": inputs.get("image") if takes_context_image(pipeline_class) else None,
             "--reference": inputs.get("image_reference")}
    return {option: image for option, image in found.items() if image is not None}


@dataclass(frozen=True)
class ImageInputs:
    """The image inputs of a command line: file paths and numbers (`read` opens and checks them)."""

    image: str | Path | None = None
    mask: str | Path | None = None
    control_images: tuple[str | Path, ...] = ()  # one per ControlNet (several: diffusers' Multi*ControlNetModel)
    control_mask: str | Path | None = None
    reference: str | Path | None = None
    strength: float | None = None
    control_scales: tuple[float, ...] = ()  # none (the pipeline's), one for every ControlNet, or one each
    controlnets: tuple[str | Path, ...] = ()  # ControlNet model folders, or ORG/NAME in the Hugging Face cache
    clear_controlnet: bool | None = None  # CLEAR on the ControlNet's attention too (None: the default, yes)

    def __post_init__(self):
        if self.strength is not None and not 0 < self.strength <= 1:
            raise DitkitError(f"--strength must be in (0, 1] (the share of the steps run from the image), got "
                              f"{self.strength}")
        for scale in self.control_scales:
            if not (math.isfinite(scale) and scale >= 0):
                raise DitkitError(f"--control-scale must be a finite number >= 0, got {scale}")
        if self.mask is not None and self.image is None:
            raise DitkitError("--mask marks what to repaint in an image: give the image with --image too")
        if self.control_mask is not None and not self.control_images:
            raise DitkitError("--control-mask marks what to repaint in the control image: give it with "
                              "--control-image too")
        self.check_controlnet_counts()

    def check_controlnet_counts(self) -> None:
        """Several ControlNets take one control image each and one scale for all or one each."""
        nets, images, scales = len(self.controlnets), len(self.control_images), len(self.control_scales)
        if nets > 1 and images != nets:
            raise DitkitError(f"{nets} --controlnet models take {nets} --control-image files (one each, in the "
                              f"same order), got {images}")
        if scales > 1 and scales != nets:
            raise DitkitError(f"{scales} --control-scale values for {nets or 'one'} ControlNet(s): give one for "
                              "all, or one per --controlnet")
        if nets > 1 and self.control_mask is not None:
            raise DitkitError("--control-mask takes one ControlNet (SD3 ControlNet inpainting): give one --controlnet")

    def given(self) -> dict[str, object]:
        """The call arguments given, by their diffusers names: one control image and scale as values,
        several (one per ControlNet) as lists, as diffusers' Multi*ControlNetModel pipelines take them."""
        several = len(self.controlnets) > 1
        images = list(self.control_images) if several else (self.control_images or (None,))[0]
        scales = self.control_scales
        if several and scales:  # one for all, or one each (check_controlnet_counts)
            scale = list(scales) if len(scales) > 1 else [scales[0]] * len(self.controlnets)
        else:
            scale = (scales or (None,))[0]
        values = {"image": self.image, "mask_image": self.mask, "control_image": images,
                  "control_mask": self.control_mask, "image_reference": self.reference, "strength": self.strength,
                  "controlnet_conditioning_scale": scale}
        return {key: value for key, value in values.items() if value is not None}

    def read(self, height: int, width: int, context: bool = False) -> dict[str, object]:
        """The call arguments with the images opened (PIL; masks grayscale), sizes checked: the image,
        control image and control mask at the request's size (a `context` image and the reference at
        any), the mask at the image's."""
        given = self.given()
        arguments = dict(given)
        for key in IMAGE_ARGUMENTS:
            if key in arguments:
                paths = given[key] if isinstance(given[key], list) else [given[key]]
                images = [read_image(path, OPTIONS[key], "L" if key in GRAY else "RGB") for path in paths]
                if key in ("image", "control_image", "control_mask") and not (key == "image" and context):
                    for path, image in zip(paths, images, strict=True):
                        check_image_size(image, OPTIONS[key], path, height, width)
                arguments[key] = images if isinstance(given[key], list) else images[0]
        if "mask_image" in arguments and arguments["mask_image"].size != arguments["image"].size:
            mask, image = arguments["mask_image"].size, arguments["image"].size
            raise DitkitError(f"--mask {self.mask} is {mask[1]}x{mask[0]}, --image {self.image} is {image[1]}x"
                              f"{image[0]}: give a mask of the image's size (white = repaint)")
        return arguments


def read_image(path: str | Path, option: str, mode: str):
    """An image file opened with PIL and converted to `mode` ("RGB", or "L" for a mask), or one line."""
    from PIL import Image, UnidentifiedImageError

    if not Path(path).is_file():
        raise DitkitError(f"{option} {path} does not exist: give an image file (PNG, JPEG, ...)")
    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (UnidentifiedImageError, OSError) as error:
        raise DitkitError(f"{option} {path} is not a readable image ({error}): give a PNG or JPEG file") from error


def check_image_size(image, option: str, path, height: int, width: int) -> None:
    if image.size != (width, height):
        raise DitkitError(f"{option} {path} is {image.size[1]}x{image.size[0]}, the request is {height}x{width}: "
                          f"resize the image, or give --height {image.size[1]} --width {image.size[0]}")


def check_family_inputs(family: PipelineFamily, folder: Path, inputs: ImageInputs, patch: bool, chain: bool) -> None:
    """One-line refusals, from the class and the options alone, of what this pipeline cannot run."""
    given = inputs.given()
    for key in given:
        if key not in family.takes:
            raise DitkitError(f"{family.name} takes no {OPTIONS[key]} (its call has no {key}): drop it, or use a "
                              f"pipeline whose call takes {key}")
    for key in family.needed():
        if key not in given:
            raise DitkitError(f"{family.name} needs {OPTIONS[key]} FILE (its {key}): give the image file")
    check_controlnet_options(family, folder, inputs)
    if patch and (family.controlnet or family.adds_context_tokens):
        why = "the ControlNet's residuals cover every token" if family.controlnet else \
            "the context image's tokens are not rows of the image grid"
        raise DitkitError(f"--parallel patch cuts the image grid into strips, and in a {family.name} {why}: run "
                          "it in one process")
    if chain and not family.text_to_image:
        raise DitkitError(f"--upscale-from chains a text-to-image pipeline with its img2img form; a {family.name} "
                          "takes images already: generate at the full size directly")


def check_controlnet_options(family: PipelineFamily, folder: Path, inputs: ImageInputs) -> None:
    if not family.controlnet:
        if inputs.controlnets or inputs.clear_controlnet is not None:
            raise DitkitError(f"a {family.name} holds no ControlNet: drop --controlnet / --clear-controlnet, or "
                              "use a ControlNet pipeline (FluxControlNetPipeline, StableDiffusion3ControlNetPipeline)")
        if len(inputs.control_images) > 1:
            raise DitkitError(f"a {family.name} takes one --control-image (several belong to ControlNet pipelines)")
        return
    if len(inputs.control_images) > 1 and len(inputs.controlnets) <= 1:
        raise DitkitError(f"{len(inputs.control_images)} --control-image files for one ControlNet: give one "
                          "--controlnet PATH per --control-image, in the same order")
    if not inputs.controlnets and not family.has_own_controlnet(folder):
        raise DitkitError(f"this {family.name} folder holds no ControlNet: give --controlnet PATH (a diffusers "
                          "ControlNet folder, or ORG/NAME in the Hugging Face cache)")
    classes = {controlnet_class(name) for name in inputs.controlnets}
    if len(classes) > 1:
        raise DitkitError(f"the --controlnet models are of different classes ({', '.join(sorted(classes))}): give "
                          "ControlNets of one transformer family")


def controlnet_folder(name: str | Path) -> Path:
    """A ControlNet model folder: `name` itself, or the snapshot of hub repository ORG/NAME in the
    local Hugging Face cache (never downloaded)."""
    return resolve_pipeline(name)


def controlnet_class(name: str | Path) -> str:
    """The diffusers class a ControlNet folder's config.json names, checked to be a ControlNet."""
    import diffusers

    folder = controlnet_folder(name)
    if not folder.is_dir():
        raise DitkitError(f"--controlnet {name} does not exist: give a diffusers ControlNet model folder, or ORG/NAME "
                          "of one in the Hugging Face cache")
    cls = model_class_name(folder / CONFIG)
    if cls is None or "ControlNet" not in cls or not hasattr(diffusers, cls):
        raise DitkitError(f"--controlnet {name} is not a diffusers ControlNet folder (its config.json names "
                          f"{cls or 'no class'}): give the folder of a FluxControlNetModel or SD3ControlNetModel")
    return cls


def load_controlnet(name: str | Path, **dtype) -> nn.Module:
    """The ControlNet model of `--controlnet` (its weights load here; `dtype`: from_pretrained's keyword)."""
    import diffusers

    cls = controlnet_class(name)
    return getattr(diffusers, cls).from_pretrained(controlnet_folder(name), **dtype)


def load_controlnets(names: tuple[str | Path, ...], **dtype) -> nn.Module:
    """One ControlNet, or several in diffusers' Multi*ControlNetModel of their class (FluxControlNetModel ->
    FluxMultiControlNetModel), whose residuals the pipeline adds up, each with its image and scale."""
    import diffusers

    nets = [load_controlnet(name, **dtype) for name in names]
    if len(nets) == 1:
        return nets[0]
    multi = type(nets[0]).__name__.replace("ControlNetModel", "MultiControlNetModel")
    if not hasattr(diffusers, multi):
        raise DitkitError(f"diffusers has no {multi} to run several {type(nets[0]).__name__}s: give one --controlnet")
    return getattr(diffusers, multi)(nets)


def fixed_call_arguments(call_parameters, height: int, width: int) -> dict:
    """Arguments ditkit sets for a pipeline's call (`call_parameters`: the names its __call__ takes):
    Kontext's output area is the request's (its default would resize the output to about a
    megapixel) and its context image is used as given (diffusers' `_auto_resize` would resize it to
    one of Kontext's preferred sizes)."""
    arguments = {}
    if "max_area" in call_parameters:
        arguments["max_area"] = height * width
    if "_auto_resize" in call_parameters:
        arguments["_auto_resize"] = False
    return arguments
