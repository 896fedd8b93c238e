"""Every file the package writes for others to read (artifacts, checkpoints, reports,
manifests) is written through `atomic_write`: a process killed at any moment leaves the
old file or the new one, never a torn one. The new file is written inside a private
folder named with its writer's pid (libraries make temp files of their own next to the
file they write: safetensors' `.tmpXXXXXX`), so the next write into that folder removes
whatever killed writers left (SIGKILL leaves no chance to clean up)."""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
from typing import Callable

from mergekit_dam.core.errors import DamError


class WriteError(DamError):
    """A file could not be written (full disk, no permission, read-only filesystem): the
    message names the file, the reason and the fix, on one line."""


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """write(temp_path) to a temp file in `path`'s directory, fsync, then rename it to
    `path`. The file gets the permissions a plain open() would give (the umask's), not
    the temp file's private 0600. If the disk fills or the directory is not writable,
    nothing is left behind and a WriteError says so."""
    directory = os.path.dirname(os.path.abspath(path))
    staging = None
    try:
        os.makedirs(directory, exist_ok=True)
        remove_orphans(directory)
        staging = tempfile.mkdtemp(prefix=f".dam-{os.getpid()}-", suffix=".tmp", dir=directory)
        temp_path = os.path.join(staging, os.path.basename(path))
        write(temp_path)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_path, 0o666 & ~umask)
        with open(temp_path, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp_path, path)
    except BaseException as error:
        reason = _write_failure(error)
        if reason:
            raise WriteError(f"dam: cannot write {path}: {reason}; free space there or choose a writable location") from None
        raise
    finally:
        if staging:
            shutil.rmtree(staging, ignore_errors=True)


ORPHAN = re.compile(r"^\.dam-(?:partial-)?(\d+)-")  # temp files here, staging folders (plugin/preflight.py)


def remove_orphans(directory: str) -> None:
    """Remove the temp files and staging folders in `directory` whose writing process is
    gone. Best effort: another process may be removing the same ones."""
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        match = ORPHAN.match(name)
        if match and not _alive(int(match.group(1))):
            path = os.path.join(directory, name)
            try:
                shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)
            except OSError:
                pass


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _write_failure(error: BaseException):
    """The reason a write failed for lack of space or permission, else None. safetensors
    reports a full disk as its own error type, with the OS message inside."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS):
        return error.strerror or os.strerror(error.errno)
    text = str(error)
    for marker in ("No space left on device", "Disk quota exceeded", "Permission denied", "Read-only file system"):
        if marker in text:
            return marker
    return None


def atomic_write_text(path: str, text: str) -> None:
    def write(temp_path: str) -> None:
        with open(temp_path, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)
