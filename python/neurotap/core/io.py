"""Atomic file output: a reader never sees half a file, and a failed write leaves the old one."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]


def _refuse_non_regular(path: Path, what: str) -> None:
    if path.is_dir():
        raise IsADirectoryError(f"{what} {path} is a directory: give a file name")
    if path.exists() and not path.is_file():
        # A device, a pipe or /dev/stdout: renaming over it would replace the node itself.
        raise ValueError(f"{what} {path} is not a regular file (a device, pipe or socket): give a file name")


def check_output(path: PathLike, what: str = "output") -> Path:
    """Checks, before any work starts, that `path` can be written atomically: a regular file or a
    new name, in a folder where a file can be created (made if missing). Raises IsADirectoryError,
    ValueError or PermissionError naming the path."""
    path = Path(path)
    _refuse_non_regular(path, what)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as e:
        raise PermissionError(f"{what} {path}: cannot write in {path.parent} ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)
    return path


@contextlib.contextmanager
def atomic_path(path: PathLike, what: str = "output") -> Iterator[Path]:
    """A temporary path in the destination's folder (same suffix, for writers that look at it),
    renamed over `path` when the block succeeds and removed when it fails."""
    path = Path(path)
    _refuse_non_regular(path, what)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_atomic(path: PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically, flushed to disk before the rename."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
