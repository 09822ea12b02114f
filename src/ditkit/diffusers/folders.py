"""What a diffusers folder is, read in one place: a pipeline folder (model_index.json naming the
pipeline class and its component folders) or a model folder (config.json naming the model class
in `_class_name`, weights in diffusion_pytorch_model.safetensors, or split in several files listed
by its .index.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..distributed.sharded_load import WeightFiles, single_weight_file, stored_tensors
from ..errors import DitkitError
from ..files import read_json

MODEL_INDEX = "model_index.json"
CONFIG = "config.json"
WEIGHTS = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX = WEIGHTS + ".index.json"


def model_class_name(config_file: Path) -> str | None:
    """The `_class_name` a diffusers config.json names, or None when the file is not one."""
    if not (config_file.is_file() and config_file.suffix == ".json"):
        return None
    values = read_json(config_file, "diffusers config")
    return values.get("_class_name") if isinstance(values, dict) else None


def is_model_folder(path: str | Path) -> bool:
    """A diffusers model folder: its config.json names a `_class_name`."""
    return model_class_name(Path(path) / CONFIG) is not None


def is_diffusers_folder(path: str | Path) -> bool:
    """A pipeline folder (model_index.json), a model folder (its config.json names a `_class_name`) or
    bare model weights: what a format check asks. A damaged config.json makes it False, not an error."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / MODEL_INDEX).is_file() or any(path.glob(WEIGHTS.removesuffix(".safetensors") + "*")):
        return True
    try:
        return is_model_folder(path)
    except DitkitError:
        return False


def diffusers_config_file(path: str | Path) -> Path | None:
    """The model config.json at `path` (the file itself), in it, or in its transformer/ subfolder
    (a pipeline folder); None when `path` is not a diffusers model."""
    path = Path(path)
    for candidate in (path, path / CONFIG, path / "transformer" / CONFIG):
        if model_class_name(candidate) is not None:
            return candidate
    return None


def hub_cache() -> Path:
    """The Hugging Face cache folder (HF_HUB_CACHE, else HF_HOME/hub, else huggingface_hub's default),
    read when called: huggingface_hub reads the environment once, when it is imported."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(constants.HF_HUB_CACHE)


def is_repo_id(name: str) -> bool:
    """`ORG/NAME` as the Hugging Face hub spells a repository (not a path that exists here)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if "/" not in name or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def resolve_pipeline(name: str | Path, revision: str | None = None) -> Path:
    """The folder of a pipeline: `name` itself when it is a folder, or the snapshot of the hub
    repository `ORG/NAME` (at `revision`: a branch, tag or commit; default main) in the local Hugging Face
    cache. Never downloads: a repository missing from the cache is refused in one line naming the
    cache folder and the command that fetches it."""
    text = str(name)
    if not is_repo_id(text):
        if revision is not None:
            raise DitkitError(f"--revision picks a snapshot of a hub repository (ORG/NAME) in the Hugging Face "
                              f"cache; {text} is a folder: drop --revision or name the repository")
        return Path(name)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    cache = hub_cache()
    try:
        return Path(snapshot_download(text, revision=revision, cache_dir=cache, local_files_only=True))
    except LocalEntryNotFoundError as error:
        fetch = f"hf download {text}" + (f" --revision {revision}" if revision else "")
        at = f" at revision {revision}" if revision else ""
        raise DitkitError(f"{text}{at} is neither a folder here nor in the Hugging Face cache ({cache}): fetch it "
                          f"with `{fetch}` (set HF_HOME to use another cache), or give the pipeline folder") from error


def pipeline_index(folder: str | Path) -> dict:
    """A pipeline folder's model_index.json (its `_class_name` and components)."""
    index_file = Path(folder) / MODEL_INDEX
    if not index_file.is_file():
        raise DitkitError(f"{folder} is not a diffusers pipeline folder (no {MODEL_INDEX}): pass the folder "
                          f"that holds {MODEL_INDEX} (e.g. a FLUX.1-dev download)")
    index = read_json(index_file, f"diffusers {MODEL_INDEX}")
    if not isinstance(index, dict):
        raise DitkitError(f"{index_file} is not a JSON object: download the pipeline folder again")
    return index


def diffusers_weight_files(folder: str | Path, prefix: str = "") -> WeightFiles:
    """A diffusers model folder's weights, for the sharded loader: one WEIGHTS file, or several
    listed in its .index.json (how save_pretrained splits a large model, FLUX.1's layout)."""
    folder = Path(folder)
    index = folder / WEIGHTS_INDEX
    if not index.is_file():
        if not (folder / WEIGHTS).is_file():
            raise DitkitError(f"{folder} has no {WEIGHTS} (nor {WEIGHTS_INDEX}): save the model with "
                              "save_pretrained (safetensors), or load it with sharding=none")
        return single_weight_file(folder / WEIGHTS, prefix)
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict):
        raise DitkitError(f"{index} has no weight_map: download the folder again")
    tensors = {}
    for file in sorted(set(weight_map.values())):
        if not (folder / file).is_file():
            raise DitkitError(f"{index} names {file}, which is missing from {folder}: download that file again")
        held = stored_tensors(folder / file, str(folder))
        for name in (n for n, f in weight_map.items() if f == file):
            if name not in held:
                raise DitkitError(f"{index} places {name} in {file}, which lacks it: download the folder again")
            tensors[name] = held[name]
    return WeightFiles(tensors, str(folder), prefix)
