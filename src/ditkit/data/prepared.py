"""Prepared latents: a source's images encoded once by a VAE into fixed-size safetensors shards
plus a manifest (`ditkit prepare`, and the latent cache of `ditkit train` with data.vae), and the
lazy dataset that training reads them with (`data.source: latents:DIR`).

A prepared folder holds

    manifest.json            written last: the source, its fingerprint, the VAE (path, sha256 of its
                             config and of its weights file's header), resolution, hflip, crop rule,
                             dtype, latent shape, scaling factor, class names, the skipped files and
                             every shard with its item count, size and sha256
    shard-000000.safetensors `latents` (n, C, h, w), `labels` and `indices` (the source items, int64),
    shard-000001.safetensors and with hflip `flipped`: the latents of the same images mirrored
    ...

Shard k holds the readable items among source items [k*S, (k+1)*S) (S = shard size), encoded in
batches of B from the shard's first item (S is a multiple of B), so its bytes depend on neither the
number of processes nor on which process made it: process r of P makes every P-th missing shard.
With hflip, dataset item 2j is a source item's latent and item 2j+1 that of its mirror image.

Resuming: while a folder is in progress, `progress.json` holds its settings and each finished shard
has a record `shard-000000.json` (count, size, sha256, skipped files), written after the shard (both
atomically). A rerun trusts a shard only when its record is there and the file's size, header and
sha256 match it; the others are made (again). Rank 0 writes the manifest once every shard has its
record, then removes the records. A finished folder rerun is verified (every sha256), never rebuilt:
a shard that differs from the manifest is named (delete it and rerun), a deleted one is made again;
a folder of another source, VAE, resolution, hflip, dtype or shard plan is refused in one line.

Reading (`PreparedLatents`): the manifest and every shard's size and header are checked at open
(cheap: no tensor data is read); full checksums are `prepare`'s (rerun it on the finished folder).
Each item is one positioned read (`os.pread`) from a file opened lazily in the process that reads it
(a DataLoader worker opens its own; open files are never pickled): no mapping, so resident memory
does not grow as an epoch touches the whole dataset, as it does with mmap, whose pages count as the
process's own. The files stay memory-mappable for other readers (`safetensors.safe_open`).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..errors import DitkitError
from ..files import (
    FolderLock,
    atomic_path,
    atomic_write_text,
    check_writable,
    foreign_files,
    read_json,
    refuse_output_over_inputs,
    remove_temporary_files,
)
from .folder import Unreadable
from .latents import encode, load_vae, vae_scale

MANIFEST = "manifest.json"
PROGRESS = "progress.json"
KIND = "ditkit prepared latents"
FORMAT = 1
PREFIX = "latents:"  # data.source: latents:DIR
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
NUMPY_DTYPES = {"F16": np.float16, "F32": np.float32, "I64": np.int64}
# DiT's center crop (data.images.center_crop), what image folders do; a source may name its own.
CENTER_CROP = "resize the short side to R (box halving, then bicubic), crop the center R x R"
# What the bytes depend on: a folder whose manifest differs in one of these is another preparation.
IDENTITY = ("resolution", "hflip", "dtype", "vae_config_sha256", "vae_weights_sha256", "source_key", "source_count",
            "crop", "shard_size", "batch_size")


def shard_path(folder: str | Path, index: int) -> Path:
    return Path(folder) / f"shard-{index:06d}.safetensors"


def record_path(folder: str | Path, index: int) -> Path:
    return Path(folder) / f"shard-{index:06d}.json"


def latents_folder(source: str) -> Path | None:
    """The folder of `data.source: latents:DIR`, or None for any other source."""
    return Path(source[len(PREFIX):]) if source.startswith(PREFIX) else None


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def read_safetensors_header(path: str | Path) -> tuple[dict[str, dict], int]:
    """({tensor name: {dtype, shape, data_offsets}}, where the data starts) of a safetensors file:
    its 8-byte header length and JSON header (the format's definition), read without the data."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100_000_000:
                raise ValueError("header length out of range")
            header = json.loads(f.read(length))
    except FileNotFoundError:
        raise DitkitError(f"shard {path} is missing: rerun the ditkit prepare command that made its folder to "
                          "make it again") from None
    except (struct.error, ValueError, UnicodeDecodeError) as error:
        raise DitkitError(f"shard {path} is damaged ({error}): rerun the ditkit prepare command that made its "
                          "folder to make it again") from None
    header.pop("__metadata__", None)
    return header, 8 + length


def vae_fingerprint(vae_path: str | Path, vae) -> tuple[str, str | None]:
    """(sha256 of the VAE's config, sha256 of its safetensors weights file's header, or None when its
    weights are in another format): the header names every tensor's shape, dtype and byte range."""
    # Without diffusers' bookkeeping (_name_or_path is where it was loaded from, _diffusers_version
    # the writer's): the same VAE moved or re-saved by another diffusers has the same fingerprint.
    config = json.dumps({k: v for k, v in dict(vae.config).items() if not k.startswith("_")}, sort_keys=True,
                        default=str)
    weights = sorted(Path(vae_path).glob("*.safetensors"))
    header = None
    if weights:
        with open(weights[0], "rb") as f:
            head = f.read(8)
            header = hashlib.sha256(head + f.read(struct.unpack("<Q", head)[0])).hexdigest()
    return hashlib.sha256(config.encode()).hexdigest(), header


def _scaling_factor(vae) -> float:
    return float(getattr(vae.config, "scaling_factor", 1.0) or 1.0)


def describe(source: Dataset, source_name: str, vae_path: str | Path, vae, resolution: int, hflip: bool,
             dtype: str, shard_size: int, batch_size: int) -> dict[str, Any]:
    """The settings of a preparation: everything its bytes depend on, and what training reads back."""
    key = getattr(source, "cache_key", None)
    if not isinstance(key, str):
        raise DitkitError(f"source {source_name} has no fingerprint (cache_key) to record in the manifest: prepare "
                          "an image folder, a built-in dataset or another source ditkit can fingerprint")
    config_sha, weights_sha = vae_fingerprint(vae_path, vae)
    scale = vae_scale(vae)
    size = resolution // scale
    return {"kind": KIND, "format": FORMAT, "source": source_name, "source_key": key, "source_count": len(source),
            "vae": str(Path(vae_path).resolve()), "vae_config_sha256": config_sha, "vae_weights_sha256": weights_sha,
            "resolution": resolution, "hflip": hflip, "crop": getattr(source, "crop_rule", CENTER_CROP),
            "dtype": dtype, "shard_size": shard_size, "batch_size": batch_size,
            "scaling_factor": _scaling_factor(vae), "vae_scale": scale,
            "channels": int(vae.config.latent_channels), "latent_size": [size, size],
            "image_channels": int(source.channels), "num_classes": int(source.num_classes),
            "class_names": list(source.class_names)}


def differences(there: dict, here: dict) -> list[str]:
    return [f"{key} {there.get(key)!r} there, {here.get(key)!r} here" for key in IDENTITY
            if there.get(key) != here.get(key)]


def refuse_other(folder: Path, there: dict, here: dict) -> None:
    if changed := differences(there, here):
        raise DitkitError(f"{folder} holds latents prepared otherwise ({'; '.join(changed[:3])}"
                          f"{'; ...' if len(changed) > 3 else ''}): use another --out or delete it")


def read_manifest(folder: str | Path) -> dict:
    """A finished folder's manifest, with one-line errors when it is missing or not ditkit's."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DitkitError(f"prepared latents {folder} do not exist: make them with ditkit prepare SOURCE --vae PATH "
                          f"--resolution R --out {folder}")
    if not (folder / MANIFEST).is_file():
        raise DitkitError(f"{folder} has no {MANIFEST} (its preparation has not finished): rerun the ditkit prepare "
                          "command that made it")
    manifest = read_json(folder / MANIFEST, "prepared latents manifest")
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND or not isinstance(manifest.get("shards"), list):
        raise DitkitError(f"{folder / MANIFEST} is not a ditkit prepared-latents manifest: give a folder that "
                          "ditkit prepare wrote")
    if manifest.get("format") != FORMAT:
        raise DitkitError(f"{folder / MANIFEST} has format {manifest.get('format')!r}, this ditkit reads {FORMAT}: "
                          "prepare the latents again with this ditkit")
    return manifest


class ShardPlan:
    """How `count` source items split into shards of `shard_size`, encoded in batches of `batch_size`."""

    def __init__(self, count: int, shard_size: int, batch_size: int):
        if shard_size < 1 or batch_size < 1:
            raise DitkitError(f"--shard-size and --batch-size must be at least 1, got {shard_size} and {batch_size}")
        if shard_size % batch_size:
            fit = batch_size * max(1, shard_size // batch_size)
            raise DitkitError(f"--shard-size {shard_size} is not a multiple of --batch-size {batch_size}: a shard "
                              f"holds whole batches (e.g. --shard-size {fit})")
        self.count, self.shard_size, self.batch_size = count, shard_size, batch_size

    @property
    def shards(self) -> int:
        return -(-self.count // self.shard_size)

    def bounds(self, index: int) -> range:
        return range(index * self.shard_size, min((index + 1) * self.shard_size, self.count))


def read_item(source: Dataset, index: int) -> tuple[Tensor, int]:
    """Item `index` exactly (`read`, which raises Unreadable) where the source has it, else its item."""
    return source.read(index) if hasattr(source, "read") else source[index]


def encode_shard(source: Dataset, vae, plan: ShardPlan, index: int, settings: dict,
                 bar=None) -> tuple[dict[str, Tensor], list[dict]]:
    """Shard `index`'s tensors and the files it skipped ({item, name, reason})."""
    images, labels, kept, skipped = [], [], [], []
    for item in plan.bounds(index):
        try:
            image, label = read_item(source, item)
        except Unreadable as error:
            warnings.warn(f"skipping unreadable image {error.name}: {error.reason}", stacklevel=2)
            skipped.append({"item": item, "name": error.name, "reason": error.reason})
            continue
        images.append(image)
        labels.append(int(label))
        kept.append(item)
    views = [False, True] if settings["hflip"] else [False]
    encoded = {flip: [] for flip in views}
    for start in range(0, len(images), plan.batch_size):
        batch = torch.stack(images[start:start + plan.batch_size])
        for flip in views:
            encoded[flip].append(encode(vae, batch.flip(-1) if flip else batch).cpu())
        if bar is not None:
            bar.update(len(batch))
    tensors = {}
    for flip in views:
        stacked = torch.cat(encoded[flip]) if images else torch.zeros((0, settings["channels"],
                                                                       *settings["latent_size"]))
        tensors["flipped" if flip else "latents"] = stacked.to(DTYPES[settings["dtype"]]).contiguous()
    tensors["labels"] = torch.tensor(labels, dtype=torch.int64)
    tensors["indices"] = torch.tensor(kept, dtype=torch.int64)
    return tensors, skipped


def write_shard(folder: Path, index: int, tensors: dict[str, Tensor], skipped: list[dict]) -> dict:
    """The shard, then its record (both atomically): a shard without a record is made again."""
    path = shard_path(folder, index)
    with atomic_path(path) as tmp:
        save_file(tensors, tmp)
    record = {"index": index, "file": path.name, "count": len(tensors["labels"]), "bytes": path.stat().st_size,
              "sha256": file_sha256(path), "skipped": skipped}
    atomic_write_text(record_path(folder, index), json.dumps(record) + "\n")
    return record


def check_shard(folder: Path, entry: dict, settings: dict, checksum: bool) -> str | None:
    """What is wrong with a shard against its record or manifest entry (None: nothing): its size,
    header (tensors, shapes, dtype) and, with `checksum`, its sha256."""
    path = folder / entry["file"]
    if not path.is_file():
        return "missing"
    if path.stat().st_size != entry["bytes"]:
        return f"{path.stat().st_size} bytes, {entry['bytes']} expected"
    try:
        header, _ = read_safetensors_header(path)
    except DitkitError:
        return "a damaged header"
    count, shape = entry["count"], [settings["channels"], *settings["latent_size"]]
    expected = {"latents": ("F16" if settings["dtype"] == "fp16" else "F32", [count, *shape]),
                "labels": ("I64", [count]), "indices": ("I64", [count])}
    if settings["hflip"]:
        expected["flipped"] = expected["latents"]
    found = {name: (info.get("dtype"), info.get("shape")) for name, info in header.items()}
    if found != expected:
        return "other tensors than the manifest's"
    if checksum and file_sha256(path) != entry["sha256"]:
        return "another sha256: the file changed after it was written"
    return None


def finished_shards(folder: Path, settings: dict, plan: ShardPlan) -> list[int]:
    """The shards of a folder in progress that are whole: a record and a file that matches it."""
    done = []
    for index in range(plan.shards):
        record_file = record_path(folder, index)
        if not record_file.is_file():
            continue
        try:
            record = json.loads(record_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # made again
        if check_shard(folder, record, settings, checksum=True) is None:
            done.append(index)
    return done


def verify_folder(folder: Path, manifest: dict) -> list[int]:
    """Every shard of a finished folder against the manifest, checksums included; returns the shards
    that are missing (deleted, to be made again). A shard that is there but differs is an error."""
    missing = []
    for index, entry in enumerate(manifest["shards"]):
        if (problem := check_shard(folder, entry, manifest, checksum=True)) == "missing":
            missing.append(index)
        elif problem is not None:
            raise DitkitError(f"shard {folder / entry['file']} of the prepared latents is not as its manifest says "
                              f"({problem}): delete that shard and rerun the same ditkit prepare command, which "
                              "makes it again")
    return missing


def reopen(folder: Path, manifest: dict, settings: dict, plan: ShardPlan, missing: list[int]) -> None:
    """A finished folder with `missing` shards back in progress: the progress file and the records of
    the shards that are there (from the manifest), then no manifest until the missing ones are made."""
    atomic_write_text(folder / PROGRESS, json.dumps(settings, indent=2) + "\n")
    for index, entry in enumerate(manifest["shards"]):
        if index not in missing:
            items = plan.bounds(index)
            skipped = [s for s in manifest["skipped"] if s["item"] in items]
            atomic_write_text(record_path(folder, index), json.dumps({"index": index, **entry, "skipped": skipped})
                              + "\n")
    (folder / MANIFEST).unlink()


def claim_folder(folder: Path, settings: dict, plan: ShardPlan, verify: bool) -> tuple[dict | None, list[int]]:
    """(the manifest of a finished folder, or None; the shards still to make). Refuses a folder of
    another preparation or of other files; starts a new one (progress.json)."""
    if folder.exists() and not folder.is_dir():
        raise DitkitError(f"--out {folder} is a file: give a folder")
    if (folder / MANIFEST).exists():
        manifest = read_manifest(folder)
        refuse_other(folder, manifest, settings)
        if not verify:
            return manifest, []
        if not (missing := verify_folder(folder, manifest)):
            return manifest, []
        reopen(folder, manifest, settings, plan, missing)
        return None, missing
    if (folder / PROGRESS).exists():
        refuse_other(folder, read_json(folder / PROGRESS, "prepare progress file"), settings)
    else:
        if others := foreign_files(folder):
            raise DitkitError(f"--out {folder} holds files that are not prepared latents ({others[0]}, ...): use "
                              "another --out or delete it")
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / PROGRESS, json.dumps(settings, indent=2) + "\n")
    remove_temporary_files(folder)  # of shards a kill interrupted
    done = set(finished_shards(folder, settings, plan))
    return None, [k for k in range(plan.shards) if k not in done]


def wait_until(condition: Callable[[], bool], poll_seconds: float) -> None:
    """Poll the folder, not a collective: processes may finish a shard's encoding time apart."""
    while not condition():
        time.sleep(poll_seconds)


def write_manifest(folder: Path, settings: dict, plan: ShardPlan) -> dict:
    """The manifest from the shard records (all present), then the records and progress file go."""
    records = [json.loads(record_path(folder, k).read_text()) for k in range(plan.shards)]
    count = sum(r["count"] for r in records)
    if count == 0:
        raise DitkitError(f"none of the {plan.count} items of {settings['source']} could be read: nothing to "
                          "prepare; check the source's files")
    manifest = {**settings, "count": count, "items": count * (2 if settings["hflip"] else 1),
                "skipped": [s for r in records for s in r["skipped"]],
                "shards": [{key: r[key] for key in ("file", "count", "bytes", "sha256")} for r in records]}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    for k in range(plan.shards):
        record_path(folder, k).unlink(missing_ok=True)
    (folder / PROGRESS).unlink(missing_ok=True)
    return manifest


def alone(action: Callable[[], Any]) -> Any:
    return action()


def prepare_latents(source: Dataset, vae_path: str | Path, out: str | Path, *, source_name: str, resolution: int,
                    hflip: bool = False, dtype: str = "fp32", shard_size: int = 1024, batch_size: int = 32,
                    device: str | torch.device = "cpu", rank: int = 0, world_size: int = 1,
                    agree: Callable[[Callable[[], Any]], Any] = alone, verify: bool = True, progress: bool = True,
                    poll_seconds: float = 1.0) -> dict:
    """Encode `source` (items: image tensor CHW in [-1, 1], int label) with the AutoencoderKL at
    `vae_path` into shards in `out` (see the module docstring); returns the manifest.

    Every process of `world_size` calls this with its `rank`; `agree(action)` runs `action` on rank 0
    and returns its result (or raises its DitkitError) on every process: the CLI passes a
    torch.distributed broadcast, one process needs none. Every refusal comes before any encoding.
    `verify`: check every sha256 of a finished folder (the latent cache checks sizes and headers)."""
    out = Path(out)
    if dtype not in DTYPES:
        raise DitkitError(f"--dtype {dtype!r} is not a storage type: use fp16 or fp32")
    if len(source) == 0:
        raise DitkitError(f"source {source_name} has no items: give a source with images")
    if getattr(source, "resolution", resolution) != resolution:
        raise DitkitError(f"source {source_name} makes {source.resolution} px images, not the resolution {resolution} "
                          "to record: build the source at that resolution")
    plan = ShardPlan(len(source), shard_size, batch_size)
    check_writable(out, "prepared latents")  # before the encoding, not after it
    vae = load_vae(vae_path, device)
    refuse_output_over_inputs(out, {"source": source_name, "VAE": vae_path}, "--out")
    if int(vae.config.in_channels) != int(source.channels):
        raise DitkitError(f"the VAE {vae_path} encodes {vae.config.in_channels}-channel images and {source_name} has "
                          f"{source.channels}-channel ones: use a VAE made for them")
    if resolution % vae_scale(vae):
        raise DitkitError(f"--resolution {resolution} is not a multiple of the VAE's downsampling "
                          f"{vae_scale(vae)}: use a multiple of it")
    settings = describe(source, source_name, vae_path, vae, resolution, hflip, dtype, shard_size, batch_size)
    with ExitStack() as held:

        def claim() -> tuple[dict | None, list[int]]:
            if not out.is_file():
                held.enter_context(FolderLock(out, "ditkit prepare"))  # two runs never prepare one folder
            return claim_folder(out, settings, plan, verify)

        manifest, missing = agree(claim)
        if manifest is not None:
            return manifest
        todo = missing[rank::world_size]
        total = sum(len(plan.bounds(k)) for k in todo)
        with tqdm(total=total, desc="encoding latents", unit="img", disable=not (progress and rank == 0)) as bar:
            for index in todo:
                tensors, skipped = encode_shard(source, vae, plan, index, settings, bar)
                write_shard(out, index, tensors, skipped)
        if rank == 0:
            wait_until(lambda: all(record_path(out, k).is_file() for k in range(plan.shards)), poll_seconds)
            return write_manifest(out, settings, plan)
    wait_until(lambda: (out / MANIFEST).is_file(), poll_seconds)
    return read_manifest(out)


CACHE_SHARD_SIZE = 1024  # the latent cache's shards: a multiple of its batch size


def cached_latents(dataset: Dataset, vae_path: str | Path, cache_dir: str | Path, hflip: bool, batch_size: int = 16,
                   device: str | torch.device = "cpu", progress: bool = True, rank: int = 0, world_size: int = 1,
                   agree: Callable[[Callable[[], Any]], Any] = alone) -> PreparedLatents:
    """The latents of a training run with data.vae: `prepare_latents` (fp32, batches of `batch_size`)
    into a folder of `cache_dir` keyed by the dataset, the VAE and hflip, made by every process of
    the run (each its shards, as `ditkit prepare` under torchrun), then read lazily. A finished cache
    is opened with the size and header checks only (start-up does not read the data); one that fails
    them is rebuilt, as it is only a cache."""
    vae_path = Path(vae_path).resolve()
    config = vae_path / "config.json"
    text = config.read_bytes() if config.is_file() else b""  # load_vae names what is missing
    key = hashlib.sha256(b"|".join([dataset.cache_key.encode(), str(vae_path).encode(), text, str(hflip).encode(),
                                    f"shards-{FORMAT}-{batch_size}".encode()]))
    folder = Path(cache_dir) / f"latents-{key.hexdigest()[:20]}"

    def drop_damaged() -> None:
        if (folder / MANIFEST).is_file():
            try:
                PreparedLatents(folder)
            except DitkitError as error:
                warnings.warn(f"rebuilding the latent cache {folder}: {error}", stacklevel=3)
                shutil.rmtree(folder)

    check_writable(cache_dir, "latent cache")  # before the encoding, not after it
    agree(drop_damaged)
    resolution = getattr(dataset, "resolution", None) or int(dataset[0][0].shape[-1])
    prepare_latents(dataset, vae_path, folder, source_name=dataset.cache_key, resolution=resolution, hflip=hflip,
                    dtype="fp32", shard_size=CACHE_SHARD_SIZE // batch_size * batch_size or batch_size,
                    batch_size=batch_size, device=device, rank=rank, world_size=world_size, agree=agree,
                    verify=False, progress=progress)
    return PreparedLatents(folder)


class PreparedLatents(Dataset):
    """The items of a prepared folder, read lazily: (latent (C, h, w) float32, label). With hflip,
    item 2j is source item j's latent and 2j+1 its mirror image's. Opening checks the manifest and
    every shard's size and header; the tensors are read item by item (see the module docstring)."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.manifest = manifest = read_manifest(self.folder)
        self.channels = manifest["channels"]
        self.num_classes = manifest["num_classes"]
        self.class_names = list(manifest["class_names"])
        self.resolution = manifest["resolution"]
        self.vae_scale = manifest["vae_scale"]
        self.hflip = manifest["hflip"]
        self.cache_key = f"latents-{hashlib.sha256(json.dumps(manifest['shards']).encode()).hexdigest()[:16]}"
        self.views = 2 if self.hflip else 1
        self.shape = (self.channels, *manifest["latent_size"])
        self.ends = np.cumsum([entry["count"] for entry in manifest["shards"]])
        self.layout = [self._open_check(entry) for entry in manifest["shards"]]
        self._files: dict[int, int] = {}

    def _open_check(self, entry: dict) -> dict[str, tuple[np.dtype, int]]:
        """{tensor: (numpy dtype, byte offset of its data)} of one shard, after its size and header check."""
        if (problem := check_shard(self.folder, entry, self.manifest, checksum=False)) is not None:
            raise DitkitError(f"shard {self.folder / entry['file']} of the prepared latents is not as its manifest "
                              f"says ({problem}): rerun "
                              "the ditkit prepare command that made the folder (it verifies and names what to do)")
        header, start = read_safetensors_header(self.folder / entry["file"])
        return {name: (NUMPY_DTYPES[info["dtype"]], start + info["data_offsets"][0]) for name, info in header.items()}

    def __len__(self) -> int:
        return int(self.ends[-1]) * self.views if len(self.ends) else 0

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_files": {}}  # open files stay in the process that opened them

    def __del__(self):
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)

    def _read(self, shard: int, name: str, local: int, shape: tuple[int, ...]) -> np.ndarray:
        if shard not in self._files:
            self._files[shard] = os.open(self.folder / self.manifest["shards"][shard]["file"], os.O_RDONLY)
        dtype, offset = self.layout[shard][name]
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        data = os.pread(self._files[shard], size, offset + local * size)
        return np.frombuffer(data, dtype=dtype).reshape(shape)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} of {len(self)}")
        item, view = divmod(int(index), self.views)
        shard = int(np.searchsorted(self.ends, item, side="right"))
        local = item - (int(self.ends[shard - 1]) if shard else 0)
        latent = self._read(shard, "flipped" if view else "latents", local, self.shape)
        label = self._read(shard, "labels", local, ())
        return torch.from_numpy(latent.astype(np.float32)), int(label)
