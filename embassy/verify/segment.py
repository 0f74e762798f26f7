"""Verify a log segment: chain, signatures, positions, clocks, and PCR replay to a quote."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from embassy.attest.marshal import PublicArea
from embassy.attest.quote import check_qualifying_data, verify_quote
from embassy.attest.types import ClockInfo, TpmMode
from embassy.errors import (
    ClockError,
    LogIntegrityError,
    PcrMismatchError,
    QuoteError,
    SoftwareTpmError,
    VerificationError,
)
from embassy.log.entry import Checkpoint, EntryType, LogEntry, checkpoint_qualifying_data
from embassy.log.segment import Segment, check_chain, replay
from embassy.log.verify_entry import authenticate_entry
from embassy.wire.statement import Statement


@dataclass(frozen=True, slots=True)
class LoggedStatement:
    entry: LogEntry
    envelope: bytes
    statement: Statement


@dataclass(frozen=True, slots=True)
class VerifiedSegment:
    """What a segment proved: its statements, in order, anchored in the TPM."""

    statements: tuple[LoggedStatement, ...]
    entries: tuple[LogEntry, ...]
    head_clock: ClockInfo
    reset_count: int
    checks: tuple[str, ...]
    # The log PCRs' values before the first entry (the anchor's quote, or zeros) and at the
    # head (the closing quote, which the entries replay to).
    start_pcrs: Mapping[int, bytes] = field(default_factory=dict)
    head_pcrs: Mapping[int, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SegmentKeys:
    """The keys a segment is checked with (from a verified identity document)."""

    signing: Ed25519PublicKey
    ak: PublicArea
    embassy_pcr: int
    log_pcr: int


def _verify_checkpoint_quote(
    cp: Checkpoint, ak: PublicArea, expected: bytes, error: type[VerificationError]
) -> ClockInfo:
    """Check the quote's signature, PCR digest and qualifying data; return its clock."""
    attest = verify_quote(cp.quote, ak)
    check_qualifying_data(attest, expected, error)
    return attest.clock


def _check_clocks(
    statements: list[LoggedStatement], head: ClockInfo, *, floor: ClockInfo | None
) -> None:
    """Within a boot, TPM time only moves forward: from the anchor's quote (``floor``),
    through each statement, to the quote that closes the segment."""
    prev: ClockInfo | None = floor
    for item in statements:
        clock = item.statement.header.clock
        if clock.reset_count != item.entry.reset_count:
            raise ClockError(
                f"statement seq {item.entry.seq} claims TPM boot {clock.reset_count} but its "
                f"entry is in boot {item.entry.reset_count}"
            )
        if prev is not None:
            if clock.reset_count < prev.reset_count:
                raise ClockError(
                    f"statement seq {item.entry.seq}: tpm_clock.reset_count went backwards "
                    f"({prev.reset_count} -> {clock.reset_count})"
                )
            if clock.reset_count == prev.reset_count and (
                clock.restart_count < prev.restart_count
                or (clock.restart_count == prev.restart_count and clock.clock < prev.clock)
            ):
                which = (
                    f"tpm_clock.restart_count went backwards ({prev.restart_count} -> "
                    f"{clock.restart_count})"
                    if clock.restart_count < prev.restart_count
                    else f"tpm_clock.clock went backwards ({prev.clock} ms -> {clock.clock} ms)"
                )
                raise ClockError(f"statement seq {item.entry.seq}: {which}")
        prev = clock
    if (
        prev is not None
        and prev.reset_count == head.reset_count
        and (
            prev.restart_count > head.restart_count
            or (prev.restart_count == head.restart_count and prev.clock > head.clock)
        )
    ):
        what = f"statement seq {statements[-1].entry.seq}" if statements else "the anchor"
        raise ClockError(
            f"{what} is dated after the quote that closes its segment (tpm_clock "
            f"restart_count/clock {prev.restart_count}/{prev.clock} ms, the quote's "
            f"{head.restart_count}/{head.clock} ms)"
        )


def _verify_ends(segment: Segment, keys: SegmentKeys) -> tuple[dict[int, bytes], ClockInfo | None]:
    """Check the segment's closing quote names its last entry, and its anchor (if any) its
    first; return the PCR values the replay starts from and the anchor's TPM clock."""
    entries = segment.entries
    if not entries:
        raise LogIntegrityError("segment has no entries")
    head, last = segment.head, entries[-1]
    if head.seq != last.seq:
        raise LogIntegrityError(
            f"head.seq: the closing quote is for entry seq {head.seq}, but the segment ends "
            f"at seq {last.seq}: entries were dropped from or added to its end"
        )
    if head.head != last.digest:
        raise LogIntegrityError(
            f"head.head: the closing quote is for entry seq {head.seq} with digest "
            f"{head.head.hex()}, but the segment's entry seq {last.seq} has digest "
            f"{last.digest.hex()}: its last entry was replaced"
        )
    anchor = segment.anchor
    if anchor is None:
        check_chain(entries, after_seq=None, after=None)
        return {}, None
    anchor_clock = _verify_checkpoint_quote(
        anchor, keys.ak, checkpoint_qualifying_data(anchor.seq, anchor.head), QuoteError
    )
    if anchor_clock.reset_count != entries[0].reset_count:
        raise LogIntegrityError(
            f"anchor: the anchor checkpoint's quote is from TPM boot (reset count) "
            f"{anchor_clock.reset_count}, but the segment's first entry seq {entries[0].seq} "
            f"is from boot {entries[0].reset_count}"
        )
    check_chain(entries, after_seq=anchor.seq, after=anchor.head)
    roles = (keys.embassy_pcr, keys.log_pcr)
    missing = [p for p in roles if p not in anchor.quote.pcrs]
    if missing:
        raise QuoteError(
            f"anchor.quote.pcrs: the anchor quote does not cover log PCR(s) {missing} "
            f"(it covers {sorted(anchor.quote.pcrs)})"
        )
    return {p: anchor.quote.pcrs[p] for p in roles}, anchor_clock


def _verify_replay(segment: Segment, keys: SegmentKeys, start: dict[int, bytes]) -> None:
    roles = (keys.embassy_pcr, keys.log_pcr)
    replayed = replay(segment.entries, start, roles)
    for pcr in roles:
        quoted = segment.head.quote.pcrs.get(pcr)
        if quoted is None:
            raise QuoteError(f"the quote does not cover log PCR {pcr}")
        if quoted != replayed[pcr]:
            raise PcrMismatchError(
                f"PCR {pcr}: the log replays to {replayed[pcr].hex()[:16]}… but the TPM "
                f"quoted {quoted.hex()[:16]}…: an entry was forged, dropped or reordered"
            )


def _verify_entries(
    entries: tuple[LogEntry, ...], keys: SegmentKeys, allow_software_tpm: bool
) -> list[LoggedStatement]:
    """Authenticate every entry (statements and events) and return the statements."""
    statements = []
    for entry in entries:
        wanted_pcr = keys.log_pcr if entry.type is EntryType.STATEMENT else keys.embassy_pcr
        if entry.pcr != wanted_pcr:
            raise LogIntegrityError(
                f"entry seq {entry.seq} ({entry.type.value}) is extended into PCR {entry.pcr}, "
                f"not PCR {wanted_pcr}"
            )
        authenticated = authenticate_entry(entry, keys.signing)
        if not isinstance(authenticated, Statement):
            continue
        if authenticated.header.tpm_mode is TpmMode.SOFTWARE and not allow_software_tpm:
            raise SoftwareTpmError(
                f"statement seq {entry.seq} was made with a software TPM (no hardware root "
                "of trust); pass --allow-software-tpm to accept it for testing"
            )
        statements.append(LoggedStatement(entry, entry.data, authenticated))
    return statements


def verify_segment(
    segment: Segment,
    keys: SegmentKeys,
    *,
    expected_qualifying_data: bytes | None = None,
    freshness_error: type[VerificationError] = QuoteError,
    allow_software_tpm: bool = False,
) -> VerifiedSegment:
    """Verify ``segment`` and return its statements, or raise the first reason it fails.

    ``expected_qualifying_data`` is what the closing quote must be over: None means an
    ordinary checkpoint (bound to the head entry); a caller's nonce comes with
    ``freshness_error=FreshnessError``.
    """
    start, start_clock = _verify_ends(segment, keys)
    checks = ["anchor-quote"] if segment.anchor else []
    checks.append("hash-chain")
    head = segment.head
    expected = (
        checkpoint_qualifying_data(head.seq, head.head)
        if expected_qualifying_data is None
        else expected_qualifying_data
    )
    head_clock = _verify_checkpoint_quote(head, keys.ak, expected, freshness_error)
    checks.append("quote-signature")
    boots = {e.reset_count for e in segment.entries}
    if boots != {head_clock.reset_count}:
        raise LogIntegrityError(
            f"segment entries are from TPM boot(s) {sorted(boots)} but the quote is from boot "
            f"{head_clock.reset_count}; one segment covers one boot"
        )
    _verify_replay(segment, keys, start)
    checks.append("pcr-replay")
    statements = _verify_entries(segment.entries, keys, allow_software_tpm)
    checks.append("entry-signatures")
    _check_clocks(statements, head_clock, floor=start_clock)
    checks.append("tpm-clock")
    roles = (keys.embassy_pcr, keys.log_pcr)
    return VerifiedSegment(
        tuple(statements),
        segment.entries,
        head_clock,
        head_clock.reset_count,
        tuple(checks),
        start_pcrs={p: start.get(p, bytes(32)) for p in roles},
        head_pcrs={p: head.quote.pcrs[p] for p in roles},
    )
