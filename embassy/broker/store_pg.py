"""The broker's store in PostgreSQL, for several broker replicas serving one fleet.

The same promises as :class:`embassy.broker.store.SqliteStore`, held across processes and
hosts by the server:

- ``append_decision`` locks the single row of ``head`` (``SELECT ... FOR UPDATE``) before it
  reads the last entry, and moves the head in the transaction that inserts the entry, so
  replicas append one after another; the primary key on ``seq`` is a second guard.
- ``take_nonce`` is one conditional ``UPDATE``: a second replica's update of the same row
  waits for the first to commit, re-reads it, finds it used and matches nothing.

Tables live in the schema ``embassy_broker`` (created, with its version, when absent; a
version this code does not know is refused). Every transaction sets ``synchronous_commit``
on, so a call returns once its commit is flushed to the server's WAL (given the server runs
with ``fsync`` on). A lost connection fails the call that meets it (a StorageError: the
broker denies); the next call connects again. A commit whose outcome was lost with the
connection may have been made: an entry the broker reported as failed can be in the log.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import psycopg

from embassy.broker.decision_log import LoggedDecision, next_entry
from embassy.broker.store import (
    NONCE_MAX_LEN,
    NONCE_MIN_LEN,
    SCHEMA_VERSION,
    SWEEP_AFTER_S,
    NonceState,
    check_nonce_args,
    nonce_state,
)
from embassy.errors import StorageError

# pg_advisory_xact_lock key for creating the schema: two replicas starting together
# would otherwise race on CREATE ... IF NOT EXISTS (it is not atomic in PostgreSQL).
_SETUP_LOCK = 0x454D424B

_CREATE = (
    "CREATE SCHEMA IF NOT EXISTS embassy_broker",
    """CREATE TABLE IF NOT EXISTS embassy_broker.meta (
        key text PRIMARY KEY,
        value text NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS embassy_broker.decisions (
        seq bigint PRIMARY KEY CHECK (seq >= 1),
        entry bytea NOT NULL,
        signature bytea NOT NULL,
        digest bytea NOT NULL UNIQUE
    )""",
    """CREATE TABLE IF NOT EXISTS embassy_broker.head (
        id boolean PRIMARY KEY DEFAULT true CHECK (id),
        seq bigint NOT NULL CHECK (seq >= 0)
    )""",
    """CREATE TABLE IF NOT EXISTS embassy_broker.nonces (
        nonce bytea PRIMARY KEY,
        expires bigint NOT NULL,
        used boolean NOT NULL DEFAULT false
    )""",
    "CREATE INDEX IF NOT EXISTS nonces_expires ON embassy_broker.nonces (expires)",
    # A guard against our own mistakes, not against the database's owner (the signatures
    # and the chain are that): the log is never updated or deleted from.
    """CREATE OR REPLACE FUNCTION embassy_broker.append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN RAISE EXCEPTION 'the decision log is append-only'; END $$""",
    """CREATE OR REPLACE TRIGGER decisions_append_only
        BEFORE UPDATE OR DELETE OR TRUNCATE ON embassy_broker.decisions
        FOR EACH STATEMENT EXECUTE FUNCTION embassy_broker.append_only()""",
    "INSERT INTO embassy_broker.head (id, seq) VALUES (true, 0) ON CONFLICT (id) DO NOTHING",
)


class PostgresStore:
    """A :class:`embassy.broker.store.BrokerStore` in PostgreSQL (``psycopg`` 3).

    ``dsn`` is a libpq connection string. One connection per store, used under a lock;
    open one store per process (a replica)."""

    def __init__(self, dsn: str, *, connect_timeout_s: int = 10) -> None:
        self._lock = threading.Lock()
        self._dsn = dsn
        self._connect_timeout_s = connect_timeout_s
        self._closed = False
        self._db: psycopg.Connection[Any] | None = None
        try:
            self._setup()
        except BaseException:
            self.close()
            raise

    def _conn(self) -> psycopg.Connection[Any]:
        """The connection, made again if the last one was lost (a server restart, a
        failover): the call that saw it fail was refused, the next one goes ahead."""
        if self._closed:
            raise StorageError("broker store: closed")
        if self._db is None or self._db.closed or self._db.broken:
            if self._db is not None:
                self._db.close()
                self._db = None
            try:
                self._db = psycopg.connect(
                    self._dsn, autocommit=False, connect_timeout=self._connect_timeout_s
                )
            except psycopg.Error as exc:
                raise StorageError(f"broker store: cannot connect to PostgreSQL: {exc}") from None
        return self._db

    @contextmanager
    def _tx(self) -> Iterator[psycopg.Cursor[Any]]:
        """One transaction; a database error is a StorageError naming what failed.

        ``synchronous_commit`` is forced on for it, whatever the server's default: a taken
        nonce or an appended decision that a crash could undo would be a replay or a
        decision missing from the log."""
        with self._lock:
            db = self._conn()
            try:
                with db.transaction(), db.cursor() as cur:
                    cur.execute("SET LOCAL synchronous_commit = on")
                    yield cur
            except psycopg.Error as exc:
                raise StorageError(f"broker store: PostgreSQL: {exc}") from None

    def _setup(self) -> None:
        with self._tx() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(%s)", (_SETUP_LOCK,))
            for statement in _CREATE:
                cur.execute(statement)
            cur.execute(
                "INSERT INTO embassy_broker.meta (key, value) VALUES ('schema_version', %s) "
                "ON CONFLICT (key) DO NOTHING",
                (str(SCHEMA_VERSION),),
            )
            cur.execute("SELECT value FROM embassy_broker.meta WHERE key = 'schema_version'")
            row = cur.fetchone()
        version = row[0] if row is not None else None
        if version != str(SCHEMA_VERSION):
            raise StorageError(
                f"broker store: schema version {version}, this broker reads {SCHEMA_VERSION}"
            )

    # -- nonces ---------------------------------------------------------------------------------

    def issue_nonce(self, nonce: bytes, expires_unix: int) -> None:
        check_nonce_args(nonce, expires_unix)
        with self._tx() as cur:
            cur.execute(
                "INSERT INTO embassy_broker.nonces (nonce, expires) VALUES (%s, %s) "
                "ON CONFLICT (nonce) DO NOTHING",
                (nonce, expires_unix),
            )
            if cur.rowcount != 1:
                raise StorageError("nonce: already issued (nonces must be fresh random bytes)")

    def take_nonce(self, nonce: bytes, now_unix: int) -> NonceState:
        """:attr:`NonceState.OK` exactly once for an issued nonce before it expires, across
        every replica."""
        if not isinstance(nonce, bytes) or not NONCE_MIN_LEN <= len(nonce) <= NONCE_MAX_LEN:
            return NonceState.UNKNOWN
        with self._tx() as cur:
            cur.execute(
                "UPDATE embassy_broker.nonces SET used = true "
                "WHERE nonce = %s AND NOT used AND expires >= %s",
                (nonce, now_unix),
            )
            if cur.rowcount == 1:
                state = NonceState.OK
            else:
                cur.execute(
                    "SELECT used, expires FROM embassy_broker.nonces WHERE nonce = %s", (nonce,)
                )
                state = nonce_state(cur.fetchone(), now_unix)
            cur.execute(
                "DELETE FROM embassy_broker.nonces WHERE expires < %s", (now_unix - SWEEP_AFTER_S,)
            )
        return state

    def sweep_nonces(self, now_unix: int) -> int:
        with self._tx() as cur:
            cur.execute(
                "DELETE FROM embassy_broker.nonces WHERE expires < %s", (now_unix - SWEEP_AFTER_S,)
            )
            return cur.rowcount

    # -- the decision log -----------------------------------------------------------------------

    def append_decision(
        self, decision: dict[str, Any], sign: Callable[[bytes], bytes]
    ) -> LoggedDecision:
        with self._tx() as cur:
            # The lock every appender queues on. Read committed: the statements after it
            # see what the previous holder committed.
            cur.execute("SELECT seq FROM embassy_broker.head WHERE id FOR UPDATE")
            row = cur.fetchone()
            if row is None:
                raise StorageError("broker store: the head row is missing")
            head_seq = int(row[0])
            head: LoggedDecision | None = None
            if head_seq > 0:
                cur.execute(
                    "SELECT seq, entry, signature, digest FROM embassy_broker.decisions "
                    "WHERE seq = %s",
                    (head_seq,),
                )
                found = cur.fetchone()
                if found is None:
                    raise StorageError(f"broker store: the head entry seq {head_seq} is missing")
                head = _logged(found)
            logged = next_entry(head, decision, sign)
            cur.execute(
                "INSERT INTO embassy_broker.decisions (seq, entry, signature, digest) "
                "VALUES (%s, %s, %s, %s)",
                (logged.seq, logged.entry, logged.signature, logged.digest),
            )
            cur.execute("UPDATE embassy_broker.head SET seq = %s WHERE id", (logged.seq,))
        return logged

    def decisions(self, from_seq: int = 0, *, limit: int | None = None) -> list[LoggedDecision]:
        with self._tx() as cur:
            cur.execute(
                "SELECT seq, entry, signature, digest FROM embassy_broker.decisions "
                "WHERE seq >= %s ORDER BY seq LIMIT %s",
                (from_seq, limit),
            )
            rows = cur.fetchall()
        return [_logged(row) for row in rows]

    def head(self) -> LoggedDecision | None:
        with self._tx() as cur:
            cur.execute(
                "SELECT seq, entry, signature, digest FROM embassy_broker.decisions "
                "ORDER BY seq DESC LIMIT 1"
            )
            row = cur.fetchone()
        return _logged(row) if row is not None else None

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._db is not None:
                self._db.close()
                self._db = None

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _logged(row: tuple[Any, ...]) -> LoggedDecision:
    seq, entry, signature, digest = row
    return LoggedDecision(
        seq=int(seq), entry=bytes(entry), signature=bytes(signature), digest=bytes(digest)
    )
