"""Files that survive crashes: atomic writes, and JSON-lines logs read back after a crash.

An atomic write goes to a hidden temporary file beside the target, which is flushed to disk and
then renamed over the target: a reader (or a resumed run) sees the old file or the new one, never
half of one. The rename is made durable by syncing the folder too, where the platform allows it.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DitkitError


def _fsync_file(path: Path) -> None:
    """Push a file that its writer has closed to disk (torch.save, save_file, ... do not sync)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable; platforms that cannot open folders (Windows) skip this."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse to sync a folder; the rename itself is still atomic
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write `path`'s new content to, with any writer (torch.save, save_file,
    Image.save, ...); when the block ends normally it replaces `path`. When the block raises,
    `path` keeps its old content and the temporary file is removed."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; only a failed write leaves it
    _fsync_folder(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def read_jsonl(path: str | Path) -> list[dict]:
    """The records of a JSON-lines file (none when it does not exist yet; blank lines skipped).

    A crash while a record was being appended leaves a torn last line: it is dropped with a
    warning. A bad line before the last is damage the reader cannot guess around: an error."""
    path = Path(path)
    if not path.is_file():
        return []
    numbered = [(number, line) for number, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    records = []
    for position, (number, line) in enumerate(numbered, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            if position < len(numbered):
                raise DitkitError(f"{path} line {number} is not JSON ({error.msg}): repair or delete that "
                                  "line") from error
            warnings.warn(f"{path}: dropped its torn last line {number} (a write was interrupted)", stacklevel=2)
    return records
