"""Atomic file writes: readers see the old file or the new one, never a torn one."""

from __future__ import annotations

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
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode('utf-8'))


def atomic_publish_dir(staging: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Make a fully written directory visible under `final` in one rename (files fsynced first).

    Readers see either no `final` or all of it. Refuses to replace an existing `final`.
    """
    staging, final = Path(staging), Path(final)
    for file in staging.rglob('*'):
        if file.is_file():
            with open(file, 'rb') as f:
                os.fsync(f.fileno())
    if final.exists():
        raise FileExistsError(f'{final} already exists')
    os.rename(staging, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final
