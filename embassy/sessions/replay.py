"""Payloads opened so far: a payload opens at most once, durably, across restarts.

SQLite in WAL mode with ``synchronous=FULL``: a payload id is committed (fsync'd) before
its key is unwrapped, so a crash can burn a payload but never let it open twice.
"""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from embassy.errors import PayloadReplayedError, StorageError


class ReplayStore:
    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS opened ("
                " payload_id BLOB PRIMARY KEY, session BLOB NOT NULL, opened_unix INTEGER NOT NULL)"
            )
        except sqlite3.Error as exc:
            raise StorageError(f"replay store {path}: {exc}") from None
        path.chmod(0o600)

    def check(self, payload_id: bytes) -> None:
        """Refuse a payload opened before, without claiming it (before anything is sealed)."""
        with self._lock:
            try:
                row = self._db.execute(
                    "SELECT session, opened_unix FROM opened WHERE payload_id = ?", (payload_id,)
                ).fetchone()
            except sqlite3.Error as exc:
                raise StorageError(f"replay store: {exc}") from None
        if row is not None:
            raise _replayed(payload_id, row)

    def claim(self, payload_id: bytes, session: bytes, now_unix: int) -> None:
        """Record ``payload_id`` as opened by ``session``; refuse one opened before."""
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO opened (payload_id, session, opened_unix) VALUES (?, ?, ?)",
                    (payload_id, session, now_unix),
                )
            except sqlite3.IntegrityError:
                row = self._db.execute(
                    "SELECT session, opened_unix FROM opened WHERE payload_id = ?", (payload_id,)
                ).fetchone()
                raise _replayed(payload_id, row) from None
            except sqlite3.Error as exc:
                raise StorageError(f"replay store: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _replayed(payload_id: bytes, row: tuple[bytes, int]) -> PayloadReplayedError:
    return PayloadReplayedError(
        f"payload {payload_id.hex()} was already opened (session {bytes(row[0]).hex()} "
        f"at {row[1]}); a payload opens once"
    )
