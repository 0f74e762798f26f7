"""Open and close sessions: seal first, unseal last, and never lose a seal to a crash.

Order of effects (each step durable before the next):

open:   journal OPEN (token hash, deadline) → firewall.seal → seal statement → journal SEALED
close:  check the token → journal CLOSE → [last open session] firewall.unseal →
        journal UNSEALED → unseal statement
abort:  journal ABORT → [last open session] unseal → abort statement

A kill at any point leaves the journal at or ahead of the kernel on the sealing side: an
OPEN without SEALED is resealed then aborted on restart (its token never left the daemon),
and a CLOSE without UNSEALED is finished. :meth:`reconcile` also reads the signed log: a
seal statement with no unseal or abort is an open session even if the journal lost it.
Disagreements are reported (logged and stated), never silently trusted.
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embassy.daemon.logstore import AppendFile
from embassy.daemon.statement_log import StatementLog
from embassy.errors import ConflictError, ForbiddenError, NotFoundError, RequestError
from embassy.log.entry import EntryType
from embassy.seal.firewall import Firewall
from embassy.sessions.journal import Op, Phase, Record, SessionState, parse_record, replay
from embassy.wire.dsse import parse_envelope
from embassy.wire.statement import (
    LIFECYCLE_V1,
    SEAL_V1,
    SESSION_ABORT_V1,
    UNSEAL_V1,
    Subject,
    parse_statement,
)

_LOG = logging.getLogger(__name__)
MAX_DEADLINE_SECONDS = 24 * 3600


@dataclass(frozen=True, slots=True)
class WorkloadIdentity:
    image_digest: str
    container_id: str
    holder_id: str
    launch_digest: bytes

    def to_json(self) -> dict[str, str]:
        return {
            "image_digest": self.image_digest,
            "container_id": self.container_id,
            "holder_id": self.holder_id,
            "launch_digest": self.launch_digest.hex(),
        }


@dataclass(frozen=True, slots=True)
class Opened:
    session: bytes
    token: bytes
    envelope: bytes
    deadline: int


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


class SessionManager:
    def __init__(
        self,
        *,
        journal_path: Path,
        firewall: Firewall,
        netns: Callable[[], Path],
        log: StatementLog,
        workload: WorkloadIdentity,
        failpoint: str | None = None,
        now: Callable[[], float] = time.time,
        on_abort: Callable[[bytes], None] = lambda session: None,
    ) -> None:
        self._journal = AppendFile(journal_path, parse_record)
        self._firewall = firewall
        self._netns = netns
        self._log = log
        self._workload = workload
        self._failpoint = failpoint
        self._now = now
        self._on_abort = on_abort
        self._lock = threading.Lock()
        self._rules_sha256: bytes | None = None

    # -- helpers --------------------------------------------------------------------------

    def _point(self, name: str) -> None:
        """Die here, as a kill -9 would, when the config's debug.failpoint names this point."""
        if self._failpoint == name:
            _LOG.warning("failpoint %s: killing the daemon", name)
            os.kill(os.getpid(), signal.SIGKILL)

    def _record(self, record: Record) -> None:
        self._journal.append(record, record.encode())

    def _states(self) -> dict[bytes, SessionState]:
        return replay(self._journal.records)

    def _open_sessions(self) -> list[SessionState]:
        return [s for s in self._states().values() if s.is_open]

    def _seal(self) -> bytes:
        digest = bytes.fromhex(self._firewall.seal(self._netns()).digest)
        self._rules_sha256 = digest
        return digest

    def _unseal_if_last(self) -> str:
        if self._open_sessions():
            return "still-sealed"
        self._firewall.unseal(self._netns())
        self._point("unseal:after-rules")
        self._record(Record(Op.UNSEALED))
        return "unsealed"

    def _subject(self, session: bytes) -> list[Subject]:
        return [Subject(f"session:{session.hex()}", _sha256(session))]

    # -- API --------------------------------------------------------------------------------

    def open(self, deadline_seconds: int, payload_id: bytes | None = None) -> Opened:
        if not 1 <= deadline_seconds <= MAX_DEADLINE_SECONDS:
            raise RequestError(f"deadline_seconds must be 1 to {MAX_DEADLINE_SECONDS}")
        with self._lock:
            session, token = secrets.token_bytes(16), secrets.token_bytes(32)
            deadline = int(self._now()) + deadline_seconds
            self._record(Record(Op.OPEN, session, token_sha256=_sha256(token), deadline=deadline))
            self._point("seal:after-intent")
            rules = self._seal()
            self._point("seal:after-rules")
            appended = self._log.append_statement(
                SEAL_V1,
                self._subject(session),
                {
                    "session": session.hex(),
                    "payload_id": None if payload_id is None else payload_id.hex(),
                    "workload": self._workload.to_json(),
                    "seal": {"rules_sha256": rules.hex(), "backend": "iptables-legacy-netns"},
                    "deadline_unix": deadline,
                    "wall_time_unix": int(self._now()),
                },
            )
            self._point("seal:after-statement")
            self._record(
                Record(
                    Op.SEALED, session, rules_sha256=rules,
                    statement_sha256=_sha256(appended.envelope),
                )
            )  # fmt: skip
            return Opened(session, token, appended.envelope, deadline)

    def _holder(self, session: bytes, token: bytes) -> SessionState:
        state = self._states().get(session)
        if state is None:
            raise NotFoundError(f"no session {session.hex()}")
        # Constant time: the token is a bearer secret.
        if not hmac.compare_digest(_sha256(token), state.token_sha256):
            raise ForbiddenError("this caller does not hold the session (wrong token)")
        if not state.is_open:
            raise ConflictError(f"session {session.hex()} is already {state.phase.value}")
        return state

    def authenticate(self, session: bytes, token: bytes) -> None:
        """Raise unless the caller holds this open session (checked again by close)."""
        with self._lock:
            self._holder(session, token)

    def close(
        self,
        session: bytes,
        token: bytes,
        output_sha256: bytes | None,
        metering: Mapping[str, Any] | None = None,
    ) -> bytes:
        """Close a session; unseal if it was the last open one; return the unseal statement.

        ``metering`` is what was metered during the session (counts and digests), or None
        when this daemon run did not meter it.
        """
        with self._lock:
            state = self._holder(session, token)
            if state.phase is not Phase.SEALED:
                raise ConflictError("the session was never sealed")
            self._record(Record(Op.CLOSE, session))
            self._point("unseal:after-intent")
            firewall = self._unseal_if_last()
            appended = self._log.append_statement(
                UNSEAL_V1,
                self._subject(session),
                {
                    "session": session.hex(),
                    "seal_statement_sha256": (state.seal_statement_sha256 or b"").hex(),
                    "output_sha256": None if output_sha256 is None else output_sha256.hex(),
                    "workload": self._workload.to_json(),
                    "metering": None if metering is None else dict(metering),
                    "firewall": firewall,
                    "wall_time_unix": int(self._now()),
                },
            )
            self._point("unseal:after-statement")
            return appended.envelope

    def _abort_locked(self, state: SessionState, reason: str, *, record: bool = True) -> bytes:
        if record:
            self._record(Record(Op.ABORT, state.session, reason=reason))
        firewall = self._unseal_if_last()
        appended = self._log.append_statement(
            SESSION_ABORT_V1,
            self._subject(state.session),
            {
                "session": state.session.hex(),
                "reason": reason,
                "seal_statement_sha256": (
                    None if state.seal_statement_sha256 is None
                    else state.seal_statement_sha256.hex()
                ),
                "workload": self._workload.to_json(),
                "firewall": firewall,
                "wall_time_unix": int(self._now()),
            },
        )  # fmt: skip
        _LOG.warning("session %s aborted: %s", state.session.hex(), reason)
        self._on_abort(state.session)
        return appended.envelope

    def abort(self, session: bytes, reason: str) -> bytes:
        """Abort an open session from inside the embassy (e.g. its payload did not open)."""
        with self._lock:
            state = self._states().get(session)
            if state is None or not state.is_open:
                raise ConflictError(f"session {session.hex()} is not open")
            return self._abort_locked(state, reason)

    def abort_expired(self) -> int:
        """Abort every open session past its deadline; its output cannot be certified."""
        with self._lock:
            expired = [s for s in self._open_sessions() if s.deadline <= self._now()]
            for state in expired:
                self._abort_locked(state, "deadline passed")
            return len(expired)

    def reseal_if_open(self, reason: str) -> bool:
        """Seal again if any session is open (a new network namespace appeared)."""
        with self._lock:
            if not self._open_sessions():
                return False
            before = self._firewall.state(self._netns()).value
            self._seal()
            self._log.append_statement(
                LIFECYCLE_V1, [], {"event": "reseal", "reason": reason, "kernel_before": before}
            )
            return True

    def status(self) -> dict[str, Any]:
        with self._lock:
            open_sessions = self._open_sessions()
            return {
                "open_sessions": len(open_sessions),
                "kernel": self._firewall.state(self._netns()).value,
                "rules_sha256": None if self._rules_sha256 is None else self._rules_sha256.hex(),
            }

    # -- restart --------------------------------------------------------------------------

    def _sessions_open_in_log(self) -> dict[bytes, tuple[bytes, int]]:
        """Sessions the signed log shows sealed and never unsealed or aborted:
        session -> (SHA-256 of the seal statement, its signed deadline)."""
        open_: dict[bytes, tuple[bytes, int]] = {}
        for entry in self._log.entries:
            if entry.type is not EntryType.STATEMENT:
                continue
            statement = parse_statement(parse_envelope(entry.data).payload)
            if statement.predicate_type not in (SEAL_V1, UNSEAL_V1, SESSION_ABORT_V1):
                continue
            session = bytes.fromhex(str(statement.body["session"]))
            if statement.predicate_type == SEAL_V1:
                open_[session] = (_sha256(entry.data), int(statement.body["deadline_unix"]))
            else:
                open_.pop(session, None)
        return open_

    def _settle_log(self, problems: list[str], actions: list[str]) -> None:
        """Make the journal agree with the signed log's open sessions."""
        states = self._states()
        for sid, (statement_sha256, deadline) in sorted(self._sessions_open_in_log().items()):
            state = states.get(sid)
            if state is not None and state.is_open:
                continue
            if state is not None:
                # Closed or aborted in the journal, but the crash came before its statement:
                # end it in the signed log too.
                self._abort_locked(state, "ended before its statement was issued", record=False)
                actions.append(f"ended {sid.hex()}")
                continue
            # The journal lost a session the signed log shows sealed. Nobody can close it
            # (its token hash is gone) but it stays sealed until its signed deadline.
            problems.append(f"journal lost open session {sid.hex()}: restored from the log")
            self._record(Record(Op.OPEN, sid, token_sha256=bytes(32), deadline=deadline))
            self._record(Record(Op.SEALED, sid, statement_sha256=statement_sha256))

    def _settle_open(self, actions: list[str]) -> None:
        """Abort sessions a crash caught half-open, or whose deadline passed meanwhile."""
        for state in self._open_sessions():
            if state.phase is Phase.OPENING:
                # Its seal statement and token never left the daemon.
                self._abort_locked(state, "interrupted while opening")
            elif state.deadline <= self._now():
                self._abort_locked(state, "deadline passed while the daemon was down")
            else:
                continue
            actions.append(f"aborted {state.session.hex()}")

    def reconcile(self) -> dict[str, Any]:
        """Bring the kernel to at least what the open sessions need; report disagreements.

        Seals first (fail closed), then settles sessions a crash left half-done.
        """
        with self._lock:
            kernel = self._firewall.state(self._netns()).value
            problems: list[str] = []
            actions: list[str] = []
            self._settle_log(problems, actions)
            if self._open_sessions():
                self._seal()
                actions.append("sealed")
                if kernel != "sealed":
                    problems.append(f"kernel was {kernel} while sessions were open: resealed")
            self._settle_open(actions)
            if not self._open_sessions():
                current = self._firewall.state(self._netns()).value
                if current != "unsealed":
                    last = self._journal.records[-1].op if self._journal.records else None
                    if last is Op.UNSEALED or last is None:
                        problems.append(f"kernel was {current} but the journal says unsealed")
                    self._firewall.unseal(self._netns())
                    self._record(Record(Op.UNSEALED))
                    actions.append("unsealed")
            for problem in problems:
                _LOG.warning("reconcile: %s", problem)
            report: dict[str, Any] = {
                "event": "reconcile",
                "kernel_before": kernel,
                "open_sessions": len(self._open_sessions()),
                "actions": actions,
                "problems": problems,
            }
            if problems or actions:
                self._log.append_statement(LIFECYCLE_V1, [], report)
            return report

    def close_journal(self) -> None:
        self._journal.close()
