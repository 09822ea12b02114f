"""Published weights into ditkit: `load_pretrained(path)` and `ditkit convert SRC --out DIR`.

Each source format registers a converter (`register_converter`): a test that recognises its files
and a function that turns them into ditkit weights plus a full run record (model config inferred
from the tensors, the diffusion setting the weights were trained with, the data space). The result
is written as an ordinary ditkit checkpoint (`model.safetensors` with its record), so `sample`,
`eval`, `info`, `bench`, `distill` and `--mixer clear` work on it unchanged.

Rules every converter keeps: files are read without running code (`torch.load(weights_only=True)`,
safetensors, JSON); every source key is used or named in an error, never silently dropped.
"""

from __future__ import annotations

import argparse
import dataclasses
import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ..checkpoint import META_KEY, load_checkpoint, load_state, read_header, save_weights
from ..data.latents import load_vae, vae_scale
from ..errors import DitkitError
from ..files import refuse_non_empty_folder, refuse_output_over_inputs
from ..models import build_model
from ..record import RunRecord


@dataclass(frozen=True)
class ConvertOptions:
    """What the files cannot say. vae: a diffusers AutoencoderKL folder for latent-space models;
    resolution: the training resolution in pixels (where the weights do not fix it); num_heads:
    attention heads (where the width matches no published config)."""

    vae: str | None = None
    resolution: int | None = None
    num_heads: int | None = None


def same_key(key: str) -> str:
    return key


@dataclass
class Converted:
    """Weights under ditkit's key names and the record that rebuilds their model; `source_key`
    maps a ditkit key back to the source's name for it (errors speak the source's names)."""

    state: dict[str, Tensor]
    record: RunRecord
    source_key: Callable[[str], str] = same_key


@dataclass(frozen=True)
class Converter:
    name: str
    accepts: Callable[[Path], bool]  # cheap: file names, config.json, the first bytes
    convert: Callable[[Path, ConvertOptions], Converted]


CONVERTERS: dict[str, Converter] = {}


def register_converter(name: str, accepts: Callable[[Path], bool]):
    """Decorator for `convert(path, options) -> Converted` of one source format."""
    def decorate(convert: Callable[[Path, ConvertOptions], Converted]):
        if name in CONVERTERS:
            raise ValueError(f"converter {name!r} is registered twice")
        CONVERTERS[name] = Converter(name, accepts, convert)
        return convert

    return decorate


def _is_plain_pickle(path: Path) -> bool:
    """A pickle.dump file: a pickle of protocol 3 or newer from its first byte on (torch.save writes a
    zip, or in its legacy format a protocol-2 pickle of its magic number)."""
    with open(path, "rb") as f:
        head = f.read(2)
    return len(head) == 2 and head[0] == 0x80 and head[1] >= 3


def read_torch_file(path: Path) -> object:
    """A torch.save file read without running code: tensors, containers and argparse.Namespace."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except pickle.UnpicklingError as error:
        unsafe = re.search(r"GLOBAL (\S+)", str(error))
        if unsafe is None and _is_plain_pickle(path):
            raise DitkitError(f"{path} is a plain Python pickle, not a torch.save file: ditkit reads torch.save and "
                              "safetensors files only (unpickling can run code); save the weights with "
                              "torch.save(model.state_dict(), ...) or safetensors") from error
        if unsafe is None:
            raise DitkitError(f"{path} is not a readable torch checkpoint ({_first_line(error)}): "
                              "is it truncated? download it again") from error
        raise DitkitError(f"{path} pickles the Python class {unsafe.group(1)}, which ditkit does not run: "
                          "save the state dict alone (torch.save(model.state_dict(), ...))") from error
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise DitkitError(f"{path} is not a readable torch checkpoint ({_first_line(error)}): "
                          "is it truncated? download it again") from error


def _first_line(error: Exception) -> str:
    """The gist of a library error: its first sentence."""
    line = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return line.split(". ")[0].rstrip(".")


def _is_zip(path: Path) -> bool:
    """torch.save's zip files can be memory-mapped: recognising a large file then reads no tensor."""
    with open(path, "rb") as f:
        return f.read(4) == b"PK\x03\x04"


def find_converter(path: Path) -> Converter:
    """The registered converter that accepts `path` (the built-in ones register when `ditkit.convert`
    is imported, which importing this module does first)."""
    if not path.exists():
        raise DitkitError(f"{path} does not exist: give a published checkpoint file or folder")
    for converter in CONVERTERS.values():
        if converter.accepts(path):
            return converter
    raise DitkitError(f"{path} is in no format ditkit converts ({', '.join(CONVERTERS)}): "
                      "see the README's 'Pretrained models' for the sources it reads")


def convert_pretrained(path: str | Path, options: ConvertOptions | None = None) -> Converted:
    path = Path(path)
    converted = find_converter(path).convert(path, options or ConvertOptions())
    if options and options.vae:
        attach_vae(converted.record, options.vae)
    return converted


def attach_vae(record: RunRecord, folder: str | Path) -> None:
    """Latent-space weights decode with the VAE at `folder`: the record names it, and the model's
    pixels per latent cell follow the VAE's."""

    vae = load_vae(folder)
    if vae.config.latent_channels != record.model.in_channels:
        raise DitkitError(f"the VAE at {folder} has {vae.config.latent_channels} latent channels, the model "
                          f"{record.model.in_channels}: give the VAE the model was trained with")
    record.model = dataclasses.replace(record.model, vae_scale=vae_scale(vae))
    record.data.vae = str(Path(folder).resolve())


def build_converted(converted: Converted) -> nn.Module:
    """The model of a conversion with its weights loaded (every key must fit: strict)."""

    model = build_model(converted.record.model)
    source = converted.record.origin["path"] if converted.record.origin else "the converted weights"
    check_keys(set(model.state_dict()), set(converted.state), source, converted.source_key)
    load_state(model, converted.state, source)
    return model.eval()


def check_keys(expected: set[str], found: set[str], source: str, source_key: Callable[[str], str] = same_key) -> None:
    """Name every key the inferred model lacks or the file lacks, as the file names them (never drop
    weights silently)."""
    unknown = sorted(map(source_key, found - expected))
    missing = sorted(map(source_key, expected - found))
    if unknown or missing:
        parts = [f"unknown keys {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}"] if unknown else []
        parts += [f"missing keys {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}"] if missing else []
        raise DitkitError(f"{source} does not fit the model inferred from it ({'; '.join(parts)}): "
                          "it is another architecture or a damaged file")


def load_pretrained(path: str | Path, options: ConvertOptions | None = None, device: str | torch.device = "cpu",
                    **option_fields):
    """(model, record) from a ditkit checkpoint or any published format a converter reads."""

    path = Path(path)
    if is_ditkit_checkpoint(path):
        return load_checkpoint(path, device=device)
    options = dataclasses.replace(options or ConvertOptions(), **option_fields)
    converted = convert_pretrained(path, options)
    return build_converted(converted).to(device), converted.record


def convert_to_checkpoint(path: str | Path, out: str | Path, options: ConvertOptions | None = None) -> Path:
    """Convert published weights and write them as a ditkit checkpoint folder `out`, which must be new
    (or empty): in a run folder the conversion would take the place of the run's own checkpoints
    wherever the folder is loaded, and in an earlier conversion's folder it would silently replace it."""

    refuse_output_over_inputs(out, {"source": path}, what="--out")
    refuse_non_empty_folder(out, "the converted checkpoint")
    converted = convert_pretrained(path, options)
    build_converted(converted)  # every tensor fits the inferred config before anything is written
    return save_weights(out, converted.state, converted.record)


def is_ditkit_checkpoint(path: Path) -> bool:
    """A ditkit run, checkpoint folder or safetensors file with a ditkit record."""

    try:
        file, metadata, _ = read_header(path)
    except DitkitError:  # no checkpoint there, or not a safetensors file at all: some other format
        return False
    return file.suffix == ".safetensors" and META_KEY in metadata
