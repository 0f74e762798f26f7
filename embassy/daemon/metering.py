"""Metering in the daemon: instructions at session open, activation files, meters, readings.

Lifecycle of a session's metering:

1. **begin** (the session was sealed and its payload opened): the actions sealed under
   the payload's action key are opened; each authority's instruction is verified
   (:func:`~embassy.metering.instruction.verify_instruction`) and its nonce claimed in the
   registry (an instruction is carried out once). The refusals of one session open are
   one ``instruction-refused`` statement (codes and digests); a refusal aborts the session
   unless the user said ``unmetered_ok``. ``read`` instructions are answered at once with
   encrypted ``meter-reading`` statements. The session's accepted instructions (their
   signed envelopes) are recorded in the registry, so it is still metered after a restart.
2. **handle** (the intake hands over the files that are ready together, a bounded group):
   names first, nothing read: a file named for a session that is not open, out of its
   sequence or over a limit is refused unread; the rest are read strictly
   (``embassy.metering.activation``), checked against their names and pooled (formula v2's
   windows) in reader processes (``embassy.daemon.activation_reader``: the daemon never
   parses what the workload wrote), and scored here as their rows come back; then, per
   instruction, ``write`` stages signatures and ``update`` stages the deltas of formula v2
   against the authority's model (``Registry.centroid_model``); the whole group is ONE
   registry transaction, ONE ``meter-batch`` statement (``embassy.daemon.metering_group``)
   and one commit (the protocol in ``embassy.metering.registry``). Every file is removed
   once handled, valid or not. Rejections are counted, not stated one by one:
   ``activation-rejected`` statements are coalesced summaries
   (``embassy.metering.rejections``), at most one a second and 60 per session, plus a last
   one when it ends.
3. **finish** (closing the session): the intake is drained (within
   ``metering.drain_timeout_seconds``), the session's last rejection summary is stated, and
   its summary (counts and digests, never activations or meter values) goes into the
   unseal statement; its record in the registry is dropped.

Nothing the workload chose leaves in its own bytes (DESIGN.md): statements and logs carry
codes (``EmbassyError.code``), lengths, counts, and SHA-256 digests: of the activation
(its checksum), of the tensor name, of a file's name (debug logs only, truncated). Error
*messages* of what the workload wrote (they may quote it) are never emitted.

At start, :meth:`MeteringService.recover` settles batches a crash left pending against the
log (committed if a statement names them, dropped if not), then restores the sessions the
registry records: instructions, next sequence number, counts and the activations' digest.
Rejections counted before a restart are in their summaries, not in the restored totals.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from embassy.config import Authority, Metering
from embassy.daemon.activation_reader import ReaderPool
from embassy.daemon.metering_group import (
    FOREIGN,
    Candidate,
    Expected,
    Job,
    Prepared,
    Refusal,
    Rows,
    SessionPart,
    admit,
    batch_statement,
    job_of,
    prepare,
    read_job,
    tensor_digest,
)
from embassy.daemon.statement_log import StatementLog
from embassy.errors import (
    ActivationSequenceError,
    BadPayloadError,
    EmbassyError,
    InstructionError,
    InstructionReplayedError,
    StorageError,
    WireFormatError,
)
from embassy.log.entry import EntryType
from embassy.metering.actions import open_actions
from embassy.metering.activation import parse_file_name
from embassy.metering.formula_v2 import FORMULA_V2
from embassy.metering.instruction import (
    AuthorityPolicy,
    Instruction,
    Op,
    parse_instruction_payload,
    verify_instruction,
)
from embassy.metering.reading import Meter, ModelCalibration, Reading, reading_predicate
from embassy.metering.registry import FileProgress, Registry, SessionRecord, SignatureRow
from embassy.metering.rejections import RejectionLedger
from embassy.wire.dsse import parse_envelope
from embassy.wire.statement import (
    ACTIVATION_REJECTED_V2,
    INSTRUCTION_REFUSED_V2,
    METER_BATCH_V1,
    METER_READING_V1,
    METER_UPDATE_V1,
    METER_UPDATE_V2,
    SIGNATURE_WRITE_V1,
    SIGNATURE_WRITE_V2,
    Subject,
    parse_statement,
)

__all__ = ["MeteringService", "authority_policies", "name_digest", "tensor_digest"]

_LOG = logging.getLogger(__name__)
# Threads scoring a group's files (and reading them when there are no reader processes).
WORKERS = 2
# Processes reading the activation files (embassy.daemon.activation_reader); 0: read in
# this process, on WORKERS threads (tests that replace the reader in this process).
READER_PROCESSES = 2
_ONE_BATCH = (SIGNATURE_WRITE_V1, METER_UPDATE_V1, SIGNATURE_WRITE_V2, METER_UPDATE_V2)


def name_digest(name: str) -> str:
    """A file name for a debug log: the first 16 hex digits of its SHA-256, never itself."""
    return hashlib.sha256(os.fsencode(name)).hexdigest()[:16]


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

    @classmethod
    def restored(cls, record: SessionRecord) -> _SessionMeter:
        state = cls(
            bytes.fromhex(record.session),
            tuple(
                parse_instruction_payload(parse_envelope(raw).payload)
                for raw in record.instructions
            ),
            record.refused,
        )
        for f in record.files:  # in seq order
            state.next_seq = f.seq + 1
            state.files += 1
            state.bytes += f.bytes
            state.digest.update(bytes.fromhex(f.activation_sha256))
            state.signatures_written += f.signatures_written
            state.meter_updates += f.meter_updates
        return state

    def summary(
        self, rejected: Mapping[str, int], rejected_bytes: int, files_left: int
    ) -> dict[str, Any]:
        return {
            "formula": FORMULA_V2,
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
        workers: int = WORKERS,
        reader_processes: int | None = None,
        on_reject: Callable[[str], None] = lambda code: None,
    ) -> None:
        self._on_reject = on_reject  # metrics: rejections by code (embassy codes only)
        self._registry = registry
        self._log = log
        self._policies = authority_policies(authorities)
        self._own_keyid = own_keyid
        self._limits = limits
        self._now = now
        self._lock = threading.RLock()
        self._sessions: dict[bytes, _SessionMeter] = {}
        self._rejections = RejectionLedger()
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None  # made at the first group of two
        self._processes = READER_PROCESSES if reader_processes is None else reader_processes
        self._readers: ReaderPool | None = None  # started at the first file

    def close(self) -> None:
        """Stop the reader processes and the pool's threads (the daemon stops)."""
        with self._lock:
            pool, self._pool = self._pool, None
            readers, self._readers = self._readers, None
        if pool is not None:
            pool.shutdown(wait=True)
        if readers is not None:
            readers.close()

    # -- start ------------------------------------------------------------------------------

    def recover(self) -> dict[str, list[str]]:
        """Settle batches a crash left pending (the log decides), then restore the open
        sessions' metering the registry records."""
        pending = set(self._registry.pending_batches())
        found: dict[str, int] = {}
        if pending:
            for entry in self._log.entries:
                if entry.type is not EntryType.STATEMENT:
                    continue
                statement = parse_statement(parse_envelope(entry.data).payload)
                if statement.predicate_type in _ONE_BATCH:
                    named = [statement.body.get("batch")]
                elif statement.predicate_type == METER_BATCH_V1:
                    named = list(statement.body.get("batches") or [])
                else:
                    continue
                for batch in named:
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
        restored = [_SessionMeter.restored(r) for r in self._registry.open_sessions()]
        with self._lock:
            for state in restored:
                self._sessions[state.session] = state
        if restored:
            _LOG.warning("metering: %d open session(s) restored", len(restored))
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
        accepted: list[tuple[Instruction, bytes]] = []
        if action_key is not None and actions is not None and payload_id is not None:
            opened = open_actions(action_key, payload_id, actions)
            refusals: list[tuple[bytes, EmbassyError]] = []
            for raw in opened.instructions:
                try:
                    accepted.append((self._accept(raw), raw))
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
            state.instructions = tuple(i for i, _ in accepted)
            readings = [self._read(i) for i, _ in accepted if i.op is Op.READ]
        # Recorded before its first file can be handled: a restart goes on metering it.
        self._registry.save_session(session.hex(), [raw for _, raw in accepted], state.refused)
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
        # The models (and calibrations) the authority's meters were moved with: enough to
        # recompute every increment from what it wrote and what it reads.
        models: dict[tuple[str, int, str], list[tuple[str, int]]] = {}
        for c in self._registry.calibrations(instruction.authority):
            key = (tensor_digest(c.tensor), c.dim, c.model_sha256)
            models.setdefault(key, []).append((c.capability, c.threshold))
        head = self._log.head
        reading = Reading(
            instruction.authority,
            instruction.digest,
            FORMULA_V2,
            -1 if head is None else head.seq,
            tuple(meters),
            models=tuple(
                ModelCalibration(tensor, dim, digest, tuple(sorted(thresholds)))
                for (tensor, dim, digest), thresholds in sorted(models.items())
            ),
        )
        assert instruction.reply_key is not None  # parse_instruction ensures it for read
        subjects, body = reading_predicate(reading, instruction.reply_key, self._own_keyid)
        return self._log.append_statement(METER_READING_V1, subjects, body).envelope

    # -- activation files -------------------------------------------------------------------

    def handle(self, path: Path) -> None:
        """:meth:`handle_many` for one file."""
        self.handle_many([path])

    def handle_many(self, paths: Sequence[Path]) -> None:
        """Handle a group of activation files and remove them; never raises for what they hold.

        Names first (:func:`~embassy.daemon.metering_group.admit`): a file whose name is not
        the SDK's, names a session not open here, is out of sequence or over a limit is
        refused unread. The others are read, checked against their names and pooled in the
        reader processes and scored here, then staged in ONE registry transaction, reported by ONE
        ``meter-batch`` statement and committed in one more (the two-phase protocol of
        ``embassy.metering.registry``). A rejection is counted against the open session its
        name names, or against no session. Every file is removed once handled, a valid one
        only after its statement and registry batch are committed.
        """
        named: list[tuple[Path, bytes | None, int, int]] = []
        for path in paths:
            try:
                size = os.lstat(path).st_size
            except OSError:
                continue  # gone already (a drain and an event for the same file)
            parsed = parse_file_name(path.name)
            named.append((path, *(parsed or (None, -1)), size))
        refusals: list[Refusal] = []
        try:
            with self._lock:
                expected = {
                    s: Expected(st.next_seq, st.files, st.instructions)
                    for s, st in self._sessions.items()
                }
            candidates, refusals = admit(
                named,
                expected,
                self._limits.max_files_per_session,
                self._limits.max_activation_bytes,
            )
            prepared = self._prepare(candidates, expected)
            with self._lock:
                refusals += self._commit(prepared)
        except Exception:
            raise  # a bug: the files are removed all the same (nothing may stall the intake)
        except BaseException:
            named = []  # the process is going down: what is not acknowledged stays
            raise
        finally:
            for refusal in refusals:
                if refusal.code:  # "": vanished before it was read, nothing to count
                    self._reject(refusal.session, refusal.code, refusal.size, refusal.path.name)
                if refusal.error is not None:
                    _LOG.error(
                        "activation intake: %s handling a file (%s)",
                        refusal.error.code,
                        type(refusal.error).__name__,
                    )
            for path, *_ in named:
                try:
                    path.unlink(missing_ok=True)
                except OSError as exc:
                    _LOG.error(
                        "activation intake: cannot remove file %s…: %s",
                        name_digest(path.name),
                        exc.strerror,
                    )

    def _prepare(
        self, candidates: Sequence[Candidate], expected: Mapping[bytes, Expected]
    ) -> list[Prepared]:
        """Read, check and pool every candidate (in the reader processes, or on this
        process's threads without them), and score each as its rows come back, on the
        pool's threads when there are several (numpy's products release the GIL: a 3 MiB
        file's rows take milliseconds), while the readers go on with the next files. The
        group is committed as one, once all are prepared: groups are bounded (the
        intake's), so one transaction and one statement per group costs little per file,
        and a group is all or nothing."""
        instructions = [expected[c.session].instructions for c in candidates]
        jobs = [
            job_of(c, i, self._limits.max_activation_bytes)
            for c, i in zip(candidates, instructions, strict=True)
        ]
        threads = self._threads() if len(candidates) > 1 else None
        scored: list[Prepared | Future[Prepared] | None] = [None] * len(candidates)
        for index, read in self._read_jobs(jobs):
            args = (candidates[index], read, instructions[index])
            if threads is None or isinstance(read, str):
                scored[index] = prepare(*args, model=self._registry.centroid_model)
            else:
                scored[index] = threads.submit(prepare, *args, model=self._registry.centroid_model)
        out = [s.result() if isinstance(s, Future) else s for s in scored]
        assert all(p is not None for p in out)
        return [p for p in out if p is not None]

    def _threads(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="embassy-meter")
            return self._pool

    def _read_jobs(self, jobs: Sequence[Job]) -> Iterator[tuple[int, Rows | str]]:
        """(index, rows or refusal code) of each job, in the order they are done."""
        if not jobs:
            return iter(())
        with self._lock:
            if self._processes and self._readers is None:
                try:
                    self._readers = ReaderPool(self._processes)
                    self._readers.start()
                except (OSError, ValueError) as exc:
                    # Never a stalled intake: the files are read in this process instead.
                    _LOG.error("metering: reader processes not started (%s)", exc)
                    self._processes = 0
                    self._readers = None
            readers = self._readers
        if readers is not None:
            return readers.read(jobs)
        if len(jobs) == 1:
            return iter([(0, read_job(jobs[0]))])
        return enumerate(self._threads().map(read_job, jobs))

    def _commit(self, prepared: Sequence[Prepared]) -> list[Refusal]:
        """Stage, state and commit a group's valid files (lock held); return the refused."""
        refusals: list[Refusal] = []
        expect = {s: st.next_seq for s, st in self._sessions.items()}
        parts: dict[bytes, SessionPart] = {}
        signatures: list[tuple[str, SignatureRow]] = []
        updates: list[tuple[str, str, Mapping[str, int]]] = []
        files: list[FileProgress] = []
        accepted: list[tuple[_SessionMeter, Prepared, int, int]] = []
        for p in prepared:
            c = p.candidate
            state = self._sessions.get(c.session)
            if p.refusal is not None:
                refusals.append(p.refusal)
                continue
            if state is None:  # the session ended while the file was read
                refusals.append(Refusal(c.path, None, FOREIGN, c.size))
                continue
            if c.seq != expect[c.session]:  # an earlier file of the group was refused
                refusals.append(Refusal(c.path, c.session, ActivationSequenceError.code, c.size))
                continue
            expect[c.session] += 1
            rows = p.rows
            assert rows is not None
            session = c.session.hex()
            part = parts.setdefault(c.session, SessionPart(c.session))
            writes, meter_updates = part.add(p, state.instructions)
            for i in state.instructions:
                if i.op is Op.WRITE:
                    assert i.polarity is not None  # parse_instruction ensures it for write
                    row = SignatureRow(
                        i.capabilities[0],
                        i.authority,
                        i.polarity,
                        rows.tensor,
                        rows.windows[0],
                        windows=rows.windows,
                    )
                    signatures.append((session, row))
            for update in p.updates:
                updates.append((session, rows.sha256.hex(), update.deltas))
            files.append(
                FileProgress(
                    session,
                    c.seq,
                    rows.sha256.hex(),
                    rows.nbytes,
                    writes,
                    meter_updates,
                )
            )
            accepted.append((state, p, writes, meter_updates))
        if not accepted:
            return refusals
        try:
            self._stage_state_commit(signatures, updates, files, list(parts.values()))
        except (EmbassyError, ValueError) as exc:
            code = exc.code if isinstance(exc, EmbassyError) else EmbassyError.code
            _LOG.error("activation intake: a group of %d not metered (%s)", len(accepted), code)
            for _, p, _, _ in accepted:
                c = p.candidate
                refusals.append(Refusal(c.path, c.session, code, c.size))
            return refusals
        for state, p, writes, meter_updates in accepted:
            assert p.rows is not None
            state.next_seq += 1
            state.files += 1
            state.bytes += p.rows.nbytes
            state.digest.update(p.rows.sha256)
            state.signatures_written += writes
            state.meter_updates += meter_updates
        return refusals

    def _stage_state_commit(
        self,
        signatures: Sequence[tuple[str, SignatureRow]],
        updates: Sequence[tuple[str, str, Mapping[str, int]]],
        files: Sequence[FileProgress],
        parts: Sequence[SessionPart],
    ) -> None:
        """Stage (one transaction), state (one statement), commit (one transaction).

        Raises when the group is not acknowledged: nothing staged, or a statement that is
        not in the log (its batches discarded, or left for recovery when that is unknown).
        Once the statement is in the log the group is acknowledged; a failed commit is
        logged and left to recovery at the next start.
        """
        batches = self._registry.stage_group(signatures, updates, files)
        if not batches:
            return  # nothing but progress, committed by stage_group itself
        subjects, body = batch_statement(batches, parts)
        try:
            appended = self._log.append_statement(METER_BATCH_V1, subjects, body)
        except StorageError:
            # Nothing was stored (a full disk): the statement is known not to be there.
            for batch in batches:
                try:
                    self._registry.discard(batch)
                except EmbassyError as exc:
                    _LOG.error("metering: batch not discarded (%s); recovery will", exc.code)
            raise
        try:
            self._registry.commit_group(batches, appended.entry.seq)
        except EmbassyError as exc:
            _LOG.error(
                "metering: batch stated at seq %d but not committed (%s); recovery commits it",
                appended.entry.seq,
                exc.code,
            )

    def discard(self, size: int) -> None:
        """The intake removed an entry unread (not an activation file's name or type)."""
        self._reject(None, FOREIGN, size, None)

    def _reject(self, session: bytes | None, code: str, size: int, name: str | None) -> None:
        """Count a rejection (no statement here: :meth:`flush` states them, coalesced)."""
        with self._lock:
            if session not in self._sessions:
                session = None  # only an open session's own id is ever stated
            self._rejections.record(session, code, size)
            self._on_reject(code)
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
            self._drop(session)
        return None if state is None else state.summary(rejected, rejected_bytes, files_left)

    def forget(self, session: bytes) -> None:
        """The session ended otherwise (aborted): later files for it are foreign, and its
        last rejection summary is stated with the next flush."""
        with self._lock:
            self._sessions.pop(session, None)
            self._rejections.end(session)
            self._drop(session)

    def _drop(self, session: bytes) -> None:
        try:
            self._registry.drop_session(session.hex())
        except EmbassyError as exc:  # it stays recorded; a restart would restore it
            _LOG.error("metering: session record not dropped (%s)", exc.code)

    def meters(self, authority: str) -> Mapping[str, int]:
        return {m.capability: m.value for m in self._registry.meters(authority)}
