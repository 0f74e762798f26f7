"""Metering in the daemon: instructions at session open, activation files, meters, readings.

Lifecycle of a session's metering:

1. **begin** (the session was sealed and its payload opened): the actions sealed under
   the payload's action key are opened; each authority's instruction is verified
   (:func:`~embassy.metering.instruction.verify_instruction`) and its nonce claimed in the
   registry (an instruction is carried out once). A refusal is an ``instruction-refused``
   statement; it aborts the session unless the user said ``unmetered_ok``. ``read``
   instructions are answered at once with encrypted ``meter-reading`` statements.
2. **handle** (the intake's worker thread, one file at a time): read the file strictly
   (``embassy.metering.activation``), check it belongs to an open session and comes next
   in its sequence, pool it, then per instruction: ``write`` stages signatures, ``update``
   scores against the registry and stages meter deltas; each batch is reported by a
   ``signature-write`` / ``meter-update`` statement and only then committed (the protocol
   in ``embassy.metering.registry``). A rejected file gets an ``activation-rejected``
   statement saying why. Every file is removed once handled.
3. **finish** (closing the session): the intake is drained, and the summary (counts and
   digests, never activations or meter values) goes into the unseal statement.

At start, :meth:`MeteringService.recover` settles batches a crash left pending against the
log: committed if their statement is there, dropped if not.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from embassy.config import Authority, Metering
from embassy.daemon.statement_log import StatementLog
from embassy.errors import (
    ActivationError,
    ActivationForeignError,
    ActivationOversizedError,
    ActivationSequenceError,
    BadPayloadError,
    EmbassyError,
    InstructionError,
    InstructionReplayedError,
    WireFormatError,
)
from embassy.log.entry import EntryType
from embassy.metering.actions import open_actions
from embassy.metering.activation import Activation, read_activation_file
from embassy.metering.instruction import AuthorityPolicy, Instruction, Op, verify_instruction
from embassy.metering.reading import Meter, Reading, reading_predicate
from embassy.metering.registry import Registry, SignatureRow
from embassy.metering.score import FORMULA, pool, score
from embassy.wire.dsse import parse_envelope
from embassy.wire.statement import (
    ACTIVATION_REJECTED_V1,
    INSTRUCTION_REFUSED_V1,
    METER_READING_V1,
    METER_UPDATE_V1,
    SIGNATURE_WRITE_V1,
    Subject,
    parse_statement,
)

_LOG = logging.getLogger(__name__)
MAX_NAME_IN_STATEMENT = 200


@dataclass
class _SessionMeter:
    """What one open session's metering has done so far (guarded by the service's lock)."""

    session: bytes
    instructions: tuple[Instruction, ...] = ()
    refused: int = 0
    next_seq: int = 0
    files: int = 0
    rejected: int = 0
    bytes: int = 0
    signatures_written: int = 0
    meter_updates: int = 0
    digest: Any = field(default_factory=hashlib.sha256)

    def summary(self) -> dict[str, Any]:
        return {
            "formula": FORMULA,
            "instructions": [
                {"op": i.op.value, "authority": i.authority, "sha256": i.digest.hex()}
                for i in self.instructions
            ],
            "instructions_refused": self.refused,
            "files": self.files,
            "bytes": self.bytes,
            "rejected": self.rejected,
            "activations_sha256": self.digest.hexdigest(),
            "signatures_written": self.signatures_written,
            "meter_updates": self.meter_updates,
        }


def authority_policies(authorities: Sequence[Authority]) -> dict[str, AuthorityPolicy]:
    return {
        a.name: AuthorityPolicy(
            a.name, Ed25519PublicKey.from_public_bytes(a.ed25519), frozenset(a.capabilities)
        )
        for a in authorities
    }


def _printable(name: str) -> str:
    """A workload-chosen file name, safe to put in canonical JSON."""
    return name.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")[
        :MAX_NAME_IN_STATEMENT
    ]


class MeteringService:
    def __init__(
        self,
        *,
        registry: Registry,
        log: StatementLog,
        authorities: Sequence[Authority],
        own_keyid: str,
        limits: Metering,
        now: Callable[[], float] = time.time,
    ) -> None:
        self._registry = registry
        self._log = log
        self._policies = authority_policies(authorities)
        self._own_keyid = own_keyid
        self._limits = limits
        self._now = now
        self._lock = threading.RLock()
        self._sessions: dict[bytes, _SessionMeter] = {}

    # -- start ------------------------------------------------------------------------------

    def recover(self) -> dict[str, list[str]]:
        """Settle batches a crash left pending: the log decides."""
        pending = set(self._registry.pending_batches())
        found: dict[str, int] = {}
        if pending:
            for entry in self._log.entries:
                if entry.type is not EntryType.STATEMENT:
                    continue
                statement = parse_statement(parse_envelope(entry.data).payload)
                if statement.predicate_type in (SIGNATURE_WRITE_V1, METER_UPDATE_V1):
                    batch = statement.body.get("batch")
                    if isinstance(batch, str) and batch in pending:
                        found[batch] = entry.seq
        result = self._registry.recover(found)
        if result.committed or result.discarded:
            _LOG.warning(
                "metering recovered: %d batch(es) committed from the log, %d never logged "
                "and dropped",
                len(result.committed),
                len(result.discarded),
            )
        return {"committed": list(result.committed), "discarded": list(result.discarded)}

    # -- session open -----------------------------------------------------------------------

    def begin(
        self,
        session: bytes,
        *,
        payload_id: bytes | None = None,
        action_key: bytes | None = None,
        actions: bytes | None = None,
    ) -> list[bytes]:
        """Start metering a session; return the meter-reading statements it asked for.

        Raises (and the caller aborts the session) when the actions do not open, or an
        instruction is refused and the user did not accept running unmetered.
        """
        state = _SessionMeter(session)
        if (action_key is None) != (actions is None):
            raise BadPayloadError(
                "the payload has an action key but the request carries no actions (a relay "
                "dropped them)"
                if actions is None
                else "the request carries actions but the payload has no action key"
            )
        readings: list[bytes] = []
        if action_key is not None and actions is not None and payload_id is not None:
            opened = open_actions(action_key, payload_id, actions)
            accepted = []
            for raw in opened.instructions:
                try:
                    accepted.append(self._accept(raw))
                except (InstructionError, InstructionReplayedError, WireFormatError) as exc:
                    state.refused += 1
                    self._refused(session, raw, exc, continues=opened.unmetered_ok)
                    if not opened.unmetered_ok:
                        raise
            state.instructions = tuple(accepted)
            readings = [self._read(i) for i in accepted if i.op is Op.READ]
        with self._lock:
            self._sessions[session] = state
        return readings

    def _accept(self, raw: bytes) -> Instruction:
        now = int(self._now())
        instruction = verify_instruction(raw, self._policies, own_keyid=self._own_keyid, now=now)
        self._registry.claim_nonce(
            instruction.nonce, instruction.authority, instruction.expires_unix, now
        )
        return instruction

    def _refused(self, session: bytes, raw: bytes, exc: EmbassyError, *, continues: bool) -> None:
        self._log.append_statement(
            INSTRUCTION_REFUSED_V1,
            [Subject("instruction", hashlib.sha256(raw).digest())],
            {
                "session": session.hex(),
                "code": exc.code,
                "message": exc.message,
                "session_continues_unmetered": continues,
            },
        )
        _LOG.warning("instruction refused (%s): %s", exc.code, exc.message)

    def _read(self, instruction: Instruction) -> bytes:
        policy = self._policies[instruction.authority]
        wanted = instruction.capabilities or tuple(sorted(policy.capabilities))
        stored = {m.capability: m for m in self._registry.meters(instruction.authority)}
        meters = []
        for capability in wanted:
            m = stored.get(capability)
            meters.append(
                Meter(capability, 0, 0, None)
                if m is None
                else Meter(capability, m.value, m.count, m.last_seq)
            )
        head = self._log.head
        reading = Reading(
            instruction.authority,
            instruction.digest,
            FORMULA,
            -1 if head is None else head.seq,
            tuple(meters),
        )
        assert instruction.reply_key is not None  # parse_instruction ensures it for read
        subjects, body = reading_predicate(reading, instruction.reply_key, self._own_keyid)
        return self._log.append_statement(METER_READING_V1, subjects, body).envelope

    # -- activation files -------------------------------------------------------------------

    def handle(self, path: Path) -> None:
        """Handle one activation file and remove it; never raises for what the file holds."""
        activation: Activation | None = None
        try:
            activation = read_activation_file(path, max_bytes=self._limits.max_activation_bytes)
            with self._lock:
                self._apply(activation)
        except ActivationError as exc:
            self._reject(path.name, activation, exc)
        except FileNotFoundError:
            return  # handled already (a drain and an event for the same file)
        except OSError as exc:
            # Not the file's content: the embassy could not read it. Reject it all the same
            # (a workload must not be able to stall the intake), saying why.
            reason = ActivationForeignError(f"activation: cannot be read: {exc.strerror}")
            self._reject(path.name, activation, reason)
        finally:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                _LOG.error("activation intake: cannot remove %s: %s", path.name, exc.strerror)

    def _session_for(self, activation: Activation) -> _SessionMeter:
        state = self._sessions.get(activation.session)
        if state is None:
            raise ActivationForeignError(
                f"activation: session {activation.session.hex()} is not open here"
            )
        if activation.seq != state.next_seq:
            raise ActivationSequenceError(
                f"activation: sequence number {activation.seq}, expected {state.next_seq}"
            )
        if state.files >= self._limits.max_files_per_session:
            raise ActivationOversizedError(
                f"activation: session already handed in {state.files} files (the limit)"
            )
        return state

    def _apply(self, activation: Activation) -> None:
        state = self._session_for(activation)
        pooled = pool(activation.data)
        state.next_seq += 1
        state.files += 1
        state.bytes += activation.data.nbytes
        state.digest.update(activation.sha256)
        for instruction in state.instructions:
            if instruction.op is Op.WRITE:
                self._write(state, instruction, activation, pooled)
        capabilities = sorted(
            {c for i in state.instructions if i.op is Op.UPDATE for c in i.capabilities}
        )
        if capabilities:
            self._update(state, capabilities, activation, pooled)

    def _write(
        self, state: _SessionMeter, instruction: Instruction, activation: Activation, pooled: Any
    ) -> None:
        assert instruction.polarity is not None  # parse_instruction ensures it for write
        capability = instruction.capabilities[0]
        row = SignatureRow(
            capability, instruction.authority, instruction.polarity, activation.tensor, pooled
        )
        batch = self._registry.stage_signatures([row], session=state.session.hex())
        appended = self._log.append_statement(
            SIGNATURE_WRITE_V1,
            [Subject("activation", activation.sha256)],
            {
                "session": state.session.hex(),
                "batch": batch,
                "authority": instruction.authority,
                "capability": capability,
                "polarity": instruction.polarity.value,
                "tensor": activation.tensor,
                "dim": int(pooled.shape[0]),
                "instruction_sha256": instruction.digest.hex(),
            },
        )
        self._registry.commit(batch, appended.entry.seq)
        state.signatures_written += 1

    def _update(
        self,
        state: _SessionMeter,
        capabilities: Sequence[str],
        activation: Activation,
        pooled: Any,
    ) -> None:
        signatures = self._registry.signature_set(activation.tensor, int(pooled.shape[0]))
        scores: Mapping[str, int] = {} if signatures is None else score(signatures, pooled)
        deltas = {c: scores[c] for c in capabilities if c in scores}
        if not deltas:
            return  # no signature of these capabilities for this tensor: nothing to meter
        batch = self._registry.stage_update(state.session.hex(), activation.sha256.hex(), deltas)
        appended = self._log.append_statement(
            METER_UPDATE_V1,
            [Subject("activation", activation.sha256)],
            {
                "session": state.session.hex(),
                "batch": batch,
                "formula": FORMULA,
                "tensor": activation.tensor,
                "capabilities": sorted(deltas),
            },
        )
        self._registry.commit(batch, appended.entry.seq)
        state.meter_updates += 1

    def _reject(self, name: str, activation: Activation | None, exc: ActivationError) -> None:
        session = None if activation is None else activation.session
        with self._lock:
            state = None if session is None else self._sessions.get(session)
            if state is not None:
                state.rejected += 1
            self._log.append_statement(
                ACTIVATION_REJECTED_V1,
                [] if activation is None else [Subject("activation", activation.sha256)],
                {
                    "session": None if session is None else session.hex(),
                    "file": _printable(name),
                    "code": exc.code,
                    "message": exc.message,
                },
            )
        _LOG.warning("activation %s rejected (%s): %s", _printable(name), exc.code, exc.message)

    # -- session close ----------------------------------------------------------------------

    def finish(self, session: bytes, drain: Callable[[], int]) -> dict[str, Any] | None:
        """Handle what the workload left for this session, then end its metering."""
        drain()
        with self._lock:
            state = self._sessions.pop(session, None)
        return None if state is None else state.summary()

    def forget(self, session: bytes) -> None:
        """The session ended otherwise (aborted): later files for it are foreign."""
        with self._lock:
            self._sessions.pop(session, None)

    def meters(self, authority: str) -> Mapping[str, int]:
        return {m.capability: m.value for m in self._registry.meters(authority)}
