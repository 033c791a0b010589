"""Atomic file writes: readers see the old file or the new one, never a torn one."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write to a temp file in the same directory, fsync it, rename over `path`, fsync the dir."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode('utf-8'))


def fsync_path(path: str | os.PathLike) -> None:
    """fsync a file or a directory (a directory's fsync makes renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_publish_dir(staging: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Make a fully written directory visible under `final` in one rename (its files fsynced first).

    Readers see either no `final` or all of it. Never replaces an existing `final`
    (FileExistsError), also when a concurrent writer wins the race.
    """
    staging, final = Path(staging), Path(final)
    for file in staging.rglob('*'):
        if file.is_file():
            fsync_path(file)
    fsync_path(staging)
    if final.exists():
        raise FileExistsError(f'{final} already exists')
    try:
        os.rename(staging, final)
    except OSError as err:  # rename onto a non-empty directory: someone else published it first
        if err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(f'{final} already exists') from None
        raise
    fsync_path(final.parent)
    return final
