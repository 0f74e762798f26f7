"""A log segment: the entries between two checkpoints of one TPM boot, and their replay.

Wire format (version 1)::

    {"v":1, "anchor": <checkpoint>|null, "entries": ["<b64 of exact entry bytes>", ...],
     "head": <checkpoint>}

``anchor`` null means the segment starts at the first entry of its boot, where the log's
PCRs were all zero. Otherwise the anchor's quoted PCR values are the replay's starting point
and ``entries[0]`` must directly follow the anchor's head. The functions here are pure and
raise :class:`LogIntegrityError` for a gap, reorder, duplicate or broken chain.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from embassy.errors import LogIntegrityError, WireFormatError
from embassy.log.entry import (
    ENTRY_VERSION,
    Checkpoint,
    LogEntry,
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


def replay(
    entries: Iterable[LogEntry], start: Mapping[int, bytes], pcrs: Iterable[int]
) -> dict[int, bytes]:
    """Replay ``entries`` into ``pcrs`` from ``start`` (missing PCRs start at zero)."""
    values = {pcr: start.get(pcr, bytes(32)) for pcr in pcrs}
    for entry in entries:
        if entry.pcr not in values:
            raise LogIntegrityError(
                f"entry seq {entry.seq} extends PCR {entry.pcr}, not one of the log's PCRs"
            )
        values[entry.pcr] = extend(values[entry.pcr], entry.digest)
    return values
