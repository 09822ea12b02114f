"""Checkpoints: safetensors weights that carry their own config, written atomically.

A checkpoint is a folder `checkpoints/step_0001000/` holding
  model.safetensors  training weights    } both with metadata "ditkit": JSON record of the
  ema.safetensors    EMA weights         } model config, diffusion settings and data
  optimizer.pt       optimizer state, and training_state.json (step, seed, ...)
It is written into a hidden temporary folder and renamed into place, so a crash never
leaves a half-written checkpoint; `checkpoints/latest` names the newest one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import DitkitError
from ..files import atomic_path, atomic_write_text
from ..mixers import swap_mixers
from ..models import build_model
from ..record import RunRecord

META_KEY = "ditkit"
STEP_DIR = re.compile(r"^step_(\d+)$")


def _state_for_saving(module: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = module if isinstance(module, dict) else module.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def save_checkpoint(root: Path, step: int, *, model: nn.Module | dict[str, torch.Tensor], ema: nn.Module | None,
                    optimizer: torch.optim.Optimizer, record: RunRecord, train_state: dict[str, Any],
                    keep: int = 0) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep` (0 = all).
    Without `ema` (distillation keeps none) loading falls back to model.safetensors."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp-step_{step:07d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    metadata = {META_KEY: record.to_json()}
    save_file(_state_for_saving(model), tmp / "model.safetensors", metadata=metadata)
    if ema is not None:
        save_file(_state_for_saving(ema), tmp / "ema.safetensors", metadata=metadata)
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "training_state.json").write_text(json.dumps({"step": step, **train_state}, indent=2))
    if final.exists():  # the same step saved again: replace it
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name + "\n")
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def save_weights(folder: str | Path, state: dict[str, torch.Tensor], record: RunRecord) -> Path:
    """A checkpoint of weights only (no optimizer: nothing to resume), e.g. converted published
    weights: `folder/model.safetensors` carrying its run record, which `load_checkpoint` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(_state_for_saving(state), tmp, metadata={META_KEY: record.to_json()})
    return folder


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | Path) -> Path:
    """Resolve a run folder, a checkpoints folder, a checkpoint folder or a .safetensors file."""
    path = Path(path)
    if path.is_file():
        return path
    if (path / "model.safetensors").is_file():
        return path
    for root in (path / "checkpoints", path):
        latest = root / "latest"
        if latest.is_file() and (root / latest.read_text().strip() / "model.safetensors").is_file():
            return root / latest.read_text().strip()
        if found := list_checkpoints(root):
            return found[-1]
    raise DitkitError(f"no checkpoint at {path}: pass a run folder, a checkpoint folder or a .safetensors file")


def read_weights(file: Path) -> tuple[dict[str, torch.Tensor], RunRecord]:
    """Tensors and the ditkit record of one safetensors file, with clear errors for bad files."""
    try:
        with safe_open(str(file), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError as error:
        raise DitkitError(f"checkpoint file {file} does not exist") from error
    except Exception as error:  # safetensors reports truncation and corruption with its own errors
        raise DitkitError(f"checkpoint file {file} is damaged or truncated ({error}): "
                          "use another checkpoint of the run") from error
    if META_KEY not in metadata:
        raise DitkitError(f"{file} is not a ditkit checkpoint (no model config in its metadata)")
    return tensors, RunRecord.from_json(metadata[META_KEY], source=str(file))


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise DitkitError(f"checkpoint {source} does not fit this model config ({detail}): "
                          "load it with the config it was trained with") from error


def load_checkpoint(path: str | Path, *, ema: bool = True, mixer: str | None = None,
                    mixer_options: dict | None = None, device: str | torch.device = "cpu"):
    """Rebuild the model a checkpoint was trained with and load its weights.

    `mixer` swaps the token mixer at load time (shared weights kept). Returns (model, record).
    """
    found = find_checkpoint(path)
    file = found
    if found.is_dir():
        file = found / ("ema.safetensors" if ema and (found / "ema.safetensors").is_file() else "model.safetensors")
    tensors, record = read_weights(file)
    if not hasattr(record.model, "backbone"):
        raise DitkitError(f"{file} holds a diffusers student ({record.model.diffusers}): load it into its "
                          "pipeline with ditkit.integrations.diffusers, not as a ditkit model")
    model = build_model(record.model)
    load_state(model, tensors, file)
    if mixer is not None or mixer_options:
        name = mixer or model.config.mixer
        options = dict(mixer_options or {})
        swap_mixers(model, name, **options)
        model.config = dataclasses.replace(model.config, mixer=name, mixer_options=options)
        record = record.with_model(model.config)
    return model.to(device).eval(), record
