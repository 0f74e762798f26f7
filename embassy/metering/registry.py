"""The registry: signatures, meters, their history and instruction nonces, in one SQLite file.

An edge (stdlib ``sqlite3``): the daemon's durable metering state. The file is opened with
``journal_mode=WAL`` and ``synchronous=FULL`` (a returned COMMIT survives kill -9 and power
loss), foreign keys on, and one connection shared by the daemon's threads behind a lock.
The schema is versioned in ``meta``; a file of an unknown version is refused, and a known
older one is migrated at open, in one transaction, with a warning (never silently).

Atomicity with the statement log
--------------------------------
A signature write or a meter update and the signed statement that reports it must commit
together: no meter may move without its statement, and an acknowledged statement's change
must survive a crash. Two files cannot share a transaction, so the statement log (append
only, fsync'd, PCR-extended) is the source of truth for "acknowledged", and the registry
follows it in two phases:

1. :meth:`Registry.stage_signatures` / :meth:`Registry.stage_update` insert the rows in
   state ``pending`` under a fresh batch id (16 random bytes, hex) in one transaction and
   return it. Nothing a reader sees changes: meters and signature sets read committed rows.
2. The caller appends the statement, which names the batch id, to the log.
3. :meth:`Registry.commit` (batch, the statement's log seq), in ONE transaction, marks the
   batch's rows committed with that seq and applies an update's deltas to the meters
   (``value += delta``, ``count += 1``, ``last_seq = max(last_seq, seq)``; a missing meter
   is created with its capability's authority). Committing a committed batch again with
   the same seq is a no-op, so a retry after a crash between 2 and 3 is safe.
4. At start, the caller takes :meth:`Registry.pending_batches`, looks for their batch ids
   in the log and passes what it found (batch id → seq) to :meth:`Registry.recover`: found
   batches are committed (their statement was acknowledged), the others deleted (it never
   was). A crash at any point thus ends with registry and log agreeing.

:meth:`Registry.discard` deletes a pending batch at once; call it only when the statement
is known NOT to be in the log (the append was refused before writing). When the outcome of
an append is unknown, leave the batch pending: recovery decides from the log.

Ownership, defence in depth (the policy check comes first, in the instruction): a
capability belongs to ONE authority, the one its meter or its first signatures name.
Staging signatures for it under another authority raises ``NotOwnerError`` (pending rows
count, so two authorities cannot race for a new name); an update's rows take the owner from
the registry, so a meter is always created for the authority whose signatures scored it.

Instruction nonces (``claim_nonce``) are committed before the instruction is carried out:
a crash may burn an instruction, never run it twice.

Formula v2 (:mod:`embassy.metering.formula_v2`): each signature also keeps the pooled
windows of the activation it came from (row 0 is its vector). The model of one authority's
signatures for a (tensor, dim), :meth:`Registry.centroid_model`, is fitted from exactly the
committed rows; committing a signatures batch (or recovering one) refits the models it
touches in the same transaction and records each capability's calibration and the model's
digest in ``calibrations``, with the batch's statement seq: what meter readings report, so
the authority can recompute every increment from what it wrote and read.

Schema 1 files (before formula v2) are migrated at open, in one transaction, and the
migration is logged; their signatures have no windows and read as one-window samples.

Signature sets and models are cached per (tensor, dim) and (authority, tensor, dim) so
matching does not touch SQLite; committing a signatures batch drops the entries it changes.
Vectors are stored as given, as little-endian float32; :mod:`embassy.metering.score`
normalises them when it builds a set.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np

from embassy.errors import InstructionReplayedError, NotOwnerError, StorageError
from embassy.metering import registry_rows
from embassy.metering.formula_v2 import CentroidModel, Sample, fit
from embassy.metering.registry_rows import (
    Calibration,
    FileProgress,
    Meter,
    Recovery,
    SessionRecord,
    SignatureRow,
    Update,
)
from embassy.metering.registry_schema import SCHEMA_VERSION, configure, ensure_schema
from embassy.metering.score import Polarity, SignatureSet

__all__ = [
    "SCHEMA_VERSION",
    "Calibration",
    "FileProgress",
    "Meter",
    "Recovery",
    "Registry",
    "SessionRecord",
    "SignatureRow",
    "Update",
]


class Registry:
    """One open registry file. Every method is thread-safe."""

    def __init__(self, path: Path, conn: sqlite3.Connection) -> None:
        self._path = path
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()
        self._cache: dict[tuple[str, int], SignatureSet | None] = {}
        self._models: dict[tuple[str, str, int], CentroidModel | None] = {}
        self._generation = 0  # bumped by every signatures commit (see signature_set)

    # --- lifecycle -------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> Registry:
        try:
            # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
            conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise StorageError(f"registry {path}: cannot open: {exc}") from None
        try:
            configure(conn, path)
            ensure_schema(conn, path)
            path.chmod(0o600)  # signatures are the authorities' secrets
        except (sqlite3.Error, OSError) as exc:
            conn.close()
            raise StorageError(f"registry {path}: unreadable: {exc}") from None
        except BaseException:
            conn.close()
            raise
        return cls(path, conn)

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
                self._cache.clear()
                self._models.clear()

    def __enter__(self) -> Registry:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        """One write transaction under the lock; any sqlite error becomes a StorageError."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StorageError(f"registry {self._path}: closed")
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise StorageError(f"registry {self._path}: {exc}") from None

    # --- staging and the commit protocol ---------------------------------------------------

    def stage_signatures(self, rows: Sequence[SignatureRow], session: str | None = None) -> str:
        """Insert ``rows`` as one pending batch; returns its id. Nothing is visible yet."""
        if not rows:
            raise ValueError("registry: a signatures batch needs at least one row")
        if session is not None:
            registry_rows.hex_field(session, "session")
        prepared = [registry_rows.prepare_signature(row) for row in rows]
        owners: dict[str, str] = {}
        for row in rows:
            if owners.setdefault(row.capability, row.authority) != row.authority:
                raise NotOwnerError(
                    f"registry: capability {row.capability!r} named for two authorities"
                )
        batch = secrets.token_hex(16)
        with self._tx() as conn:
            for capability, authority in owners.items():
                owner = registry_rows.owner(conn, capability, pending=True)
                if owner is not None and owner != authority:
                    raise NotOwnerError(
                        f"registry: capability {capability!r} belongs to {owner!r}, "
                        f"not {authority!r}"
                    )
            conn.execute("INSERT INTO batches VALUES (?, 'signatures', 'pending', NULL)", (batch,))
            conn.executemany(
                "INSERT INTO signatures (batch, capability, authority, polarity, tensor, dim,"
                " vector, windows, session, statement_seq, state)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, 'pending')",
                [(batch, *fields, session) for fields in prepared],
            )
        return batch

    def stage_update(self, session: str, activation_sha256: str, deltas: Mapping[str, int]) -> str:
        """Stage meter deltas (micro-units) for one activation; returns the batch id.

        Each capability's authority is the one its meter or committed signatures name.
        """
        registry_rows.hex_field(session, "session")
        registry_rows.hex_field(activation_sha256, "activation_sha256", registry_rows.SHA256_HEX)
        for capability, delta in deltas.items():
            registry_rows.text(capability, "capability")
            if type(delta) is not int or delta < 0:
                raise ValueError(f"registry: delta for {capability!r} must be an int >= 0")
        batch = secrets.token_hex(16)
        with self._tx() as conn:
            rows = []
            for capability, delta in sorted(deltas.items()):
                owner = registry_rows.owner(conn, capability, pending=False)
                if owner is None:
                    raise StorageError(
                        f"registry {self._path}: capability {capability!r} has no signatures"
                    )
                rows.append((batch, capability, owner, delta, session, activation_sha256))
            conn.execute("INSERT INTO batches VALUES (?, 'update', 'pending', NULL)", (batch,))
            conn.executemany(
                "INSERT INTO updates (batch, capability, authority, delta, session,"
                " activation_sha256, statement_seq, state)"
                " VALUES (?, ?, ?, ?, ?, ?, NULL, 'pending')",
                rows,
            )
        return batch

    def commit(self, batch: str, statement_seq: int) -> None:
        """Apply a staged batch, its statement now in the log at ``statement_seq``."""
        if type(statement_seq) is not int or statement_seq < 0:
            raise ValueError("registry: statement_seq must be an int >= 0")
        with self._tx() as conn:
            self._commit_in(conn, batch, statement_seq)

    def discard(self, batch: str) -> None:
        """Delete a pending batch whose statement is known not to be in the log."""
        with self._tx() as conn:
            row = conn.execute("SELECT state FROM batches WHERE id = ?", (batch,)).fetchone()
            if row is not None and row[0] == "committed":
                raise StorageError(
                    f"registry {self._path}: batch {batch} is committed; it cannot be discarded"
                )
            conn.execute("DELETE FROM batches WHERE id = ?", (batch,))  # rows cascade

    def pending_batches(self) -> list[str]:
        """Batches staged but neither committed nor discarded, oldest first."""
        return [
            r[0]
            for r in self._query("SELECT id FROM batches WHERE state = 'pending' ORDER BY rowid")
        ]

    def recover(self, found: Mapping[str, int]) -> Recovery:
        """At start: commit pending batches found in the log, delete the rest, atomically.

        ``found`` maps batch ids to the seq of the statement naming them; ids that are not
        pending here (already committed, or unknown) are ignored.
        """
        committed: list[str] = []
        discarded: list[str] = []
        with self._tx() as conn:
            pending = [r[0] for r in conn.execute("SELECT id FROM batches WHERE state = 'pending'")]
            # In log order, so each meter's last_seq is the seq of its last statement.
            for batch in sorted(pending, key=lambda b: (b not in found, found.get(b, 0), b)):
                if batch in found:
                    self._commit_in(conn, batch, found[batch])
                    committed.append(batch)
                else:
                    conn.execute("DELETE FROM batches WHERE id = ?", (batch,))
                    discarded.append(batch)
        return Recovery(tuple(committed), tuple(discarded))

    def _commit_in(self, conn: sqlite3.Connection, batch: str, seq: int) -> None:
        row = conn.execute(
            "SELECT kind, state, statement_seq FROM batches WHERE id = ?", (batch,)
        ).fetchone()
        if row is None:
            raise StorageError(f"registry {self._path}: no batch {batch}")
        kind, state, old_seq = row
        if state == "committed":
            if old_seq != seq:
                raise StorageError(
                    f"registry {self._path}: batch {batch} committed at seq {old_seq}, not {seq}"
                )
            return
        conn.execute(
            "UPDATE batches SET state = 'committed', statement_seq = ? WHERE id = ?", (seq, batch)
        )
        if kind == "signatures":
            conn.execute(
                "UPDATE signatures SET state = 'committed', statement_seq = ? WHERE batch = ?",
                (seq, batch),
            )
            changed = conn.execute(
                "SELECT DISTINCT authority, tensor, dim FROM signatures WHERE batch = ?", (batch,)
            ).fetchall()
            for authority, tensor, dim in changed:
                self._cache.pop((tensor, dim), None)
                self._models.pop((authority, tensor, dim), None)
                self._recalibrate(conn, authority, tensor, dim, seq)
            self._generation += 1
            return
        conn.execute(
            "UPDATE updates SET state = 'committed', statement_seq = ? WHERE batch = ?",
            (seq, batch),
        )
        # One upsert per meter, not per row: a grouped batch holds many activations' rows.
        for capability, authority, delta, n in conn.execute(
            "SELECT capability, authority, sum(delta), count(*) FROM updates WHERE batch = ?"
            " GROUP BY capability, authority",
            (batch,),
        ).fetchall():
            moved = conn.execute(
                "INSERT INTO meters (capability, authority, value, count, last_seq)"
                " VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT (capability) DO UPDATE SET value = value + excluded.value,"
                " count = count + excluded.count, last_seq = max(last_seq, excluded.last_seq)"
                " WHERE authority = excluded.authority",
                (capability, authority, delta, n, seq),
            ).rowcount
            if moved != 1:
                raise NotOwnerError(
                    f"registry: meter {capability!r} belongs to an authority other than "
                    f"{authority!r}"
                )

    # --- reads -----------------------------------------------------------------------------

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        with self._lock:
            return self._query_locked(sql, params)

    def _query_locked(self, sql: str, params: Sequence[object] = ()) -> list[Any]:
        if self._conn is None:
            raise StorageError(f"registry {self._path}: closed")
        try:
            return self._conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"registry {self._path}: {exc}") from None

    def signature_set(self, tensor: str, dim: int) -> SignatureSet | None:
        """The committed signatures for (tensor, dim), or None if there are none (cached)."""
        key = (tensor, dim)
        with self._lock:
            if key in self._cache:
                return self._cache[key]
            generation = self._generation
            rows = self._query_locked(
                "SELECT capability, polarity, vector FROM signatures"
                " WHERE tensor = ? AND dim = ? AND state = 'committed' ORDER BY id",
                (tensor, dim),
            )
        sigs = None
        if rows:  # built outside the lock: matching on other tensors need not wait
            matrix = np.frombuffer(b"".join(r[2] for r in rows), dtype=registry_rows.VECTOR_DTYPE)
            matrix = matrix.reshape(len(rows), dim)
            try:
                sigs = SignatureSet.build(
                    [(r[0], Polarity(r[1]), matrix[i]) for i, r in enumerate(rows)]
                )
            except ValueError as exc:  # staging refuses such vectors: the file was altered
                raise StorageError(
                    f"registry {self._path}: signatures of {tensor!r}/{dim}: {exc}"
                ) from None
        with self._lock:
            # A signatures commit since the read would make this set stale: then use it for
            # this call only, and let the next call read again.
            if self._generation == generation and self._conn is not None:
                self._cache[key] = sigs
        return sigs

    def centroid_model(self, authority: str, tensor: str, dim: int) -> CentroidModel | None:
        """Formula v2's model of one authority's committed signatures for (tensor, dim), or
        None if they hold no positive sample (cached like :meth:`signature_set`)."""
        key = (authority, tensor, dim)
        with self._lock:
            if key in self._models:
                return self._models[key]
            generation = self._generation
            if self._conn is None:
                raise StorageError(f"registry {self._path}: closed")
            try:
                samples = registry_rows.samples(self._conn, authority, tensor, dim)
            except sqlite3.Error as exc:
                raise StorageError(f"registry {self._path}: {exc}") from None
        model = self._fit(samples, key)  # outside the lock, as signature_set builds
        with self._lock:
            if self._generation == generation and self._conn is not None:
                self._models[key] = model
        return model

    def _fit(self, samples: list[Sample], key: tuple[str, str, int]) -> CentroidModel | None:
        if not any(s.polarity is Polarity.POSITIVE for s in samples):
            return None
        try:
            return fit(samples)
        except ValueError as exc:  # staging refuses such rows: the file was altered
            raise StorageError(f"registry {self._path}: signatures of {key!r}: {exc}") from None

    def _recalibrate(
        self, conn: sqlite3.Connection, authority: str, tensor: str, dim: int, seq: int
    ) -> None:
        """Refit (authority, tensor, dim) inside a signatures commit and record the
        calibration it gives each capability: the registry's copy of what readings report."""
        model = self._fit(
            registry_rows.samples(conn, authority, tensor, dim), (authority, tensor, dim)
        )
        conn.execute(
            "DELETE FROM calibrations WHERE authority = ? AND tensor = ? AND dim = ?",
            (authority, tensor, dim),
        )
        if model is None:
            return
        conn.executemany(
            "INSERT INTO calibrations VALUES (?, ?, ?, ?, ?, ?, ?)",
            [
                (authority, tensor, dim, capability, threshold, model.digest.hex(), seq)
                for capability, threshold in sorted(model.calibration().items())
            ],
        )

    def calibrations(self, authority: str) -> list[Calibration]:
        """The authority's recorded calibrations, by tensor, dim and capability."""
        return [
            Calibration(*r)
            for r in self._query(
                "SELECT capability, tensor, dim, threshold, model_sha256, statement_seq"
                " FROM calibrations WHERE authority = ? ORDER BY tensor, dim, capability",
                (authority,),
            )
        ]

    def signature_counts(self, capability: str) -> dict[Polarity, int]:
        counts = dict.fromkeys(Polarity, 0)
        for polarity, n in self._query(
            "SELECT polarity, count(*) FROM signatures"
            " WHERE capability = ? AND state = 'committed' GROUP BY polarity",
            (capability,),
        ):
            counts[Polarity(polarity)] = n
        return counts

    def meters(self, authority: str) -> list[Meter]:
        return [
            Meter(*r)
            for r in self._query(
                "SELECT capability, authority, value, count, last_seq FROM meters"
                " WHERE authority = ? ORDER BY capability",
                (authority,),
            )
        ]

    def history(self, capability: str) -> list[Update]:
        """The committed updates of one capability, in log order."""
        return [
            Update(*r)
            for r in self._query(
                "SELECT id, batch, capability, authority, delta, session, activation_sha256,"
                " statement_seq FROM updates WHERE capability = ? AND state = 'committed'"
                " ORDER BY statement_seq, id",
                (capability,),
            )
        ]

    # --- instruction nonces ----------------------------------------------------------------

    def claim_nonce(self, nonce: bytes, authority: str, expires_unix: int, now: int) -> None:
        """Record an instruction's nonce, durably, before it is carried out; once only.

        Nonces past their expiry are pruned: their instructions are refused as expired before
        they reach here, so forgetting them cannot let one run twice.
        """
        if not nonce:
            raise ValueError("registry: empty nonce")
        registry_rows.text(authority, "authority")
        with self._tx() as conn:
            conn.execute("DELETE FROM instruction_nonces WHERE expires_unix < ?", (now,))
            try:
                conn.execute(
                    "INSERT INTO instruction_nonces VALUES (?, ?, ?)",
                    (nonce.hex(), authority, expires_unix),
                )
            except sqlite3.IntegrityError:
                raise InstructionReplayedError(
                    f"instruction: nonce {nonce.hex()} was already carried out"
                ) from None

    # --- group commit and open sessions (daemon/metering.py) ---------------------------------

    def stage_group(
        self,
        signatures: Sequence[tuple[str, SignatureRow]],
        updates: Sequence[tuple[str, str, Mapping[str, int]]],
        files: Sequence[FileProgress],
    ) -> tuple[str, ...]:
        """Stage one group of files in ONE transaction: its signature rows ((session,
        row)), meter deltas ((session, activation sha256, deltas)) and files' progress.

        Returns the pending batch ids (a signatures batch, an update batch, either absent
        when empty), to be named by one statement and committed by :meth:`commit_group`.
        With no batch at all the files' rows are committed at once (nothing for a
        statement to report). Ownership is checked as by the one-batch methods.
        """
        prepared = [
            (registry_rows.hex_field(session, "session"), registry_rows.prepare_signature(row))
            for session, row in signatures
        ]
        owners: dict[str, str] = {}
        for _, row in signatures:
            if owners.setdefault(row.capability, row.authority) != row.authority:
                raise NotOwnerError(
                    f"registry: capability {row.capability!r} named for two authorities"
                )
        for session, activation_sha256, deltas in updates:
            registry_rows.hex_field(session, "session")
            registry_rows.hex_field(
                activation_sha256, "activation_sha256", registry_rows.SHA256_HEX
            )
            for capability, delta in deltas.items():
                registry_rows.text(capability, "capability")
                if type(delta) is not int or delta < 0:
                    raise ValueError(f"registry: delta for {capability!r} must be an int >= 0")
        batches: list[str] = []
        with self._tx() as conn:
            if prepared:
                for capability, authority in owners.items():
                    owner = registry_rows.owner(conn, capability, pending=True)
                    if owner is not None and owner != authority:
                        raise NotOwnerError(
                            f"registry: capability {capability!r} belongs to {owner!r}, "
                            f"not {authority!r}"
                        )
                batch = secrets.token_hex(16)
                conn.execute(
                    "INSERT INTO batches VALUES (?, 'signatures', 'pending', NULL)", (batch,)
                )
                conn.executemany(
                    "INSERT INTO signatures (batch, capability, authority, polarity, tensor,"
                    " dim, vector, windows, session, statement_seq, state)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, NULL, 'pending')",
                    [(batch, *fields, session) for session, fields in prepared],
                )
                batches.append(batch)
            rows = self._update_rows(conn, updates)
            if rows:
                batch = secrets.token_hex(16)
                conn.execute("INSERT INTO batches VALUES (?, 'update', 'pending', NULL)", (batch,))
                conn.executemany(
                    "INSERT INTO updates (batch, capability, authority, delta, session,"
                    " activation_sha256, statement_seq, state)"
                    " VALUES (?, ?, ?, ?, ?, ?, NULL, 'pending')",
                    [(batch, *row) for row in rows],
                )
                batches.append(batch)
            conn.executemany(
                "INSERT INTO metering_files VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        registry_rows.hex_field(f.session, "session"),
                        f.seq,
                        registry_rows.hex_field(
                            f.activation_sha256, "activation_sha256", registry_rows.SHA256_HEX
                        ),
                        f.bytes,
                        f.signatures_written,
                        f.meter_updates,
                        batches[0] if batches else None,
                    )
                    for f in files
                ],
            )
        return tuple(batches)

    def _update_rows(
        self, conn: sqlite3.Connection, updates: Sequence[tuple[str, str, Mapping[str, int]]]
    ) -> list[tuple[str, str, int, str, str]]:
        """(capability, owner, delta, session, activation) rows; one owner lookup per
        capability, not per row."""
        rows = []
        owner_of: dict[str, str | None] = {}
        for session, activation_sha256, deltas in updates:
            for capability, delta in sorted(deltas.items()):
                if capability not in owner_of:
                    owner_of[capability] = registry_rows.owner(conn, capability, pending=False)
                owner = owner_of[capability]
                if owner is None:
                    raise StorageError(
                        f"registry {self._path}: capability {capability!r} has no signatures"
                    )
                rows.append((capability, owner, delta, session, activation_sha256))
        return rows

    def commit_group(self, batches: Sequence[str], statement_seq: int) -> None:
        """:meth:`commit` for a group's batches, all in ONE transaction, not fsync'd.

        The statement naming them is in the log (fsync'd) and their pending rows are
        durable, so a commit lost to a power cut is redone by :meth:`recover` from the log;
        the WAL keeps transactions in order, so a later fsync'd one makes this one durable
        too. That saves one fsync per group on the path to "committed".
        """
        if type(statement_seq) is not int or statement_seq < 0:
            raise ValueError("registry: statement_seq must be an int >= 0")
        with self._lock:
            conn = self._conn
            if conn is None:
                raise StorageError(f"registry {self._path}: closed")
            try:
                conn.execute("PRAGMA synchronous=NORMAL")
                try:
                    conn.execute("BEGIN IMMEDIATE")
                    try:
                        for batch in batches:
                            self._commit_in(conn, batch, statement_seq)
                    except BaseException:
                        conn.execute("ROLLBACK")
                        raise
                    conn.execute("COMMIT")
                finally:
                    conn.execute("PRAGMA synchronous=FULL")
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise StorageError(f"registry {self._path}: {exc}") from None

    def save_session(self, session: str, instructions: Sequence[bytes], refused: int) -> None:
        """Record a session's metering as it opens (its instructions' signed envelopes)."""
        registry_rows.hex_field(session, "session")
        with self._tx() as conn:
            conn.execute("INSERT INTO metering_sessions VALUES (?, ?)", (session, refused))
            conn.executemany(
                "INSERT INTO metering_instructions VALUES (?, ?, ?)",
                [(session, i, bytes(raw)) for i, raw in enumerate(instructions)],
            )

    def drop_session(self, session: str) -> None:
        """The session ended: forget its metering (meters and signatures stay)."""
        with self._tx() as conn:
            conn.execute("DELETE FROM metering_sessions WHERE session = ?", (session,))

    def open_sessions(self) -> list[SessionRecord]:
        """Every recorded session's metering (pending batches settled first: recover)."""
        with self._lock:
            sessions = self._query_locked("SELECT session, refused FROM metering_sessions")
            instructions = self._query_locked(
                "SELECT session, envelope FROM metering_instructions ORDER BY session, position"
            )
            files = self._query_locked(
                "SELECT session, seq, activation_sha256, bytes, signatures_written,"
                " meter_updates FROM metering_files ORDER BY session, seq"
            )
        return [
            SessionRecord(
                session,
                refused,
                tuple(bytes(raw) for s, raw in instructions if s == session),
                tuple(FileProgress(*row) for row in files if row[0] == session),
            )
            for session, refused in sessions
        ]
