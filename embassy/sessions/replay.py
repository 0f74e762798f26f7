"""Payloads opened so far: a payload opens at most once, across restarts.

SQLite in WAL mode with ``synchronous=NORMAL``: a claim is not fsync'd on its own. What
makes it durable is the seal statement that follows it and names the payload id: it is
fsync'd (and PCR-extended) before any key leaves. At start the daemon puts back every
payload id the signed log shows opened (:meth:`ReplayStore.remember`), so a claim lost to
a power cut is restored whenever its key could have left; one lost before its statement
was never released, and opening that payload again is no replay.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterable
from pathlib import Path

from embassy.errors import PayloadReplayedError, StorageError


class ReplayStore:
    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS opened ("
                " payload_id BLOB PRIMARY KEY, session BLOB NOT NULL, opened_unix INTEGER NOT NULL)"
            )
        except sqlite3.Error as exc:
            raise StorageError(f"replay store {path}: {exc}") from None
        path.chmod(0o600)

    def remember(self, opened: Iterable[tuple[bytes, bytes, int]]) -> int:
        """Record (payload id, session, unix time) triples the signed log shows opened;
        return how many were missing (claims a crash or power cut had lost)."""
        with self._lock:
            try:
                before = self._db.total_changes
                self._db.execute("BEGIN")
                self._db.executemany(
                    "INSERT OR IGNORE INTO opened (payload_id, session, opened_unix) "
                    "VALUES (?, ?, ?)",
                    list(opened),
                )
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StorageError(f"replay store: {exc}") from None
            return int(self._db.total_changes - before)

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
