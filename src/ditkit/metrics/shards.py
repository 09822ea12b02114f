"""Sharded, resumable sampling for evaluation at scale (FID-50K): the samples of a checkpoint
written to a samples folder as `.npz` shards, by one process or by every process torchrun started.

A samples folder holds

    manifest.json        what the samples are: the checkpoint file, its fingerprint (sha256 of the
                         weights) and every setting the images depend on (see `settings`)
    shard-000000.npz     `arr_0`: uint8 images (n, H, W, C), the layout of ADM's evaluator and DiT's
    shard-000001.npz     sample_ddp.py; `arr_1`: their class labels (int64), for class-conditional
    ...                  models, as guided-diffusion's sampling script writes them

The same seed gives the same images whatever the number of processes. DiT's sample_ddp.py seeds each
process (seed * P + rank) and rounds the sample count up to a multiple of the global batch, so its
images change with P. Here sample i belongs to the batch that starts at a multiple of the batch size
B, seeded `seed + start` (as `quality.sample_checkpoint` seeds its batches); batches are grouped in
shards of S samples (S a multiple of B: the one divisibility rule), and the shards still missing are
dealt out in turn: process r of P makes the r-th, (r + P)-th, ... of them. Which process makes a shard
never changes its images. Any --num works: the last shard (and its last batch) is shorter, nothing is
sampled twice. The images still depend on B (a batch draws its noise together), so B is one of the
settings. A multi-node run needs --sample-dir on storage that every node sees.

Each shard is written atomically once it is complete, so a killed run leaves whole shards only; a
rerun with the same settings makes only the missing ones, and a folder made with other settings is
refused before anything is sampled. The statistics are computed afterwards by reading the shards
in order (`streaming.py`), one shard in memory at a time.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from ..checkpoint import find_checkpoint, load_checkpoint, weights_file
from ..data.images import to_uint8
from ..data.latents import load_vae
from ..diffusion.pipeline import check_labels
from ..distributed.launch import Processes, default_device
from ..errors import DitkitError
from ..files import (
    FolderLock,
    atomic_path,
    atomic_write_text,
    foreign_files,
    read_json,
    remove_temporary_files,
)
from ..record import RunRecord, Sampling
from .quality import sample_batch
from .streaming import release_free_memory

MANIFEST = "manifest.json"
KIND = "ditkit eval samples"
FORMAT = 1
SHARD_TARGET = 1000  # default shard size: the largest multiple of the batch size up to this


def shard_path(folder: str | Path, index: int) -> Path:
    return Path(folder) / f"shard-{index:06d}.npz"


@dataclass(frozen=True)
class ShardPlan:
    """How `num` samples split into shards of `shard_size` and batches of `batch_size`."""

    num: int
    batch_size: int
    shard_size: int

    def __post_init__(self):
        if self.batch_size < 1 or self.shard_size < 1:
            raise DitkitError(f"batch size and shard size must be at least 1, got --batch-size {self.batch_size} "
                              f"and --shard-size {self.shard_size}")
        if self.shard_size % self.batch_size:
            raise DitkitError(f"--shard-size {self.shard_size} is not a multiple of --batch-size {self.batch_size}: "
                              "a shard holds whole batches (e.g. --shard-size "
                              f"{self.batch_size * max(1, self.shard_size // self.batch_size)})")

    @classmethod
    def default(cls, num: int, batch_size: int, shard_size: int | None = None) -> ShardPlan:
        """`shard_size` None: the largest multiple of the batch size up to SHARD_TARGET samples."""
        if shard_size is None and batch_size >= 1:
            shard_size = batch_size * max(1, SHARD_TARGET // batch_size)
        return cls(num, batch_size, batch_size if shard_size is None else shard_size)

    @property
    def count(self) -> int:
        return -(-self.num // self.shard_size)

    def bounds(self, index: int) -> tuple[int, int]:
        """The global indices [start, stop) of shard `index`."""
        start = index * self.shard_size
        return start, min(start + self.shard_size, self.num)

    def batches(self, index: int) -> list[tuple[int, int]]:
        """The batches [start, stop) of shard `index`: each starts at a multiple of the batch size."""
        start, stop = self.bounds(index)
        return [(first, min(first + self.batch_size, stop)) for first in range(start, stop, self.batch_size)]

    def missing(self, folder: str | Path) -> list[int]:
        """The shards not written yet."""
        return [k for k in range(self.count) if not shard_path(folder, k).is_file()]


def share(shards: list[int], rank: int, world_size: int) -> list[int]:
    """The shards process `rank` of `world_size` makes: every world_size-th one of those still
    missing (a resumed run splits what is left evenly; which process makes a shard never changes it)."""
    return shards[rank::world_size]


def file_fingerprint(path: str | Path) -> str:
    """sha256 of a file's bytes, read in blocks (checkpoints are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def checkpoint_file(ckpt: str | Path, ema: bool) -> Path:
    """The weights file `load_checkpoint(ckpt, ema=ema)` reads."""
    found = find_checkpoint(ckpt)
    return weights_file(found, ema) if found.is_dir() else found


def labels_text(labels: Tensor | None) -> str | None:
    """How the manifest names the labels: None (unconditional), or their sha256 (the default
    cycled labels included, since they depend on the model's class count)."""
    if labels is None:
        return None
    return "sha256:" + hashlib.sha256(labels.to(torch.int64).numpy().tobytes()).hexdigest()


def settings(fingerprint: str, sampling: Sampling, labels: Tensor | None, plan: ShardPlan, *, ema: bool,
             mixer: str | None, mixer_options: dict | None) -> dict:
    """Everything the images depend on; `sampling` must be complete (`record.sampling(...)`)."""
    return {"fingerprint": fingerprint, "ema": ema, "mixer": mixer, "mixer_options": mixer_options or None,
            "num": sampling.num, "height": sampling.height, "width": sampling.width, "steps": sampling.steps,
            "cfg_scale": sampling.cfg_scale, "sampler": sampling.sampler,
            "timestep_spacing": sampling.timestep_spacing, "seed": sampling.seed, "labels": labels_text(labels),
            "attention_scale": sampling.attention_scale, "positions": sampling.positions,
            "batch_size": plan.batch_size, "shard_size": plan.shard_size}


def read_manifest(folder: str | Path) -> dict:
    """A samples folder's manifest, with one-line errors when it is missing or not ditkit's."""
    path = Path(folder) / MANIFEST
    manifest = read_json(path, "samples manifest")
    if not isinstance(manifest, dict) or manifest.get("kind") != KIND or not isinstance(manifest.get("settings"),
                                                                                       dict):
        raise DitkitError(f"{path} is not a ditkit samples manifest: give --sample-dir a new folder, or one that "
                          "ditkit eval wrote")
    if manifest.get("format") != FORMAT:
        raise DitkitError(f"{path} has samples format {manifest.get('format')!r}, this ditkit reads {FORMAT}: "
                          "give --sample-dir a new folder")
    return manifest


def plan_of(manifest: dict) -> ShardPlan:
    found = manifest["settings"]
    return ShardPlan(found["num"], found["batch_size"], found["shard_size"])


def differences(there: dict, here: dict) -> list[str]:
    return [f"{key} {there.get(key)!r} there, {here.get(key)!r} here"
            for key in sorted(set(there) | set(here)) if there.get(key) != here.get(key)]


def prepare_folder(folder: Path, manifest: dict) -> None:
    """Make `folder` a samples folder for `manifest`, or check that it already is one (then its
    finished shards are reused); refuse a folder of other files and one of other settings."""
    if (folder / MANIFEST).exists():
        there = read_manifest(folder)["settings"]
        if changed := differences(there, manifest["settings"]):
            raise DitkitError(f"--sample-dir {folder} holds samples made with other settings ({'; '.join(changed[:3])}"
                              f"{'; ...' if len(changed) > 3 else ''}): give a new folder, or the settings it records")
        return
    if others := foreign_files(folder):
        raise DitkitError(f"--sample-dir {folder} holds files that are not ditkit samples ({others[0]}, ...): give a "
                          "new folder")
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def write_shard(path: Path, images: np.ndarray, labels: np.ndarray | None) -> None:
    """One shard, atomically: a reader (or a resumed run) finds it whole or not at all."""
    arrays = {"arr_0": images} if labels is None else {"arr_0": images, "arr_1": labels}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: np.savez adds no ".npz" to it
        np.savez(f, **arrays)


def read_shard(folder: str | Path, index: int, plan: ShardPlan, shape: tuple[int, int]) -> tuple[np.ndarray,
                                                                                                np.ndarray | None]:
    """Shard `index`'s (images (n, H, W, C) uint8, labels or None), checked against the plan."""
    path = shard_path(folder, index)
    start, stop = plan.bounds(index)
    try:
        with np.load(path) as data:
            images = data["arr_0"]
            labels = data["arr_1"] if "arr_1" in data.files else None
    except FileNotFoundError:
        raise DitkitError(f"shard {path} is missing: run the same ditkit eval again to make it") from None
    except Exception as error:  # a zip numpy cannot read: BadZipFile, ValueError, EOFError, a missing arr_0
        raise DitkitError(f"shard {path} is damaged ({type(error).__name__}): delete it and run again to "
                          "resample it") from None
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[:3] != (stop - start, *shape):
        raise DitkitError(f"shard {path} holds {images.dtype} images of shape {images.shape}, not the "
                          f"{stop - start} uint8 {shape[0]}x{shape[1]} images of the manifest: delete it and run again")
    return images, labels


def shard_batches(folder: str | Path, batch_size: int) -> Iterator[Tensor]:
    """The samples of a samples folder as uint8 (B, C, H, W) batches, in their global order, one
    shard in memory at a time: what a streaming statistic reads."""
    manifest = read_manifest(folder)
    plan, found = plan_of(manifest), manifest["settings"]
    for index in range(plan.count):
        images, _ = read_shard(folder, index, plan, (found["height"], found["width"]))
        yield from torch.from_numpy(images).permute(0, 3, 1, 2).split(batch_size)
        del images



@dataclass
class SampleFolder:
    """What `sample_shards` made: the folder, its manifest, the run record of the checkpoint, the
    shards this process made (the others were there already or made by other processes) and the
    seconds it spent sampling."""

    folder: Path
    manifest: dict
    record: RunRecord
    made: list[int]
    seconds: float

    @property
    def plan(self) -> ShardPlan:
        return plan_of(self.manifest)


def make_shards(model, record: RunRecord, sampling: Sampling, labels: Tensor | None, plan: ShardPlan,
                indices: list[int], folder: Path, vae=None, progress: bool = True) -> None:
    """Sample and write shards `indices` of `plan`, batch by batch (`quality.sample_batch`)."""
    from tqdm.auto import tqdm

    with tqdm(total=sum(plan.bounds(k)[1] - plan.bounds(k)[0] for k in indices), desc="sampling", unit="img",
              disable=not progress) as bar:
        for index in indices:
            images = [to_uint8(sample_batch(model, record, sampling, labels, start, stop, vae).cpu())
                      for start, stop in plan.batches(index)]
            start, stop = plan.bounds(index)
            write_shard(shard_path(folder, index), np.concatenate(images),
                        None if labels is None else labels[start:stop].to(torch.int64).numpy())
            del images
            release_free_memory()  # the shard's temporaries: see release_free_memory
            bar.update(stop - start)


def agreed(processes: Processes, action: Callable[[], Any]) -> Any:
    """Run `action` on the main process and return its result on every process; a DitkitError it
    raises is raised on every process (all of them stop with the same line, none waits for the
    others forever)."""
    message = result = None
    if processes.is_main:
        try:
            result = action()
        except DitkitError as error:
            message = str(error)
    if processes.world_size > 1:
        shared = [message, result]
        dist.broadcast_object_list(shared, src=0)
        message, result = shared
    if message is not None:
        raise DitkitError(message)
    return result


def wait_for_shards(folder: Path, plan: ShardPlan, poll_seconds: float = 2.0) -> None:
    """Until the other processes have written every shard. Polling the folder, not a collective:
    the processes may finish far apart (up to one shard's sampling time), longer than a collective
    waits before it times out. Should a process fail, torchrun stops the others."""
    while plan.missing(folder):
        time.sleep(poll_seconds)


def sample_shards(ckpt: str | Path, sampling: Sampling, folder: str | Path, *, batch_size: int = 64,
                  shard_size: int | None = None, ema: bool = True, mixer: str | None = None,
                  mixer_options: dict | None = None, processes: Processes | None = None,
                  progress: bool = True) -> SampleFolder:
    """Make the missing shards of `folder` for `sampling` of `ckpt` (unset settings from its record).

    `processes`: this process's place in the process group (`distributed.launch.process_group`);
    None: this process alone, on cpu or the default device. Every process calls this; each makes
    its own shards (see the module docstring), and all return once every shard is written. The
    main process holds the folder's lock meanwhile. Refusals (shard size, a folder of other
    settings or in use) come before any sampling, on every process."""
    processes = processes or Processes(default_device(None))
    folder = Path(folder)
    plan = ShardPlan.default(sampling.num, batch_size, shard_size)
    model, record = load_checkpoint(ckpt, ema=ema, mixer=mixer, mixer_options=mixer_options, device=processes.device)
    sampling = record.sampling(sampling)
    labels = check_labels(model, sampling.labels, sampling.num)
    with ExitStack() as held:

        def claim() -> tuple[dict, list[int]]:
            file = checkpoint_file(ckpt, ema)
            manifest = {"kind": KIND, "format": FORMAT, "checkpoint": str(file.resolve()),
                        "settings": settings(file_fingerprint(file), sampling, labels, plan, ema=ema, mixer=mixer,
                                             mixer_options=mixer_options)}
            if folder.exists() and not folder.is_dir():
                raise DitkitError(f"--sample-dir {folder} is a file: give a folder")
            held.enter_context(FolderLock(folder, "ditkit eval"))  # first: two runs never prepare one folder
            prepare_folder(folder, manifest)
            remove_temporary_files(folder)  # of shards a kill interrupted
            return manifest, plan.missing(folder)

        manifest, missing = agreed(processes, claim)
        todo = share(missing, processes.rank, processes.world_size)
        vae = load_vae(record.vae, processes.device) if record.vae else None
        began = time.perf_counter()
        make_shards(model, record, sampling, labels, plan, todo, folder, vae, progress and processes.is_main)
        seconds = time.perf_counter() - began
        if processes.world_size > 1:
            wait_for_shards(folder, plan)
            dist.barrier()  # every process has seen every shard: the main process may release the lock
    return SampleFolder(folder, manifest, record, todo, seconds)
