"""Log entries and checkpoints: the wire format, defined once (version 1).

An entry is one line of canonical JSON::

    {"data":"<b64>","pcr":14,"prev":"<hex>","reset_count":3,"seq":7,"type":"statement","v":1}

``prev`` is the SHA-256 of the previous entry's exact bytes (32 zero bytes for the first
entry ever), so the file is a hash chain. The same SHA-256 of the entry's exact bytes is
what the daemon extends into PCR ``pcr``, so the TPM holds the chain head the way it holds
an IMA measurement list: replaying the entries of one boot from all-zero PCRs reproduces
the quoted values. ``reset_count`` is the TPM's reset count when the entry was written; a
new value starts a new PCR chain (a new boot) while the hash chain goes on.

Group commit (ADR 0016): statements appended together form a *batch* of consecutive
entries, each of which carries the batch's ``"batch":[first,last]``; the PCR is then
extended once, with :func:`batch_digest` over the batch's entry digests in order, instead
of once per entry. A batch of one carries no ``batch`` field and is extended with its entry
digest, exactly as before batches existed, so older logs read and replay unchanged.

A checkpoint is a TPM quote over the log's PCRs taken when the head was entry ``seq``;
its qualifying data is :func:`checkpoint_qualifying_data`, which binds the head.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field

from embassy.attest.types import Quote
from embassy.errors import WireFormatError
from embassy.wire.codec import (
    JsonObject,
    b64decode,
    b64encode,
    canonical_json,
    field,
    hex_decode,
    json_string,
    only_fields,
    parse_json_object,
)

ENTRY_VERSION = 1
GENESIS = bytes(32)
MAX_ENTRY_BYTES = 8 * 1024 * 1024
_CHECKPOINT_DOMAIN = b"embassy-checkpoint-v1\x00"
_BATCH_DOMAIN = b"embassy-log-batch-v1\x00"
# The most entries one batch may hold: the daemon commits at most this many statements at
# once, and a verifier never buffers more than this many entries to replay one extend.
MAX_BATCH_ENTRIES = 256


class EntryType(enum.StrEnum):
    """What an entry records. Each type goes to exactly one PCR role."""

    EMBASSY_START = "embassy-start"  # the measurement, at every daemon start
    LAUNCH_IMAGE = "launch-image"  # workload launch inputs, before it starts ...
    LAUNCH_COMMAND = "launch-command"
    LAUNCH_ENV = "launch-env"
    LAUNCH_PORTS = "launch-ports"
    LAUNCH_LIMITS = "launch-limits"
    LAUNCH_OPTIONS = "launch-options"
    LAUNCH_SEAL_POLICY = "launch-seal-policy"
    LAUNCH_SEPARATOR = "launch-separator"  # ... closed by a separator
    STATEMENT = "statement"  # a DSSE envelope the embassy signed


@dataclass(frozen=True, slots=True)
class LogEntry:
    seq: int
    prev: bytes
    reset_count: int
    pcr: int
    type: EntryType
    data: bytes
    raw: bytes
    # (first, last) seq of the group-committed batch this entry belongs to; None for a
    # batch of one (the entry's own digest is extended, as before batches existed).
    batch: tuple[int, int] | None = None
    # Computed once: the chain check, the replay and the log's next position each need it.
    _digest: bytes = dataclass_field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_digest", hashlib.sha256(self.raw).digest())

    @property
    def digest(self) -> bytes:
        """SHA-256 of the exact entry bytes: the chain link, and the PCR extend value of an
        entry committed alone (a batch's extend is :func:`batch_digest`)."""
        return self._digest


def batch_digest(first: int, last: int, digests: Sequence[bytes]) -> bytes:
    """What one PCR extend records for batch ``[first, last]``: a domain-separated SHA-256
    over its range and its entries' digests in order. The range is inside the hash, so a
    batch cannot be replayed as another range; the domain keeps it apart from any entry
    digest (an entry line starts with ``{``)."""
    if last - first + 1 != len(digests) or last <= first:
        raise ValueError(f"batch [{first},{last}] with {len(digests)} digests")
    return hashlib.sha256(
        _BATCH_DOMAIN + first.to_bytes(8, "big") + last.to_bytes(8, "big") + b"".join(digests)
    ).digest()


def encode_entry(
    *,
    seq: int,
    prev: bytes,
    reset_count: int,
    pcr: int,
    type: EntryType,
    data: bytes,
    batch: tuple[int, int] | None = None,
) -> LogEntry:
    data_b64 = b64encode(data)
    raw = _entry_line(
        seq=seq,
        prev_hex=prev.hex(),
        reset_count=reset_count,
        pcr=pcr,
        type=type,
        data_b64=data_b64,
        batch=batch,
    )
    if raw is None:  # not the plain types written directly: the general encoder
        obj: JsonObject = {
            "v": ENTRY_VERSION,
            "seq": seq,
            "prev": prev.hex(),
            "reset_count": reset_count,
            "pcr": pcr,
            "type": type.value,
            "data": data_b64,
        }
        if batch is not None:
            obj["batch"] = list(batch)
        raw = canonical_json(obj)
    return LogEntry(seq, prev, reset_count, pcr, type, data, raw, batch)


def _entry_line(
    *,
    seq: int,
    prev_hex: str,
    reset_count: int,
    pcr: int,
    type: EntryType,
    data_b64: str,
    batch: tuple[int, int] | None,
) -> bytes | None:
    """The entry's canonical JSON written directly (keys in sorted order), or None unless
    every field is of exactly the type the format has (an int that is no bool, ...)."""
    if not (_ints(seq, reset_count, pcr) and isinstance(type, EntryType)):
        return None
    if batch is None:
        head = '{"data":"'
    elif len(batch) == 2 and _ints(*batch):
        head = f'{{"batch":[{batch[0]},{batch[1]}],"data":"'
    else:
        return None
    return "".join(
        (
            head,
            data_b64,
            f'","pcr":{pcr},"prev":"{prev_hex}","reset_count":{reset_count},"seq":{seq},"type":',
            json_string(type.value),
            f',"v":{ENTRY_VERSION}}}',
        )
    ).encode("utf-8")


def _ints(*values: object) -> bool:
    return all(type(v) is int for v in values)


def parse_entry(raw: bytes) -> LogEntry:
    if len(raw) > MAX_ENTRY_BYTES:
        raise WireFormatError(f"log entry: {len(raw)} bytes exceeds {MAX_ENTRY_BYTES}")
    obj = parse_json_object(raw, "log entry")
    only_fields(
        obj, {"v", "seq", "prev", "reset_count", "pcr", "type", "data", "batch"}, "log entry"
    )
    if field(obj, "v", int, "log entry") != ENTRY_VERSION:
        raise WireFormatError(f"log entry: unsupported version {obj['v']}")
    seq = field(obj, "seq", int, "log entry")
    reset_count = field(obj, "reset_count", int, "log entry")
    pcr = field(obj, "pcr", int, "log entry")
    if seq < 0 or reset_count < 0 or not 0 <= pcr <= 23:
        raise WireFormatError("log entry: seq, reset_count or pcr out of range")
    kind = field(obj, "type", str, "log entry")
    try:
        entry_type = EntryType(kind)
    except ValueError:
        raise WireFormatError(f"log entry: unknown type {kind!r}") from None
    return LogEntry(
        seq=seq,
        prev=hex_decode(field(obj, "prev", str, "log entry"), "log entry.prev", size=32),
        reset_count=reset_count,
        pcr=pcr,
        type=entry_type,
        data=b64decode(field(obj, "data", str, "log entry"), "log entry.data"),
        raw=raw,
        batch=_parse_batch(obj) if "batch" in obj else None,
    )


def _parse_batch(obj: JsonObject) -> tuple[int, int]:
    """``[first, last]``: two seqs, first < last (a batch of one has no field: one encoding
    per log), at most :data:`MAX_BATCH_ENTRIES` entries. Whether the entry is in the range
    and the batch whole is the replay's to check (:mod:`embassy.log.segment`)."""
    value = field(obj, "batch", list, "log entry")
    if len(value) != 2 or not all(type(v) is int for v in value):
        raise WireFormatError("log entry.batch: expected [first, last], two integers")
    first, last = value
    if first < 0 or last <= first:
        raise WireFormatError(
            f"log entry.batch: [{first},{last}] is not a range of two or more entries "
            "(an entry committed alone carries no batch)"
        )
    if last - first + 1 > MAX_BATCH_ENTRIES:
        raise WireFormatError(
            f"log entry.batch: [{first},{last}] holds more than {MAX_BATCH_ENTRIES} entries"
        )
    return first, last


def checkpoint_qualifying_data(seq: int, head: bytes) -> bytes:
    """Qualifying data of a checkpoint quote: binds the head entry's position and digest."""
    return hashlib.sha256(_CHECKPOINT_DOMAIN + seq.to_bytes(8, "big") + head).digest()


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A quote taken when the log head was entry ``seq`` with digest ``head``."""

    seq: int
    head: bytes
    quote: Quote

    def to_json(self) -> JsonObject:
        return {
            "v": ENTRY_VERSION,
            "seq": self.seq,
            "head": self.head.hex(),
            **quote_to_json(self.quote),
        }


def quote_to_json(quote: Quote) -> JsonObject:
    return {
        "quote": {
            "attest": b64encode(quote.attest),
            "signature": b64encode(quote.signature),
            "pcrs": {str(i): v.hex() for i, v in sorted(quote.pcrs.items())},
        }
    }


def parse_quote(obj: object, what: str) -> Quote:
    if not isinstance(obj, dict):
        raise WireFormatError(f"{what}: expected an object")
    only_fields(obj, {"attest", "signature", "pcrs"}, what)
    pcrs_obj = field(obj, "pcrs", dict, what)
    pcrs: dict[int, bytes] = {}
    for key, value in pcrs_obj.items():
        if not key.isdigit() or not 0 <= int(key) <= 23 or str(int(key)) != key:
            raise WireFormatError(f"{what}.pcrs: bad PCR index {key!r}")
        pcrs[int(key)] = hex_decode(value, f"{what}.pcrs[{key}]", size=32)
    return Quote(
        attest=b64decode(field(obj, "attest", str, what), f"{what}.attest"),
        signature=b64decode(field(obj, "signature", str, what), f"{what}.signature"),
        pcrs=pcrs,
    )


def parse_checkpoint(obj: object, what: str = "checkpoint") -> Checkpoint:
    if not isinstance(obj, dict):
        raise WireFormatError(f"{what}: expected an object")
    only_fields(obj, {"v", "seq", "head", "quote"}, what)
    if field(obj, "v", int, what) != ENTRY_VERSION:
        raise WireFormatError(f"{what}: unsupported version {obj['v']}")
    seq = field(obj, "seq", int, what)
    if seq < 0:
        raise WireFormatError(f"{what}.seq: negative")
    return Checkpoint(
        seq=seq,
        head=hex_decode(field(obj, "head", str, what), f"{what}.head", size=32),
        quote=parse_quote(obj.get("quote"), f"{what}.quote"),
    )


def parse_checkpoint_bytes(raw: bytes) -> Checkpoint:
    return parse_checkpoint(parse_json_object(raw, "checkpoint"))
