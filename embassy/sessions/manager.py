"""Open and close sessions; release a key only in the locked step that checks the seal.

The signed statement log is the one record of sessions: a seal statement opens a session,
an unseal or abort statement ends it. Nothing else is kept durably, so nothing can
disagree with the log after a crash.

open     (the payload is parsed, unwrapped and checked against replays before this: a bad
         one never costs a seal)
         lock → close the gate (link down, sealed layer-3 table in) → claim the payload →
         seal statement (fsync'd, PCR-extended) → wait for the gate (a fallback flip runs on
         the netns worker meanwhile), check it in the kernel → release the key → unlock
close    (activation files are drained before, outside the lock)
         lock → token (constant time) → deadline → unseal statement → open the gate if
         this was the last open session → unlock; the answer waits for the gate
         (:meth:`SessionManager.settle_gate`: a fallback flip may still be on the worker).
         A retried close of a session whose unseal statement exists returns that statement.
abort    lock → abort statement → start opening the gate if last (not while quarantined)

Every statement of a session is made with the gate closed: closed before the seal
statement, opened only after the unseal or abort statement. So the log's window from a
session's seal to its end is sealed throughout, and a crash anywhere in it leaves the
workload sealed (fail closed) until the restart reads the log.
restart  open sessions = seal statements with no unseal or abort; the gate is closed if
         there is any, sessions past their deadline are aborted, and the gate opened only
         if none remain.

The reaper and the key release take the same lock, so a session can never be aborted (and
its workload unsealed) between the check and the release. Tokens are HMAC-SHA256 of the
session id under a key derived from the TPM-sealed master secret: nothing to store, the
same after a restart, compared in constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
import signal
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from embassy.errors import ConflictError, ForbiddenError, NotFoundError, RequestError, SealError
from embassy.log.entry import EntryType, LogEntry
from embassy.seal.proof import SealProof
from embassy.wire.dsse import parse_envelope
from embassy.wire.statement import (
    LIFECYCLE_V1,
    SEAL_V1,
    SEAL_V2,
    SESSION_ABORT_V1,
    SESSION_ABORT_V2,
    UNSEAL_V1,
    UNSEAL_V2,
    Subject,
    parse_statement,
)

_LOG = logging.getLogger(__name__)
T = TypeVar("T")

#: A session lives at least this long: long enough that its key release can never race
#: the deadline reaper, and no workload can make the embassy flap the seal at will.
MIN_DEADLINE_SECONDS = 10
MAX_DEADLINE_SECONDS = 24 * 3600
_SEALS = (SEAL_V1, SEAL_V2)
_ENDS = (UNSEAL_V1, UNSEAL_V2, SESSION_ABORT_V1, SESSION_ABORT_V2)


class AppendedStatement(Protocol):
    @property
    def envelope(self) -> bytes: ...


class StatementLog(Protocol):
    """What the sessions need of the statement log
    (:class:`embassy.daemon.statement_log.StatementLog`): the sessions live below the daemon
    and do not import it."""

    @property
    def entries(self) -> Sequence[LogEntry]: ...
    def append_statement(
        self, predicate_type: str, subjects: Sequence[Subject], body: Mapping[str, Any]
    ) -> AppendedStatement: ...


class SessionMetrics(Protocol):
    """Where session events are counted (embassy.daemon.metrics.Metrics); no ids pass."""

    def session_opened(self, seconds: float) -> None: ...
    def session_closed(self, seconds: float) -> None: ...
    def session_aborted(self, reason: str) -> None: ...


class _NoMetrics:
    def session_opened(self, seconds: float) -> None:
        pass

    def session_closed(self, seconds: float) -> None:
        pass

    def session_aborted(self, reason: str) -> None:
        pass


class Seal(Protocol):
    """What the sessions need of the seal (:class:`embassy.seal.keeper.SealKeeper`)."""

    def close(self) -> SealProof: ...
    def open(self) -> str: ...
    @property
    def quarantined(self) -> bool: ...
    def settle(self) -> None: ...
    def check(self, proof: SealProof, *, settled: bool = True) -> None: ...
    def status(self) -> dict[str, Any]: ...


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    image_digest: str
    container_id: str
    launch_digest: bytes

    def to_json(self) -> dict[str, str]:
        return {
            "image_digest": self.image_digest,
            "container_id": self.container_id,
            "launch_digest": self.launch_digest.hex(),
        }


@dataclass(frozen=True, slots=True)
class OpenSession:
    session: bytes
    deadline: int
    seal_sha256: bytes
    proof: SealProof | None  # None: opened by an earlier daemon run (restored from the log)


@dataclass(frozen=True, slots=True)
class Opened(Generic[T]):
    session: bytes
    token: bytes
    envelope: bytes
    deadline: int
    released: T


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _statements(log: StatementLog) -> list[tuple[str, Mapping[str, Any], bytes]]:
    """(predicate type, body, envelope) of every session statement in the log."""
    out = []
    for entry in log.entries:
        if entry.type is not EntryType.STATEMENT:
            continue
        statement = parse_statement(parse_envelope(entry.data).payload)
        if statement.predicate_type in _SEALS or statement.predicate_type in _ENDS:
            out.append((statement.predicate_type, statement.body, entry.data))
    return out


def opened_payloads(log: StatementLog) -> list[tuple[bytes, bytes, int]]:
    """(payload id, session, wall time) of every seal statement in the log that names one:
    the payloads whose keys may have left (the replay store's durable witness)."""
    out = []
    for kind, body, _ in _statements(log):
        payload = body.get("payload_id") if kind in _SEALS else None
        if isinstance(payload, str):
            session = bytes.fromhex(str(body["session"]))
            out.append((bytes.fromhex(payload), session, int(body.get("wall_time_unix") or 0)))
    return out


class SessionManager:
    def __init__(
        self,
        *,
        log: StatementLog,
        seal: Seal,
        workload: WorkloadIdentity,
        token_key: bytes,
        failpoint: str | None = None,
        now: Callable[[], float] = time.time,
        on_abort: Callable[[bytes], None] = lambda session: None,
        metrics: SessionMetrics | None = None,
    ) -> None:
        if len(token_key) < 32:
            raise ValueError("the session token key must be at least 32 bytes")
        self._log = log
        self._seal = seal
        self._workload = workload
        self._token_key = token_key
        self._failpoint = failpoint
        self._now = now
        self._on_abort = on_abort
        self._metrics = _NoMetrics() if metrics is None else metrics
        self._lock = threading.Lock()
        self._open: dict[bytes, OpenSession] = {}

    # -- helpers ------------------------------------------------------------------------

    def _point(self, name: str) -> None:
        """Die here, as a kill -9 would, when the config's debug.failpoint names this point."""
        if self._failpoint == name:
            _LOG.warning("failpoint %s: killing the daemon", name)
            os.kill(os.getpid(), signal.SIGKILL)

    def _token(self, session: bytes) -> bytes:
        return hmac.new(self._token_key, b"embassy-session-token-v1\0" + session, "sha256").digest()

    def _subject(self, session: bytes) -> list[Subject]:
        return [Subject(f"session:{session.hex()}", _sha256(session))]

    def _open_gate_if_idle(self) -> str:
        if self._open:
            return "still-sealed"
        return self._seal.open()

    def _gate_after(self) -> str:
        """What an ending session's statement says the gate does next: stay closed for
        other sessions or a quarantine, or open (it starts opening right after)."""
        if self._open:
            return "still-sealed"
        return "quarantined" if self._seal.quarantined else "unsealed"

    # -- open -------------------------------------------------------------------------------

    def open(
        self,
        deadline_seconds: int,
        *,
        payload_id: bytes | None = None,
        claim: Callable[[bytes], None] | None = None,
        release: Callable[[bytes], T],
    ) -> Opened[T]:
        """Seal, state it, and run ``release(session)`` while the seal is checked in force.

        ``claim(session)`` runs before the statement (e.g. marking a payload as used);
        ``release(session)`` after the statement and the check of the seal in force, under
        the same lock: what it returns (a key) leaves only then. If the claim or the
        statement fails, the gate opens again (when no other session holds it); if the
        release fails, the session is aborted with a signed reason. Either way the error
        goes on.
        """
        if not MIN_DEADLINE_SECONDS <= deadline_seconds <= MAX_DEADLINE_SECONDS:
            raise RequestError(
                f"deadline_seconds must be {MIN_DEADLINE_SECONDS} to {MAX_DEADLINE_SECONDS}"
            )
        started = time.monotonic()
        with self._lock:
            # The gate closes (link down, then the sealed table; a fallback flip goes on on the
            # netns worker while the statement is written): nothing leaves before both are
            # checked in force.
            proof = self._seal.close()
            self._point("seal:before-statement")
            try:
                self._seal.check(proof, settled=False)  # quarantine, the very namespace
                session = secrets.token_bytes(16)
                if claim is not None:
                    claim(session)
                deadline = int(self._now()) + deadline_seconds
                appended = self._log.append_statement(
                    SEAL_V2,
                    self._subject(session),
                    {
                        "session": session.hex(),
                        "payload_id": None if payload_id is None else payload_id.hex(),
                        "workload": self._workload.to_json(),
                        "seal": proof.to_json(),
                        "deadline_unix": deadline,
                        "wall_time_unix": int(self._now()),
                    },
                )
            except BaseException:
                self._open_gate_if_idle()
                self._seal.settle()
                raise
            state = OpenSession(session, deadline, _sha256(appended.envelope), proof)
            self._open[session] = state
            try:
                # Right before anything leaves: the very namespace that was sealed is sealed
                # (link down in the kernel, both layers), nobody else is in it.
                self._seal.check(proof)
                self._point("seal:after-statement")
                released = release(session)
            except SealError as exc:
                self._abort_locked(state, "seal-not-in-force")
                raise SealError(
                    f"the seal was not in force at the key release: {exc.message}"
                ) from exc
            except BaseException as exc:
                code = getattr(exc, "code", "internal")
                self._abort_locked(state, f"refused:{code}")
                raise
            self._metrics.session_opened(time.monotonic() - started)
            return Opened(session, self._token(session), appended.envelope, deadline, released)

    # -- close ------------------------------------------------------------------------------

    def _check_token(self, session: bytes, token: bytes) -> None:
        if not hmac.compare_digest(self._token(session), token):
            raise ForbiddenError("this caller does not hold the session (wrong token)")

    def authenticate(self, session: bytes, token: bytes) -> bool:
        """Raise unless the caller holds this session; say whether it is still open (a
        closed one may be a retried close, which :meth:`close` answers)."""
        self._check_token(session, token)
        with self._lock:
            return session in self._open

    def close(
        self,
        session: bytes,
        token: bytes,
        output_sha256: bytes | None,
        metering: Mapping[str, Any] | None = None,
    ) -> bytes:
        """Close a session; unseal if it was the last; return the unseal statement.

        A retried close (the first one's answer was lost to a crash) returns the unseal
        statement that was made. A session past its deadline is aborted, not closed: its
        output cannot be certified.
        """
        self._check_token(session, token)
        started = time.monotonic()
        with self._lock:
            state = self._open.get(session)
            if state is None:
                return self._ended(session)
            if self._now() >= state.deadline:
                self._abort_locked(state, "deadline-passed")
                raise ConflictError(
                    f"session {session.hex()} passed its deadline before it was closed: "
                    "it was aborted and its output cannot be certified"
                )
            del self._open[session]
            appended = self._log.append_statement(
                UNSEAL_V2,
                self._subject(session),
                {
                    "session": session.hex(),
                    "seal_statement_sha256": state.seal_sha256.hex(),
                    "output_sha256": None if output_sha256 is None else output_sha256.hex(),
                    "workload": self._workload.to_json(),
                    "metering": None if metering is None else dict(metering),
                    "gate": self._gate_after(),
                    "wall_time_unix": int(self._now()),
                },
            )
            self._point("unseal:after-statement")
            # Stated, then opened. The caller settles (:meth:`settle_gate`) before it
            # answers, after what it can do meanwhile (the log segment's quote).
            self._open_gate_if_idle()
            self._metrics.session_closed(time.monotonic() - started)
            return appended.envelope

    def settle_gate(self) -> None:
        """Wait until the gate's last change is done, so that the workload's next bytes
        find the link as the log says (a reply sent into a link still down would wait for
        a TCP retransmission). A failed opening is logged, not raised: the session's end
        is stated, the gate stays closed or half-open (fail closed) and the monitor's next
        round repairs it."""
        try:
            self._seal.settle()
        except SealError as exc:
            _LOG.error("gate: opening after a session's end failed: %s", exc.message)

    def _ended(self, session: bytes) -> bytes:
        """The unseal statement of an ended session (a retried close), else why not."""
        for kind, body, envelope in reversed(_statements(self._log)):
            if body.get("session") != session.hex():
                continue
            if kind in (UNSEAL_V1, UNSEAL_V2):
                return bytes(envelope)
            if kind in (SESSION_ABORT_V1, SESSION_ABORT_V2):
                raise ConflictError(f"session {session.hex()} was aborted ({body.get('reason')})")
        raise NotFoundError(f"no session {session.hex()}")

    # -- abort ------------------------------------------------------------------------------

    def _abort_locked(self, state: OpenSession, reason: str) -> bytes:
        self._open.pop(state.session, None)
        appended = self._log.append_statement(
            SESSION_ABORT_V2,
            self._subject(state.session),
            {
                "session": state.session.hex(),
                "reason": reason,
                "seal_statement_sha256": state.seal_sha256.hex(),
                "workload": self._workload.to_json(),
                "gate": self._gate_after(),
                "wall_time_unix": int(self._now()),
            },
        )
        _LOG.warning("session %s aborted: %s", state.session.hex(), reason)
        self._metrics.session_aborted(reason)
        self._on_abort(state.session)
        self._open_gate_if_idle()
        return appended.envelope

    def abort_all(self, reason: str) -> int:
        """Abort every open session (an intrusion: nothing made now can be certified)."""
        with self._lock:
            states = list(self._open.values())
            for state in states:
                self._abort_locked(state, reason)
            return len(states)

    def abort_expired(self) -> int:
        """Abort every open session past its deadline; its output cannot be certified."""
        with self._lock:
            expired = [s for s in self._open.values() if s.deadline <= self._now()]
            for state in expired:
                self._abort_locked(state, "deadline-passed")
            return len(expired)

    # -- state and restart ------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"open_sessions": len(self._open), **self._seal.status()}

    @property
    def open_count(self) -> int:
        """Sessions open now; read without the lock (a scrape never waits for a seal)."""
        return len(self._open)

    def _open_in_log(self) -> dict[bytes, OpenSession]:
        found: dict[bytes, OpenSession] = {}
        for kind, body, envelope in _statements(self._log):
            session = bytes.fromhex(str(body["session"]))
            if kind in _SEALS:
                found[session] = OpenSession(
                    session, int(body["deadline_unix"]), _sha256(envelope), None
                )
            else:
                found.pop(session, None)
        return found

    def reconcile(self) -> dict[str, Any]:
        """After a start: close the gate if the log shows open sessions (fail closed), abort
        those whose deadline passed while the daemon was down, open it if none remain."""
        with self._lock:
            before = self._seal.status().get("gate")
            self._open = self._open_in_log()
            actions: list[str] = []
            if self._open:
                self._seal.close()
                actions.append("sealed")
                for state in [s for s in self._open.values() if s.deadline <= self._now()]:
                    self._abort_locked(state, "deadline-passed-while-down")
                    actions.append(f"aborted {state.session.hex()}")
            if not self._open:
                actions.append(self._seal.open())
            self._seal.settle()
            report: dict[str, Any] = {
                "event": "reconcile",
                "gate_before": before,
                "open_sessions": len(self._open),
                "actions": actions,
            }
            self._log.append_statement(LIFECYCLE_V1, [], report)
            return report
