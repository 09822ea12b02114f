"""CLEAR's released FLUX.1-dev weights (github.com/Huage001/CLEAR: `clear_local_32`, `clear_local_16`,
`clear_local_8`, `clear_local_16_down_4`, `clear_local_8_down_4` .safetensors) read into ditkit's CLEAR
processors, and ditkit's FLUX students written in their layout.

The layout. The authors' notebook sets its processors on a `FluxTransformer2DModel` and loads the file
with `load_state_dict(strict=False)`, so the keys are the transformer's own parameter names:
    {transformer_blocks|single_transformer_blocks}.{i}.attn.{to_q|to_k|to_v}.{weight|bias}
    transformer_blocks.{i}.attn.to_out.0.{weight|bias}           (single blocks have no to_out)
    {...}.{i}.attn.processor.spatial_weight  (1, 1, 1, f, 1, f, 1) with a down factor f
The file holds no settings: the window and the down factor are in its name
(`clear_local_{window_size}[_down_{down_factor}]`). ditkit's export adds them to the metadata as well
(`window_size`, `down_factor`), which the official loader ignores.

The correspondence, read from their `attention_processor.py`:
  - their mask lets image query q see image key k iff (qy-ky)^2 + (qx-kx)^2 < window_size^2, a strict
    comparison, as ditkit's disc of radius r (`(..)^2 < r^2`): radius = window_size, the same disc.
    A non-integer radius r draws the disc of window ceil(r) only when no lattice offset lies between
    (`official_window`); otherwise it has no official form and export refuses it.
  - text tokens are global in both: every query sees them, text queries see every image token;
  - with f > 1 their keys and values, after QK-norm and rotary, are pooled over f x f blocks with
    weights spatial_weight[0, 0, 0, i, 0, j, 0], seen by image queries only: ditkit's pooled tokens
    with pool_weight[i * f + j]. Their down_factor 1 (no `_down_` in the name) is ditkit's 0;
  - their pooling skips the first 512 tokens (FluxPipeline's default max_sequence_length), ditkit's
    skips the text tokens whatever their number: the same at 512 text tokens.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..checkpoint import first_non_finite, read_header, read_weights
from ..errors import DitkitError
from ..files import atomic_path
from ..mixers.clear import disc_size
from ..record import DiffusersModel
from .clear import self_attention_layers
from .lora import base_parameters

FLUX = "FluxTransformer2DModel"
BLOCKS = ("transformer_blocks", "single_transformer_blocks")
PROJECTIONS = ("to_q.", "to_k.", "to_v.", "to_out.0.")
OFFICIAL_KEY = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.attn\."
                          r"(?:(?:to_q|to_k|to_v|to_out\.0)\.(?:weight|bias)|processor\.spatial_weight)")
OFFICIAL_NAME = re.compile(r"clear_local_(\d+)(?:_down_(\d+))?(?!\d)")
SPATIAL, POOL = "processor.spatial_weight", "processor.pool_weight"


def is_official_layout(keys) -> bool:
    """Every key is one of the official file's (attention projections, pooling weights), and some are."""
    keys = list(keys)
    return bool(keys) and all(OFFICIAL_KEY.fullmatch(key) for key in keys)


def settings_from_name(path: str | Path) -> dict | None:
    """{"radius", "down_factor"} (ditkit's: 0 for none) from an official file name, or None when the
    name does not say (`clear_local_8_down_4.safetensors` -> radius 8, down_factor 4)."""
    found = OFFICIAL_NAME.search(Path(path).stem)
    if found is None:
        return None
    factor = int(found.group(2) or 1)
    return {"radius": int(found.group(1)), "down_factor": 0 if factor == 1 else factor}


def settings_from_metadata(metadata: dict[str, str]) -> dict | None:
    """The settings ditkit's export writes into the metadata (official convention: down_factor 1 = none)."""
    if not metadata.get("window_size", "").isdigit() or not metadata.get("down_factor", "1").isdigit():
        return None  # not written by ditkit's export
    factor = int(metadata.get("down_factor", 1))
    return {"radius": int(metadata["window_size"]), "down_factor": 0 if factor == 1 else factor}


def file_down_factor(file: Path, shapes: dict[str, tuple[int, ...]]) -> int:
    """The down factor the pooling weights' shape says (0 when the file has none)."""
    factors = {shape[3] if len(shape) == 7 else -1 for key, shape in shapes.items() if key.endswith(SPATIAL)}
    if len(factors) > 1 or -1 in factors:
        shapes_seen = sorted({shapes[key] for key in shapes if key.endswith(SPATIAL)})
        raise DitkitError(f"the spatial_weight tensors of {file} have shapes {shapes_seen}: the official "
                          "layout has one (1, 1, 1, f, 1, f, 1) shape in every layer; download the file again")
    return factors.pop() if factors else 0


def official_settings(file: Path, metadata: dict[str, str], shapes: dict[str, tuple[int, ...]],
                      given: dict | None = None) -> dict:
    """Radius and down factor of an official file, from `given` (--clear), the name, ditkit's metadata
    and the pooling weights' shape, all of which must agree; refused in one line when the radius is
    said by none."""
    sources = {"--clear": {k: v for k, v in (given or {}).items() if k in ("radius", "down_factor")},
               "the file name": settings_from_name(file) or {},
               "the file's metadata": settings_from_metadata(metadata) or {}}
    sources["the shape of its pooling weights"] = {"down_factor": file_down_factor(file, shapes)}
    settings: dict = {}
    said_by: dict[str, str] = {}
    for source, values in sources.items():
        for key, value in values.items():
            if key in settings and float(settings[key]) != float(value):
                raise DitkitError(f"{file}: {said_by[key]} says {key}={settings[key]}, {source} says {value}: correct "
                                  "--clear, or name the file after its settings (clear_local_W[_down_F].safetensors)")
            settings.setdefault(key, value)
            said_by.setdefault(key, source)
    if "radius" not in settings:
        raise DitkitError(f"{file} holds CLEAR's official weights but its name does not say their window: pass "
                          "--clear radius=W[,down_factor=F] (W = the window_size it was distilled with), or name it "
                          "clear_local_W[_down_F].safetensors")
    settings.setdefault("down_factor", 0)
    return settings


def expected_shapes(transformer: nn.Module, down_factor: int) -> dict[str, tuple[int, ...]]:
    """The official file's keys and shapes for this transformer: the image-stream projections of every
    self-attention layer and, with a down factor, each layer's pooling weights."""
    expected = {}
    for path, attn, _ in self_attention_layers(transformer):
        for name, parameter in base_parameters(attn).items():  # a LoRA-wrapped layer's base weights
            if name.startswith(PROJECTIONS):
                expected[f"{path}.{name}"] = tuple(parameter.shape)
        if down_factor:
            expected[f"{path}.{SPATIAL}"] = (1, 1, 1, down_factor, 1, down_factor, 1)
    return expected


def layer_counts(keys) -> str:
    """'19 double-stream + 38 single-stream' attention layers named by these keys."""
    layers = {block: set() for block in BLOCKS}
    for key in keys:
        found = OFFICIAL_KEY.fullmatch(key)
        if found:
            layers[found.group(1)].add(int(found.group(2)))
    return f"{len(layers[BLOCKS[0]])} double-stream + {len(layers[BLOCKS[1]])} single-stream"


def check_official(transformer: nn.Module, file: Path, shapes: dict[str, tuple[int, ...]], down_factor: int) -> None:
    """Every key of the file against the transformer, before anything loads: its class, its layer count,
    missing and unexpected keys, shapes. One line for the first problem."""
    name = type(transformer).__name__
    if name != FLUX:
        raise DitkitError(f"{file} holds CLEAR's official weights for FLUX.1 ({FLUX}); this pipeline's transformer is "
                          f"a {name}: use them with a FLUX.1-dev pipeline")
    expected = expected_shapes(transformer, down_factor)
    if layer_counts(shapes) != layer_counts(expected):
        raise DitkitError(f"{file} holds {layer_counts(shapes)} attention layers, this transformer has "
                          f"{layer_counts(expected)}: use the transformer the weights were distilled from (FLUX.1-dev)")
    missing = sorted(set(expected) - set(shapes))
    unexpected = sorted(set(shapes) - set(expected))
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which this transformer does not"
        hint = " (its down factor is not the one given)" if any(SPATIAL in key for key in missing + unexpected) else ""
        raise DitkitError(f"{file} {what}{hint}: check the down factor (--clear down_factor=F) and that the file "
                          "is one of CLEAR's FLUX.1-dev releases")
    for key, shape in expected.items():  # in the transformer's order: the first layer's first
        if tuple(shapes[key]) != shape:
            raise DitkitError(f"{file} does not fit this transformer ({key}: {shape} here, {tuple(shapes[key])} in "
                              "the file): use the transformer the weights were distilled from (FLUX.1-dev)")


def ditkit_state(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official tensors under the names of ditkit's processors: spatial_weight (1,1,1,f,1,f,1) is
    pool_weight (f*f,) in the same (row, column) order; the projections keep their names."""
    return {key.replace(SPATIAL, POOL): value.reshape(-1) if key.endswith(SPATIAL) else value
            for key, value in tensors.items()}


def official_state(state: dict[str, Tensor], down_factor: int) -> dict[str, Tensor]:
    """ditkit student tensors (names within the transformer) under the official names."""
    return {key.replace(POOL, SPATIAL): value.reshape(1, 1, 1, down_factor, 1, down_factor, 1)
            if key.endswith(POOL) else value for key, value in state.items()}


def read_official(file: Path) -> dict[str, Tensor]:
    """An official file's tensors under ditkit's names; refused when any is inf or NaN."""
    try:
        tensors = load_file(str(file))
    except Exception as error:  # safetensors reports truncation and corruption with its own errors
        raise DitkitError(f"{file} is damaged or truncated ({error}): download it again") from error
    bad = first_non_finite(tensors)
    if bad is not None:  # it would draw black images, not fail
        raise DitkitError(f"{file} holds inf or NaN weights ({bad}): download it again")
    return ditkit_state(tensors)


def official_window(radius: float) -> int:
    """The official window_size whose disc is ditkit's disc of `radius`, or a one-line refusal.
    Discs grow with the radius, so only ceil(r) can match: it does when they hold as many points."""
    window = math.ceil(radius)
    if disc_size(window) != disc_size(radius):
        raise DitkitError(f"a CLEAR disc of radius {radius} is no official window (window_size w draws the disc "
                          f"d^2 < w^2; {window} holds {disc_size(window)} offsets, radius {radius} "
                          f"{disc_size(radius)}): distil with an integer radius")
    return window


def write_official(state: dict[str, Tensor], radius: float, down_factor: int, out: str | Path) -> Path:
    """Write a FLUX student's tensors (names within the transformer: projections and pool_weight) as an
    official file; a name in the official pattern must say the student's settings."""
    out = Path(out)
    window = official_window(radius)
    if out.suffix != ".safetensors":
        raise DitkitError(f"{out}: the official layout is a .safetensors file: give a name like "
                          f"clear_local_{window}{f'_down_{down_factor}' if down_factor else ''}.safetensors")
    named = settings_from_name(out)
    if named is not None and named != {"radius": window, "down_factor": down_factor}:
        raise DitkitError(f"{out.name} says radius {named['radius']}, down factor {named['down_factor']}; the student "
                          f"has {window} and {down_factor}: name the file clear_local_{window}"
                          f"{f'_down_{down_factor}' if down_factor else ''}.safetensors")
    tensors = {key: value.contiguous() for key, value in official_state(state, down_factor).items()}
    out.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "window_size": str(window), "down_factor": str(down_factor or 1)}
    with atomic_path(out) as tmp:
        save_file(tensors, tmp, metadata=metadata)
    return out


def export_official(student: str | Path, out: str | Path) -> Path:
    """`ditkit export STUDENT --to clear-official OUT.safetensors`: a `ditkit distill` FLUX student (run
    folder, checkpoint folder or file) written in the official layout, which the authors' notebook loads
    and ditkit's `--student` reads back bit for bit."""
    file = read_header(student)[0]
    tensors, record = read_weights(file)
    if not isinstance(record.model, DiffusersModel) or "radius" not in (record.distill or {}):
        raise DitkitError(f"{file} is not a diffusers CLEAR student: export one made by ditkit distill with a "
                          "diffusers FLUX teacher")
    if record.model.diffusers != FLUX:
        raise DitkitError(f"{file} is a student of a {record.model.diffusers}: CLEAR's official layout holds "
                          f"FLUX.1 students ({FLUX}) only")
    state = {key.removeprefix("transformer."): value for key, value in tensors.items()}
    strays = sorted(key for key in state if not OFFICIAL_KEY.fullmatch(key.replace(POOL, SPATIAL)))
    if strays:
        raise DitkitError(f"{file} holds {strays[0]}, which the official layout has no place for: export a student "
                          "that trains the attention projections only (ditkit distill's default)")
    return write_official(state, record.distill["radius"], int(record.distill.get("down_factor", 0)), out)
