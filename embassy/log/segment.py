"""A log segment: the entries between two checkpoints of one TPM boot, and their replay.

Wire format (version 1)::

    {"v":1, "anchor": <checkpoint>|null, "entries": ["<b64 of exact entry bytes>", ...],
     "head": <checkpoint>}

``anchor`` null means the segment starts at the first entry of its boot, where the log's
PCRs were all zero. Otherwise the anchor's quoted PCR values are the replay's starting point
and ``entries[0]`` must directly follow the anchor's head. The functions here are pure and
raise :class:`LogIntegrityError` for a gap, reorder, duplicate or broken chain.

Group-committed batches (ADR 0016) replay as one extend each (:func:`extends`): a segment
holds whole batches only, since no quote can fall inside one (the daemon extends a batch
in one step, under the lock every checkpoint takes).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from embassy.errors import LogIntegrityError, WireFormatError
from embassy.log.entry import (
    ENTRY_VERSION,
    Checkpoint,
    LogEntry,
    batch_digest,
    parse_checkpoint,
    parse_entry,
)
from embassy.wire.codec import (
    JsonObject,
    b64decode,
    b64encode,
    field,
    only_fields,
    parse_json_object,
)

MAX_SEGMENT_ENTRIES = 1_000_000

# The documents that carry a segment out of the daemon: {"v":1,"type":<one of these>,
# "segment":{...}} (evidence adds "nonce"). Defined once, for the daemon and the verifier.
IDENTITY_DOCUMENT_TYPE = "embassy-identity-document"
EVIDENCE_TYPE = "embassy-evidence"
LOG_SEGMENT_TYPE = "embassy-log-segment"


@dataclass(frozen=True, slots=True)
class Segment:
    anchor: Checkpoint | None
    entries: tuple[LogEntry, ...]
    head: Checkpoint

    def to_json(self) -> JsonObject:
        return {
            "v": ENTRY_VERSION,
            "anchor": self.anchor.to_json() if self.anchor else None,
            "entries": [b64encode(e.raw) for e in self.entries],
            "head": self.head.to_json(),
        }


def parse_segment(obj: object, what: str = "segment") -> Segment:
    if not isinstance(obj, dict):
        raise WireFormatError(f"{what}: expected an object")
    only_fields(obj, {"v", "anchor", "entries", "head"}, what)
    if field(obj, "v", int, what) != ENTRY_VERSION:
        raise WireFormatError(f"{what}: unsupported version {obj['v']}")
    raw_entries = field(obj, "entries", list, what)
    if len(raw_entries) > MAX_SEGMENT_ENTRIES:
        raise WireFormatError(f"{what}: more than {MAX_SEGMENT_ENTRIES} entries")
    entries = tuple(
        parse_entry(b64decode(e, f"{what}.entries[{i}]")) for i, e in enumerate(raw_entries)
    )
    anchor_obj = obj.get("anchor")
    return Segment(
        anchor=None if anchor_obj is None else parse_checkpoint(anchor_obj, f"{what}.anchor"),
        entries=entries,
        head=parse_checkpoint(obj.get("head"), f"{what}.head"),
    )


def parse_segment_bytes(data: bytes) -> Segment:
    return parse_segment(parse_json_object(data, "segment"))


def extend(value: bytes, digest: bytes) -> bytes:
    """PCR extend in the SHA-256 bank: new = SHA-256(old || digest)."""
    return hashlib.sha256(value + digest).digest()


def check_chain(entries: Sequence[LogEntry], *, after_seq: int | None, after: bytes | None) -> None:
    """Check that ``entries`` follow each other (and the given predecessor) without a gap.

    ``after_seq``/``after`` name the entry just before ``entries[0]`` (None: no claim).
    """
    prev_seq, prev_digest = after_seq, after
    for entry in entries:
        if prev_seq is not None:
            if entry.seq == prev_seq:
                raise LogIntegrityError(f"entry seq {entry.seq} appears twice (duplicate)")
            if entry.seq < prev_seq:
                raise LogIntegrityError(f"entry seq {entry.seq} follows seq {prev_seq} (reordered)")
            if entry.seq != prev_seq + 1:
                missing = entry.seq - prev_seq - 1
                raise LogIntegrityError(
                    f"entry seq {entry.seq} follows seq {prev_seq}: {missing} entries missing "
                    "or out of order"
                )
        if prev_digest is not None and entry.prev != prev_digest:
            raise LogIntegrityError(
                f"entry seq {entry.seq} does not chain to its predecessor "
                "(an entry was changed, dropped or inserted)"
            )
        prev_seq, prev_digest = entry.seq, entry.digest


def extends(entries: Sequence[LogEntry]) -> Iterator[tuple[LogEntry, int, bytes]]:
    """The PCR extends ``entries`` stand for, in order: ``(last entry, pcr, digest)``.

    An entry without ``batch`` is one extend of its own digest. Entries with ``batch``
    ``[first, last]`` must be exactly seqs first..last, consecutive here, in order, all
    claiming that range and one PCR; together they are one extend of
    :func:`~embassy.log.entry.batch_digest`. Anything else is a :class:`LogIntegrityError`
    naming the entry: a range that does not contain its entry, a batch entered in its
    middle (a segment or anchor inside a batch) or cut off before its last entry, an entry
    of a batch's range claiming another batch or none (overlapping ranges), a reordered or
    missing member, members extended into different PCRs.
    """
    i = 0
    while i < len(entries):
        entry = entries[i]
        if entry.batch is None:
            yield entry, entry.pcr, entry.digest
            i += 1
            continue
        first, last = entry.batch
        name = f"batch [{first},{last}]"
        if not first <= entry.seq <= last:
            raise LogIntegrityError(f"entry seq {entry.seq} claims {name}, which does not hold it")
        if entry.seq != first:
            raise LogIntegrityError(
                f"entry seq {entry.seq} is inside {name} but the entries before it (from seq "
                f"{first}) are not here: a segment or its anchor falls inside a batch, which "
                "no quote can (a batch is extended at once)"
            )
        members = entries[i : i + last - first + 1]
        for k, member in enumerate(members):
            if member.seq != first + k:
                raise LogIntegrityError(
                    f"{name}: entry seq {member.seq} stands where seq {first + k} belongs "
                    "(reordered, dropped or inserted)"
                )
            if member.batch != entry.batch:
                claim = (
                    "no batch" if member.batch is None else "batch [{},{}]".format(*member.batch)
                )
                raise LogIntegrityError(
                    f"entry seq {member.seq} lies in {name} but claims {claim} (overlapping "
                    "or lying batch ranges)"
                )
            if member.pcr != entry.pcr:
                raise LogIntegrityError(
                    f"{name}: entry seq {member.seq} is extended into PCR {member.pcr}, the "
                    f"batch into PCR {entry.pcr}; a batch is one extend of one PCR"
                )
        if len(members) != last - first + 1:
            raise LogIntegrityError(
                f"{name} is cut off after entry seq {members[-1].seq}: its last "
                f"{last - members[-1].seq} entries are missing (a segment cannot end inside "
                "a batch)"
            )
        yield members[-1], entry.pcr, batch_digest(first, last, [m.digest for m in members])
        i += len(members)


def replay(
    entries: Sequence[LogEntry], start: Mapping[int, bytes], pcrs: Iterable[int]
) -> dict[int, bytes]:
    """Replay ``entries`` into ``pcrs`` from ``start`` (missing PCRs start at zero), one
    extend per entry committed alone and one per batch (:func:`extends`)."""
    values = {pcr: start.get(pcr, bytes(32)) for pcr in pcrs}
    for entry, pcr, digest in extends(entries):
        if pcr not in values:
            raise LogIntegrityError(
                f"entry seq {entry.seq} extends PCR {pcr}, not one of the log's PCRs"
            )
        values[pcr] = extend(values[pcr], digest)
    return values


def last_commit(entries: Sequence[LogEntry]) -> int:
    """How many entries at the end of ``entries`` were committed together as the last one
    extend (1 for an entry alone, the batch's size for a batch), from the last entry's own
    claim; whether that batch is whole is :func:`extends`' to check."""
    if not entries:
        return 0
    batch = entries[-1].batch
    return 1 if batch is None else min(len(entries), entries[-1].seq - batch[0] + 1)
