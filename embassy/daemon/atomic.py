"""Durable file operations: whole-file replace and append, both fsync'd.

A failed write (ENOSPC, EIO, a short write) never leaves a partial file in place of a good
one: the bytes go to a temporary file that is removed on any failure, and only a complete,
fsync'd file is renamed over the old one. Failures are a :class:`StorageError` saying which
file and why, so a full disk is a message, not a traceback or a truncated key blob.
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

from embassy.errors import StorageError


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` or raise ``OSError`` (ENOSPC for a write that stalls).

    ``os.write`` may write less than asked (a full disk part-way through); a write of zero
    bytes would loop forever, so it is reported as the disk being full.
    """
    with memoryview(data) as view:
        done = 0
        while done < len(view):
            n = os.write(fd, view[done:])
            if n <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            done += n


def write_atomic(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` so a crash leaves either the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise StorageError(f"{path}: cannot be written: {exc.strerror}") from None


def ensure_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def create_private(path: Path, data: bytes) -> None:
    """Write a secret once: 0600 from creation, fsync'd, never over an existing file.

    The bytes go to a temporary file that is then *linked* into place: ``link`` refuses an
    existing target atomically (``replace`` would overwrite one created meanwhile), and a
    failed write leaves nothing at ``path``. Raises ``FileExistsError`` if ``path`` exists
    (the caller says what it refused to overwrite) and :class:`StorageError` otherwise.
    """
    if os.path.lexists(path):
        raise FileExistsError(path)
    tmp = path.with_name(f".{path.name}.{os.urandom(6).hex()}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
        fsync_dir(path.parent)
    except FileExistsError:
        raise
    except OSError as exc:
        raise StorageError(f"{path}: cannot be written: {exc.strerror}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
