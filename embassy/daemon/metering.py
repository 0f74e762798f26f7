"""Metering in the daemon: instructions at session open, activation files, meters, readings.

Lifecycle of a session's metering:

1. **begin** (the session was sealed and its payload opened): the actions sealed under
   the payload's action key are opened; each authority's instruction is verified
   (:func:`~embassy.metering.instruction.verify_instruction`) and its nonce claimed in the
   registry (an instruction is carried out once). The refusals of one session open are
   one ``instruction-refused`` statement (codes and digests); a refusal aborts the session
   unless the user said ``unmetered_ok``. ``read`` instructions are answered at once with
   encrypted ``meter-reading`` statements.
2. **handle** (the intake's worker thread, one file at a time): a file named for a session
   that is not open is refused unread; otherwise it is read strictly
   (``embassy.metering.activation``), checked against its name and its session's sequence,
   pooled, then per instruction: ``write`` stages signatures, ``update`` scores against
   the registry and stages meter deltas; each batch is reported by a ``signature-write`` /
   ``meter-update`` statement and only then committed (the protocol in
   ``embassy.metering.registry``). Every file is removed once handled, valid or not.
   Rejections are counted, not stated one by one: ``activation-rejected`` statements are
   coalesced summaries (``embassy.metering.rejections``), at most one a second and 60 per
   session, plus a last one when it ends.
3. **finish** (closing the session): the intake is drained (within
   ``metering.drain_timeout_seconds``), the session's last rejection summary is stated, and
   its summary (counts and digests, never activations or meter values) goes into the
   unseal statement.

Nothing the workload chose leaves in its own bytes (DESIGN.md): statements and logs carry
codes (``EmbassyError.code``), lengths, counts, and SHA-256 digests: of the activation
(its checksum), of the tensor name, of a file's name (debug logs only, truncated). Error
*messages* of what the workload wrote (they may quote it) are never emitted.

At start, :meth:`MeteringService.recover` settles batches a crash left pending against the
log: committed if their statement is there, dropped if not.
"""

from __future__ import annotations

import hashlib
import logging
import os
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
    ActivationCorruptError,
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
from embassy.metering.activation import Activation, parse_file_name, read_activation_file
from embassy.metering.instruction import AuthorityPolicy, Instruction, Op, verify_instruction
from embassy.metering.reading import Meter, Reading, reading_predicate
from embassy.metering.registry import Registry, SignatureRow
from embassy.metering.rejections import RejectionLedger
from embassy.metering.score import FORMULA, pool, score
from embassy.wire.dsse import parse_envelope
from embassy.wire.statement import (
    ACTIVATION_REJECTED_V2,
    INSTRUCTION_REFUSED_V2,
    METER_READING_V1,
    METER_UPDATE_V1,
    METER_UPDATE_V2,
    SIGNATURE_WRITE_V1,
    SIGNATURE_WRITE_V2,
    Subject,
    parse_statement,
)

_LOG = logging.getLogger(__name__)
FOREIGN = ActivationForeignError.code


def name_digest(name: str) -> str:
    """A file name for a debug log: the first 16 hex digits of its SHA-256, never itself."""
    return hashlib.sha256(os.fsencode(name)).hexdigest()[:16]


def tensor_digest(tensor: str) -> str:
    """The tensor name as statements carry it: its SHA-256 (hex). The name is the
    workload's choice (128 characters a file, which would be a channel); an authority
    recomputes the digest of the names it cares about."""
    return hashlib.sha256(tensor.encode("ascii")).hexdigest()


@dataclass
class _SessionMeter:
    """What one open session's metering has done so far (guarded by the service's lock)."""

    session: bytes
    instructions: tuple[Instruction, ...] = ()
    refused: int = 0
    next_seq: int = 0
    files: int = 0
    bytes: int = 0
    unattributed: int = 0  # junk removed while open that no session could be charged with
    signatures_written: int = 0
    meter_updates: int = 0
    digest: Any = field(default_factory=hashlib.sha256)

    def summary(
        self, rejected: Mapping[str, int], rejected_bytes: int, files_left: int
    ) -> dict[str, Any]:
        return {
            "formula": FORMULA,
            "instructions": [
                {"op": i.op.value, "authority": i.authority, "sha256": i.digest.hex()}
                for i in self.instructions
            ],
            "instructions_refused": self.refused,
            "files": self.files,
            "bytes": self.bytes,
            "rejected": sum(rejected.values()),
            "rejected_by_code": dict(rejected),
            "rejected_bytes": rejected_bytes,
            "unattributed": self.unattributed,
            "files_left": files_left,
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
        self._rejections = RejectionLedger()

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
                if statement.predicate_type in (
                    SIGNATURE_WRITE_V1,
                    METER_UPDATE_V1,
                    SIGNATURE_WRITE_V2,
                    METER_UPDATE_V2,
                ):
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
            refusals: list[tuple[bytes, EmbassyError]] = []
            for raw in opened.instructions:
                try:
                    accepted.append(self._accept(raw))
                except (InstructionError, InstructionReplayedError, WireFormatError) as exc:
                    refusals.append((raw, exc))
                    if not opened.unmetered_ok:
                        break
            if refusals:
                # One statement for all of this open's refusals (at most MAX_INSTRUCTIONS).
                state.refused = len(refusals)
                self._refused(session, refusals, continues=opened.unmetered_ok)
                if not opened.unmetered_ok:
                    raise refusals[-1][1]
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

    def _refused(
        self, session: bytes, refusals: Sequence[tuple[bytes, EmbassyError]], *, continues: bool
    ) -> None:
        # Codes and digests only: a refusal's message may quote the instruction, which the
        # workload can choose (it can make a payload of its own, actions and all).
        digests = [hashlib.sha256(raw).digest() for raw, _ in refusals]
        self._log.append_statement(
            INSTRUCTION_REFUSED_V2,
            [Subject(f"instruction:{i}", d) for i, d in enumerate(digests)],
            {
                "session": session.hex(),
                "refused": [
                    {"code": exc.code, "instruction_sha256": d.hex()}
                    for d, (_, exc) in zip(digests, refusals, strict=True)
                ],
                "session_continues_unmetered": continues,
            },
        )
        _LOG.warning(
            "session %s: %d instruction(s) refused (%s)",
            session.hex(),
            len(refusals),
            ", ".join(exc.code for _, exc in refusals),
        )

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
        """Handle one activation file and remove it; never raises for what the file holds.

        A file whose name is not the SDK's, or names a session that is not open here, is
        refused without being read (``activation-foreign``). Otherwise it is read strictly
        and must match its name. A rejection is counted against the open session its name
        names, or against no session; the file is removed either way, and a valid one only
        after its statement and registry batch are committed.
        """
        try:
            size = os.lstat(path).st_size
        except OSError:
            return  # gone already (a drain and an event for the same file)
        named = parse_file_name(path.name)
        session = None if named is None else named[0]
        try:
            with self._lock:
                if session not in self._sessions:
                    raise ActivationForeignError("activation: not the file of an open session")
            activation = read_activation_file(path, max_bytes=self._limits.max_activation_bytes)
            if (activation.session, activation.seq) != named:
                raise ActivationCorruptError("activation: header and file name disagree")
            with self._lock:
                self._apply(activation)
        except FileNotFoundError:
            return
        except OSError:
            # Not the file's content: the embassy could not read it. Reject it all the same
            # (a workload must not be able to stall the intake).
            self._reject(session, FOREIGN, size, path.name)
        except EmbassyError as exc:  # an ActivationError, or a log or registry failure
            self._reject(session, exc.code, size, path.name)
            if not isinstance(exc, ActivationError):
                _LOG.error("activation intake: %s handling a file (%s)", exc.code, type(exc))
        finally:
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                _LOG.error(
                    "activation intake: cannot remove file %s…: %s",
                    name_digest(path.name),
                    exc.strerror,
                )

    def discard(self, size: int) -> None:
        """The intake removed an entry unread (not an activation file's name or type)."""
        self._reject(None, FOREIGN, size, None)

    def _session_for(self, activation: Activation) -> _SessionMeter:
        state = self._sessions.get(activation.session)
        if state is None:
            raise ActivationForeignError("activation: its session is not open here")
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
            SIGNATURE_WRITE_V2,
            [Subject("activation", activation.sha256)],
            {
                "session": state.session.hex(),
                "batch": batch,
                "authority": instruction.authority,
                "capability": capability,
                "polarity": instruction.polarity.value,
                "tensor_sha256": tensor_digest(activation.tensor),
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
            METER_UPDATE_V2,
            [Subject("activation", activation.sha256)],
            {
                "session": state.session.hex(),
                "batch": batch,
                "formula": FORMULA,
                "tensor_sha256": tensor_digest(activation.tensor),
                "capabilities": sorted(deltas),
            },
        )
        self._registry.commit(batch, appended.entry.seq)
        state.meter_updates += 1

    def _reject(self, session: bytes | None, code: str, size: int, name: str | None) -> None:
        """Count a rejection (no statement here: :meth:`flush` states them, coalesced)."""
        with self._lock:
            if session not in self._sessions:
                session = None  # only an open session's own id is ever stated
            self._rejections.record(session, code, size)
            if session is None:
                for state in self._sessions.values():
                    state.unattributed += 1
        if name is not None:
            _LOG.debug("activation file %s… rejected (%s, %d bytes)", name_digest(name), code, size)

    def flush(self, *, final: bool = False) -> int:
        """State the rejection summaries that are due (``final``: all, as at a stop)."""
        with self._lock:
            summaries = self._rejections.due(final=final)
            for summary in summaries:
                body = summary.body()
                # About the session it is charged to; about the embassy (the default subject)
                # when no session can be charged.
                subjects = (
                    []
                    if summary.session is None
                    else [
                        Subject(
                            f"session:{summary.session.hex()}",
                            hashlib.sha256(summary.session).digest(),
                        )
                    ]
                )
                try:
                    self._log.append_statement(ACTIVATION_REJECTED_V2, subjects, body)
                except EmbassyError as exc:  # a full disk: the session's totals stay exact
                    _LOG.error("activation rejections: summary not stated (%s)", exc.code)
                    continue
                _LOG.warning(
                    "activation files rejected (session %s): %s, %d bytes",
                    body["session"],
                    ", ".join(f"{n} {code}" for code, n in body["counts"].items()),
                    summary.bytes,
                )
            return len(summaries)

    # -- session close ----------------------------------------------------------------------

    def finish(self, session: bytes, drain: Callable[[], int]) -> dict[str, Any] | None:
        """Handle what the workload left for this session, then end its metering.

        ``drain`` handles the files present (within the drain timeout) and returns how
        many activation files it had to leave; the summary says so (``files_left``).
        """
        files_left = drain()
        with self._lock:
            state = self._sessions.pop(session, None)
            rejected, rejected_bytes = self._rejections.totals(session)
            self._rejections.end(session)
            self.flush()  # its last rejection summary precedes its unseal statement
        return None if state is None else state.summary(rejected, rejected_bytes, files_left)

    def forget(self, session: bytes) -> None:
        """The session ended otherwise (aborted): later files for it are foreign, and its
        last rejection summary is stated with the next flush."""
        with self._lock:
            self._sessions.pop(session, None)
            self._rejections.end(session)

    def meters(self, authority: str) -> Mapping[str, int]:
        return {m.capability: m.value for m in self._registry.meters(authority)}
