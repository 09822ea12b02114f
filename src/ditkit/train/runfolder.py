"""One run per run folder: `ditkit train`, `distill`, `study` and `quickstart` own their output folder
while they run.

- an output folder that is, contains or lies inside one of the run's inputs is refused
  (`files.refuse_output_over_inputs`) before anything is written there;
- a lock (`files.FolderLock`): a second process on the same folder stops at once, naming the
  first one's pid; the lock of a killed run is taken over;
- an ownership record (`.ditkit-run.json`: the command and the names of the outputs it writes) is
  written before the run writes anything. Only what it lists is ever removed (by --overwrite), and
  a folder recorded as another command's run is refused. A folder without a record holding files
  under those names is refused too: ditkit did not write them. Folders from before the record are
  recognised by the file each command always writes (`LEGACY_MARKERS`) and adopted;
- a folder that holds a previous run is not silently started over (its metrics truncated, its
  checkpoints mixed with new ones): continue it with --resume, or replace it with --overwrite;
- what killed writes left behind (temporary files and folders) is removed before the run writes.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..checkpoint import list_checkpoints, remove_orphans
from ..errors import DitkitError
from ..files import FolderLock, atomic_write_text, read_json, refuse_output_over_inputs, remove_temporary_files

# What a training run writes in its folder (the outputs --overwrite removes).
TRAIN_OUTPUTS = ("checkpoints", "metrics.jsonl", "loss.png", "samples", "tensorboard", "config.json")

RECORD_NAME = ".ditkit-run.json"

# Run folders written before the ownership record: the file that shows which command wrote one
# (checked in this order: a distillation has checkpoints too).
LEGACY_MARKERS = (("distill.json", "ditkit distill"), ("study.json", "ditkit study"),
                  ("quickstart.json", "ditkit quickstart"), ("metrics.jsonl", "ditkit train"))


@contextmanager
def own_run_folder(folder: str | Path, outputs: tuple[str, ...], *, resume, overwrite: bool,
                   command: str, inputs: dict[str, str | Path | None] | None = None,
                   checkpointed: bool = True) -> Iterator[None]:
    """Hold `folder` for the block: checked against `inputs` (role -> path), locked, claimed and
    cleaned (see the module docstring). `outputs` are the names (or glob patterns) of what the run
    writes there; a `checkpointed` run resumes from checkpoints/ (a study resumes from its records)."""
    folder = Path(folder)
    refuse_output_over_inputs(folder, inputs or {})
    if folder.exists() and not folder.is_dir():
        raise DitkitError(f"output folder {folder} is a file: give a folder")
    with FolderLock(folder, command):
        claim_outputs(folder, outputs, resume=resume, overwrite=overwrite, command=command, checkpointed=checkpointed)
        remove_temporary_files(folder)
        remove_orphans(folder / "checkpoints")
        yield


def folder_owner(folder: Path) -> tuple[str | None, tuple[str, ...]]:
    """(the command whose run `folder` holds, the output names recorded as its own): from the
    ownership record, else guessed for a folder from before the record; (None, ()) for no ditkit run."""
    record_path = folder / RECORD_NAME
    if record_path.is_file():
        record = read_json(record_path, "ditkit's ownership record")
        if not isinstance(record, dict) or not isinstance(record.get("command"), str):
            raise DitkitError(f"ditkit's ownership record {record_path} is damaged: restore it, or move the run's "
                              "files to a new folder")
        return record["command"], tuple(record.get("outputs", ()))
    for marker, command in LEGACY_MARKERS:
        if (folder / marker).exists():
            return command, ()
    if list_checkpoints(folder / "checkpoints"):  # a training run killed before its first metrics line
        return "ditkit train", ()
    return None, ()


def claim_outputs(folder: Path, outputs: tuple[str, ...], *, resume, overwrite: bool,
                  command: str = "ditkit train", checkpointed: bool = True) -> None:
    """Refuse a folder holding a previous run unless the run resumes it (--overwrite removes what
    ditkit recorded writing there), another command's run, or files ditkit did not write; then
    record the folder as this command's run."""
    if resume and overwrite:
        raise DitkitError("--resume and --overwrite contradict each other: give one of them")
    owner, recorded = folder_owner(folder)
    if owner is not None and owner != command:
        raise DitkitError(f"{folder} holds a `{owner}` run: give `{command}` another output folder")
    own = recorded or outputs  # a folder from before the record: what this command writes
    previous = sorted({path for pattern in outputs + own for path in folder.glob(pattern)})
    if previous and owner is None:
        names = ", ".join(path.name for path in previous)
        raise DitkitError(f"{folder} holds files that ditkit did not write ({names}): move them away, or use "
                          "another output folder")
    resumable = not checkpointed or bool(list_checkpoints(folder / "checkpoints"))
    if previous and resume is True and not resumable:
        raise DitkitError(f"{folder} holds a run that stopped before its first checkpoint, so there is nothing to "
                          "resume: start it again with --overwrite")
    if previous and not resume:
        if not overwrite:
            names = ", ".join(path.name for path in previous)
            then = "continue it with --resume" if resumable else "it stopped before its first checkpoint"
            raise DitkitError(f"{folder} holds a previous run ({names}): {then}, use another output folder, or "
                              "replace it with --overwrite")
        for path in sorted({path for pattern in own for path in folder.glob(pattern)}):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
    names = tuple(dict.fromkeys(own + outputs))
    if (owner, recorded) != (command, names):  # a resumed run whose record says it all rewrites nothing
        record = {"command": command, "outputs": list(names)}
        atomic_write_text(folder / RECORD_NAME, json.dumps(record, indent=2) + "\n")
