"""Receive a sealed input whole, to local scratch storage, before asking for the seal.

Why: while a session is open the workload is silent. The embassy takes the workload's only
network link down, so no byte passes between its network namespace and the outside; flows
opened before the seal are paused (not reset) and resume after the unseal. A service that
opened the session first and then read the user's request body from its connection would
wait for bytes that cannot arrive until the session it is in has ended: the session runs
into its deadline. So the workload receives the whole (encrypted) input first, then opens
the session, then decrypts from local storage::

    with spool_input(request_body, content_length, max_bytes=cap) as ciphertext:
        with client.open(envelope) as session:        # sealed from here on
            for chunk in session.decrypt(ciphertext):  # read from disk, not the network
                ...

What is spooled is the ciphertext, exactly as received: plaintext never touches the spool.
Memory is O(chunk) whatever the input size; the bytes go to a file in ``directory``
(default ``tempfile.gettempdir()``: ``TMPDIR``, else ``/tmp``), a directory of the
workload's own container. The file has no name: it is opened ``O_TMPFILE | O_EXCL``
(never linkable), or, where the filesystem lacks that, created ``O_CREAT | O_EXCL |
O_NOFOLLOW`` under a random name and unlinked before a byte is written; either way mode
0600. Closing the returned file (leaving its ``with`` block, or an exception while
spooling) frees the storage, and nothing is left behind on any path, a crash included. No
fsync: it is scratch, worthless after the request.

Standard library only; it must not import ``embassy``.
"""

from __future__ import annotations

import errno
import io
import os
import secrets
import tempfile
from typing import Protocol

DEFAULT_CHUNK_SIZE = 1024 * 1024
_NO_TMPFILE = (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL)
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# Whether to try O_TMPFILE first (a switch so tests can exercise the named fallback).
_USE_O_TMPFILE = hasattr(os, "O_TMPFILE")


class Readable(Protocol):
    """What is spooled from: anything with ``read(n)`` (a socket's file, an HTTP body)."""

    def read(self, size: int, /) -> bytes | None: ...


class SpoolError(Exception):
    """The input was not spooled whole; no session should be opened for it.

    ``reason`` is a stable word: ``too-large`` (over the cap, said before reading when the
    length is known), ``short-input`` (the source ended before ``length`` bytes),
    ``no-space`` (the spool's filesystem is full), ``storage`` (any other local I/O error).
    ``received`` is how many bytes had been read from the source.
    """

    def __init__(self, reason: str, message: str, *, received: int = 0) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.received = received


def spool_input(
    src: Readable,
    length: int | None,
    *,
    max_bytes: int,
    directory: str | os.PathLike[str] | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> io.BufferedReader:
    """Copy exactly ``length`` bytes of ``src`` to an unnamed scratch file; return it for reading.

    The returned file is positioned at 0; use it as a context manager (closing it frees the
    storage). ``length`` ``None`` reads ``src`` to its end. Exactly ``length`` bytes are read:
    whatever follows in ``src`` is left there (on an HTTP connection, the next request).

    Raises :class:`SpoolError` (see its reasons) with nothing left behind; an error reading
    ``src`` (e.g. ``TimeoutError``, ``ConnectionError``) propagates unchanged, likewise.
    """
    if length is not None and (isinstance(length, bool) or not isinstance(length, int)):
        raise TypeError(f"length must be an int or None, got {length!r}")
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise ValueError(f"max_bytes must be a non-negative int, got {max_bytes!r}")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if length is not None:
        if length < 0:
            raise ValueError(f"length must be non-negative, got {length}")
        if length > max_bytes:
            raise SpoolError(
                "too-large", f"the input is {length} bytes, over the cap of {max_bytes}"
            )
    where = os.fspath(directory) if directory is not None else tempfile.gettempdir()
    fd = _create(where)
    try:
        received = _copy(src, fd, length, max_bytes, chunk_size)
        os.lseek(fd, 0, os.SEEK_SET)
        # Read-only from here: the caller gets the ciphertext, not a scratch pad.
        spooled = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    assert length is None or received == length
    return spooled


def _create(directory: str) -> int:
    """An unnamed 0600 file in ``directory``, opened read-write; its descriptor."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise _storage(exc, f"cannot open the spool directory {directory}") from None
    try:
        if _USE_O_TMPFILE:
            try:
                # O_EXCL with O_TMPFILE: the file can never be linked into the tree.
                flags = os.O_TMPFILE | os.O_RDWR | os.O_EXCL | os.O_CLOEXEC
                return os.open(".", flags, 0o600, dir_fd=dir_fd)
            except OSError as exc:
                if exc.errno not in _NO_TMPFILE:
                    raise _storage(exc, f"cannot create a spool file in {directory}") from None
        return _create_named(directory, dir_fd)
    finally:
        os.close(dir_fd)


def _create_named(directory: str, dir_fd: int) -> int:
    """The fallback: a random name, O_EXCL (no symlink, no existing file), then unlinked."""
    flags = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_RDWR | os.O_CLOEXEC
    for _ in range(16):
        name = f".embassy-spool-{secrets.token_hex(8)}"
        try:
            fd = os.open(name, flags, 0o600, dir_fd=dir_fd)
        except FileExistsError:
            continue
        except OSError as exc:
            raise _storage(exc, f"cannot create a spool file in {directory}") from None
        try:
            os.unlink(name, dir_fd=dir_fd)
        except OSError as exc:
            os.close(fd)
            raise _storage(exc, f"cannot unlink the spool file {directory}/{name}") from None
        return fd
    raise SpoolError("storage", f"cannot create a spool file in {directory}: names all taken")


def _copy(src: Readable, fd: int, length: int | None, max_bytes: int, chunk_size: int) -> int:
    """Copy ``length`` bytes (or to the end, at most ``max_bytes``) of ``src`` into ``fd``."""
    received = 0
    # Unknown length: one byte over the cap is enough to know the input is over it.
    limit = length if length is not None else max_bytes + 1
    while received < limit:
        want = min(chunk_size, limit - received)
        data = src.read(want)
        if data is None:  # a non-blocking source with nothing ready: not supported
            raise OSError(errno.EAGAIN, "the source is non-blocking and returned no data")
        if len(data) > want:
            raise ValueError(f"the source returned {len(data)} bytes when asked for {want}")
        if not data:
            break
        _write_all(fd, data, received)
        received += len(data)
    if length is not None and received < length:
        raise SpoolError(
            "short-input",
            f"the input ended after {received} of its {length} bytes",
            received=received,
        )
    if received > max_bytes:
        raise SpoolError(
            "too-large", f"the input is over the cap of {max_bytes} bytes", received=received
        )
    return received


def _write_all(fd: int, data: bytes, received: int) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except OSError as exc:
            raise _storage(exc, "cannot write the spool file", received) from None
        view = view[n:]


def _storage(exc: OSError, what: str, received: int = 0) -> SpoolError:
    reason = "no-space" if exc.errno in _NO_SPACE else "storage"
    return SpoolError(reason, f"{what}: {exc.strerror or exc}", received=received)
