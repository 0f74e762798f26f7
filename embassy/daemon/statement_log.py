"""The statement log as the daemon keeps it: sign, append durably, extend, checkpoint.

Statements are group-committed (ADR 0016). A writer queues its statement; the first writer
to find no batch being built becomes the leader and, once it holds the build lock, takes
everything queued (at most ``MAX_BATCH``) while the others wait. It reads the TPM clock
once and builds and signs each statement at its position (one clock for all). Then, in
build order under the commit lock, it writes all their lines with one write and one
fsync, extends the PCR once (the entry digest for a batch of one, exactly as before
batches; else the batch digest over the entries' digests), and wakes every writer of the
batch with its own result, or all of them with the same exception. The next leader builds
its batch while this one is written and extended (a pipeline of two: CPU work overlaps the
disk and the TPM). A statement is acknowledged only once its whole batch is both fsync'd
and extended. Events (starts, launch inputs) are committed alone, with the log quiet.

A crash after the fsync and before the extend leaves the PCR one commit (an entry or a
batch) behind the file; :meth:`recover` finds exactly that case and finishes the extend. A
batch whose last lines never reached the file (a crash inside its write) was neither
fsync'd whole nor extended nor acknowledged: :meth:`recover` cuts its lines. Any other
disagreement between the file and the PCRs is tampering (or a foreign extend), reported as
:class:`TamperError`: the daemon refuses to sign on top of a log it cannot vouch for.

A failed append (a full disk) stores nothing and raises :class:`StorageError` (see
``logstore``); the daemon goes on. A failed extend after the lines are stored leaves the
PCR one commit behind: every later append is refused (``TpmError``) until a restart, whose
``recover`` finishes that extend. A failed periodic checkpoint after a commit does not
fail it (it was acknowledged): it is logged and retried with the next one.

Quotes cost TPM time (1.7 ms each on a hardware TPM, and a checkpoint line): a
``GET /v1/log`` whose head has not moved since the last checkpoint reuses that checkpoint
(:meth:`StatementLog.log_segment`), and evidence quotes over callers' nonces are drawn from
a token bucket (:class:`QuoteBudget`) that refuses with ``RateLimitedError`` when empty.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embassy.attest.types import ClockInfo
from embassy.config import PcrLayout
from embassy.daemon.keys import EmbassyKeys
from embassy.daemon.logstore import AppendFile
from embassy.daemon.metrics import Metrics
from embassy.errors import (
    EmbassyError,
    LogIntegrityError,
    RateLimitedError,
    TamperError,
    TpmError,
)
from embassy.log.entry import (
    GENESIS,
    Checkpoint,
    EntryType,
    LogEntry,
    checkpoint_qualifying_data,
    encode_entry,
    parse_checkpoint_bytes,
    parse_entry,
)
from embassy.log.event import EVENT_PAYLOAD_TYPE, encode_event
from embassy.log.segment import Segment, check_chain, extends, last_commit, replay
from embassy.log.verify_entry import authenticate_entry
from embassy.tpm.interface import Tpm
from embassy.wire.codec import canonical_json
from embassy.wire.dsse import Signer, raw_public_key
from embassy.wire.statement import Header, Statement, Subject, embassy_subject

_LOG = logging.getLogger(__name__)
# Evidence quotes a caller may ask for: 20 a second on average, 40 at once. A relying party
# needs one per verification; a workload hammering GET /v1/evidence gets 429s instead of
# the TPM's time.
EVIDENCE_QUOTES_PER_SECOND = 20.0
EVIDENCE_QUOTE_BURST = 40
# The most statements one leader commits at once: bounds what a follower waits behind and
# the batch a verifier buffers (the wire allows up to entry.MAX_BATCH_ENTRIES).
MAX_BATCH = 64


class QuoteBudget:
    """A token bucket: ``burst`` tokens, refilled at ``rate`` a second; thread-safe."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()
        self._lock = threading.Lock()

    def take(self, what: str) -> None:
        """Spend one token, or raise :class:`RateLimitedError` (nothing is spent)."""
        with self._lock:
            now = self._clock()
            self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
            self._at = now
            if self._tokens < 1.0:
                raise RateLimitedError(
                    f"{what}: more than {self._rate:g} TPM quotes a second (burst "
                    f"{self._burst:g}); retry in {(1.0 - self._tokens) / self._rate:.2f} s"
                )
            self._tokens -= 1.0


@dataclass(frozen=True, slots=True)
class Appended:
    envelope: bytes
    entry: LogEntry


class _Pending:
    """One writer's statement while it waits for a group commit: its outcome is set once,
    by the leader that commits it, before ``done``."""

    __slots__ = ("_wake", "body", "done", "error", "predicate_type", "result", "subjects")

    def __init__(
        self, predicate_type: str, subjects: tuple[Subject, ...], body: Mapping[str, Any]
    ) -> None:
        self.predicate_type = predicate_type
        self.subjects = subjects
        self.body = body
        self.result: Appended | None = None
        self.error: BaseException | None = None
        self.done = False
        # Released when the outcome is in, or when the writer is made the next leader: a
        # bare lock, taken now, is a one-shot wake-up that costs a fraction of an Event (a
        # Condition in Python), paid per statement while the GIL is the bottleneck. Each
        # release follows an acquire: a writer made leader is released once to lead and
        # once more, unwaited, with its batch's outcome.
        self._wake = threading.Lock()
        self._wake.acquire()

    def wait(self) -> None:
        self._wake.acquire()

    def wake(self) -> None:
        self._wake.release()


# A checkpoint whose head is not the entry at its seq (the log was cut back and grew again)
# is skipped; after this many, a segment starts at the boot's first entry instead.
_ANCHOR_LOOKBACK = 64


class StatementLog:
    def __init__(
        self,
        *,
        data_dir: Path,
        tpm: Tpm,
        keys: EmbassyKeys,
        pcrs: PcrLayout,
        checkpoint_every: int,
        max_batch: int = MAX_BATCH,
        metrics: Metrics | None = None,
    ) -> None:
        self._metrics = Metrics() if metrics is None else metrics  # counts, never content
        self._tpm = tpm
        self._keys = keys
        self._pcrs = pcrs
        self._mode = tpm.mode
        self._every = checkpoint_every
        # Lock order: _lock (building a batch; held by whatever needs the log quiet) before
        # _commit (writing + extending one commit, in build order); _tip_lock, _queued leaves.
        self._lock = threading.Lock()
        self._commit = threading.Lock()
        self._entries = AppendFile(data_dir / "log.jsonl", parse_entry)
        self._checkpoints = AppendFile(data_dir / "checkpoints.jsonl", parse_checkpoint_bytes)
        self._since_checkpoint = 0
        # Set when an entry is stored but its extend failed: appending on top would make
        # the PCR disagree with the file for good; recover() at restart repairs this case.
        self._unextended: str | None = None
        # Group commit: statements waiting for a leader, and whether one is committing.
        self._max_batch = max_batch
        self._queue: list[_Pending] = []
        self._self_subject = embassy_subject(raw_public_key(keys.signing.public_key()))
        self._signer = Signer.of(keys.signing)  # its key id computed once, not per statement
        self._queued = threading.Lock()
        self._leading = False
        # Where the next batch is built: after the last one built, which may still be
        # committing (None: after the stored head). A failed commit's exception is kept for
        # the batches built on it (they fail with it: their predecessor was never stored).
        self._tip: tuple[int, bytes] | None = None
        self._tip_lock = threading.Lock()
        self._broken: BaseException | None = None
        self.evidence_quotes = QuoteBudget(EVIDENCE_QUOTES_PER_SECOND, EVIDENCE_QUOTE_BURST)

    # -- reading -----------------------------------------------------------------------

    @property
    def entries(self) -> Sequence[LogEntry]:
        return self._entries.records

    @property
    def head(self) -> LogEntry | None:
        return self._entries.records[-1] if self._entries.records else None

    def _boot_bounds(self, reset_count: int) -> tuple[int, int]:
        """Where TPM boot ``reset_count``'s entries are, as ``records[first:end]``; found by
        bisection: a log's boots only ever go up (:meth:`recover` refuses one from a later
        boot), and entry ``i`` has seq ``i`` (the chain is checked from seq 0). So a
        segment costs what it holds, not what the log has grown to."""
        records = self._entries.records
        first = bisect.bisect_left(records, reset_count, key=lambda e: e.reset_count)
        end = bisect.bisect_right(records, reset_count, lo=first, key=lambda e: e.reset_count)
        return first, end

    def _boot_entries(self, reset_count: int) -> list[LogEntry]:
        first, end = self._boot_bounds(reset_count)
        return self._entries.records[first:end]

    # -- start-up ------------------------------------------------------------------------

    def recover(self) -> None:
        """Check the file against itself and the TPM; finish an interrupted extend and cut
        a batch whose write a crash interrupted."""
        with self._quiet():
            records = self._entries.records
            try:
                check_chain(
                    records, after_seq=-1 if records else None, after=GENESIS if records else None
                )
            except LogIntegrityError as exc:
                raise TamperError(f"log.jsonl: {exc.message}") from None
            if records and records[0].seq != 0:
                raise TamperError("log.jsonl does not start at seq 0")
            reset_count = self._tpm.clock().reset_count
            later = [e for e in records if e.reset_count > reset_count]
            if later:
                raise TamperError(
                    f"log entry seq {later[0].seq} is from TPM boot {later[0].reset_count}, "
                    f"after the TPM's current boot {reset_count}: the TPM was rolled back "
                    "or the log belongs to another TPM"
                )
            cut = self._unfinished_batch(records)
            boot = self._boot_entries(reset_count)
            if cut and records[-1].reset_count == reset_count:
                boot = boot[:-cut]
            roles = (self._pcrs.embassy, self._pcrs.log)
            actual = self._tpm.read_pcrs(roles)
            try:
                if actual == replay(boot, {}, roles):
                    self._drop_unfinished(cut)
                    return
                tail = last_commit(boot)
                if not cut and boot and actual == replay(boot[:-tail], {}, roles):
                    self._repair_extend(boot[-tail:])
                    return
                expected = replay(boot, {}, roles)
            except LogIntegrityError as exc:
                raise TamperError(f"log.jsonl: {exc.message}") from None
            diffs = ", ".join(
                f"PCR {p} is {actual[p].hex()[:16]}… but the log replays to "
                f"{expected[p].hex()[:16]}…"
                for p in roles
                if actual[p] != expected[p]
            )
            raise TamperError(f"the log does not match the TPM for boot {reset_count}: {diffs}")

    def _authenticate_own(self, entry: LogEntry, what: str) -> None:
        """Only entries this embassy signed for exactly their position are repaired or cut
        as its own; a line appended to the file by someone else is tampering."""
        try:
            authenticate_entry(entry, self._keys.signing.public_key())
        except EmbassyError as exc:
            raise TamperError(
                f"log.jsonl: {what} entry seq {entry.seq} is not one this embassy signed "
                f"({exc.message})"
            ) from None

    def _unfinished_batch(self, records: Sequence[LogEntry]) -> int:
        """How many entries at the file's end are the start of a batch whose later lines
        are missing: a crash inside the batch's one write. Never fsync'd whole, so never
        extended nor acknowledged."""
        last = records[-1] if records else None
        if last is None or last.batch is None or last.seq >= last.batch[1]:
            return 0
        first = last.batch[0]
        count = last.seq - first + 1
        tail = records[-count:] if count <= len(records) else records
        for k, entry in enumerate(tail):
            if entry.seq != first + k or entry.batch != last.batch:
                raise TamperError(
                    f"log.jsonl: entry seq {entry.seq} ends the file inside batch "
                    f"[{first},{last.batch[1]}] but the entries before it do not form its start"
                )
            if entry.reset_count != last.reset_count:
                raise TamperError(f"log.jsonl: batch [{first},{last.batch[1]}] spans TPM boots")
            self._authenticate_own(entry, "unfinished batch")
        return count

    def _drop_unfinished(self, count: int) -> None:
        if not count:
            return
        records = self._entries.records
        dropped = records[-count:]
        _LOG.warning(
            "log: batch [%d,%d] was cut short by a crash inside its write (entries %d..%d "
            "present, never acknowledged nor extended); cutting them",
            dropped[0].batch[0] if dropped[0].batch else dropped[0].seq,
            dropped[0].batch[1] if dropped[0].batch else dropped[0].seq,
            dropped[0].seq,
            dropped[-1].seq,
        )
        self._entries.drop_last(count, sum(len(e.raw) + 1 for e in dropped))

    def _repair_extend(self, tail: Sequence[LogEntry]) -> None:
        """Finish the extend of the last commit (an entry or a whole batch), stored but not
        extended when the daemon went down."""
        for entry in tail:
            self._authenticate_own(entry, "unextended")
        ((_, pcr, digest),) = extends(tail)
        _LOG.warning(
            "log: entries seq %d..%d were written but not extended (crash in between); "
            "extending them now",
            tail[0].seq,
            tail[-1].seq,
        )
        self._tpm.extend(pcr, digest)

    # -- writing ---------------------------------------------------------------------------

    def _commit_locked(self, entries: Sequence[LogEntry]) -> None:
        """Store ``entries`` (one commit: an entry alone or a whole batch) with one write and
        one fsync, then extend the PCR once; raise having acknowledged nothing."""
        if self._unextended is not None:
            raise TpmError(f"log: appends refused until restart: {self._unextended}")
        self._entries.append_many([(e, e.raw) for e in entries])  # StorageError: nothing stored
        ((_, pcr, digest),) = extends(entries)
        try:
            self._tpm.extend(pcr, digest)
        except BaseException as exc:
            code = exc.code if isinstance(exc, EmbassyError) else type(exc).__name__
            self._unextended = (
                f"entry seq {entries[0].seq} is stored but its extend failed ({code})"
                if len(entries) == 1
                else f"batch [{entries[0].seq},{entries[-1].seq}] is stored but its extend "
                f"failed ({code})"
            )
            _LOG.error("log: %s", self._unextended)
            raise
        self._metrics.log_commit()
        self._since_checkpoint += len(entries)
        if self._since_checkpoint >= self._every:
            try:
                self._checkpoint_locked()
            except EmbassyError as exc:  # the commit stands; the checkpoint is retried
                _LOG.error(
                    "log: checkpoint after seq %d failed (%s); retrying later",
                    entries[-1].seq,
                    exc.code,
                )

    def _stored_next(self) -> tuple[int, bytes]:
        head = self.head
        return (0, GENESIS) if head is None else (head.seq + 1, head.digest)

    def _next(self) -> tuple[int, bytes]:
        """Where the next batch goes: after the last one built (under ``_lock``)."""
        with self._tip_lock:
            tip = self._tip
        return self._stored_next() if tip is None else tip

    @contextlib.contextmanager
    def _quiet(self) -> Iterator[None]:
        """No batch being built nor committed: the file, the records and the PCRs agree."""
        with self._lock, self._commit:
            try:
                yield
            finally:
                with self._tip_lock:
                    self._tip = None  # the next batch is built on the stored head

    def append_event(self, entry_type: EntryType, body: Mapping[str, Any]) -> LogEntry:
        """Record a signed, position-bound event (a daemon start, a launch input) in the
        embassy PCR, committed alone."""
        with self._quiet():
            seq, prev = self._stored_next()
            data = self._signer.sign(
                encode_event(entry_type.value, seq, prev, body), EVENT_PAYLOAD_TYPE
            )
            entry = encode_entry(
                seq=seq,
                prev=prev,
                reset_count=self._tpm.clock().reset_count,
                pcr=self._pcrs.embassy,
                type=entry_type,
                data=data,
            )
            self._commit_locked([entry])
            return entry

    def append_statement(
        self, predicate_type: str, subjects: Sequence[Subject], body: Mapping[str, Any]
    ) -> Appended:
        """Sign a statement at the log's next position and append it; return once it is
        fsync'd and extended (group-committed with whatever other writers queued).

        No ``subjects``: the statement is about the embassy itself, and its subject is the
        embassy's signing key (in-toto v1 requires at least one subject)."""
        if not subjects:
            subjects = [self._self_subject]
        pending = _Pending(predicate_type, tuple(subjects), body)
        with self._queued:
            self._queue.append(pending)
            leads = not self._leading
            self._leading = True
        if not leads:
            pending.wait()
        if not pending.done:  # made the leader: first in the queue, so in its own batch
            self._lead()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def _lead(self) -> None:
        """Build the queued statements into a batch as its leader; then let the next leader
        build while this batch is written and extended; then wake its writers."""
        batch: list[_Pending] = []
        stepped_down = False
        try:
            with self._lock:
                with self._queued:  # taken as late as possible: the bigger the batch
                    batch = self._queue[: self._max_batch]
                    del self._queue[: len(batch)]
                clock = self._tpm.clock()  # one read for the batch: every statement carries it
                built = self._build_locked(batch, clock)
                if built:
                    last = built[-1][2]
                    with self._tip_lock:
                        self._tip = (last.seq + 1, last.digest)
                self._commit.acquire()  # before the next leader can build: commits in order
            try:
                self._step_down()
                stepped_down = True
                if built:
                    self._commit_built(built)
            finally:
                self._commit.release()
        except BaseException as exc:  # every writer of the batch gets the same exception
            for item in batch:
                if item.result is None and item.error is None:
                    item.error = exc
        finally:
            if not stepped_down:
                self._step_down()
            for item in batch:
                if item.result is None and item.error is None:  # pragma: no cover
                    item.error = TpmError("log: the group commit ended without an outcome")
                item.done = True
                item.wake()

    def _step_down(self) -> None:
        """Hand the lead to the first writer queued (it builds the next batch), or leave it
        to the next writer to come; wakes one thread, not all."""
        with self._queued:
            if self._queue:
                self._queue[0].wake()
            else:
                self._leading = False

    def _check_on_head(self, first: LogEntry) -> None:
        if (first.seq, first.prev) != self._stored_next():
            raise self._broken or TpmError("log: the batch before this one was not stored")

    def _commit_built(self, built: list[tuple[_Pending, bytes, LogEntry]]) -> None:
        """Write and extend a built batch (under ``_commit``), or fail it having stored
        nothing: also when the batch it was built on failed."""
        entries = [entry for _, _, entry in built]
        try:
            self._check_on_head(entries[0])
            self._commit_locked(entries)
        except BaseException as exc:
            self._broken = exc
            with self._tip_lock:
                if self._tip == (entries[-1].seq + 1, entries[-1].digest):
                    self._tip = None  # nothing was built on it: the next goes on the head
            raise
        self._metrics.statements(len(built))
        for item, envelope, entry in built:
            item.result = Appended(envelope, entry)

    def _build_locked(
        self, batch: list[_Pending], clock: ClockInfo
    ) -> list[tuple[_Pending, bytes, LogEntry]]:
        """Sign each statement at its position in a batch of ``len(live)`` from the head.
        The range is in every entry (and so in each next one's ``prev``), so a statement
        that cannot be encoded (a bad body: its writer gets that error) means building the
        rest again for the smaller range; nothing is stored meanwhile."""
        live = list(batch)
        while live:
            seq, prev = self._next()
            span = (seq, seq + len(live) - 1) if len(live) > 1 else None
            built: list[tuple[_Pending, bytes, LogEntry]] = []
            for item in live:
                header = Header(seq=seq, prev=prev, clock=clock, tpm_mode=self._mode)
                try:
                    payload = Statement(
                        item.predicate_type, item.subjects, header, item.body
                    ).encode()
                except (ValueError, TypeError) as exc:
                    item.error = exc
                    break
                envelope = self._signer.sign(payload)
                entry = encode_entry(
                    seq=seq,
                    prev=prev,
                    reset_count=clock.reset_count,
                    pcr=self._pcrs.log,
                    type=EntryType.STATEMENT,
                    data=envelope,
                    batch=span,
                )
                built.append((item, envelope, entry))
                seq, prev = seq + 1, entry.digest
            else:
                return built
            live = [item for item in live if item.error is None]
        return []

    # -- checkpoints and segments ----------------------------------------------------------

    def _checkpoint_locked(self) -> Checkpoint:
        head = self.head
        if head is None:
            raise TamperError("cannot checkpoint an empty log")
        quote = self._tpm.quote(
            self._pcrs.quoted, checkpoint_qualifying_data(head.seq, head.digest)
        )
        checkpoint = Checkpoint(head.seq, head.digest, quote)
        self._checkpoints.append(checkpoint, canonical_json(checkpoint.to_json()))
        self._metrics.checkpoint()
        self._since_checkpoint = 0
        return checkpoint

    def checkpoint(self) -> Checkpoint:
        with self._quiet():
            return self._checkpoint_locked()

    def _anchor(self, first: int, before_seq: int) -> Checkpoint | None:
        """The latest stored checkpoint at or after seq ``first`` (this boot's start) whose
        head is before ``before_seq``. Checkpoints are stored in log order: bisected to
        ``before_seq``, then looked at newest first, down to this boot's start."""
        records = self._entries.records
        checkpoints = self._checkpoints.records
        below = bisect.bisect_left(checkpoints, before_seq, key=lambda cp: cp.seq)
        for cp in reversed(checkpoints[max(0, below - _ANCHOR_LOOKBACK) : below]):
            if cp.seq < first:
                return None
            if cp.seq < len(records) and records[cp.seq].digest == cp.head:
                return cp
        return None

    def log_segment(self, from_seq: int) -> Segment:
        """The current boot from ``from_seq``, closed by a checkpoint at the head: the last
        one if the head has not moved since it was taken (no new quote), else a new one."""
        return self.current_segment(from_seq, reuse_checkpoint=True)

    def evidence_segment(self, nonce: bytes) -> Segment:
        """The current boot, closed by a fresh quote over ``nonce``; rate-limited
        (:class:`RateLimitedError` when the budget is spent, before the TPM is asked)."""
        self.evidence_quotes.take("evidence")
        return self.current_segment(0, nonce)

    def current_segment(
        self,
        from_seq: int,
        qualifying_data: bytes | None = None,
        *,
        reuse_checkpoint: bool = False,
    ) -> Segment:
        """Entries of the current boot from ``from_seq`` (or the nearest anchor) to the head,
        closed by a fresh quote over ``qualifying_data`` (default: a checkpoint, a new one
        unless ``reuse_checkpoint`` and the last stored one is at the head)."""
        with self._quiet():
            head = self.head
            if head is None:
                raise TamperError("the log is empty")
            first, end = self._boot_bounds(head.reset_count)
            anchor = self._anchor(first, from_seq)
            entries = tuple(
                self._entries.records[first if anchor is None else anchor.seq + 1 : end]
            )
            last = self._checkpoints.records[-1] if self._checkpoints.records else None
            if qualifying_data is None and reuse_checkpoint and self._at_head(last, head):
                assert last is not None
                closing = last
            elif qualifying_data is None:
                closing = self._checkpoint_locked()
            else:
                quote = self._tpm.quote(self._pcrs.quoted, qualifying_data)
                self._metrics.quote("evidence")
                closing = Checkpoint(head.seq, head.digest, quote)
            return Segment(anchor, entries, closing)

    @staticmethod
    def _at_head(checkpoint: Checkpoint | None, head: LogEntry) -> bool:
        return (
            checkpoint is not None and checkpoint.seq == head.seq and checkpoint.head == head.digest
        )

    def close(self) -> None:
        with self._quiet():
            self._entries.close()
            self._checkpoints.close()
