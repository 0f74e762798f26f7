"""Append-only, fsync'd files for the statement log and its checkpoints.

Each file is one canonical JSON record per line. An append writes the whole line on an
``O_APPEND`` descriptor and fsyncs before returning, so an acknowledged entry survives a
crash.

An append is atomic at the line level. A write that fails or falls short (ENOSPC: the disk
is full) or an fsync that fails is cut back to the last good offset (``ftruncate`` +
``fsync``) and reported as a :class:`StorageError`; the record was not acknowledged, the
file holds exactly the records it held before, and the next append (once there is room)
goes on from there. Were the cut itself to fail, the file refuses every further append
until the daemon restarts: a partial last line is exactly what a crash mid-write leaves,
and opening the file drops it (it was never acknowledged, nor extended into a PCR).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Generic, TypeVar

from embassy.daemon.atomic import fsync_dir, write_all
from embassy.errors import EmbassyError, StorageError, TamperError

_LOG = logging.getLogger(__name__)
T = TypeVar("T")


class AppendFile(Generic[T]):
    """Records of type ``T`` kept in memory and appended durably to ``path``."""

    def __init__(self, path: Path, parse: Callable[[bytes], T]) -> None:
        self.path = path
        self.records: list[T] = []
        self._broken: str | None = None  # why appends are refused until a restart
        existed = path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        if not existed:
            fsync_dir(path.parent)
        try:
            self._size = self._load(parse)
        except BaseException:
            os.close(self._fd)
            raise

    def _load(self, parse: Callable[[bytes], T]) -> int:
        data = self.path.read_bytes()
        complete = data.rfind(b"\n") + 1
        if complete < len(data):
            _LOG.warning(
                "%s: dropping a partial last record (%d bytes) left by a crash mid-write",
                self.path.name,
                len(data) - complete,
            )
            os.ftruncate(self._fd, complete)
            os.fsync(self._fd)
        for number, line in enumerate(data[:complete].splitlines(), start=1):
            try:
                self.records.append(parse(line))
            except EmbassyError as exc:
                raise TamperError(f"{self.path.name} line {number} is corrupt: {exc}") from None
        return complete

    def append(self, record: T, raw: bytes) -> None:
        """Append one record durably, or raise :class:`StorageError` having stored nothing."""
        self.append_many([(record, raw)])

    def append_many(self, items: Sequence[tuple[T, bytes]]) -> None:
        """Append records with one write and one fsync (a group commit): all of them durably,
        or none (:class:`StorageError`, the file cut back to where it was)."""
        if self._broken is not None:
            raise StorageError(f"{self.path.name}: appends refused until restart: {self._broken}")
        data = b"".join(raw + b"\n" for _, raw in items)
        try:
            write_all(self._fd, data)
            os.fsync(self._fd)
        except OSError as exc:
            self._cut_back(exc)
            raise StorageError(
                f"{self.path.name}: append failed ({exc.strerror}); nothing was stored"
            ) from None
        self._size += len(data)
        self.records.extend(record for record, _ in items)

    def drop_last(self, count: int, nbytes: int) -> None:
        """Cut the last ``count`` records (``nbytes`` bytes of lines) from the file, durably:
        for start-up recovery of records that were never acknowledged."""
        if not 0 < count <= len(self.records) or not 0 < nbytes <= self._size:
            raise ValueError(f"cannot drop {count} records / {nbytes} bytes")
        os.ftruncate(self._fd, self._size - nbytes)
        os.fsync(self._fd)
        self._size -= nbytes
        del self.records[-count:]

    def _cut_back(self, exc: OSError) -> None:
        """Truncate to the last acknowledged record after a failed append."""
        try:
            os.ftruncate(self._fd, self._size)
            os.fsync(self._fd)
        except OSError as cut:
            self._broken = (
                f"a failed append ({exc.strerror}) could not be cut back ({cut.strerror})"
            )
            _LOG.error("%s: %s", self.path.name, self._broken)
            raise StorageError(f"{self.path.name}: {self._broken}") from None
        _LOG.error(
            "%s: append failed (%s); cut back to the last good record at byte %d",
            self.path.name,
            exc.strerror,
            self._size,
        )

    def close(self) -> None:
        os.close(self._fd)
