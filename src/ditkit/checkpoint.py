"""Checkpoints: safetensors weights that carry their own config, written atomically.

A checkpoint is a folder `checkpoints/step_0001000/` holding
  model.safetensors  training weights    } both with metadata "ditkit": JSON record of the
  ema.safetensors    EMA weights         } model config, diffusion settings and data
  optimizer.pt       optimizer state, and training_state.json (step, seed, ...)
Sharded runs (distributed/sharding.py) write `sharded/`, a torch.distributed.checkpoint folder of
weights, EMA and optimizer state, in place of optimizer.pt; their safetensors are full weights.
It is written into a hidden temporary folder and renamed into place, so a crash never
leaves a half-written checkpoint; `checkpoints/latest` names the newest one.

Every safetensors file also carries the CRC-32 of each tensor's raw bytes (metadata "ditkit.crc32"),
and training_state.json the CRC-32 of optimizer.pt: verified whenever they load, so a flipped bit on
disk or in a copy is one line, not a run that trains on damaged weights. CRC-32 because it finds
every single flipped bit and every burst up to 32 bits, at a fraction of the cost of a cryptographic
hash (benchmarks/results/checksum-cpu.md), and tensors are hashed on several threads (zlib frees the
GIL). Files from before the checksums load as they did. Weights or optimizer state holding inf or
NaN are refused when they load, before any step or sample.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import shutil
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import DitkitError
from .files import atomic_path, atomic_write_text, fsync_file, read_json, remove_temporary_files, writing
from .mixers import MixerSpec, swap_mixers
from .models import build_model
from .record import RunRecord

META_KEY = "ditkit"
CHECKSUM_KEY = "ditkit.crc32"  # safetensors metadata: {tensor name: CRC-32 of its raw bytes, 8 hex digits}
STEP_DIR = re.compile(r"^step_(\d+)$")
OPTIMIZER_FILE, STATE_FILE = "optimizer.pt", "training_state.json"
log = logging.getLogger(__name__)


def _crc32(tensor: torch.Tensor) -> str:
    """The CRC-32 of a CPU tensor's raw bytes (any dtype, bf16 included: hashed as bytes)."""
    return f"{zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy()):08x}"


def tensor_checksums(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """{name: CRC-32} of contiguous CPU tensors, hashed on up to 8 threads (zlib releases the GIL)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        return dict(zip(state, pool.map(_crc32, state.values()), strict=True))


def file_checksum(path: Path) -> str:
    """The CRC-32 of a file's bytes, read in 16 MB chunks."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def _metadata(record: RunRecord, state: dict[str, torch.Tensor]) -> dict[str, str]:
    """A safetensors file's metadata: the run record and its tensors' checksums."""
    return {META_KEY: record.to_json(), CHECKSUM_KEY: json.dumps(tensor_checksums(state), sort_keys=True)}


def _state_for_saving(module: nn.Module | dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    state = module if isinstance(module, dict) else module.state_dict()
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def staging_folder(root: Path, step: int) -> Path:
    """A new hidden folder where checkpoint `step` is written before it is renamed into place (a
    killed write leaves it behind as an orphan, which `remove_orphans` recognises). Sharded runs
    make it on the main process first, every process writes its shards there, then
    `save_checkpoint(..., staged=it)` completes it."""
    root.mkdir(parents=True, exist_ok=True)
    remove_orphans(root)
    tmp = root / f".tmp-step_{step:07d}-{os.getpid()}"
    tmp.mkdir()
    return tmp


def save_checkpoint(root: Path, step: int, *, model: nn.Module | dict[str, torch.Tensor], ema: nn.Module | None,
                    optimizer: torch.optim.Optimizer | None, record: RunRecord, train_state: dict[str, Any],
                    keep: int = 0, staged: Path | None = None) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep` (0 = all).
    Without `ema` (distillation keeps none) loading falls back to model.safetensors. `staged`: a
    `staging_folder` already holding the sharded state (then `optimizer` is None: it is in there).

    Weights holding inf or NaN are refused (the last good checkpoint stays the newest), and a full
    disk is a one-line error naming the file and the last complete checkpoint; neither leaves a
    temporary folder behind, nor do earlier killed writes (removed here first)."""
    root.mkdir(parents=True, exist_ok=True)
    if staged is None:
        remove_orphans(root)
    weights = {"model.safetensors": _state_for_saving(model)}
    if ema is not None:
        weights["ema.safetensors"] = _state_for_saving(ema)
    for name, state in weights.items():
        if (bad := first_non_finite(state)) is not None:
            if staged is not None:
                shutil.rmtree(staged, ignore_errors=True)
            raise DitkitError(f"the {name.split('.')[0]} weights of step {step} hold inf or NaN ({bad}): not saved; "
                              f"the last good checkpoint is {last_checkpoint(root) or 'none yet'}: lower the "
                              "learning rate")
    final = root / f"step_{step:07d}"
    tmp = staged or root / f".tmp-step_{step:07d}-{os.getpid()}"
    writers = [(name, partial(save_file, state, metadata=_metadata(record, state))) for name, state in weights.items()]
    if optimizer is not None:
        writers.append((OPTIMIZER_FILE, partial(torch.save, optimizer.state_dict())))
    state = {"step": step, "ema": ema is not None, **train_state}

    def write_state(path: Path) -> None:  # after optimizer.pt: it carries that file's checksum
        checksums = {OPTIMIZER_FILE: file_checksum(tmp / OPTIMIZER_FILE)} if optimizer is not None else {}
        path.write_text(json.dumps({**state, **({"checksums": checksums} if checksums else {})}, indent=2))

    writers.append((STATE_FILE, write_state))
    try:
        tmp.mkdir(exist_ok=staged is not None)
        for name, write in writers:
            _write_durably(write, tmp / name, final / name, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # a half-written checkpoint must not keep the disk full
        raise
    if final.exists():  # the same step saved again: replace it
        _remove_checkpoint(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name + "\n")
    if keep > 0:
        for old in list_checkpoints(root)[:-keep]:
            _remove_checkpoint(old)
    return final


def _write_durably(write, path: Path, shown: Path, root: Path) -> None:
    """`write(path)`, synced to disk; a storage fault becomes a one-line error naming `shown`."""
    with writing(shown, folder=root, after=resume_advice(root)):
        write(path)
        fsync_file(path)


def resume_advice(root: Path) -> str:
    """What works after a run under `root` (its checkpoints folder) stopped: resume from its last
    complete checkpoint, or, when it has none, start it again."""
    last = last_checkpoint(root)
    if last is None:
        return "no checkpoint was written yet: then start again with --overwrite"
    return f"the last complete checkpoint is {last}: then run again with --resume"


def last_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    try:
        return find_checkpoint(root)
    except DitkitError:
        return None


def _remove_checkpoint(folder: Path) -> None:
    """Rename, then delete: a kill midway leaves a hidden orphan (removed later), never a
    step folder that looks complete but is not."""
    doomed = folder.with_name(f".remove-{folder.name}-{os.getpid()}")
    os.replace(folder, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


ORPHAN = re.compile(r"^\.(tmp-step_|remove-step_)")


def remove_orphans(root: Path) -> None:
    """What killed writes left under a checkpoints folder: temporary and half-removed checkpoint
    folders, atomic-write temporaries, and step folders without their weights. Only the process
    that owns the run folder (its lock) may call this."""
    if not root.is_dir():
        return
    remove_temporary_files(root)
    for path in root.iterdir():
        incomplete = STEP_DIR.match(path.name) and path.is_dir() and not (path / "model.safetensors").is_file()
        if incomplete:
            warnings.warn(f"removing the incomplete checkpoint {path} (a write or a removal was killed)",
                          stacklevel=2)
        if incomplete or (ORPHAN.match(path.name) and path.is_dir()):
            shutil.rmtree(path, ignore_errors=True)


def save_weights(folder: str | Path, state: dict[str, torch.Tensor], record: RunRecord) -> Path:
    """A checkpoint of weights only (no optimizer: nothing to resume), e.g. converted published
    weights: `folder/model.safetensors` carrying its run record, which `load_checkpoint` reads."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = _state_for_saving(state)
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, tmp, metadata=_metadata(record, state))
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


def _read_safetensors(file: Path, read) -> tuple[dict[str, str], Any]:
    """(metadata, read(opened file)) of one safetensors file, with clear errors for bad files."""
    try:
        with safe_open(str(file), framework="pt") as f:
            return f.metadata() or {}, read(f)
    except FileNotFoundError as error:
        raise DitkitError(f"checkpoint file {file} does not exist") from error
    except Exception as error:  # safetensors reports truncation and corruption with its own errors
        raise DitkitError(f"checkpoint file {file} is damaged or truncated ({error}): "
                          "use another checkpoint of the run") from error


def read_header(path: str | Path) -> tuple[Path, dict[str, str], dict[str, tuple[int, ...]]]:
    """(file, metadata, tensor shapes) of a checkpoint's model.safetensors (any path `find_checkpoint`
    resolves), read from the header alone: no weights are loaded."""
    found = find_checkpoint(path)
    file = weights_file(found, ema=False) if found.is_dir() else found
    metadata, shapes = _read_safetensors(file, lambda f: {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return file, metadata, shapes


def read_weights(file: Path) -> tuple[dict[str, torch.Tensor], RunRecord]:
    """Tensors and the ditkit record of one safetensors file, verified: every load of ditkit weights
    (sample, eval, train --resume, a distillation's teacher and resume, export) comes through here.
    A file that is damaged, whose tensors do not match their checksums, or that holds inf or NaN is
    a one-line error naming it and the first bad tensor."""
    metadata, tensors = _read_safetensors(file, lambda f: {k: f.get_tensor(k) for k in f.keys()})
    if META_KEY not in metadata:
        raise DitkitError(f"{file} is not a ditkit checkpoint (no model config in its metadata)")
    if (bad := first_non_finite(tensors)) is not None:  # named first: the checksums may have been copied along
        raise DitkitError(f"{file} holds inf or NaN weights ({bad}): the run had diverged when it was saved; "
                          "use an earlier checkpoint")
    verify_checksums(file, metadata, tensors)
    return tensors, RunRecord.from_json(metadata[META_KEY], source=str(file))


def verify_checksums(file: Path, metadata: dict[str, str], tensors: dict[str, torch.Tensor]) -> None:
    """The tensors of `file` against the checksums written with them (files from before checksums: none
    to check, said once at info level)."""
    if CHECKSUM_KEY not in metadata:
        log.info("%s carries no tensor checksums (written before ditkit kept them): loaded unverified", file)
        return
    try:
        expected = json.loads(metadata[CHECKSUM_KEY])
        names = set(expected) == set(tensors)
    except (json.JSONDecodeError, TypeError):
        expected, names = {}, False
    if not names:
        raise DitkitError(f"{file} is damaged: its tensors are not those its checksums list: use another "
                          "checkpoint of the run, or copy the file again")
    actual = tensor_checksums(tensors)
    if bad := next((name for name in tensors if actual[name] != expected[name]), None):
        raise DitkitError(f"{file} is damaged: tensor {bad} does not match the checksum written with it (flipped "
                          "bytes on disk or in a copy): use another checkpoint of the run, or copy the file again")


def read_training_state(folder: Path) -> dict[str, Any]:
    """A checkpoint's training_state.json, checked: a mapping whose step is a whole number of at least 0
    (the seed too, when it has one). A damaged one is one line naming the file and the field."""
    path = folder / STATE_FILE
    state = read_json(path, "training state")
    if not isinstance(state, dict):
        raise DitkitError(f"training state {path} holds a {type(state).__name__}, not the checkpoint's settings: "
                          "resume from another checkpoint of the run")
    for key, required in (("step", True), ("seed", False)):
        value = state.get(key)
        if value is None and not required:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DitkitError(f"training state {path} has {key} {value!r}, not a whole number of at least 0: "
                              "resume from another checkpoint of the run")
    return state


def load_optimizer_state(folder: Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """A checkpoint's optimizer.pt, verified against the checksum its training_state.json carries (when
    it carries one), shaped as torch's optimizer state, and finite: refused in one line otherwise."""
    path = folder / OPTIMIZER_FILE
    expected = read_training_state(folder).get("checksums", {})
    expected = expected.get(OPTIMIZER_FILE) if isinstance(expected, dict) else None
    saved = load_torch_file(path, device)  # runs no code (weights_only), so it may come before the check
    if expected is not None and file_checksum(path) != expected:
        raise DitkitError(f"{path} is damaged: its bytes do not match the checksum written with it (flipped "
                          "bytes on disk or in a copy): resume from another checkpoint of the run")
    if not (isinstance(saved, dict) and isinstance(saved.get("state"), dict)
            and isinstance(saved.get("param_groups"), list)):
        raise DitkitError(f"{path} is not an optimizer's state (no state and param_groups): resume from another "
                          "checkpoint of the run")
    for index, values in saved["state"].items():
        for name, value in (values.items() if isinstance(values, dict) else ()):
            if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
                raise DitkitError(f"{path} holds inf or NaN optimizer state (parameter {index}, {name}): the run "
                                  "had diverged when it was saved; resume from an earlier checkpoint")
    return saved


def read_record(file: Path) -> RunRecord:
    """The ditkit record of one safetensors file of a model checkpoint, read from its header alone
    (no weights): what a model built empty, to be loaded shard by shard, is built from."""
    metadata, _ = _read_safetensors(file, lambda f: None)
    if META_KEY not in metadata:
        raise DitkitError(f"{file} is not a ditkit checkpoint (no model config in its metadata)")
    record = RunRecord.from_json(metadata[META_KEY], source=str(file))
    if not hasattr(record.model, "backbone"):
        raise DitkitError(f"{file} holds a diffusers student ({record.model.diffusers}): run it in its pipeline "
                          "(ditkit generate --student, or ditkit.diffusers.pipelines.load_student)")
    return record


def load_torch_file(path: Path, device: str | torch.device = "cpu") -> Any:
    """A checkpoint's optimizer.pt (plain tensors only: `weights_only` runs no pickled code), with
    one-line errors when it is missing, damaged or holds objects that weights_only refuses."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except FileNotFoundError as error:
        raise DitkitError(f"checkpoint file {path} is missing: resume from another checkpoint of the run") from error
    except Exception as error:  # UnpicklingError (refused payloads), RuntimeError (truncated zip), ...
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DitkitError(f"checkpoint file {path} is damaged or holds objects ditkit does not load ({reason}): "
                          "resume from another checkpoint of the run") from error


def first_non_finite(state: dict[str, torch.Tensor]) -> str | None:
    """The name of the first floating-point tensor of `state` holding inf or NaN, or None."""
    return next((name for name, tensor in state.items()
                 if tensor.is_floating_point() and not torch.isfinite(tensor).all()), None)


def weights_file(folder: Path, ema: bool) -> Path:
    """The weights to load from a checkpoint folder: its EMA when asked for. A checkpoint written with
    an EMA (its training_state.json says so) that lost ema.safetensors is an error, not silently its
    raw weights; those written without one (distilled students) load model.safetensors."""
    model_file, ema_file = folder / "model.safetensors", folder / "ema.safetensors"
    if not ema or ema_file.is_file():
        return ema_file if ema else model_file
    if (folder / STATE_FILE).is_file() and read_training_state(folder).get("ema"):
        raise DitkitError(f"checkpoint {folder} has no ema.safetensors (its EMA weights): restore that file, or "
                          "load the raw training weights (--no-ema)")
    return model_file


def load_state(model: nn.Module, tensors: dict[str, torch.Tensor], source: Path) -> None:
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise DitkitError(f"checkpoint {source} does not fit this model config ({detail}): "
                          "load it with the config it was trained with") from error


def load_checkpoint(path: str | Path, *, ema: bool = True, mixer: str | MixerSpec | None = None,
                    mixer_options: dict | None = None, device: str | torch.device = "cpu"):
    """Rebuild the model a checkpoint was trained with and load its weights.

    `mixer` (a MixerSpec, or its text: "clear:radius=8") swaps the token mixer at load time, shared
    weights kept; `mixer_options` are merged into it (alone, they rebuild the checkpoint's own mixer
    with those options). Returns (model, record).
    """
    spec = None if mixer is None else MixerSpec.parse(mixer).merged(mixer_options)  # a bad spec fails first
    found = find_checkpoint(path)
    file = weights_file(found, ema) if found.is_dir() else found
    tensors, record = read_weights(file)
    if not hasattr(record.model, "backbone"):
        raise DitkitError(f"{file} holds a diffusers student ({record.model.diffusers}): run it in its pipeline "
                          "(ditkit generate --student, or ditkit.diffusers.pipelines.load_student)")
    model = build_model(record.model)
    load_state(model, tensors, file)
    if spec is None and mixer_options:
        spec = MixerSpec(model.config.mixer, mixer_options)
    if spec is not None:
        swap_mixers(model, spec)
        model.config = dataclasses.replace(model.config, mixer=spec.name, mixer_options=dict(spec.options))
        record = record.with_model(model.config)
    return model.to(device).eval(), record
