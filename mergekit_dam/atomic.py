"""Every file the package writes for others to read (artifacts, checkpoints, reports,
manifests) is written through `atomic_write`: a process killed at any moment leaves the
old file or the new one, never a torn one."""

from __future__ import annotations

import os
import tempfile
from typing import Callable


def atomic_write(path: str, write: Callable[[str], None]) -> None:
    """write(temp_path) to a temp file in `path`'s directory, fsync, then rename it to
    `path`. The file gets the permissions a plain open() would give (the umask's), not
    the temp file's private 0600."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temp_path = tempfile.mkstemp(prefix=".dam-", suffix=".tmp", dir=directory)
    os.close(handle)
    try:
        write(temp_path)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temp_path, 0o666 & ~umask)
        with open(temp_path, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.unlink(temp_path)
        raise


def atomic_write_text(path: str, text: str) -> None:
    def write(temp_path: str) -> None:
        with open(temp_path, "w", encoding="utf-8") as handle:
            handle.write(text)

    atomic_write(path, write)
