"""LoRA on a diffusers pipeline, stock, with CLEAR or with a student: `ditkit generate --lora FILE[:SCALE]`.

    loras = check_loras("black-forest-labs/FLUX.1-dev", None, ["style.safetensors:0.8"])  # nothing loaded yet
    pipe = load_pipeline(...)
    load_loras(pipe, loras)                  # diffusers' load_lora_weights + set_adapters (peft)
    generate(pipe, request, Attention(student="clear_local_8_down_4.safetensors"))

The order is defined: a student's weights replace the base attention projections, the LoRA deltas
apply on top of them, W = W_student + scale * (alpha / rank) * B @ A (CLEAR without a student keeps the
base weights and adds the same deltas). peft keeps a LoRA apart from the weight it adapts: a wrapped
projection holds that weight as `to_q.base_layer.weight` and adds its delta in forward. A student
loaded after the LoRA (the upscale chain's base pass runs stock + LoRA before the student loads) is
therefore written into the base layers (`base_layer_state`), and its keys are checked against the
base parameters' own names (`base_parameters`): either order gives the same transformer.

Every LoRA is checked before any model weight loads: its file's keys (`safe_open`; LoRAs in another
trainer's layout, kohya's or BFL's, are first converted by the pipeline class's `lora_state_dict`) must
name modules of the pipeline's transformer, built from its config on the meta device, with their
shapes. A LoRA for another model (an SD3 LoRA on FLUX) is refused in one line.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor, nn

from ..distributed.sharded_load import empty_model
from ..errors import DitkitError
from .adapters import find_adapter
from .folders import CONFIG, model_class_name, pipeline_index, resolve_pipeline

LORA_WEIGHTS = (".lora_A.weight", ".lora_B.weight")  # diffusers' / peft's names of the two factors
TEXT_ENCODERS = re.compile(r"text_encoder(_\d)?\.")  # LoRA keys for the text encoders, not the transformer
PEFT_PARAMETER = re.compile(r"(^|\.)lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")
BASE_LAYER = re.compile(r"(^|\.)base_layer\.")  # where peft keeps a wrapped layer's own weights


@dataclass(frozen=True)
class LoraFile:
    """One --lora: the file and its scale (1 unless FILE:SCALE says)."""

    path: Path
    scale: float = 1.0

    @property
    def setting(self) -> str:
        return f"{self.path.name}:{self.scale:g}"


def parse_lora(text: str) -> LoraFile:
    """`FILE` or `FILE:SCALE` (a file whose own name holds a colon is taken whole when it exists)."""
    if Path(text).is_file() or ":" not in text:
        path, scale = Path(text), 1.0
    else:
        name, _, number = text.rpartition(":")
        try:
            scale = float(number)
        except ValueError:
            raise DitkitError(f"--lora {text}: the scale {number!r} is not a number: give FILE or FILE:SCALE "
                              "(e.g. style.safetensors:0.8)") from None
        if not math.isfinite(scale):
            raise DitkitError(f"--lora {text}: the scale must be a finite number: give FILE:SCALE, e.g. "
                              "style.safetensors:0.8")
        path = Path(name)
    if not path.is_file():
        raise DitkitError(f"--lora {path}: no such file: give a LoRA .safetensors file (FILE or FILE:SCALE)")
    if path.suffix != ".safetensors":
        raise DitkitError(f"--lora {path}: ditkit reads LoRA weights from .safetensors files only: convert it or "
                          "download the safetensors version")
    return LoraFile(path, scale)


# -- what a LoRA file changes -------------------------------------------------------------------------
def file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Every key of a safetensors file with its shape, from the header (no tensor read)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as file:
            return {key: tuple(file.get_slice(key).get_shape()) for key in file.keys()}
    except Exception as error:  # safetensors reports damaged headers with its own errors
        raise DitkitError(f"--lora {path} is not a readable safetensors file ({error}): download it again") from error


def is_diffusers_layout(keys) -> bool:
    """Keys as diffusers saves a LoRA: `transformer.<module>.lora_A.weight` / `.lora_B.weight`, and the
    text encoders' under their own prefixes."""
    return all(TEXT_ENCODERS.match(key) or (key.startswith("transformer.") and key.endswith(LORA_WEIGHTS))
               for key in keys)


def converted_shapes(path: Path, pipeline_class) -> dict[str, tuple[int, ...]]:
    """A LoRA in another trainer's layout (kohya, BFL, XLabs...) as diffusers converts it on loading
    (the pipeline class's `lora_state_dict`): its keys and shapes in diffusers' layout."""
    try:
        state = pipeline_class.lora_state_dict(str(path))
    except Exception as error:  # diffusers' converters raise whatever the layout trips on
        raise DitkitError(f"--lora {path} is not a LoRA diffusers can read for {pipeline_class.__name__} "
                          f"({str(error).splitlines()[0] if str(error) else type(error).__name__}): give a LoRA "
                          "trained for this pipeline's model") from error
    state = state[0] if isinstance(state, tuple) else state
    return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, Tensor)}


def lora_targets(shapes: dict[str, tuple[int, ...]]) -> dict[str, dict[str, tuple[int, ...]]]:
    """Transformer module -> {"A": (rank, in), "B": (out, rank)} of each factor pair the keys hold."""
    targets: dict[str, dict[str, tuple[int, ...]]] = {}
    for key, shape in shapes.items():
        suffix = next((suffix for suffix in LORA_WEIGHTS if key.endswith(suffix)), None)
        if suffix is None or TEXT_ENCODERS.match(key):
            continue
        module = key.removeprefix("transformer.").removesuffix(suffix)
        targets.setdefault(module, {})[suffix[len(".lora_")]] = shape  # "A" or "B"
    return targets


# -- checks before loading ----------------------------------------------------------------------------
def meta_transformer(folder: Path) -> nn.Module:
    """The pipeline's transformer built from its config on the meta device: module names and shapes, no weights."""
    config = folder / "transformer" / CONFIG
    adapter = find_adapter(model_class_name(config) or "")
    if adapter is None:
        raise DitkitError(f"{folder} has no transformer ditkit knows ({config}): --lora works on FLUX and SD3 "
                          "pipelines")
    model_class = adapter.model_class()
    return empty_model(lambda: model_class.from_config(model_class.load_config(config.parent)))


def check_fits(lora: LoraFile, targets: dict, transformer: nn.Module) -> None:
    """Every module the LoRA changes exists in `transformer` with the LoRA's input and output widths."""
    name = type(transformer).__name__
    if not targets:
        raise DitkitError(f"--lora {lora.path} holds no LoRA weights for a transformer (no *.lora_A.weight / "
                          "*.lora_B.weight keys after conversion): give a LoRA trained for this pipeline's model")
    modules = dict(transformer.named_modules())
    for module_name, factors in targets.items():
        module = modules.get(module_name)
        weight = getattr(module, "weight", None)
        if weight is None:
            raise DitkitError(f"--lora {lora.path} is a LoRA for another model: it changes {module_name}, which this "
                              f"pipeline's {name} does not have: give a LoRA trained for this pipeline's model")
        out_features, in_features = weight.shape[0], math.prod(weight.shape[1:])
        lora_in, lora_out = factors.get("A", (0, in_features))[1], factors.get("B", (out_features,))[0]
        wider_input = module_name == "x_embedder" and lora_in > in_features  # diffusers widens it (Control LoRAs)
        if lora_out != out_features or (lora_in != in_features and not wider_input):
            raise DitkitError(f"--lora {lora.path} is a LoRA for another model: {module_name} maps {in_features} -> "
                              f"{out_features} features in this {name}, {lora_in} -> {lora_out} in the LoRA: give a "
                              "LoRA trained for this pipeline's model")


def check_loras(pipeline: str | Path, revision: str | None, texts: list[str]) -> list[LoraFile]:
    """The --lora options, parsed and checked against the pipeline (a folder or a cached ORG/NAME)
    before any model weight loads; [] without any."""
    loras = [parse_lora(text) for text in texts]
    if not loras:
        return []
    import diffusers

    folder = resolve_pipeline(pipeline, revision)
    class_name = pipeline_index(folder).get("_class_name")
    pipeline_class = getattr(diffusers, str(class_name), None)
    if not hasattr(pipeline_class, "load_lora_weights"):
        raise DitkitError(f"diffusers' {class_name} cannot load LoRA weights: use --lora with a FLUX or SD3 "
                          "pipeline")
    if importlib.util.find_spec("peft") is None:
        raise DitkitError("--lora needs peft (diffusers loads LoRAs through it): pip install peft")
    transformer = meta_transformer(folder)
    for lora in loras:
        shapes = file_shapes(lora.path)
        if not is_diffusers_layout(shapes):
            shapes = converted_shapes(lora.path, pipeline_class)
        check_fits(lora, lora_targets(shapes), transformer)
    return loras


# -- loading ------------------------------------------------------------------------------------------
def adapter_names(loras: list[LoraFile]) -> list[str]:
    return [f"lora_{index}" for index in range(len(loras))]


def load_loras(pipe, loras: list[LoraFile]) -> None:
    """Load each LoRA as its own peft adapter and activate all of them with their scales."""
    if not loras:
        return
    names = adapter_names(loras)
    for lora, name in zip(loras, names, strict=True):
        pipe.load_lora_weights(str(lora.path), adapter_name=name)
    pipe.set_adapters(names, adapter_weights=[lora.scale for lora in loras])


def lora_settings(loras: list[LoraFile]) -> dict[str, str]:
    """The PNG settings of the LoRAs: {"lora": "style.safetensors:0.8, detail.safetensors:1"}."""
    return {"lora": ", ".join(lora.setting for lora in loras)} if loras else {}


# -- students under LoRA-wrapped layers ----------------------------------------------------------------
def base_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """The module's parameters under the names they have without LoRA: peft's wrapped base weights
    (`to_q.base_layer.weight`) as `to_q.weight`, the LoRA factors left out."""
    return {BASE_LAYER.sub(r"\1", name): parameter for name, parameter in module.named_parameters()
            if not PEFT_PARAMETER.search(name)}


def base_layer_state(module: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """`state` under `module`'s own names: a key whose layer peft wrapped goes into its base layer
    (`…to_q.weight` -> `…to_q.base_layer.weight`); other keys unchanged."""
    own = {name for name, _ in module.named_parameters()} | {name for name, _ in module.named_buffers()}
    renamed = {}
    for key, value in state.items():
        layer, _, leaf = key.rpartition(".")
        wrapped = f"{layer}.base_layer.{leaf}"
        renamed[wrapped if key not in own and wrapped in own else key] = value
    return renamed
