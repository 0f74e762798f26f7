"""The broker's durable state: single-use nonces and the signed, append-only decision log.

:class:`BrokerStore` is what the broker needs; :class:`SqliteStore` is the default (one file,
one host, any number of processes on it); ``embassy.broker.store_pg.PostgresStore`` serves
several broker replicas from one PostgreSQL.

The two promises every store keeps, across threads and processes:

- ``take_nonce`` answers :attr:`NonceState.OK` at most once per nonce, and only before the
  nonce expires: the check and the marking are one conditional ``UPDATE``.
- ``append_decision`` reads the head and writes the entry after it in one transaction that
  excludes every other writer, so no two entries share a seq and the chain never forks.
  It returns only once the entry is durable; it never rewrites an entry.

The file is the broker's alone (0600). Nothing secret is in it: the log is meant to be shown
to auditors, and nonces are public once issued.
"""

from __future__ import annotations

import enum
import os
import sqlite3
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from embassy.broker.decision_log import LoggedDecision, next_entry
from embassy.errors import StorageError, WireFormatError

__all__ = [
    "NONCE_MAX_LEN",
    "NONCE_MIN_LEN",
    "SCHEMA_VERSION",
    "SWEEP_AFTER_S",
    "BrokerStore",
    "LoggedDecision",
    "NonceState",
    "SqliteStore",
    "check_nonce_args",
]

SCHEMA_VERSION = 1
# PRAGMA application_id: "EMBK", so another SQLite file is never taken for a store.
APPLICATION_ID = 0x454D424B
NONCE_MIN_LEN = 16
NONCE_MAX_LEN = 64
# Nonces are deleted this long after they expire: until then a late one is reported as
# expired (or used) rather than unknown. Either way it is refused.
SWEEP_AFTER_S = 3600
BUSY_TIMEOUT_S = 30.0


class NonceState(enum.StrEnum):
    OK = "ok"
    UNKNOWN = "unknown"
    USED = "used"
    EXPIRED = "expired"


class BrokerStore(Protocol):
    def issue_nonce(self, nonce: bytes, expires_unix: int) -> None: ...

    def take_nonce(self, nonce: bytes, now_unix: int) -> NonceState: ...

    def append_decision(
        self, decision: dict[str, Any], sign: Callable[[bytes], bytes]
    ) -> LoggedDecision: ...

    def decisions(self, from_seq: int = 0) -> list[LoggedDecision]: ...

    def close(self) -> None: ...


def check_nonce_args(nonce: bytes, expires_unix: int) -> None:
    if not isinstance(nonce, bytes) or not NONCE_MIN_LEN <= len(nonce) <= NONCE_MAX_LEN:
        raise WireFormatError(f"nonce: expected {NONCE_MIN_LEN}-{NONCE_MAX_LEN} bytes")
    if isinstance(expires_unix, bool) or not isinstance(expires_unix, int) or expires_unix < 0:
        raise WireFormatError("expires_unix: expected a non-negative integer")


def nonce_state(row: tuple[Any, Any] | None, now_unix: int) -> NonceState:
    """Why a nonce was not taken, from its row (used, expires) read after the UPDATE."""
    if row is None:
        return NonceState.UNKNOWN
    used, expires = row
    if used:
        return NonceState.USED
    if expires < now_unix:
        return NonceState.EXPIRED
    # Not used and not expired, yet the conditional UPDATE matched nothing: cannot happen
    # inside one transaction; refuse rather than guess.
    return NonceState.USED


_SCHEMA = (
    """CREATE TABLE decisions (
        seq INTEGER PRIMARY KEY CHECK (seq >= 1),
        entry BLOB NOT NULL,
        signature BLOB NOT NULL,
        digest BLOB NOT NULL UNIQUE
    )""",
    # A guard against our own mistakes, not against someone with the file (the signatures
    # and the chain are that): the log is never updated or deleted from.
    """CREATE TRIGGER decisions_append_only_update BEFORE UPDATE ON decisions
       BEGIN SELECT RAISE(ABORT, 'the decision log is append-only'); END""",
    """CREATE TRIGGER decisions_append_only_delete BEFORE DELETE ON decisions
       BEGIN SELECT RAISE(ABORT, 'the decision log is append-only'); END""",
    """CREATE TABLE nonces (
        nonce BLOB PRIMARY KEY,
        expires INTEGER NOT NULL,
        used INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID""",
    "CREATE INDEX nonces_expires ON nonces (expires)",
    f"PRAGMA application_id = {APPLICATION_ID}",
    f"PRAGMA user_version = {SCHEMA_VERSION}",
)


class SqliteStore:
    """A :class:`BrokerStore` in one SQLite file: WAL, ``synchronous=FULL`` (a commit is on
    disk when it returns), ``BEGIN IMMEDIATE`` for every write (the write lock is taken
    before the head is read). Thread-safe; several processes may open the same file."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        _create_private(self.path)
        try:
            self._db: sqlite3.Connection | None = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: cannot open the broker store: {exc}") from None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    # -- connection and schema --------------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise StorageError(f"{self.path}: the broker store is closed")
        return self._db

    def _setup(self) -> None:
        db = self._conn()
        try:
            mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode != "wal":
                raise StorageError(f"{self.path}: journal_mode is {mode!r}, not WAL")
            db.execute("PRAGMA synchronous = FULL")
        except sqlite3.Error as exc:
            raise StorageError(f"{self.path}: not a usable SQLite file: {exc}") from None
        with self._write() as db:
            app_id = db.execute("PRAGMA application_id").fetchone()[0]
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if app_id == 0 and version == 0:
                tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
                if tables:
                    raise StorageError(f"{self.path}: a SQLite file that is not a broker store")
                for statement in _SCHEMA:
                    db.execute(statement)
                return
            if app_id != APPLICATION_ID:
                raise StorageError(f"{self.path}: a SQLite file that is not a broker store")
            if version != SCHEMA_VERSION:
                raise StorageError(
                    f"{self.path}: schema version {version}, this broker reads {SCHEMA_VERSION}"
                )

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding SQLite's write lock from its first statement."""
        with self._lock:
            db = self._conn()
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise StorageError(f"{self.path}: cannot begin a write: {exc}") from None
            try:
                yield db
                db.execute("COMMIT")
            except BaseException as exc:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if isinstance(exc, sqlite3.Error):
                    raise StorageError(f"{self.path}: write failed: {exc}") from None
                raise

    # -- nonces ---------------------------------------------------------------------------------

    def issue_nonce(self, nonce: bytes, expires_unix: int) -> None:
        check_nonce_args(nonce, expires_unix)
        with self._write() as db:
            exists = db.execute("SELECT 1 FROM nonces WHERE nonce = ?", (nonce,)).fetchone()
            if exists:
                raise StorageError("nonce: already issued (nonces must be fresh random bytes)")
            db.execute("INSERT INTO nonces (nonce, expires) VALUES (?, ?)", (nonce, expires_unix))

    def take_nonce(self, nonce: bytes, now_unix: int) -> NonceState:
        """:attr:`NonceState.OK` exactly once for an issued nonce before it expires."""
        if not isinstance(nonce, bytes) or not NONCE_MIN_LEN <= len(nonce) <= NONCE_MAX_LEN:
            return NonceState.UNKNOWN
        with self._write() as db:
            taken = db.execute(
                "UPDATE nonces SET used = 1 WHERE nonce = ? AND used = 0 AND expires >= ?",
                (nonce, now_unix),
            ).rowcount
            if taken == 1:
                state = NonceState.OK
            else:
                row = db.execute(
                    "SELECT used, expires FROM nonces WHERE nonce = ?", (nonce,)
                ).fetchone()
                state = nonce_state(row, now_unix)
            db.execute("DELETE FROM nonces WHERE expires < ?", (now_unix - SWEEP_AFTER_S,))
        return state

    def sweep_nonces(self, now_unix: int) -> int:
        """Delete nonces that expired more than :data:`SWEEP_AFTER_S` ago; how many."""
        with self._write() as db:
            return db.execute(
                "DELETE FROM nonces WHERE expires < ?", (now_unix - SWEEP_AFTER_S,)
            ).rowcount

    # -- the decision log -----------------------------------------------------------------------

    def append_decision(
        self, decision: dict[str, Any], sign: Callable[[bytes], bytes]
    ) -> LoggedDecision:
        with self._write() as db:
            row = db.execute(
                "SELECT seq, entry, signature, digest FROM decisions ORDER BY seq DESC LIMIT 1"
            ).fetchone()
            head = LoggedDecision(*row) if row is not None else None
            logged = next_entry(head, decision, sign)
            db.execute(
                "INSERT INTO decisions (seq, entry, signature, digest) VALUES (?, ?, ?, ?)",
                (logged.seq, logged.entry, logged.signature, logged.digest),
            )
        return logged

    def decisions(self, from_seq: int = 0, *, limit: int | None = None) -> list[LoggedDecision]:
        """Entries with seq >= ``from_seq``, in order (at most ``limit``)."""
        with self._lock:
            try:
                rows = (
                    self._conn()
                    .execute(
                        "SELECT seq, entry, signature, digest FROM decisions WHERE seq >= ? "
                        "ORDER BY seq LIMIT ?",
                        (from_seq, -1 if limit is None else limit),
                    )
                    .fetchall()
                )
            except sqlite3.Error as exc:
                raise StorageError(f"{self.path}: cannot read the decision log: {exc}") from None
        return [LoggedDecision(*row) for row in rows]

    def head(self) -> LoggedDecision | None:
        """The latest entry, or None for an empty log."""
        with self._lock:
            row = (
                self._conn()
                .execute(
                    "SELECT seq, entry, signature, digest FROM decisions ORDER BY seq DESC LIMIT 1"
                )
                .fetchone()
            )
        return LoggedDecision(*row) if row is not None else None

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> SqliteStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _create_private(path: Path) -> None:
    """Create the store file 0600 (or tighten an existing one); refuse a non-file."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StorageError(f"{path}: cannot open the broker store: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise StorageError(f"{path}: the broker store is not a regular file")
        if stat.S_IMODE(st.st_mode) != 0o600:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
