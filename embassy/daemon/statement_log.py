"""The statement log as the daemon keeps it: sign, append durably, extend, checkpoint.

Order of effects for every entry, all under one lock: build the entry over the current
head, append it to the file and fsync, then extend its digest into the PCR. A crash after
the fsync and before the extend leaves the PCR one entry behind the file; :meth:`recover`
finds exactly that case and finishes the extend. Any other disagreement between the file
and the PCRs is tampering (or a foreign extend), reported as :class:`TamperError`: the
daemon refuses to sign on top of a log it cannot vouch for.

A failed append (a full disk) stores nothing and raises :class:`StorageError` (see
``logstore``); the daemon goes on. A failed extend after the line is stored leaves the PCR
one entry behind: every later append is refused (``TpmError``) until a restart, whose
``recover`` finishes that extend. A failed periodic checkpoint after an entry is stored
does not fail the entry (it was acknowledged): it is logged and retried with the next one.

Quotes cost TPM time (1.7 ms each on a hardware TPM, and a checkpoint line): a
``GET /v1/log`` whose head has not moved since the last checkpoint reuses that checkpoint
(:meth:`StatementLog.log_segment`), and evidence quotes over callers' nonces are drawn from
a token bucket (:class:`QuoteBudget`) that refuses with ``RateLimitedError`` when empty.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from embassy.config import PcrLayout
from embassy.daemon.keys import EmbassyKeys
from embassy.daemon.logstore import AppendFile
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
from embassy.log.segment import Segment, check_chain, replay
from embassy.log.verify_entry import authenticate_entry
from embassy.tpm.interface import Tpm
from embassy.wire.codec import canonical_json
from embassy.wire.dsse import raw_public_key, sign_envelope
from embassy.wire.statement import Header, Statement, Subject, embassy_subject

_LOG = logging.getLogger(__name__)
# Evidence quotes a caller may ask for: 20 a second on average, 40 at once. A relying party
# needs one per verification; a workload hammering GET /v1/evidence gets 429s instead of
# the TPM's time.
EVIDENCE_QUOTES_PER_SECOND = 20.0
EVIDENCE_QUOTE_BURST = 40


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
    ) -> None:
        self._tpm = tpm
        self._keys = keys
        self._pcrs = pcrs
        self._mode = tpm.mode
        self._every = checkpoint_every
        self._lock = threading.Lock()
        self._entries = AppendFile(data_dir / "log.jsonl", parse_entry)
        self._checkpoints = AppendFile(data_dir / "checkpoints.jsonl", parse_checkpoint_bytes)
        self._since_checkpoint = 0
        # Set when an entry is stored but its extend failed: appending on top would make
        # the PCR disagree with the file for good; recover() at restart repairs this case.
        self._unextended: str | None = None
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
        """Check the file against itself and the TPM; finish an interrupted extend."""
        with self._lock:
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
            boot = self._boot_entries(reset_count)
            roles = (self._pcrs.embassy, self._pcrs.log)
            actual = self._tpm.read_pcrs(roles)
            if actual == replay(boot, {}, roles):
                return
            if boot and actual == replay(boot[:-1], {}, roles):
                last = boot[-1]
                # Only an entry this embassy signed for exactly this position is repaired;
                # a line appended to the file by someone else is tampering.
                try:
                    authenticate_entry(last, self._keys.signing.public_key())
                except EmbassyError as exc:
                    raise TamperError(
                        f"log.jsonl: unextended last entry seq {last.seq} is not one this "
                        f"embassy signed ({exc.message})"
                    ) from None
                _LOG.warning(
                    "log: entry seq %d was written but not extended (crash in between); "
                    "extending it now",
                    last.seq,
                )
                self._tpm.extend(last.pcr, last.digest)
                return
            expected = replay(boot, {}, roles)
            diffs = ", ".join(
                f"PCR {p} is {actual[p].hex()[:16]}… but the log replays to "
                f"{expected[p].hex()[:16]}…"
                for p in roles
                if actual[p] != expected[p]
            )
            raise TamperError(f"the log does not match the TPM for boot {reset_count}: {diffs}")

    # -- writing ---------------------------------------------------------------------------

    def _append_locked(
        self,
        *,
        pcr: int,
        entry_type: EntryType,
        data: bytes,
        seq: int,
        prev: bytes,
        reset_count: int,
    ) -> LogEntry:
        if self._unextended is not None:
            raise TpmError(f"log: appends refused until restart: {self._unextended}")
        entry = encode_entry(
            seq=seq, prev=prev, reset_count=reset_count, pcr=pcr, type=entry_type, data=data
        )
        self._entries.append(entry, entry.raw)  # StorageError: nothing stored
        try:
            self._tpm.extend(pcr, entry.digest)
        except BaseException as exc:
            code = exc.code if isinstance(exc, EmbassyError) else type(exc).__name__
            self._unextended = f"entry seq {seq} is stored but its extend failed ({code})"
            _LOG.error("log: %s", self._unextended)
            raise
        self._since_checkpoint += 1
        if self._since_checkpoint >= self._every:
            try:
                self._checkpoint_locked()
            except EmbassyError as exc:  # the entry stands; the checkpoint is retried
                _LOG.error(
                    "log: checkpoint after seq %d failed (%s); retrying later", seq, exc.code
                )
        return entry

    def _next(self) -> tuple[int, bytes]:
        head = self.head
        return (0, GENESIS) if head is None else (head.seq + 1, head.digest)

    def append_event(self, entry_type: EntryType, body: Mapping[str, Any]) -> LogEntry:
        """Record a signed, position-bound event (a daemon start, a launch input) in the
        embassy PCR."""
        with self._lock:
            seq, prev = self._next()
            data = sign_envelope(
                encode_event(entry_type.value, seq, prev, body),
                self._keys.signing,
                EVENT_PAYLOAD_TYPE,
            )
            return self._append_locked(
                pcr=self._pcrs.embassy,
                entry_type=entry_type,
                data=data,
                seq=seq,
                prev=prev,
                reset_count=self._tpm.clock().reset_count,
            )

    def append_statement(
        self, predicate_type: str, subjects: Sequence[Subject], body: Mapping[str, Any]
    ) -> Appended:
        """Sign a statement at the log's next position and append it.

        No ``subjects``: the statement is about the embassy itself, and its subject is the
        embassy's signing key (in-toto v1 requires at least one subject)."""
        if not subjects:
            subjects = [embassy_subject(raw_public_key(self._keys.signing.public_key()))]
        with self._lock:
            seq, prev = self._next()
            clock = self._tpm.clock()
            header = Header(seq=seq, prev=prev, clock=clock, tpm_mode=self._mode)
            payload = Statement(predicate_type, tuple(subjects), header, body).encode()
            envelope = sign_envelope(payload, self._keys.signing)
            entry = self._append_locked(
                pcr=self._pcrs.log,
                entry_type=EntryType.STATEMENT,
                data=envelope,
                seq=seq,
                prev=prev,
                reset_count=clock.reset_count,
            )
            return Appended(envelope, entry)

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
        self._since_checkpoint = 0
        return checkpoint

    def checkpoint(self) -> Checkpoint:
        with self._lock:
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
        with self._lock:
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
                closing = Checkpoint(head.seq, head.digest, quote)
            return Segment(anchor, entries, closing)

    @staticmethod
    def _at_head(checkpoint: Checkpoint | None, head: LogEntry) -> bool:
        return (
            checkpoint is not None and checkpoint.seq == head.seq and checkpoint.head == head.digest
        )

    def close(self) -> None:
        with self._lock:
            self._entries.close()
            self._checkpoints.close()
