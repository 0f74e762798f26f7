"""The registry's SQLite schema, its version, and the one migration (1 -> 2) done at open.

Part of :mod:`embassy.metering.registry` (its module docstring has the protocol). A new
file gets :data:`SCHEMA` statement by statement; an existing one must say
:data:`SCHEMA_VERSION` in ``meta``, or a version :data:`MIGRATIONS` knows, which is
migrated in the same transaction and logged; anything else is refused.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from embassy.errors import StorageError

_LOG = logging.getLogger("embassy.metering.registry")  # one logger for the registry
SCHEMA_VERSION = 2
# Schema 1 -> 2 (formula v2): the signatures' pooled windows and the calibrations table.
# Done at open, in one transaction, and logged; any other version is refused.
MIGRATIONS: dict[str, tuple[str, ...]] = {
    "1": (
        "ALTER TABLE signatures ADD COLUMN windows BLOB CHECK (windows IS NULL OR"
        " (length(windows) > 0 AND length(windows) % (4 * dim) = 0))",
    ),
}

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE batches (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL CHECK (kind IN ('signatures', 'update')),
    state TEXT NOT NULL CHECK (state IN ('pending', 'committed')),
    statement_seq INTEGER CHECK ((state = 'pending') = (statement_seq IS NULL))
);
CREATE TABLE signatures (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    batch TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    capability TEXT NOT NULL,
    authority TEXT NOT NULL,
    polarity TEXT NOT NULL CHECK (polarity IN ('positive', 'negative')),
    tensor TEXT NOT NULL,
    dim INTEGER NOT NULL CHECK (dim > 0),
    vector BLOB NOT NULL CHECK (length(vector) = 4 * dim),
    -- Formula v2's pooled windows ((m, dim) float32, row 0 = vector), NULL for rows
    -- written before schema 2, which v2 reads as their one mean vector.
    windows BLOB CHECK (
        windows IS NULL OR (length(windows) > 0 AND length(windows) % (4 * dim) = 0)
    ),
    session TEXT,
    statement_seq INTEGER,
    state TEXT NOT NULL CHECK (state IN ('pending', 'committed'))
);
CREATE INDEX signatures_by_tensor ON signatures (tensor, dim, state);
CREATE INDEX signatures_by_capability ON signatures (capability);
CREATE INDEX signatures_by_batch ON signatures (batch);
CREATE TABLE meters (
    capability TEXT PRIMARY KEY,
    authority TEXT NOT NULL,
    -- SQLite turns an overflowing integer sum into REAL: refuse that instead.
    value INTEGER NOT NULL CHECK (typeof(value) = 'integer'),
    count INTEGER NOT NULL,
    last_seq INTEGER NOT NULL
);
CREATE INDEX meters_by_authority ON meters (authority);
CREATE TABLE updates (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    batch TEXT NOT NULL REFERENCES batches (id) ON DELETE CASCADE,
    capability TEXT NOT NULL,
    authority TEXT NOT NULL,
    delta INTEGER NOT NULL,
    session TEXT NOT NULL,
    activation_sha256 TEXT NOT NULL,
    statement_seq INTEGER,
    state TEXT NOT NULL CHECK (state IN ('pending', 'committed'))
);
CREATE INDEX updates_by_capability ON updates (capability, state);
CREATE INDEX updates_by_batch ON updates (batch);
CREATE TABLE instruction_nonces (
    nonce TEXT PRIMARY KEY,
    authority TEXT NOT NULL,
    expires_unix INTEGER NOT NULL
);
CREATE INDEX nonces_by_expiry ON instruction_nonces (expires_unix);
CREATE TABLE calibrations (
    authority TEXT NOT NULL,
    tensor TEXT NOT NULL,
    dim INTEGER NOT NULL,
    capability TEXT NOT NULL,
    threshold INTEGER NOT NULL CHECK (typeof(threshold) = 'integer'),
    model_sha256 TEXT NOT NULL,
    statement_seq INTEGER NOT NULL,
    PRIMARY KEY (authority, tensor, dim, capability)
);
-- The daemon's open sessions' metering (daemon/metering.py), so a session open across a
-- restart is still metered: its instructions (the authorities' signed envelopes) and one
-- row per activation file handled. A file's row is staged with its group's first batch
-- (NULL: a group that changed nothing else) and goes if that batch is discarded.
CREATE TABLE metering_sessions (
    session TEXT PRIMARY KEY,
    refused INTEGER NOT NULL CHECK (refused >= 0)
);
CREATE TABLE metering_instructions (
    session TEXT NOT NULL REFERENCES metering_sessions (session) ON DELETE CASCADE,
    position INTEGER NOT NULL,
    envelope BLOB NOT NULL,
    PRIMARY KEY (session, position)
);
CREATE TABLE metering_files (
    session TEXT NOT NULL REFERENCES metering_sessions (session) ON DELETE CASCADE,
    seq INTEGER NOT NULL CHECK (seq >= 0),
    activation_sha256 TEXT NOT NULL,
    bytes INTEGER NOT NULL CHECK (bytes >= 0),
    signatures_written INTEGER NOT NULL,
    meter_updates INTEGER NOT NULL,
    batch TEXT REFERENCES batches (id) ON DELETE CASCADE,
    PRIMARY KEY (session, seq)
);
CREATE INDEX metering_files_by_batch ON metering_files (batch);
"""


def configure(conn: sqlite3.Connection, path: Path) -> None:
    mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
    if mode != "wal":
        raise StorageError(f"registry {path}: journal_mode is {mode}, not wal")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")


def ensure_schema(conn: sqlite3.Connection, path: Path) -> None:
    """Create the schema in a new file, or check an existing file's version."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        _create_or_check(conn, path)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _create_or_check(conn: sqlite3.Connection, path: Path) -> None:
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if not tables:
        # Statement by statement: executescript would commit half a schema on failure.
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(statement)
        conn.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        return
    if "meta" not in tables:
        raise StorageError(f"registry {path}: not an embassy registry (no meta table)")
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    found = None if row is None else row[0]
    if found in MIGRATIONS:
        for statement in MIGRATIONS[found]:
            conn.execute(statement)
        # Tables and indexes that version did not have, as the current schema defines them.
        for statement in SCHEMA.split(";"):
            if statement.strip():
                conn.execute(
                    statement.replace("CREATE TABLE ", "CREATE TABLE IF NOT EXISTS ").replace(
                        "CREATE INDEX ", "CREATE INDEX IF NOT EXISTS "
                    )
                )
        conn.execute(
            "UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION),)
        )
        _LOG.warning("registry %s: schema %s migrated to %s", path, found, SCHEMA_VERSION)
        return
    if found != str(SCHEMA_VERSION):
        raise StorageError(
            f"registry {path}: schema version {found!r}; this embassy reads {SCHEMA_VERSION} "
            f"(and migrates {', '.join(sorted(MIGRATIONS))}) only"
        )
