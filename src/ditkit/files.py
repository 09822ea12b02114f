"""Files that survive crashes: atomic writes, JSON-lines logs read back after a crash, the lock
that gives a run folder to one process at a time, and the rule that keeps outputs off inputs.

An atomic write goes to a hidden temporary file beside the target, which is flushed to disk and
then renamed over the target: a reader (or a resumed run) sees the old file or the new one, never
half of one. The rename is made durable by syncing the folder too, where the platform allows it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import DitkitError

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None


def fsync_file(path: Path) -> None:
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
        with writing(path):
            yield tmp
            fsync_file(tmp)
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # gone after the rename; only a failed write leaves it
    _fsync_folder(path.parent)


TEMPORARY = re.compile(r"^\..+\.tmp\d+$")  # atomic_path's temporary files: .NAME.tmpPID


@contextmanager
def staged_folder(folder: str | Path) -> Iterator[Path]:
    """A hidden folder beside `folder` to write a whole folder's content in; when the block ends
    normally it is renamed to `folder` (absent or empty), else removed: readers see the complete
    folder or none, and a full disk leaves nothing behind. Storage faults are one line naming `folder`."""
    folder = Path(folder)
    stage = folder.with_name(f".{folder.name}.tmp{os.getpid()}")
    try:
        with writing(folder):
            stage.mkdir(parents=True)
            yield stage
            os.replace(stage, folder)
    finally:
        shutil.rmtree(stage, ignore_errors=True)  # gone after the rename; only a failed write leaves it
    _fsync_folder(folder.parent)


def remove_temporary_files(folder: str | Path) -> None:
    """The temporary files of atomic writes that a kill interrupted, in `folder` (not below it).
    Only the process that owns the folder (see FolderLock) may call this."""
    for path in Path(folder).iterdir():
        if TEMPORARY.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)


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


def read_json(path: str | Path, what: str = "file") -> object:
    """A JSON file's content, with a one-line error when it is missing or damaged."""
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise DitkitError(f"{what} {path} is missing") from error
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DitkitError(f"{what} {path} is not valid JSON (truncated or damaged?): repair or delete it") from error


# A write that fails with less free space than this left is taken for a full disk, whatever the
# writer called its error (torch.save and safetensors report a failed write without an errno).
NEARLY_FULL_BYTES = 1 << 20

# What a failed write means, by errno, and what the user can do about it.
STORAGE_ERRNOS = {
    errno.ENOSPC: ("the disk is full", "free space or write elsewhere"),
    errno.EDQUOT: ("the disk quota is used up", "free space or write elsewhere"),
    errno.EROFS: ("the location is read-only", "write to a writable folder"),
    errno.EACCES: ("permission denied", "write to a folder you may write in"),
    errno.EPERM: ("permission denied", "write to a folder you may write in"),
    errno.EFBIG: ("the file is larger than the file system (or a size limit) allows", "write elsewhere"),
}
# Writers that report a failed write without an errno (safetensors' Rust code, torch.save's zip
# writer) still name the cause in their message.
STORAGE_MESSAGES = {
    "No space left on device": errno.ENOSPC, "os error 28": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
    "Read-only file system": errno.EROFS, "os error 30": errno.EROFS, "Permission denied": errno.EACCES,
    "File too large": errno.EFBIG, "os error 27": errno.EFBIG,
}


def storage_errno(error: BaseException, folder: str | Path | None = None) -> int | None:
    """The errno of the storage fault behind `error` (raised while writing in `folder`), looking
    through its causes and messages; None when `error` is not a storage fault."""
    causes, cause = [], error
    while cause is not None and len(causes) < 8:
        causes.append(cause)
        cause = cause.__cause__ or cause.__context__
    for cause in causes:
        if isinstance(cause, OSError) and cause.errno in STORAGE_ERRNOS:
            return cause.errno
        for text, number in STORAGE_MESSAGES.items():
            if text in str(cause):
                return number
    if folder is not None and isinstance(error, OSError | RuntimeError):  # torch's zip writer: "enforce fail"
        try:
            if shutil.disk_usage(folder).free < NEARLY_FULL_BYTES:
                return errno.ENOSPC
        except OSError:
            pass
    return None


def is_disk_full(error: BaseException, folder: str | Path | None = None) -> bool:
    """Whether `error`, raised while writing in `folder`, means the disk (or quota) is full."""
    return storage_errno(error, folder) in (errno.ENOSPC, errno.EDQUOT)


def storage_reason(error: BaseException, folder: str | Path | None = None) -> str | None:
    """What a storage fault behind `error` means and what to do ("the disk is full; free space or
    write elsewhere"), or None when `error` is not one."""
    number = storage_errno(error, folder)
    return None if number is None else "; ".join(STORAGE_ERRNOS[number])


def storage_failure(error: BaseException, path: str | Path, folder: str | Path | None = None,
                    after: str = "") -> DitkitError | None:
    """A one-line error for a storage fault behind `error` while writing `path` (None when it is
    some other error): what went wrong, where, what to do, and `after` (what then, e.g. how to
    resume)."""
    reason = storage_reason(error, folder if folder is not None else Path(path).parent)
    if reason is None:
        return None
    return DitkitError(f"could not write {_named_file(error) or path}: {reason}" + (f"; {after}" if after else ""))


def _is_temporary(path: str) -> bool:
    """An atomic write's temporary file (.NAME.tmpPID) or a file in a checkpoint's staging folder."""
    return any(part.startswith(".") and ".tmp" in part for part in Path(path).parts)


def _named_file(error: BaseException) -> str | None:
    """The file an OSError in `error`'s chain names (an open or a rename says which; a failed
    write() does not), so that a message names the file rather than its folder; a temporary file
    of an atomic write is not named (its caller names the file it stands for)."""
    while error is not None:
        if isinstance(error, OSError) and error.filename and not _is_temporary(str(error.filename)):
            return str(error.filename)
        error = error.__cause__ or error.__context__
    return None


@contextmanager
def writing(path: str | Path, folder: str | Path | None = None, after: str = "") -> Iterator[None]:
    """Run a write of `path`; a storage fault (full disk, read-only location, no permission, any
    writer's way of saying so) becomes a one-line DitkitError naming `path` (see storage_failure)."""
    try:
        yield
    except DitkitError:
        raise
    except Exception as error:
        failure = storage_failure(error, path, folder, after)
        if failure is None:
            raise
        raise failure from error


def storage_fault_message(error: BaseException) -> str | None:
    """A one-line message for a storage fault that reached the top of a command outside any
    `writing` block (None when `error` is something else): the file it names, what went wrong."""
    reason = storage_reason(error)
    file = _named_file(error)
    if reason is None or file is None:
        return reason
    # permission faults happen on reads too; the others only when writing
    return f"{file}: {reason}" if storage_errno(error) in (errno.EACCES, errno.EPERM) else \
        f"could not write {file}: {reason}"


def check_writable(folder: str | Path, what: str = "output") -> Path:
    """Fail before the work, not after it: `folder` must exist or be creatable, and a file must be
    writable in it. Tried with a real write (a permission check would pass for root on a read-only
    file system); a folder that does not exist yet is tried in its nearest existing parent."""
    folder = Path(folder)
    existing = next(path for path in (folder, *folder.absolute().parents) if path.exists())
    if not existing.is_dir():
        raise DitkitError(f"cannot write the {what} in {folder}: {existing} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=existing, prefix=".ditkit-probe-") as probe:
            probe.write(b"ditkit")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        raise DitkitError(f"cannot write the {what} in {folder}: {storage_reason(error, existing) or error}") from error
    return folder


def refuse_output_over_inputs(output: str | Path, inputs: dict[str, str | Path | None],
                              what: str = "output folder") -> None:
    """The input-ownership rule: an output that is, contains or lies inside one of `inputs` (role ->
    path; missing paths and None are skipped) is refused before anything is written, since its writes,
    its --overwrite or its cleaning would replace the input's files."""
    out = Path(output).resolve()
    for role, given in inputs.items():
        if given is None or not Path(given).exists():
            continue
        source = Path(given).resolve()
        relation = ("is" if out == source else "contains" if out in source.parents
                    else "lies inside" if source in out.parents else None)
        if relation is not None:
            raise DitkitError(f"{what} {output} {relation} the {role} {given}: give an output folder outside "
                              f"the {role} (and not holding it)")


def refuse_non_empty_folder(folder: str | Path, what: str) -> None:
    """An output folder that must be new: a file there, or a folder with anything in it, is refused
    (writing into it would mix `what` with files it does not own, or silently replace an earlier one)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise DitkitError(f"{folder} is a file: give a new folder to write {what} to")
    if folder.is_dir() and any(folder.iterdir()):
        raise DitkitError(f"{folder} exists and is not empty: choose a new folder to write {what} to")


LOCK_NAME = ".ditkit.lock"


def foreign_files(folder: Path) -> list[str]:
    """The names in `folder` other than ditkit's own bookkeeping (its lock file, atomic writes'
    temporaries): what a command must not claim a folder over. A missing folder has none."""
    if not folder.is_dir():
        return []
    return [p.name for p in folder.iterdir() if p.name != LOCK_NAME and not TEMPORARY.match(p.name)]


class FolderLock:
    """An exclusive claim on a run folder, for as long as the `with` block runs.

    The lock file `.ditkit.lock` holds the holder's pid and host (for the message a second process
    gets) and an exclusive `flock`, which the kernel drops when the holder exits, even by SIGKILL:
    a lock file without a live flock is stale, and is taken over with a warning. On platforms
    without `fcntl` (Windows) the folder is not locked.
    """

    def __init__(self, folder: str | Path, command: str = "ditkit"):
        self.folder, self.command = Path(folder), command
        self.path = self.folder / LOCK_NAME
        self.fd: int | None = None

    def __enter__(self) -> FolderLock:
        if fcntl is None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir():
            raise DitkitError(f"{self.path} is a folder, where ditkit keeps its lock file: remove it, or use another "
                              "output folder")
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _lock_holder(fd)
                os.close(fd)
                raise DitkitError(f"{self.folder} is in use by {holder}: wait until it ends, or use another "
                                  "output folder") from None
            if _same_file(fd, self.path):
                self.fd = fd
            else:  # its holder removed the file between our open and our flock: take the new one
                os.close(fd)
        self._claim()
        return self

    def _claim(self) -> None:
        """Write our pid and host; a previous holder's, still there, was killed before it released."""
        previous = _lock_holder(self.fd)
        if previous != "another process":
            warnings.warn(f"{self.folder}: took over the lock left by {previous}, which is no longer running",
                          stacklevel=3)
        with writing(self.path):
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                           "command": self.command}).encode(), 0)

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before the unlock: a waiter then finds no stale file
            os.close(self.fd)
            self.fd = None


def _lock_holder(fd: int) -> str:
    """'process 123 on host (ditkit train)' from a lock file's content, as far as it can be read."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"process {holder['pid']} on {holder['host']} ({holder['command']})"
    except (ValueError, KeyError, TypeError, OSError):
        return "another process"


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False
