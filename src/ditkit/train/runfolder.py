"""One run per run folder: `ditkit train` and `ditkit distill` own their output folder while they run.

- a lock (`files.FolderLock`): a second process on the same folder stops at once, naming the
  first one's pid; the lock of a killed run is taken over;
- a folder that holds a previous run is not silently started over (its metrics truncated, its
  checkpoints mixed with new ones): continue it with --resume, or replace it with --overwrite;
- what killed writes left behind (temporary files and folders) is removed before the run writes.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..checkpoint import remove_orphans
from ..errors import DitkitError
from ..files import FolderLock, remove_temporary_files

# What a training run writes in its folder (the outputs --overwrite removes).
TRAIN_OUTPUTS = ("checkpoints", "metrics.jsonl", "loss.png", "samples", "tensorboard", "config.json")


@contextmanager
def own_run_folder(folder: str | Path, outputs: tuple[str, ...], *, resume, overwrite: bool,
                   command: str) -> Iterator[None]:
    """Hold `folder` for the block: locked, checked and cleaned (see the module docstring).
    `outputs` are the names (or glob patterns) of what the run writes there."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DitkitError(f"output folder {folder} is a file: give a folder")
    with FolderLock(folder, command):
        claim_outputs(folder, outputs, resume=resume, overwrite=overwrite)
        remove_temporary_files(folder)
        remove_orphans(folder / "checkpoints")
        yield


def claim_outputs(folder: Path, outputs: tuple[str, ...], *, resume, overwrite: bool) -> None:
    """Refuse a folder holding a previous run unless the run resumes it; --overwrite removes it."""
    if resume and overwrite:
        raise DitkitError("--resume and --overwrite contradict each other: give one of them")
    previous = sorted({path for pattern in outputs for path in folder.glob(pattern)})
    if not previous or resume:
        return
    if not overwrite:
        names = ", ".join(path.name for path in previous)
        raise DitkitError(f"{folder} holds a previous run ({names}): continue it with --resume, use another output "
                          "folder, or replace it with --overwrite")
    for path in previous:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
