"""Append-only, fsync'd files for the statement log and its checkpoints.

Each file is one canonical JSON record per line. An append writes the whole line with one
``write`` on an ``O_APPEND`` descriptor and fsyncs before returning, so an acknowledged entry
survives a crash. A crash mid-write can leave a partial last line; it was never
acknowledged (nor extended into the PCR), so opening the file drops it and says so.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from embassy.daemon.atomic import fsync_dir
from embassy.errors import EmbassyError, TamperError

_LOG = logging.getLogger(__name__)
T = TypeVar("T")


class AppendFile(Generic[T]):
    """Records of type ``T`` kept in memory and appended durably to ``path``."""

    def __init__(self, path: Path, parse: Callable[[bytes], T]) -> None:
        self.path = path
        self.records: list[T] = []
        existed = path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        if not existed:
            fsync_dir(path.parent)
        try:
            self._load(parse)
        except BaseException:
            os.close(self._fd)
            raise

    def _load(self, parse: Callable[[bytes], T]) -> None:
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

    def append(self, record: T, raw: bytes) -> None:
        line = raw + b"\n"
        if os.write(self._fd, line) != len(line):
            raise OSError(f"short write to {self.path}")
        os.fsync(self._fd)
        self.records.append(record)

    def close(self) -> None:
        os.close(self._fd)
